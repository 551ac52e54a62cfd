"""append_kv, paged_attention and rope over a paged KV cache
(csrc/{cpu,cuda,ops}/attention)."""

from __future__ import annotations

import math
from typing import Dict, Optional, Tuple, Union

import torch

from .._ext import C
from .._tensor import _DTYPE_CODES, is_capturing, stream_handle, view
from ._common import (choice_arg, compiling, float_tensor, int_arg, on_device, real_arg, require_tensor,
                      token_tensor)

__all__ = ["ATTENTION_MASKS", "append_kv", "paged_attention", "rope", "rope_inv_freq"]


ATTENTION_MASKS = {"causal": 0, "block": 1}
_FLOAT32_MAX = float(torch.finfo(torch.float32).max)


@torch.library.custom_op("dspark::append_kv", mutates_args=("k_cache", "v_cache"))
def _append_kv_op(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  slot_mapping: torch.Tensor) -> None:
    _append_kv_launch(k, v, k_cache, v_cache, slot_mapping)


@_append_kv_op.register_fake
def _append_kv_fake(k, v, k_cache, v_cache, slot_mapping) -> None:
    return None


def append_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
              slot_mapping: torch.Tensor, *, validate: bool = True) -> None:
    """Writes new keys and values ``[T, H_kv, D]`` into a paged cache
    ``[num_pages, page_size, H_kv, D]`` at flat slots ``page * page_size + offset``
    (``slot_mapping`` ``[T]`` int64); negative slots are skipped (padding)."""
    op = "append_kv"
    device = require_tensor(op, "k", k).device
    if device.type not in ("cpu", "cuda"):
        raise TypeError(f"{op}: argument 'k' is on unsupported device {device} (cpu or cuda)")
    k = float_tensor(op, "k", k, device, 3)
    v = float_tensor(op, "v", v, device, 3)
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        cache = float_tensor(op, name, cache, device, 4)
        if not cache.is_contiguous():
            raise ValueError(f"{op}: argument '{name}' must be contiguous")
    slot_mapping = require_tensor(op, "slot_mapping", slot_mapping)
    if slot_mapping.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{op}: argument 'slot_mapping' must be an integer tensor, got {slot_mapping.dtype}")
    slot_mapping = on_device(op, "slot_mapping", slot_mapping.to(torch.int64), device)
    if validate and device.type == "cuda" and not compiling() and not is_capturing(device):
        capacity = k_cache.shape[0] * k_cache.shape[1]
        if slot_mapping.numel() and bool((slot_mapping >= capacity).any()):
            raise ValueError(f"{op}: argument 'slot_mapping' holds slots past the cache's {capacity}")
    if compiling():
        torch.ops.dspark.append_kv(k, v, k_cache, v_cache, slot_mapping)
    else:
        _append_kv_launch(k, v, k_cache, v_cache, slot_mapping)


def _append_kv_launch(k, v, k_cache, v_cache, slot_mapping) -> None:
    op = "append_kv"
    C.append_kv(view(k, op, "k"), view(v, op, "v"), view(k_cache, op, "k_cache"), view(v_cache, op, "v_cache"),
                view(slot_mapping, op, "slot_mapping"), stream_handle(k.device))


def _attention_launch(q, k_cache, v_cache, block_table, kv_lens, cu_q, mask: int, scale: float, window: int, out,
                      lse) -> None:
    op = "paged_attention"
    workspace = None
    if q.device.type == "cuda":
        nbytes = C.paged_attention_workspace_bytes(q.shape[0], block_table.shape[0], q.shape[1], k_cache.shape[2],
                                                   q.shape[2], block_table.shape[1], k_cache.shape[1],
                                                   _DTYPE_CODES[q.dtype], window, mask)
        workspace = torch.empty(max(nbytes, 1), dtype=torch.uint8, device=q.device)
    C.paged_attention(view(q, op, "q"), view(k_cache, op, "k_cache"), view(v_cache, op, "v_cache"),
                      view(block_table, op, "block_table"), view(kv_lens, op, "kv_lens"), view(cu_q, op, "cu_q"),
                      mask, scale, window, view(out, op, "out"), view(lse, op, "lse"),
                      view(workspace, op, "workspace"), stream_handle(q.device))


