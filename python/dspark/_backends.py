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
        "cpu": {"compiled": True, "usable": True, "threads": C.num_threads(), "compiler": info["compiler"],
                "isa": C.cpu_isa(), "isas": list(C.cpu_isas_supported())},
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


def cpu_isa() -> str:
    """The instruction set whose CPU kernels run (baseline, avx2, avx512,
    avx512bf16): the widest this CPU has, or DSPARK_CPU_ISA."""
    return str(C.cpu_isa())


def set_cpu_isa(name: str) -> None:
    """Runs the CPU kernels compiled for ``name`` (one of
    ``backends()["cpu"]["isas"]``). The ops that decide sampled tokens give the
    same bits on every ISA; matrix products differ in rounding."""
    if not isinstance(name, str):
        raise TypeError(f"set_cpu_isa: argument 'name' must be a str, got {type(name).__name__}")
    C.set_cpu_isa(name)


def set_num_threads(n: int) -> None:
    """Sets the worker threads of the CPU backend."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"set_num_threads: n must be a positive int, got {n!r}")
    C.set_num_threads(n)
