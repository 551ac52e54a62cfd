"""What was compiled, and what can run now."""

from __future__ import annotations

from typing import Any, Dict

from ._ext import C


def backends() -> Dict[str, Dict[str, Any]]:
    """Reports each backend: ``compiled`` (built into this installation) and
    ``usable`` (can run now), with details.

    >>> dspark.backends()["cuda"]["usable"]
    False
    """
    info = C.build_info()
    devices, reason = C.cuda_device_count() if info["cuda_compiled"] else (0, "built without CUDA")
    archs = [a for a in info["cuda_archs"].split(",") if a]
    runtime = info["cuda_runtime_version"]
    driver = C.cuda_driver_version()
    return {
        "cpu": {"compiled": True, "usable": True, "threads": C.num_threads(), "compiler": info["compiler"]},
        "cuda": {
            "compiled": bool(info["cuda_compiled"]),
            "usable": bool(info["cuda_compiled"]) and devices > 0,
            "archs": archs,
            "runtime_version": _version(runtime),
            "driver_version": _version(driver),  # the CUDA version the driver supports; None: no driver
            "devices": devices,
            "reason": "" if devices > 0 else reason,
        },
    }


def _version(v: int):
    return f"{v // 1000}.{v % 1000 // 10}" if v else None


def num_threads() -> int:
    """Worker threads of the CPU backend (env DSPARK_NUM_THREADS, default: all cores)."""
    return int(C.num_threads())


def set_num_threads(n: int) -> None:
    """Sets the worker threads of the CPU backend."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"set_num_threads: n must be a positive int, got {n!r}")
    C.set_num_threads(n)