@torch.library.custom_op("dspark::paged_attention", mutates_args=())
def _paged_attention_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                        kv_lens: torch.Tensor, cu_q: torch.Tensor, mask: int, scale: float, window: int = 0
                        ) -> Tuple[torch.Tensor, torch.Tensor]:
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(q.shape[:2], dtype=torch.float32, device=q.device)
    _attention_launch(q, k_cache, v_cache, block_table, kv_lens, cu_q, mask, scale, window, out, lse)
    return out, lse


@_paged_attention_op.register_fake
def _paged_attention_fake(q, k_cache, v_cache, block_table, kv_lens, cu_q, mask, scale, window=0):
    return (torch.empty(q.shape, dtype=q.dtype, device=q.device),
            torch.empty(q.shape[:2], dtype=torch.float32, device=q.device))


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    kv_lens: torch.Tensor,
    cu_q: torch.Tensor,
    *,
    mask: str = "causal",
    scale: Optional[float] = None,
    window: Optional[int] = None,
    return_lse: bool = False,
    out: Optional[torch.Tensor] = None,
    validate: bool = True,
):
    """Attention of a flattened ragged batch of queries over a paged KV cache.

    Args:
        q: ``[T, H_q, D]``; request r's queries are ``q[cu_q[r]:cu_q[r+1]]``.
        k_cache, v_cache: ``[num_pages, page_size, H_kv, D]`` (``H_q`` a multiple of
            ``H_kv``: grouped-query attention), q's dtype.
        block_table: ``[R, max_pages]`` int32, the pages of each request in order.
        kv_lens: ``[R]`` int32, keys of each request, including the new tokens
            already appended with :func:`append_kv`.
        cu_q: ``[R + 1]`` int32 prefix offsets of the queries.
        mask: ``causal`` (query i of request r sees keys up to
            ``kv_lens[r] - q_len + i``: verification) or ``block`` (every query sees
            all ``kv_lens[r]`` keys: the drafter's bidirectional block).
        scale: defaults to ``1 / sqrt(D)``.
        window: a sliding window ``W >= 1`` (None or 0: none). Query i of request
            r is at position ``p = kv_lens[r] - q_len + i`` and sees, besides what
            the mask allows, only keys ``j > p - W`` (``W`` keys with itself, under
            the causal mask: Gemma's and Mistral's sliding-window layers). Keys
            outside every query's window are not read.
    Returns the output ``[T, H_q, D]`` and, if ``return_lse``, the log-sum-exp of
    the scaled scores per query and head ``[T, H_q]`` float32 (-inf, with a zero
    output, when a query sees no key).
    """
    op = "paged_attention"
    device = require_tensor(op, "q", q).device
    if device.type not in ("cpu", "cuda"):
        raise TypeError(f"{op}: argument 'q' is on unsupported device {device} (cpu or cuda)")
    q = float_tensor(op, "q", q, device, 3)
    k_cache = float_tensor(op, "k_cache", k_cache, device, 4)
    v_cache = float_tensor(op, "v_cache", v_cache, device, 4)
    block_table = require_tensor(op, "block_table", block_table)
    if block_table.dtype != torch.int32:
        raise TypeError(f"{op}: argument 'block_table' must be int32, got {block_table.dtype}")
    block_table = on_device(op, "block_table", block_table, device)
    for name, t in (("kv_lens", kv_lens), ("cu_q", cu_q)):
        t = require_tensor(op, name, t)
        if t.dtype != torch.int32:
            raise TypeError(f"{op}: argument '{name}' must be int32, got {t.dtype}")
    kv_lens = on_device(op, "kv_lens", kv_lens, device)
    cu_q = on_device(op, "cu_q", cu_q, device)
    choice_arg(op, "mask", mask, ATTENTION_MASKS)
    if q.shape[-1] == 0:
        raise ValueError(f"{op}: argument 'q' must have a head dim >= 1, got shape {list(q.shape)}")
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    scale = real_arg(op, "scale", scale, positive=True)
    if scale > _FLOAT32_MAX:
        raise ValueError(f"{op}: argument 'scale' must be a positive finite float32, got {scale!r}")
    if window is None:
        window = 0
    elif isinstance(window, bool) or not isinstance(window, int) or not 0 <= window < 2 ** 31:
        raise ValueError(f"{op}: argument 'window' must be an int in [0, 2^31) (0 or None: no window), got {window!r}")
    if validate and device.type == "cuda" and not compiling() and not is_capturing(device) and kv_lens.numel():
        pages, page_size = k_cache.shape[0], k_cache.shape[1]
        used = (kv_lens.long() + page_size - 1) // page_size
        in_use = torch.arange(block_table.shape[1], device=device).unsqueeze(0) < used.unsqueeze(1)
        bad = torch.stack([
            (kv_lens < 0).any() | (kv_lens > block_table.shape[1] * page_size).any(),
            (in_use & ((block_table < 0) | (block_table >= pages))).any(),
            (cu_q[0] != 0) | (cu_q[-1] != q.shape[0]) | (cu_q[1:] < cu_q[:-1]).any(),
        ]).tolist()
        for flag, message in zip(bad, ("argument 'kv_lens' does not fit the block table",
                                       "argument 'block_table' holds pages outside the cache",
                                       f"argument 'cu_q' must run from 0 to {q.shape[0]}, non-decreasing")):
            if flag:
                raise ValueError(f"{op}: {message}")
    args = (q, k_cache, v_cache, block_table, kv_lens, cu_q, ATTENTION_MASKS[mask], scale, int(window))
    if compiling():
        result, lse = torch.ops.dspark.paged_attention(*args)
        if out is not None:
            out.copy_(result)
            result = out
    else:
        result = out if out is not None else torch.empty(q.shape, dtype=q.dtype, device=device)
        lse = torch.empty(q.shape[:2], dtype=torch.float32, device=device) if return_lse else None
        _attention_launch(*args, result, lse)
    return (result, lse) if return_lse else result


