"""markov_sample and confidence: the drafter's sequential stage and its
confidence head (csrc/{cpu,cuda,ops}/markov_sample)."""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple, Union

import torch

from .. import _random
from .._ext import C
from .._tensor import is_capturing, stream_handle, view
from ._common import (check_vocab_map_on_device, choice_arg, compiling, float_tensor, on_device, require_tensor,
                      temperature_args, token_tensor, truncation_args, vocab_map)

__all__ = ["MARKOV_HEADS", "ConfidenceOutput", "MarkovOutput", "confidence", "markov_sample"]


MARKOV_HEADS = {"vanilla": 0, "gated": 1, "rnn": 2}


class MarkovOutput(NamedTuple):
    """Result of :func:`markov_sample`.

    draft_tokens: ``[R, gamma]`` int64.
    logprobs: ``[R, gamma]`` float32, ``log p_d`` of each sampled token (0 when greedy).
    lse: ``[R, gamma]`` float32, log-sum-exp of each corrected row ``(U + B) / T``
        (greedy: ``max(U + B)``), so ``log p_d(v) = (U + B)_v / T - lse``. A row
        with no logit above the float range's floor (all -inf or NaN) has no mass:
        it is sampled uniformly, its logprobs are ``-log V`` and its lse is -inf
        (the limit as the logits fall together); a +inf logit gives lse = +inf.
    corrected_logits: ``[R, gamma, V]`` (``[R, gamma, V_d]`` with a draft vocabulary)
        float32 ``U + B`` when requested (feed it to :func:`rejection_sample` as
        ``draft_logits``, with the same ``draft_vocab``), else None; -inf
        outside a truncated row's kept set.
    """

    draft_tokens: torch.Tensor
    logprobs: torch.Tensor
    lse: torch.Tensor
    corrected_logits: Optional[torch.Tensor]


def _markov_launch(base_logits, anchor_tokens, w1, w2, draft_vocab, head: int, gate_weight, gate_bias, joint_weight,
                   joint_bias, hidden, temperature: float, temperatures, seed: int, seeds, offset: int, offsets,
                   top_k: int, top_ks, top_p: float, top_ps, min_p: float, min_ps,
                   draft_tokens, logprobs, lse, corrected) -> None:
    op = "markov_sample"
    device = base_logits.device
    workspace = None
    if device.type == "cuda":
        R, gamma, V = base_logits.shape
        d = hidden.shape[2] if hidden is not None else 0
        truncation = (top_ks is not None or top_ps is not None or min_ps is not None or top_k > 0 or top_p < 1.0
                      or min_p > 0.0)
        nbytes = C.markov_sample_workspace_bytes(R, gamma, V, w1.shape[1], d, head, truncation)
        workspace = torch.empty(max(nbytes, 1), dtype=torch.uint8, device=device)
    C.markov_sample(
        view(base_logits, op, "base_logits"), view(anchor_tokens, op, "anchor_tokens"), view(w1, op, "w1"),
        view(w2, op, "w2"), view(draft_vocab, op, "draft_vocab"), head, view(gate_weight, op, "gate_weight"), view(gate_bias, op, "gate_bias"),
        view(joint_weight, op, "joint_weight"), view(joint_bias, op, "joint_bias"), view(hidden, op, "hidden"),
        temperature, view(temperatures, op, "temperature"), seed, view(seeds, op, "seed"), offset,
        view(offsets, op, "offset"), top_k, view(top_ks, op, "top_k"), top_p, view(top_ps, op, "top_p"), min_p,
        view(min_ps, op, "min_p"), view(draft_tokens, op, "draft_tokens"), view(logprobs, op, "logprobs"),
        view(lse, op, "lse"), view(corrected, op, "corrected_logits"), view(workspace, op, "workspace"),
        stream_handle(device),
    )


def _markov_allocate(base_logits: torch.Tensor, corrected: bool):
    R, gamma, V = base_logits.shape
    device = base_logits.device
    return (torch.empty((R, gamma), dtype=torch.int64, device=device),
            torch.empty((R, gamma), dtype=torch.float32, device=device),
            torch.empty((R, gamma), dtype=torch.float32, device=device),
            torch.empty((R, gamma, V) if corrected else (0,), dtype=torch.float32, device=device))


