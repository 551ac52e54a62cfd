"""schedule_prefix: how many drafts each request verifies (csrc/{cpu,cuda,ops}/schedule_prefix)."""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple, Union

import torch

from .._ext import C
from .._tensor import is_capturing, stream_handle, view
from ._common import choice_arg, compiling, int_arg, on_device, real_arg, require_tensor

__all__ = ["SCHEDULE_MODES", "ScheduleOutput", "schedule_prefix"]


SCHEDULE_MODES = {"causal": 0, "global": 1, "budget": 2, "threshold": 3, "fixed": 4}


class ScheduleOutput(NamedTuple):
    """Result of :func:`schedule_prefix`.

    lengths: ``[R]`` int32, draft tokens each request verifies (a prefix).
    throughput: ``[1]`` float32, expected tokens per second of those lengths by
        the ``sps`` table: ``(R + sum of admitted a) * SPS(R + sum lengths)``
        (0 without a table, or when the batch is past the table's end).
    capacity: ``[1]`` int32, the total of ``lengths``.
    """

    lengths: torch.Tensor
    throughput: torch.Tensor
    capacity: torch.Tensor


def _schedule_launch(conf, cap, mode: int, sps, budget: int, budgets, threshold: float,
                     lengths, throughput, capacity) -> None:
    op = "schedule_prefix"
    C.schedule_prefix(
        view(conf, op, "conf"), view(cap, op, "cap"), mode, view(sps, op, "sps"), budget,
        view(budgets, op, "budget"), threshold, view(lengths, op, "lengths"),
        view(throughput, op, "throughput"), view(capacity, op, "capacity"), stream_handle(conf.device),
    )


def _schedule_allocate(conf: torch.Tensor):
    device = conf.device
    return (torch.empty(conf.shape[0], dtype=torch.int32, device=device),
            torch.empty(1, dtype=torch.float32, device=device),
            torch.empty(1, dtype=torch.int32, device=device))


