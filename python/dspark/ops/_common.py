"""Validation shared by every op family: tensors, dtypes, devices, token ids
and temperatures, each error naming the argument."""

from __future__ import annotations

import math
import numbers
from typing import Iterable, List, NamedTuple, Optional, Tuple

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def require_tensor(op: str, name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: argument '{name}' must be a torch.Tensor, got {type(t).__name__}")
    return t


def float_matrix(op: str, name: str, t: object, device: torch.device) -> torch.Tensor:
    t = require_tensor(op, name, t)
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: argument '{name}' must be float32, float16 or bfloat16, got {t.dtype}")
    if t.dim() != 2:
        raise ValueError(f"{op}: argument '{name}' must be 2-D, got shape {list(t.shape)}")
    if t.device != device:
        raise ValueError(f"{op}: argument '{name}' must be on {device}, got {t.device}")
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def on_device(op: str, name: str, t: torch.Tensor, device: torch.device) -> torch.Tensor:
    if t.device != device:
        raise ValueError(f"{op}: argument '{name}' must be on {device}, got {t.device}")
    return t.contiguous()


def compiling() -> bool:
    return torch.compiler.is_compiling()


def show(value: object, limit: int = 60) -> str:
    """repr(value) for a message, shortened."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def int_arg(op: str, name: str, value: object, low: Optional[int] = None, high: Optional[int] = None) -> int:
    """An integer scalar argument (Python or NumPy integers; not bool, not a float
    with an integral value) in ``[low, high]``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{op}: argument '{name}' must be an int, got {type(value).__name__} {show(value)}")
    value = int(value)
    if (low is not None and value < low) or (high is not None and value > high):
        span = f"[{low if low is not None else '-inf'}, {high if high is not None else 'inf'}]"
        raise ValueError(f"{op}: argument '{name}' must be in {span}, got {show(value)}")
    return value


def real_arg(op: str, name: str, value: object, *, positive: bool = False, non_negative: bool = False,
             finite: bool = True) -> float:
    """A real scalar argument (int or float, not bool), never NaN; optionally
    finite, positive or non-negative."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{op}: argument '{name}' must be a number, got {type(value).__name__} {show(value)}")
    try:
        value = float(value)
    except OverflowError:  # an int beyond the float range
        value = math.inf if value > 0 else -math.inf
    if math.isnan(value) or (finite and math.isinf(value)) or (positive and not value > 0) or (
            non_negative and not value >= 0):
        what = ("a positive" if positive else "a non-negative" if non_negative else "a") + (
            " finite" if finite else "") + " number"
        raise ValueError(f"{op}: argument '{name}' must be {what}, got {show(value)}")
    return value


def choice_arg(op: str, name: str, value: object, choices: Iterable[str]) -> str:
    """A string argument that names one of ``choices``."""
    choices = sorted(choices)
    if not isinstance(value, str):
        raise TypeError(f"{op}: argument '{name}' must be one of {choices}, got {type(value).__name__} {show(value)}")
    if value not in choices:
        raise ValueError(f"{op}: argument '{name}' must be one of {choices}, got {show(value)}")
    return value


def float_tensor(op: str, name: str, t: object, device: torch.device, dim: int) -> torch.Tensor:
    t = require_tensor(op, name, t)
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: argument '{name}' must be float32, float16 or bfloat16, got {t.dtype}")
    if t.dim() != dim:
        raise ValueError(f"{op}: argument '{name}' must have {dim} dimensions, got shape {list(t.shape)}")
    if t.device != device:
        raise ValueError(f"{op}: argument '{name}' must be on {device}, got {t.device}")
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def token_tensor(op: str, name: str, t: object, device: torch.device) -> torch.Tensor:
    t = require_tensor(op, name, t)
    if t.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{op}: argument '{name}' must be int32 or int64, got {t.dtype}")
    return on_device(op, name, t, device)


def temperature_args(op: str, temperature, device: torch.device):
    if isinstance(temperature, torch.Tensor):
        if not temperature.is_floating_point():
            raise TypeError(f"{op}: argument 'temperature' must be a float tensor, got {temperature.dtype}")
        return 1.0, on_device(op, "temperature", temperature.to(torch.float32), device)
    if isinstance(temperature, numbers.Real) and not isinstance(temperature, bool):
        if not float(temperature) >= 0.0:
            raise ValueError(f"{op}: argument 'temperature' must be >= 0, got {temperature}")
        return float(temperature), None
    raise TypeError(f"{op}: argument 'temperature' must be a float or a tensor, got {type(temperature).__name__}")


def vocab_map(op: str, t: object, device: torch.device) -> torch.Tensor:
    """A draft vocabulary ``[V_d]`` (target ids of the draft columns) as int32 on
    ``device``; the values are checked by the kernels' validation (CPU) or by
    :func:`check_vocab_map_on_device` (CUDA)."""
    t = require_tensor(op, "draft_vocab", t)
    if t.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{op}: argument 'draft_vocab' must be int32 or int64, got {t.dtype}")
    if t.dim() != 1 or t.numel() < 1:
        raise ValueError(f"{op}: argument 'draft_vocab' must be 1-D with V_d >= 1 ids, got shape {list(t.shape)}")
    return on_device(op, "draft_vocab", t.to(torch.int32), device)


def check_vocab_map_on_device(op: str, draft_vocab: torch.Tensor, vocab: int) -> None:
    """The checks the C++ layer makes on the host for a CUDA draft vocabulary:
    ids in [0, V) and distinct (one host synchronisation)."""
    bad_range = bool(((draft_vocab < 0) | (draft_vocab >= vocab)).any())
    if bad_range:
        raise ValueError(f"{op}: argument 'draft_vocab' holds token ids outside the vocabulary [0, {vocab})")
    if int(torch.unique(draft_vocab).numel()) != draft_vocab.numel():
        raise ValueError(f"{op}: argument 'draft_vocab' holds a token id twice")


class Truncation(NamedTuple):
    """top_k / top_p / min_p as the kernels take them: a scalar, or an ``[R]``
    tensor that replaces it (int32 / float32 on the op's device)."""

    top_k: int
    top_ks: Optional[torch.Tensor]
    top_p: float
    top_ps: Optional[torch.Tensor]
    min_p: float
    min_ps: Optional[torch.Tensor]

    def flags_on_device(self, columns: int) -> List[Tuple[torch.Tensor, str]]:
        """(flag, message) pairs for the value checks of per-request tensors
        (the checks the C++ layer makes on the host for CPU tensors)."""
        out = []
        if self.top_ks is not None:
            out.append((((self.top_ks < 0) | (self.top_ks > columns)).any(),
                        f"argument 'top_k' must be in [0, {columns}] (0: off)"))
        if self.top_ps is not None:
            out.append((~((self.top_ps > 0) & (self.top_ps <= 1)).all(), "argument 'top_p' must be in (0, 1] (1: off)"))
        if self.min_ps is not None:
            out.append((~((self.min_ps >= 0) & (self.min_ps <= 1)).all(), "argument 'min_p' must be in [0, 1] (0: off)"))
        return out


def truncation_args(op: str, top_k: object, top_p: object, min_p: object, num_requests: int, columns: int,
                    device: torch.device) -> Truncation:
    """Checks top_k (int in [0, columns], 0: off), top_p (float in (0, 1], 1: off)
    and min_p (float in [0, 1], 0: off), each a Python number or an ``[R]``
    tensor (values of tensors: see :meth:`Truncation.flags_on_device`)."""

    def per_request(name: str, t: torch.Tensor, integral: bool) -> torch.Tensor:
        if integral and (t.is_floating_point() or t.dtype == torch.bool or t.is_complex()):
            raise TypeError(f"{op}: argument '{name}' must be an integer tensor, got {t.dtype}")
        if not integral and not t.is_floating_point():
            raise TypeError(f"{op}: argument '{name}' must be a float tensor, got {t.dtype}")
        if t.dim() != 1 or t.shape[0] != num_requests:
            raise ValueError(f"{op}: argument '{name}' must have shape [R] = [{num_requests}], got {list(t.shape)}")
        if integral:  # out-of-range values stay out of range in int32, for the value checks
            t = t.clamp(-1, columns + 1)
        return on_device(op, name, t.to(torch.int32 if integral else torch.float32), device)

    if isinstance(top_k, torch.Tensor):
        k, ks = 0, per_request("top_k", top_k, True)
    elif isinstance(top_k, int) and not isinstance(top_k, bool):
        if not 0 <= top_k <= columns:
            raise ValueError(f"{op}: argument 'top_k' must be in [0, {columns}] (0: off), got {top_k}")
        k, ks = top_k, None
    else:
        raise TypeError(f"{op}: argument 'top_k' must be an int or a tensor, got {type(top_k).__name__}")
    floats = {}
    for name, value, low_open, default in (("top_p", top_p, True, 1.0), ("min_p", min_p, False, 0.0)):
        if isinstance(value, torch.Tensor):
            floats[name] = (default, per_request(name, value, False))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            v = float(value)
            ok = (0.0 < v <= 1.0) if low_open else (0.0 <= v <= 1.0)  # NaN fails both
            if not ok:
                interval = "(0, 1] (1: off)" if low_open else "[0, 1] (0: off)"
                raise ValueError(f"{op}: argument '{name}' must be in {interval}, got {value}")
            floats[name] = (v, None)
        else:
            raise TypeError(f"{op}: argument '{name}' must be a float or a tensor, got {type(value).__name__}")
    return Truncation(k, ks, *floats["top_p"], *floats["min_p"])
