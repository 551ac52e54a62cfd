"""``--dtype auto``: the model dtype that runs fastest on this device.

On CUDA it is bfloat16 (the tensor-core attention kernels take 16-bit
inputs). On the CPU it is bfloat16 when the CPU multiplies bfloat16 natively
(AVX512-BF16 or AMX) and a short measurement of the target's forward, in a
plain step and in a verification batch (the two dtypes' repeats interleaved),
says it is at least ``BFLOAT16_MARGIN`` (5 %) faster than float32 here;
float32 otherwise. The margin keeps a machine where the two are close from
flipping between them on timing noise, and prefers float32 when it costs
little: there greedy speculative output is bit-identical to plain decoding,
while in bfloat16 the linear layers round a verification row and a one-token
step differently and a near-tie can go either way (README, Exactness).
Whatever is chosen, speculative and plain decoding use the same dtype.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, Sequence, Tuple, Union

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
BFLOAT16_MARGIN = 0.05  # auto takes bfloat16 on the CPU only when it measures at least this much faster


def cpu_flags() -> set:
    """The CPU's feature flags (/proc/cpuinfo; empty elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def native_bfloat16() -> str:
    """The native bfloat16 matrix units of this CPU ("AMX", "AVX512-BF16"), or ""."""
    flags = cpu_flags()
    if "amx_bf16" in flags:
        return "AMX"
    if "avx512_bf16" in flags:
        return "AVX512-BF16"
    return ""


def choose(name: str, device: Union[str, torch.device], target=None, gamma: int = 7, repeats: int = 5
           ) -> Tuple[torch.dtype, str]:
    """(dtype, reason) for ``--dtype name``; ``auto`` measures ``target`` (a
    float32 TargetModel on the CPU) when the CPU has native bfloat16. For
    float32 on the CPU the reason also says how its linears run
    (``models.common.float32_backend``, measured on ``target``'s layer shapes
    when it is the first to ask)."""
    dtype, reason = _choose(name, device, target, gamma, repeats)
    if dtype == torch.float32 and torch.device(device).type == "cpu":
        from .models.common import float32_backend, float32_packing_report, layer_shapes

        float32_backend(layer_shapes(target) if isinstance(target, torch.nn.Module) else None)
        report = float32_packing_report()
        if report:
            reason += f"; {report}"
    return dtype, reason


def _choose(name: str, device: Union[str, torch.device], target, gamma: int, repeats: int
            ) -> Tuple[torch.dtype, str]:
    if name != "auto":
        if name not in DTYPES:
            raise ValueError(f"dtype must be auto or one of {sorted(DTYPES)}, got {name!r}")
        return DTYPES[name], f"{name} (as asked)"
    if torch.device(device).type == "cuda":
        return torch.bfloat16, "bfloat16 (auto: the GPU's tensor cores)"
    units = native_bfloat16()
    if not units:
        return torch.float32, "float32 (auto: this CPU has no native bfloat16 matrix units)"
    if target is None:
        return torch.bfloat16, f"bfloat16 (auto: {units})"
    cost = forward_costs(target, (torch.float32, torch.bfloat16), gamma, repeats)
    fp32, bf16 = cost[torch.float32], cost[torch.bfloat16]
    if bf16 < (1.0 - BFLOAT16_MARGIN) * fp32:
        return torch.bfloat16, (f"bfloat16 (auto: {units}; a plain step and a verification of {gamma + 1} tokens "
                                f"take {bf16 * 1e3:.1f} ms against {fp32 * 1e3:.1f} ms in float32)")
    return torch.float32, (f"float32 (auto: {units}, but a plain step and a verification of {gamma + 1} tokens "
                           f"take {fp32 * 1e3:.1f} ms against {bf16 * 1e3:.1f} ms in bfloat16 here, not "
                           f"{BFLOAT16_MARGIN:.0%} less)")


def forward_costs(target, dtypes: Sequence[torch.dtype], gamma: int, repeats: int) -> Dict[torch.dtype, float]:
    """Median seconds, per dtype, of a target forward over 1 token plus one over
    gamma + 1 (a copy of the target in that dtype; linear layers packed as the
    engine packs them), after a context of 128 tokens. After a warm-up of each,
    every repeat times each dtype once, so a drift of the machine moves them
    alike (``models.common.interleaved_medians``)."""
    from .models.common import interleaved_medians

    return interleaved_medians({dtype: _forward_step(target, dtype, gamma) for dtype in dtypes}, repeats)


def _forward_step(target, dtype: torch.dtype, gamma: int) -> Callable[[], None]:
    from .engine import SpeculativeEngine

    model = target if next(target.parameters()).dtype == dtype else _copy_as(target, dtype)
    engine = SpeculativeEngine(model, None, max_concurrency=1, max_model_len=256)
    forward, _ = engine.cost_probes(gamma + 1, context_len=128, draft=False, rows_per_request=gamma + 1)

    def step() -> None:
        forward(1)
        forward(gamma + 1)

    return step


def _copy_as(target, dtype: torch.dtype):
    import copy

    model = copy.deepcopy(target)
    return model.to(dtype)