@torch.library.custom_op("dspark::schedule_prefix", mutates_args=())
def _schedule_prefix_op(conf: torch.Tensor, cap: Optional[torch.Tensor], mode: int, sps: Optional[torch.Tensor],
                        budget: int, budgets: Optional[torch.Tensor], threshold: float
                        ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    lengths, throughput, capacity = _schedule_allocate(conf)
    _schedule_launch(conf, cap, mode, sps, budget, budgets, threshold, lengths, throughput, capacity)
    return lengths, throughput, capacity


@_schedule_prefix_op.register_fake
def _schedule_prefix_fake(conf, cap, mode, sps, budget, budgets, threshold):
    return _schedule_allocate(conf)


@torch.library.custom_op("dspark::schedule_prefix_out", mutates_args=("lengths", "throughput", "capacity"))
def _schedule_prefix_out_op(conf: torch.Tensor, cap: Optional[torch.Tensor], mode: int, sps: Optional[torch.Tensor],
                            budget: int, budgets: Optional[torch.Tensor], threshold: float, lengths: torch.Tensor,
                            throughput: torch.Tensor, capacity: torch.Tensor) -> None:
    _schedule_launch(conf, cap, mode, sps, budget, budgets, threshold, lengths, throughput, capacity)


@_schedule_prefix_out_op.register_fake
def _schedule_prefix_out_fake(*args) -> None:
    return None


def schedule_prefix(
    conf: torch.Tensor,
    *,
    mode: str = "causal",
    sps: Optional[torch.Tensor] = None,
    budget: Union[int, torch.Tensor, None] = None,
    threshold: Optional[float] = None,
    cap: Optional[torch.Tensor] = None,
    out: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None,
    validate: bool = True,
) -> ScheduleOutput:
    """Chooses how many draft tokens each request verifies (DSPARK.md, section 3).

    Candidates are the positions ``j <= min(gamma, cap[r])`` whose prefix
    survival ``a[r][j] = c[r][1] * ... * c[r][j]`` is > 0 (``c`` clamped to
    [0, 1], NaN as 0), taken in order of ``a`` descending, then ``j``, then ``r``
    ascending, so each request's admitted positions are a prefix.

    Modes:
        ``causal``: the paper's Algorithm 1 over ``sps``: admit while
            ``theta = (R + sum a) * SPS(R + admitted)`` strictly increases; stop at
            the first step that does not (the early stop keeps it lossless) or
            whose batch is past the table's end.
        ``global``: the best ``theta`` over all steps, no early stop (the capacity
            search of the asynchronous scheduler; not lossless by itself).
        ``budget``: the first ``min(budget, #candidates)`` candidates; ``budget``
            may be a one-element device tensor, so no host synchronisation.
        ``threshold``: verify up to the first position with ``c < threshold``.
        ``fixed``: verify ``min(gamma, cap)``.

    Args:
        conf: ``[R, gamma]`` conditional confidences (calibrated, not multiplied).
        sps: ``[B_max + 1]`` float32, target forward steps per second at ``B``
            batch tokens (required in causal and global mode).
        cap: ``[R]`` int32, most positions per request (remaining tokens, or its own
            block size).
        out: preallocated ``(lengths, throughput, capacity)``.

    One launch on CUDA (``R * gamma`` up to 16384 candidates), no allocation or
    host synchronisation; the CPU backend gives the same results.
    """
    op = "schedule_prefix"
    conf = require_tensor(op, "conf", conf)
    device = conf.device
    if device.type not in ("cpu", "cuda"):
        raise TypeError(f"{op}: argument 'conf' is on unsupported device {device} (cpu or cuda)")
    if not conf.is_floating_point():
        raise TypeError(f"{op}: argument 'conf' must be a float tensor, got {conf.dtype}")
    if conf.dim() != 2:
        raise ValueError(f"{op}: argument 'conf' must be [R, gamma], got shape {list(conf.shape)}")
    conf = conf.to(torch.float32).contiguous()
    choice_arg(op, "mode", mode, SCHEDULE_MODES)
    mode_code = SCHEDULE_MODES[mode]
    if cap is not None:
        cap = require_tensor(op, "cap", cap)
        if cap.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{op}: argument 'cap' must be an integer tensor, got {cap.dtype}")
        cap = on_device(op, "cap", cap.to(torch.int32), device)
    if sps is not None:
        sps = require_tensor(op, "sps", sps)
        if not sps.is_floating_point():
            raise TypeError(f"{op}: argument 'sps' must be a float tensor, got {sps.dtype}")
        sps = on_device(op, "sps", sps.to(torch.float32), device)
    elif mode in ("causal", "global"):
        raise ValueError(f"{op}: argument 'sps' (the throughput table) is required in {mode} mode")
    budget_value, budgets = 0, None
    if mode == "budget":
        if isinstance(budget, torch.Tensor):
            if budget.dtype not in (torch.int32, torch.int64):
                raise TypeError(f"{op}: argument 'budget' must be an integer tensor, got {budget.dtype}")
            if budget.numel() != 1:
                raise ValueError(f"{op}: argument 'budget' must have one element, got shape {list(budget.shape)}")
            budgets = on_device(op, "budget", budget.reshape(1), device)
        elif isinstance(budget, int) and not isinstance(budget, bool):
            budget_value = int_arg(op, "budget", budget, -(1 << 63), (1 << 63) - 1)  # < 0 admits nothing
        else:
            raise TypeError(f"{op}: argument 'budget' must be an int or a one-element tensor in budget mode, "
                            f"got {type(budget).__name__}")
    threshold_value = 0.0
    if mode == "threshold":
        if threshold is None:
            raise ValueError(f"{op}: argument 'threshold' is required in threshold mode")
        threshold_value = real_arg(op, "threshold", threshold, finite=False)
    if (validate and sps is not None and device.type == "cuda" and not compiling()
            and not is_capturing(device)):
        if not bool(((sps >= 0) & torch.isfinite(sps)).all()):
            raise ValueError(f"{op}: argument 'sps' must be finite and >= 0")
    args = (conf, cap, mode_code, sps, budget_value, budgets, threshold_value)
    if out is not None:
        if compiling():
            torch.ops.dspark.schedule_prefix_out(*args, *out)
        else:
            _schedule_launch(*args, *out)
        return ScheduleOutput(*out)
    if compiling():
        return ScheduleOutput(*torch.ops.dspark.schedule_prefix(*args))
    result = _schedule_allocate(conf)
    _schedule_launch(*args, *result)
    return ScheduleOutput(*result)
