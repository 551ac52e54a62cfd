"""Validation shared by every op family: tensors, dtypes, devices, token ids
and temperatures, each error naming the argument."""

from __future__ import annotations

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
    if isinstance(temperature, (int, float)) and not isinstance(temperature, bool):
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
