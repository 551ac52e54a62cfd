"""dspark: fast, exactly lossless DSpark speculative decoding for PyTorch.

- ``dspark.ops``: the kernels (CPU and CUDA backends) as torch.library custom ops.
- ``dspark.reference``: plain PyTorch oracles of every op.
- ``dspark.backends()``: what this build compiled and what is usable now.
"""

from __future__ import annotations

import os as _os
import sys as _sys


def _started_as_cli() -> bool:
    """Whether this process is ``python -m dspark ...`` (sys.orig_argv)."""
    argv = list(getattr(_sys, "orig_argv", []))
    return any(a == "-m" and b == "dspark" for a, b in zip(argv, argv[1:]))


# PyTorch's OpenMP threads (libgomp) spin for a while after every op, holding
# the cores that dspark's CPU ops want next (measured on a 2-core AMD EPYC: a
# verification forward over 128 tokens 14 % slower, paged attention in it
# twice as slow). Only when started as `python -m dspark` and before torch is
# loaded, a shorter spin is the default; a user's GOMP_SPINCOUNT or
# OMP_WAIT_POLICY wins, and `import dspark` in a user's program changes nothing.
if (_started_as_cli() and "torch" not in _sys.modules and "GOMP_SPINCOUNT" not in _os.environ
        and "OMP_WAIT_POLICY" not in _os.environ):
    _os.environ["GOMP_SPINCOUNT"] = "3000"

from . import ops, reference  # noqa: E402
from ._backends import backends, cpu_isa, num_threads, set_cpu_isa, set_num_threads  # noqa: E402

__version__ = "0.1.0"

__all__ = ["backends", "cpu_isa", "num_threads", "ops", "reference", "set_cpu_isa", "set_num_threads", "__version__"]