def _layer_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     positions: torch.Tensor, slots: torch.Tensor, block_table: torch.Tensor, kv_lens: torch.Tensor,
                     cu_q: torch.Tensor, inv_freq: torch.Tensor, mask: str, scale: float) -> torch.Tensor:
    """One attention layer of dspark's models: :func:`rope` on q and k,
    :func:`append_kv`, then :func:`paged_attention` (no window), as the public
    ops compute them, launched without their Python argument checks and
    conversions. Those cost about 45 us a layer on a CPU (1.4 ms of a 30-layer
    forward at batch 1) and repeat, layer after layer, checks of the same batch
    tensors; the C++ layer still checks every tensor (dtype, rank, shape,
    device, contiguity, aliasing, the cache slots and pages against the cache)
    and raises a ValueError naming it. The models' tensors have the types the
    ops take by construction (q / k / v of their own linears, the cache's
    slots and pages). Under ``torch.compile`` it calls the public ops."""
    if compiling():
        rope(q, k, positions, inv_freq=inv_freq)
        append_kv(k, v, k_cache, v_cache, slots, validate=False)
        return paged_attention(q, k_cache, v_cache, block_table, kv_lens, cu_q, mask=mask, scale=scale,
                               validate=False)
    _rope_launch(q, k, positions, inv_freq)
    _append_kv_launch(k, v, k_cache, v_cache, slots)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    _attention_launch(q, k_cache, v_cache, block_table, kv_lens, cu_q, ATTENTION_MASKS[mask], scale, 0, out, None)
    return out


def rope_inv_freq(rotary_dim: int, theta: float = 10000.0, device: Union[str, torch.device] = "cpu") -> torch.Tensor:
    """The rotary frequencies ``1 / theta^(2i / rotary_dim)`` as Llama and Qwen3 compute them."""
    return (1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim))).to(device)


