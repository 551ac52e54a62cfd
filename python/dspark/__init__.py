"""dspark: fast, exactly lossless DSpark speculative decoding for PyTorch.

- ``dspark.ops``: the kernels (CPU and CUDA backends) as torch.library custom ops.
- ``dspark.reference``: plain PyTorch oracles of every op.
- ``dspark.backends()``: what this build compiled and what is usable now.
"""

from __future__ import annotations

from . import ops, reference
from ._backends import backends, cpu_isa, num_threads, set_cpu_isa, set_num_threads

__version__ = "0.1.0"

__all__ = ["backends", "cpu_isa", "num_threads", "ops", "reference", "set_cpu_isa", "set_num_threads", "__version__"]
