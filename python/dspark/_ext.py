"""Loads the compiled extension dspark._C with an actionable error."""

from __future__ import annotations

try:
    from . import _C  # noqa: F401
except ImportError as error:  # pragma: no cover - depends on the installation
    raise ImportError(
        "dspark's compiled extension (dspark._C) could not be imported. Install dspark from "
        "source with `pip install .` (or `pip install -e .`) in the repository root; "
        f"original error: {error}"
    ) from error

C = _C