# The frequencies rope() builds from (rotary_dim, theta), once per device: the
# host-to-device copy happens on the first call only, never inside a captured
# CUDA graph. Scaled variants pass inv_freq themselves.
_INV_FREQ: Dict[Tuple[str, int, float], torch.Tensor] = {}


def _cached_inv_freq(rotary_dim: int, theta: float, device: torch.device) -> torch.Tensor:
    key = (str(device), rotary_dim, theta)
    cached = _INV_FREQ.get(key)
    if cached is None:
        if is_capturing(device):
            raise ValueError(f"rope: the frequencies for rotary_dim={rotary_dim}, theta={theta:g} on {device} are "
                             "built on the first call, which must not be inside CUDA graph capture: call rope once "
                             "before capturing, or pass inv_freq")
        cached = _INV_FREQ[key] = rope_inv_freq(rotary_dim, theta, device)
    return cached


@torch.library.custom_op("dspark::rope", mutates_args=("q", "k"))
def _rope_op(q: torch.Tensor, k: Optional[torch.Tensor], positions: torch.Tensor, inv_freq: torch.Tensor) -> None:
    _rope_launch(q, k, positions, inv_freq)


@_rope_op.register_fake
def _rope_fake(q, k, positions, inv_freq) -> None:
    return None


def _rope_launch(q, k, positions, inv_freq) -> None:
    C.rope(view(q, "rope", "q"), view(k, "rope", "k"), view(positions, "rope", "positions"),
           view(inv_freq, "rope", "inv_freq"), stream_handle(q.device))


def rope(q: torch.Tensor, k: Optional[torch.Tensor], positions: torch.Tensor, *, theta: float = 10000.0,
         rotary_dim: Optional[int] = None, inv_freq: Optional[torch.Tensor] = None) -> None:
    """Rotary embedding in place, rotate-half convention (Llama, Qwen3): for
    ``i < rotary_dim / 2`` the pair ``(x_i, x_{i + rotary_dim/2})`` is rotated by
    ``positions[t] * inv_freq[i]``. ``q`` ``[T, H_q, D]``, ``k`` ``[T, H_kv, D]`` (or
    None), ``positions`` ``[T]``. ``inv_freq`` (``[rotary_dim / 2]`` float32) overrides
    ``theta`` / ``rotary_dim`` (e.g. for scaled rotary variants)."""
    op = "rope"
    device = require_tensor(op, "q", q).device
    if device.type not in ("cpu", "cuda"):
        raise TypeError(f"{op}: argument 'q' is on unsupported device {device} (cpu or cuda)")
    float_tensor(op, "q", q, device, 3)
    if q.stride(-1) != 1:
        raise ValueError(f"{op}: argument 'q' must have unit stride in its last dimension (it is rotated in place)")
    if k is not None:
        float_tensor(op, "k", k, device, 3)
        if k.stride(-1) != 1:
            raise ValueError(f"{op}: argument 'k' must have unit stride in its last dimension")
    positions = token_tensor(op, "positions", positions, device)
    if inv_freq is None:
        rotary_dim = q.shape[-1] if rotary_dim is None else int_arg(op, "rotary_dim", rotary_dim)
        if rotary_dim <= 0 or rotary_dim % 2 or rotary_dim > q.shape[-1]:
            raise ValueError(f"{op}: argument 'rotary_dim' must be even and in (0, {q.shape[-1]}], got {rotary_dim}")
        if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not (0.0 < float(theta) < math.inf):
            raise ValueError(f"{op}: argument 'theta' must be a positive finite number, got {theta!r}")
        inv_freq = _cached_inv_freq(rotary_dim, float(theta), device)
    else:
        inv_freq = on_device(op, "inv_freq", require_tensor(op, "inv_freq", inv_freq).to(torch.float32), device)
    if compiling():
        torch.ops.dspark.rope(q, k, positions, inv_freq)
    else:
        _rope_launch(q, k, positions, inv_freq)