@torch.library.custom_op("dspark::markov_sample", mutates_args=())
def _markov_sample_op(base_logits: torch.Tensor, anchor_tokens: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
                      draft_vocab: Optional[torch.Tensor], head: int, gate_weight: Optional[torch.Tensor], gate_bias: Optional[torch.Tensor],
                      joint_weight: Optional[torch.Tensor], joint_bias: Optional[torch.Tensor],
                      hidden: Optional[torch.Tensor], temperature: float, temperatures: Optional[torch.Tensor],
                      seed: int, seeds: Optional[torch.Tensor], offset: int, offsets: Optional[torch.Tensor],
                      top_k: int, top_ks: Optional[torch.Tensor], top_p: float, top_ps: Optional[torch.Tensor],
                      min_p: float, min_ps: Optional[torch.Tensor],
                      corrected: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    out = _markov_allocate(base_logits, corrected)
    _markov_launch(base_logits, anchor_tokens, w1, w2, draft_vocab, head, gate_weight, gate_bias, joint_weight,
                   joint_bias, hidden, temperature, temperatures, seed, seeds, offset, offsets, top_k, top_ks, top_p,
                   top_ps, min_p, min_ps, out[0], out[1], out[2], out[3] if corrected else None)
    return out


@_markov_sample_op.register_fake
def _markov_sample_fake(base_logits, anchor_tokens, w1, w2, draft_vocab, head, gate_weight, gate_bias, joint_weight,
                        joint_bias, hidden, temperature, temperatures, seed, seeds, offset, offsets, top_k, top_ks,
                        top_p, top_ps, min_p, min_ps, corrected):
    return _markov_allocate(base_logits, corrected)


def markov_sample(
    base_logits: torch.Tensor,
    anchor_tokens: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    *,
    draft_vocab: Optional[torch.Tensor] = None,
    head: str = "vanilla",
    gate_weight: Optional[torch.Tensor] = None,
    gate_bias: Optional[torch.Tensor] = None,
    joint_weight: Optional[torch.Tensor] = None,
    joint_bias: Optional[torch.Tensor] = None,
    hidden: Optional[torch.Tensor] = None,
    temperature: Union[float, torch.Tensor] = 1.0,
    generator: Optional[torch.Generator] = None,
    seed: _random.SeedArg = None,
    offset: _random.OffsetArg = 0,
    top_k: Union[int, torch.Tensor] = 0,
    top_p: Union[float, torch.Tensor] = 1.0,
    min_p: Union[float, torch.Tensor] = 0.0,
    return_corrected_logits: bool = False,
    validate: bool = True,
) -> MarkovOutput:
    """The drafter's sequential stage: samples a block left to right, position k
    from ``softmax((U_k + B_k) / T)`` with ``B_k`` from the previous token (the
    anchor at k = 1) through the Markov head (DSPARK.md, section 2).

    Args:
        base_logits: ``[R, gamma, V]`` the parallel backbone's logits ``U``.
        anchor_tokens: ``[R]`` int32 / int64, the last committed token of each request.
        w1: ``[V, rank]`` the head's embedding table; w2: ``[V, rank]`` its
            projection (``B = W1[x] @ w2.T``). With 16-bit ``w2`` the product takes
            16-bit inputs with float32 accumulation.
        draft_vocab: ``[V_d]`` int32 / int64 distinct target ids: ``base_logits``
            and ``w2`` cover these ``V_d`` columns only (``[R, gamma, V_d]``,
            ``[V_d, rank]``) while ``w1`` keeps a row per target id; the sampled
            tokens are target ids.
        head: ``vanilla``, ``gated`` (``gate_weight [rank, d + rank]``, ``gate_bias
            [rank]``) or ``rnn`` (``joint_weight [3 rank, 2 rank + d]``, ``joint_bias
            [3 rank]``); the last two need ``hidden [R, gamma, d]``.
        temperature: float or ``[R]``; 0 is greedy (argmax of ``U + B``).
        generator / seed / offset: randomness as in :func:`rejection_sample`.
        top_k / top_p / min_p: the request's truncation of each sampled row
            (over its ``V_d`` columns), as :func:`rejection_sample` defines it
            for the target; the row is sampled from its kept set, and
            ``logprobs`` / ``lse`` are those of the truncated distribution.
        return_corrected_logits: also return ``U + B`` ``[R, gamma, V]`` float32, the
            exact values the tokens were sampled from (for ``draft_logits``;
            -inf outside a truncated row's kept set).
    """
    op = "markov_sample"
    device = require_tensor(op, "base_logits", base_logits).device
    if device.type not in ("cpu", "cuda"):
        raise TypeError(f"{op}: argument 'base_logits' is on unsupported device {device} (cpu or cuda)")
    base_logits = float_tensor(op, "base_logits", base_logits, device, 3)
    R, gamma, V = base_logits.shape
    anchor_tokens = token_tensor(op, "anchor_tokens", anchor_tokens, device)
    w1 = float_tensor(op, "w1", w1, device, 2).contiguous()
    w2 = float_tensor(op, "w2", w2, device, 2).contiguous()
    choice_arg(op, "head", head, MARKOV_HEADS)
    if head == "vanilla":
        gate_weight = gate_bias = joint_weight = joint_bias = hidden = None
    else:
        if hidden is None:
            raise ValueError(f"{op}: head '{head}' needs argument 'hidden' [R, gamma, d]")
        hidden = float_tensor(op, "hidden", hidden, device, 3)
        if head == "gated":
            if gate_weight is None or gate_bias is None:
                raise ValueError(f"{op}: head 'gated' needs 'gate_weight' and 'gate_bias'")
            gate_weight = float_tensor(op, "gate_weight", gate_weight, device, 2).contiguous()
            gate_bias = float_tensor(op, "gate_bias", gate_bias, device, 1).contiguous()
            joint_weight = joint_bias = None
        else:
            if joint_weight is None or joint_bias is None:
                raise ValueError(f"{op}: head 'rnn' needs 'joint_weight' and 'joint_bias'")
            joint_weight = float_tensor(op, "joint_weight", joint_weight, device, 2).contiguous()
            joint_bias = float_tensor(op, "joint_bias", joint_bias, device, 1).contiguous()
            gate_weight = gate_bias = None
    if draft_vocab is not None:
        draft_vocab = vocab_map(op, draft_vocab, device)
        V = w1.shape[0]  # anchors and tokens are target ids
    temperature_value, temperatures = temperature_args(op, temperature, device)
    truncation = truncation_args(op, top_k, top_p, min_p, R, base_logits.shape[2], device)
    rng = _random.resolve(op, device, R, generator, seed, offset)
    if validate and device.type == "cuda" and not compiling() and not is_capturing(device):
        if draft_vocab is not None:
            check_vocab_map_on_device(op, draft_vocab, V)
        none = torch.zeros((), dtype=torch.bool, device=device)
        flags = [((anchor_tokens < 0) | (anchor_tokens >= V)).any() if R else none,
                 ~(temperatures >= 0).all() if temperatures is not None else none,
                 ((rng.offsets < 0) | (rng.offsets >= _random.OFFSET_LIMIT)).any() if rng.offsets is not None else none]
        extra = truncation.flags_on_device(base_logits.shape[2])
        flags += [flag for flag, _ in extra]
        bad = torch.stack([f.reshape(()) for f in flags]).tolist()
        messages = (f"argument 'anchor_tokens' holds token ids outside the vocabulary [0, {V})",
                    "argument 'temperature' must be >= 0 (NaN is not allowed)",
                    "argument 'offset' must be in [0, 2^32)") + tuple(message for _, message in extra)
        for flag, message in zip(bad, messages):
            if flag:
                raise ValueError(f"{op}: {message}")
    args = (base_logits, anchor_tokens, w1, w2, draft_vocab, MARKOV_HEADS[head], gate_weight, gate_bias, joint_weight,
            joint_bias, hidden, temperature_value, temperatures, rng.seed, rng.seeds, rng.offset, rng.offsets,
            *truncation)
    if compiling():
        tokens, logprobs, lse, corrected = torch.ops.dspark.markov_sample(*args, return_corrected_logits)
    else:
        tokens, logprobs, lse, corrected = _markov_allocate(base_logits, return_corrected_logits)
        _markov_launch(*args, tokens, logprobs, lse, corrected if return_corrected_logits else None)
    return MarkovOutput(tokens, logprobs, lse, corrected if return_corrected_logits else None)


class ConfidenceOutput(NamedTuple):
    """Result of :func:`confidence`: ``[R, gamma]`` float32 each: the raw logits
    (before STS), the conditional confidences ``c`` and the prefix survival
    ``a = cumprod(c)``."""

    logits: torch.Tensor
    conf: torch.Tensor
    survival: torch.Tensor


def _confidence_launch(hidden, w1, anchor_tokens, draft_tokens, weight, bias, temperatures, logits, conf,
                       survival) -> None:
    op = "confidence"
    C.confidence(view(hidden, op, "hidden"), view(w1, op, "w1"), view(anchor_tokens, op, "anchor_tokens"),
                 view(draft_tokens, op, "draft_tokens"), view(weight, op, "weight"), view(bias, op, "bias"),
                 view(temperatures, op, "temperatures"), view(logits, op, "logits"), view(conf, op, "conf"),
                 view(survival, op, "survival"), stream_handle(hidden.device))


def _confidence_allocate(hidden: torch.Tensor):
    R, gamma = hidden.shape[:2]
    return tuple(torch.empty((R, gamma), dtype=torch.float32, device=hidden.device) for _ in range(3))


@torch.library.custom_op("dspark::confidence", mutates_args=())
def _confidence_op(hidden: torch.Tensor, w1: torch.Tensor, anchor_tokens: torch.Tensor, draft_tokens: torch.Tensor,
                   weight: torch.Tensor, bias: torch.Tensor, temperatures: Optional[torch.Tensor]
                   ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    out = _confidence_allocate(hidden)
    _confidence_launch(hidden, w1, anchor_tokens, draft_tokens, weight, bias, temperatures, *out)
    return out


@_confidence_op.register_fake
def _confidence_fake(hidden, w1, anchor_tokens, draft_tokens, weight, bias, temperatures):
    return _confidence_allocate(hidden)


def confidence(
    hidden: torch.Tensor,
    w1: torch.Tensor,
    anchor_tokens: torch.Tensor,
    draft_tokens: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    *,
    temperatures: Optional[torch.Tensor] = None,
    validate: bool = True,
) -> ConfidenceOutput:
    """The confidence head: ``c_k = sigmoid(w . [h_k ; W1[x_{k-1}]] + b)`` for every
    position (``x_0`` is the anchor; position k never sees ``x_k`` itself), with
    optional per-position STS temperatures ``[gamma]`` applied as
    ``sigmoid(logit / t_k)``. A NaN logit gives a NaN confidence (as
    ``torch.sigmoid``), which :func:`schedule_prefix` reads as 0.

    Args: ``hidden [R, gamma, d]``, ``w1 [V, rank]``, ``anchor_tokens [R]``,
    ``draft_tokens [R, gamma]``, ``weight [1, d + rank]`` (or ``[d + rank]``),
    ``bias [1]``. ``validate=False`` skips the value checks of token ids and
    temperatures on CUDA (they read device memory: a synchronisation); shapes
    and dtypes are always checked.
    """
    op = "confidence"
    device = require_tensor(op, "hidden", hidden).device
    if device.type not in ("cpu", "cuda"):
        raise TypeError(f"{op}: argument 'hidden' is on unsupported device {device} (cpu or cuda)")
    hidden = float_tensor(op, "hidden", hidden, device, 3)
    w1 = float_tensor(op, "w1", w1, device, 2).contiguous()
    anchor_tokens = token_tensor(op, "anchor_tokens", anchor_tokens, device)
    draft_tokens = token_tensor(op, "draft_tokens", draft_tokens, device)
    weight = require_tensor(op, "weight", weight)
    weight = float_tensor(op, "weight", weight.reshape(1, -1) if weight.dim() == 1 else weight, device, 2).contiguous()
    bias = float_tensor(op, "bias", require_tensor(op, "bias", bias).reshape(-1), device, 1).contiguous()
    if temperatures is not None:
        temperatures = require_tensor(op, "temperatures", temperatures)
        if not temperatures.is_floating_point():
            raise TypeError(f"{op}: argument 'temperatures' must be a float tensor, got {temperatures.dtype}")
        temperatures = on_device(op, "temperatures", temperatures.to(torch.float32), device)
    if validate and device.type == "cuda" and not compiling() and not is_capturing(device):
        V = w1.shape[0]
        flags = [((anchor_tokens < 0) | (anchor_tokens >= V)).any() if anchor_tokens.numel() else
                 torch.zeros((), dtype=torch.bool, device=device),
                 ((draft_tokens < 0) | (draft_tokens >= V)).any() if draft_tokens.numel() else
                 torch.zeros((), dtype=torch.bool, device=device),
                 ~(temperatures > 0).all() if temperatures is not None else torch.zeros((), dtype=torch.bool, device=device)]
        bad = torch.stack([f.reshape(()) for f in flags]).tolist()
        for flag, name in zip(bad, ("anchor_tokens", "draft_tokens", "temperatures")):
            if flag:
                raise ValueError(f"{op}: argument '{name}' holds values outside its range "
                                 "(token ids in [0, V), temperatures > 0)")
    args = (hidden, w1, anchor_tokens, draft_tokens, weight, bias, temperatures)
    if compiling():
        return ConfidenceOutput(*torch.ops.dspark.confidence(*args))
    out = _confidence_allocate(hidden)
    _confidence_launch(*args, *out)
    return ConfidenceOutput(*out)
