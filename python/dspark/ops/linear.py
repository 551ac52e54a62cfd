"""linear: ``x W^T + b`` on the CPU with float32 accumulation
(csrc/{cpu,ops}/linear): the product dspark's models run 16-bit CPU weights on
where oneDNN cannot pack them, and float32 ones at a decoding step's few rows
on AVX2 CPUs or when asked (``models.common.DsparkWeight``,
``models.common.SplitWeight``, ``models.common.float32_few_rows_backend``)."""

from __future__ import annotations

import math
from typing import Optional

import torch

from .._ext import C
from .._tensor import view
from ._common import compiling, require_tensor

__all__ = ["linear"]

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def _linear_launch(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                   out: torch.Tensor) -> None:
    """The kernel on 2-D x and out, without Python checks (the C++ layer checks
    every tensor and raises naming it)."""
    C.linear(view(x, "linear", "x"), view(weight, "linear", "weight"), view(bias, "linear", "bias"),
             view(out, "linear", "out"))


@torch.library.custom_op("dspark::linear", mutates_args=())
def _linear_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    out = torch.empty(x.shape[0], weight.shape[0], dtype=x.dtype, device=x.device)
    _linear_launch(x, weight, bias, out)
    return out


@_linear_op.register_fake
def _linear_fake(x, weight, bias):
    return x.new_empty(x.shape[0], weight.shape[0])


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x W^T (+ bias)`` on the CPU: x ``[..., K]`` and weight ``[N, K]`` of
    float32, float16 or bfloat16 (a 16-bit weight under a float32 x is read as
    stored and widened in registers: half the bytes of a float32 copy), bias
    ``[N]`` or None. Accumulated in float32, rounded once to x's dtype; the
    result is ``[..., N]`` in x's dtype.

    On AVX2 each output is its row's dot product in an order fixed by K, not
    by the number of rows: a row's result is the same, bit for bit, whichever
    other rows share the call (a verification round's rows compute what
    one-token steps compute); under AVX-512 the same to float32 rounding.
    Made for a decoding step's few rows (register blocks, no cache tiling):
    at many rows a blocked matmul (oneDNN's) is faster. CPU tensors only; no
    autograd."""
    op = "linear"
    x = require_tensor(op, "x", x)
    weight = require_tensor(op, "weight", weight)
    for name, t in (("x", x), ("weight", weight), ("bias", bias)):
        if t is None:
            continue
        t = require_tensor(op, name, t)
        if t.dtype not in _FLOATS:
            raise TypeError(f"{op}: argument '{name}' must be float32, float16 or bfloat16, got {t.dtype}")
        if t.device.type != "cpu":
            raise ValueError(f"{op}: runs on the CPU only, argument '{name}' is on {t.device}")
    if x.dim() < 1:
        raise ValueError(f"{op}: argument 'x' must have at least 1 dimension, got a scalar")
    if weight.dim() != 2:
        raise ValueError(f"{op}: argument 'weight' must be 2-D [N, K], got shape {list(weight.shape)}")
    if weight.shape[1] != x.shape[-1]:
        raise ValueError(f"{op}: argument 'weight' must have K = {x.shape[-1]} (x's last dimension) columns, "
                         f"got shape {list(weight.shape)}")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[0]):
        raise ValueError(f"{op}: argument 'bias' must have shape [{weight.shape[0]}], got {list(bias.shape)}")
    lead = x.shape[:-1]
    x2 = x.reshape(math.prod(lead), x.shape[-1])
    if x2.shape[-1] > 1 and x2.stride(-1) != 1:
        x2 = x2.contiguous()
    weight = weight.contiguous()
    bias = bias.contiguous() if bias is not None else None
    if compiling():
        out = torch.ops.dspark.linear(x2, weight, bias)
    else:
        out = torch.empty(x2.shape[0], weight.shape[0], dtype=x.dtype)
        _linear_launch(x2, weight, bias, out)
    return out.view(*lead, weight.shape[0])
