"""rejection_sample: the accept/reject step of a speculative decoding round
(csrc/{cpu,cuda,ops}/rejection_sample)."""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple, Union

import torch

from .. import _random
from .._ext import C
from .._tensor import is_capturing, stream_handle, view
from ._common import (check_vocab_map_on_device, compiling, float_matrix, int_arg, on_device, require_tensor,
                      temperature_args, token_tensor, truncation_args, vocab_map)

__all__ = ["MAX_PADDING", "RejectionOutput", "rejection_sample"]

# How far max_num_draft may exceed the number of draft tokens: columns past
# N_draft can only hold padding, so a wider output is bounded by this rather
# than by the caller's integer (a fixed width across rounds stays possible).
MAX_PADDING = 1024
# output_tokens' width max_num_draft + 1 must be an int32.
_MAX_NUM_DRAFT_LIMIT = (1 << 31) - 2


class RejectionOutput(NamedTuple):
    """Result of :func:`rejection_sample`.

    output_tokens: ``[R, max_num_draft + 1]`` int32: the accepted draft tokens,
        then the correction or bonus token, then -1.
    num_accepted: ``[R]`` int32, draft tokens accepted (the round commits
        ``num_accepted + 1`` tokens).
    soft_acceptance: ``[N_draft]`` float32 ``1 - 0.5 * ||p_d - p_t||_1`` per
        draft position when requested, else None.
    logprobs: ``[R, max_num_draft + 1]`` float32 when requested, else None: the
        natural log-probability of each committed token (same layout as
        ``output_tokens``, -inf where it holds -1) under the request's
        temperature and truncation; a greedy request's are those of the
        untruncated softmax at temperature 1; 0 for a bonus token the caller
        drew (``bonus_tokens``).
    """

    output_tokens: torch.Tensor
    num_accepted: torch.Tensor
    soft_acceptance: Optional[torch.Tensor]
    logprobs: Optional[torch.Tensor] = None


# --------------------------------------------------------------------------
# The launch, shared by the eager path and the custom ops.


def _launch(
    target_logits: torch.Tensor,
    draft_tokens: torch.Tensor,
    cu_num_draft: torch.Tensor,
    draft_logits: Optional[torch.Tensor],
    draft_probs: Optional[torch.Tensor],
    draft_vocab: Optional[torch.Tensor],
    temperature: float,
    temperatures: Optional[torch.Tensor],
    seed: int,
    seeds: Optional[torch.Tensor],
    offset: int,
    offsets: Optional[torch.Tensor],
    max_num_draft: int,
    bonus_tokens: Optional[torch.Tensor],
    top_k: int,
    top_ks: Optional[torch.Tensor],
    top_p: float,
    top_ps: Optional[torch.Tensor],
    min_p: float,
    min_ps: Optional[torch.Tensor],
    output_tokens: torch.Tensor,
    num_accepted: torch.Tensor,
    soft_acceptance: Optional[torch.Tensor],
    output_logprobs: Optional[torch.Tensor],
) -> None:
    op = "rejection_sample"
    device = target_logits.device
    workspace = None
    if device.type == "cuda":
        draft = draft_logits if draft_logits is not None else draft_probs
        nbytes = C.rejection_sample_workspace_bytes(
            cu_num_draft.shape[0] - 1,
            draft_tokens.shape[0],
            target_logits.shape[1],
            draft is not None,
            soft_acceptance is not None,
            draft.shape[1] if draft is not None else target_logits.shape[1],
            draft_vocab is not None,
        )
        workspace = torch.empty(max(nbytes, 1), dtype=torch.uint8, device=device)
    C.rejection_sample(
        view(target_logits, op, "target_logits"),
        view(draft_tokens, op, "draft_tokens"),
        view(cu_num_draft, op, "cu_num_draft"),
        view(draft_logits, op, "draft_logits"),
        view(draft_probs, op, "draft_probs"),
        view(draft_vocab, op, "draft_vocab"),
        temperature,
        view(temperatures, op, "temperature"),
        seed,
        view(seeds, op, "seed"),
        offset,
        view(offsets, op, "offset"),
        max_num_draft,
        view(bonus_tokens, op, "bonus_tokens"),
        top_k,
        view(top_ks, op, "top_k"),
        top_p,
        view(top_ps, op, "top_p"),
        min_p,
        view(min_ps, op, "min_p"),
        view(output_tokens, op, "output_tokens"),
        view(num_accepted, op, "num_accepted"),
        view(soft_acceptance, op, "soft_acceptance"),
        view(output_logprobs, op, "output_logprobs"),
        view(workspace, op, "workspace"),
        stream_handle(device),
    )


def _allocate(
    target_logits: torch.Tensor, draft_tokens: torch.Tensor, cu_num_draft: torch.Tensor,
    max_num_draft: int, soft_acceptance: bool, logprobs: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    device = target_logits.device
    num_requests = cu_num_draft.shape[0] - 1
    return (
        torch.empty((num_requests, max_num_draft + 1), dtype=torch.int32, device=device),
        torch.empty((num_requests,), dtype=torch.int32, device=device),
        torch.empty((draft_tokens.shape[0] if soft_acceptance else 0,), dtype=torch.float32, device=device),
        torch.empty((num_requests, max_num_draft + 1) if logprobs else (0, 0), dtype=torch.float32, device=device),
    )


@torch.library.custom_op("dspark::rejection_sample", mutates_args=())
def _rejection_sample_op(
    target_logits: torch.Tensor,
    draft_tokens: torch.Tensor,
    cu_num_draft: torch.Tensor,
    draft_logits: Optional[torch.Tensor],
    draft_probs: Optional[torch.Tensor],
    draft_vocab: Optional[torch.Tensor],
    temperature: float,
    temperatures: Optional[torch.Tensor],
    seed: int,
    seeds: Optional[torch.Tensor],
    offset: int,
    offsets: Optional[torch.Tensor],
    max_num_draft: int,
    bonus_tokens: Optional[torch.Tensor],
    top_k: int,
    top_ks: Optional[torch.Tensor],
    top_p: float,
    top_ps: Optional[torch.Tensor],
    min_p: float,
    min_ps: Optional[torch.Tensor],
    soft_acceptance: bool,
    logprobs: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    tokens, accepted, soft, lp = _allocate(target_logits, draft_tokens, cu_num_draft, max_num_draft,
                                           soft_acceptance, logprobs)
    _launch(
        target_logits, draft_tokens, cu_num_draft, draft_logits, draft_probs, draft_vocab, temperature,
        temperatures, seed, seeds, offset, offsets, max_num_draft, bonus_tokens, top_k, top_ks, top_p, top_ps,
        min_p, min_ps, tokens, accepted, soft if soft_acceptance else None, lp if logprobs else None,
    )
    return tokens, accepted, soft, lp


@_rejection_sample_op.register_fake
def _rejection_sample_fake(
    target_logits, draft_tokens, cu_num_draft, draft_logits, draft_probs, draft_vocab, temperature, temperatures,
    seed, seeds, offset, offsets, max_num_draft, bonus_tokens, top_k, top_ks, top_p, top_ps, min_p, min_ps,
    soft_acceptance, logprobs,
):
    return _allocate(target_logits, draft_tokens, cu_num_draft, max_num_draft, soft_acceptance, logprobs)


@torch.library.custom_op(
    "dspark::rejection_sample_out",
    mutates_args=("output_tokens", "num_accepted", "soft_acceptance", "output_logprobs"),
)
def _rejection_sample_out_op(
    target_logits: torch.Tensor,
    draft_tokens: torch.Tensor,
    cu_num_draft: torch.Tensor,
    draft_logits: Optional[torch.Tensor],
    draft_probs: Optional[torch.Tensor],
    draft_vocab: Optional[torch.Tensor],
    temperature: float,
    temperatures: Optional[torch.Tensor],
    seed: int,
    seeds: Optional[torch.Tensor],
    offset: int,
    offsets: Optional[torch.Tensor],
    max_num_draft: int,
    bonus_tokens: Optional[torch.Tensor],
    top_k: int,
    top_ks: Optional[torch.Tensor],
    top_p: float,
    top_ps: Optional[torch.Tensor],
    min_p: float,
    min_ps: Optional[torch.Tensor],
    output_tokens: torch.Tensor,
    num_accepted: torch.Tensor,
    soft_acceptance: Optional[torch.Tensor],
    output_logprobs: Optional[torch.Tensor],
) -> None:
    _launch(
        target_logits, draft_tokens, cu_num_draft, draft_logits, draft_probs, draft_vocab, temperature,
        temperatures, seed, seeds, offset, offsets, max_num_draft, bonus_tokens, top_k, top_ks, top_p, top_ps,
        min_p, min_ps, output_tokens, num_accepted, soft_acceptance, output_logprobs,
    )


@_rejection_sample_out_op.register_fake
def _rejection_sample_out_fake(*args) -> None:
    return None


def _check_values_on_device(
    op: str,
    draft_tokens: torch.Tensor,
    cu_num_draft: torch.Tensor,
    vocab: int,
    max_num_draft: int,
    temperatures: Optional[torch.Tensor],
    offsets: Optional[torch.Tensor],
    bonus_tokens: Optional[torch.Tensor] = None,
    truncation=None,
) -> None:
    """The value checks the C++ layer makes for CPU tensors, for CUDA tensors
    (one host synchronisation)."""
    counts = cu_num_draft[1:] - cu_num_draft[:-1]
    flags = [
        cu_num_draft[0] != 0,
        (counts < 0).any() if counts.numel() else cu_num_draft.new_zeros((), dtype=torch.bool),
        (counts > max_num_draft).any() if counts.numel() else cu_num_draft.new_zeros((), dtype=torch.bool),
        cu_num_draft[-1] != draft_tokens.shape[0],
        ((draft_tokens < -1) | (draft_tokens >= vocab)).any()
        if draft_tokens.numel()
        else cu_num_draft.new_zeros((), dtype=torch.bool),
        ~(temperatures >= 0).all() if temperatures is not None else cu_num_draft.new_zeros((), dtype=torch.bool),
        ((offsets < 0) | (offsets >= _random.OFFSET_LIMIT)).any()
        if offsets is not None
        else cu_num_draft.new_zeros((), dtype=torch.bool),
    ]
    extra = list(truncation.flags_on_device(vocab)) if truncation is not None else []
    if bonus_tokens is not None:
        extra.append((((bonus_tokens < 0) | (bonus_tokens >= vocab)).any(),
                      f"argument 'bonus_tokens' holds token ids outside the vocabulary [0, {vocab})"))
    flags += [flag for flag, _ in extra]
    bad = torch.stack([f.reshape(()).to(torch.bool) for f in flags]).tolist()
    messages = [
        "argument 'cu_num_draft' must start at 0",
        "argument 'cu_num_draft' must be non-decreasing",
        f"a request has more draft tokens than max_num_draft = {max_num_draft}",
        f"argument 'cu_num_draft' must end at the number of draft tokens {draft_tokens.shape[0]}",
        f"argument 'draft_tokens' holds token ids outside the vocabulary [0, {vocab}) (-1 marks a missing draft)",
        "argument 'temperature' must be >= 0 (NaN is not allowed)",
        "argument 'offset' must be in [0, 2^32)",
    ] + [message for _, message in extra]
    for flag, message in zip(bad, messages):
        if flag:
            raise ValueError(f"{op}: {message}")


# --------------------------------------------------------------------------
# rejection_sample


def rejection_sample(
    target_logits: torch.Tensor,
    draft_tokens: torch.Tensor,
    cu_num_draft: torch.Tensor,
    *,
    draft_logits: Optional[torch.Tensor] = None,
    draft_probs: Optional[torch.Tensor] = None,
    draft_vocab: Optional[torch.Tensor] = None,
    temperature: Union[float, torch.Tensor] = 1.0,
    generator: Optional[torch.Generator] = None,
    seed: _random.SeedArg = None,
    offset: _random.OffsetArg = 0,
    max_num_draft: Optional[int] = None,
    bonus_tokens: Optional[torch.Tensor] = None,
    top_k: Union[int, torch.Tensor] = 0,
    top_p: Union[float, torch.Tensor] = 1.0,
    min_p: Union[float, torch.Tensor] = 0.0,
    return_soft_acceptance: bool = False,
    return_logprobs: bool = False,
    out: Optional[Tuple[Optional[torch.Tensor], ...]] = None,
    validate: bool = True,
) -> RejectionOutput:
    """The accept/reject step of a speculative decoding round for a ragged batch.

    Request ``r`` has ``n_r = cu_num_draft[r+1] - cu_num_draft[r]`` draft tokens
    ``draft_tokens[cu_num_draft[r]:cu_num_draft[r+1]]`` and ``n_r + 1`` target rows
    ``target_logits[cu_num_draft[r] + r : cu_num_draft[r+1] + r + 1]`` (row ``k``
    scores the token after draft ``k``; the last row gives the bonus token).

    Draft token ``x_k`` is accepted with probability ``min(1, p_t(x_k) / p_d(x_k))``;
    at the first rejection one token is drawn from ``norm(max(0, p_t - p_d))`` (from
    ``p_t`` if that has no mass); after ``n_r`` acceptances a bonus token is drawn
    from the last row. Committed tokens follow the target distribution exactly.

    ``p_t`` is the target's distribution after the request's truncation, in
    this order (vLLM's): temperature, then top-k and min-p, then top-p over
    what they keep, renormalised. top-k keeps every logit tied with the k-th
    largest; min-p keeps ``p >= min_p * max p``; top-p keeps the smallest set
    of most probable tokens whose mass reaches ``top_p``, with ties at the
    boundary kept whole. The thresholds are found inside the op by a radix
    select (no sort, no probability tensor); acceptance is exact with respect
    to the truncated distribution. Greedy requests are not truncated.

    Args:
        target_logits: ``[N_draft + R, V]`` float32 / float16 / bfloat16, or
            ``[N_draft, V]`` with ``bonus_tokens``.
        draft_tokens: ``[N_draft]`` int32 or int64 in ``[0, V)``, or -1: no draft
            from here on (padded layouts): the request stops there with a
            rejection, its final token drawn from ``p_t`` of that row (greedy:
            the argmax), and what follows the -1 is not read.
        cu_num_draft: ``[R + 1]`` int32 prefix offsets (requests may have 0 drafts).
        draft_logits: ``[N_draft, V]``: the drafter's logits (softmax at the same
            temperature), or
        draft_probs: ``[N_draft, V]``: the drafter's probabilities (used as given,
            normalised), or neither: a one-hot drafter (accept with probability
            ``p_t(x)``; the residual is ``p_t`` without ``x``).
        draft_vocab: ``[V_d]`` int32 (or int64), distinct target ids: the draft rows
            have ``V_d`` columns, column ``c`` scoring token ``draft_vocab[c]``; the
            draft probability of every other token is 0, so the residual there is
            ``p_t`` itself. Draft tokens are target ids. No ``[N_draft, V]`` tensor
            is built.
        temperature: float or ``[R]`` float32; 0 means greedy for that request
            (accept iff the draft equals the target argmax; no randomness).
        generator: draws the call's seed (default: the device's default generator).
        seed: int (one stream for the batch) or ``[R]`` int64 per-request seeds, which
            make each request's result independent of its position in the batch.
        offset: int in ``[0, 2^32)`` or ``[1]`` / ``[R]`` int64: the stream offset
            (e.g. the round number).
        max_num_draft: width of ``output_tokens`` minus one, an int in
            ``[0, max(N_draft, MAX_PADDING)]``; computed from ``cu_num_draft`` if
            omitted (a host synchronisation on CUDA; required under CUDA graph
            capture and torch.compile).
        bonus_tokens: ``[R]`` int32 / int64 bonus tokens the caller drew
            (vLLM's layout): ``target_logits`` then holds the ``N_draft`` draft
            rows only, and a request that accepts all its drafts ends with its
            bonus token.
        top_k: int or ``[R]`` int tensor, 0 (off) to V.
        top_p: float or ``[R]`` float tensor in ``(0, 1]`` (1: off).
        min_p: float or ``[R]`` float tensor in ``[0, 1]`` (0: off).
        return_soft_acceptance: also return ``1 - 0.5 * ||p_d - p_t||_1`` per draft
            position (the confidence head's training label).
        return_logprobs: also return the log-probability of each committed token
            (:class:`RejectionOutput`).
        out: preallocated ``(output_tokens, num_accepted, soft_acceptance or
            None[, logprobs or None])``.
        validate: check token ids, ``cu_num_draft`` and temperatures against the
            data (on CUDA this synchronises; it is skipped under graph capture and
            torch.compile, where out-of-range tokens are simply rejected).

    Defined behaviour: NaN and -inf logits have probability 0 (a row with no finite
    logit is uniform); +inf logits share the row's mass; draft probabilities are
    clamped to [0, 1] (NaN -> 0) and normalised by their sum in 2^-40 fixed point (a
    row whose sum is below about 1e-12 has no mass: p_d = 0), and a draft token with
    ``p_d = 0`` is accepted iff ``p_t > 0`` (vLLM rejects it); a draft token outside the
    truncated support is rejected; ``R = 0`` returns empty outputs.
    """
    op = "rejection_sample"
    device = require_tensor(op, "target_logits", target_logits).device
    if device.type not in ("cpu", "cuda"):
        raise TypeError(f"{op}: argument 'target_logits' is on unsupported device {device} (cpu or cuda)")
    target_logits = float_matrix(op, "target_logits", target_logits, device)
    draft_tokens = require_tensor(op, "draft_tokens", draft_tokens)
    if draft_tokens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{op}: argument 'draft_tokens' must be int32 or int64, got {draft_tokens.dtype}")
    if draft_tokens.dim() != 1:
        raise ValueError(f"{op}: argument 'draft_tokens' must be 1-D [N_draft], got shape {list(draft_tokens.shape)}")
    draft_tokens = on_device(op, "draft_tokens", draft_tokens, device)
    if max_num_draft is not None:  # checked before anything is allocated from it
        max_num_draft = int_arg(op, "max_num_draft", max_num_draft, 0,
                                min(max(draft_tokens.shape[0], MAX_PADDING), _MAX_NUM_DRAFT_LIMIT))
    cu_num_draft = require_tensor(op, "cu_num_draft", cu_num_draft)
    if cu_num_draft.dtype != torch.int32:
        raise TypeError(f"{op}: argument 'cu_num_draft' must be int32, got {cu_num_draft.dtype}")
    if cu_num_draft.dim() != 1 or cu_num_draft.numel() < 1:
        raise ValueError(f"{op}: argument 'cu_num_draft' must be 1-D with R + 1 >= 1 elements, got shape {list(cu_num_draft.shape)}")
    cu_num_draft = on_device(op, "cu_num_draft", cu_num_draft, device)
    num_requests = cu_num_draft.shape[0] - 1
    if draft_logits is not None and draft_probs is not None:
        raise ValueError(f"{op}: give at most one of 'draft_logits' and 'draft_probs'")
    if draft_logits is not None:
        draft_logits = float_matrix(op, "draft_logits", draft_logits, device)
    if draft_probs is not None:
        draft_probs = float_matrix(op, "draft_probs", draft_probs, device)
    if draft_vocab is not None:
        draft_vocab = vocab_map(op, draft_vocab, device)
        if draft_logits is None and draft_probs is None:
            raise ValueError(f"{op}: argument 'draft_vocab' needs 'draft_logits' or 'draft_probs'")

    temperature_value, temperatures = temperature_args(op, temperature, device)
    vocab = target_logits.shape[1]
    if vocab < 1:  # before the truncation is checked against it
        raise ValueError(f"{op}: argument 'target_logits' must have at least one column (a vocabulary of V >= 1), "
                         f"got shape {list(target_logits.shape)}")
    truncation = truncation_args(op, top_k, top_p, min_p, num_requests, vocab, device)
    if bonus_tokens is not None:
        bonus_tokens = token_tensor(op, "bonus_tokens", bonus_tokens, device)

    rng = _random.resolve(op, device, num_requests, generator, seed, offset)

    host_sync_allowed = not compiling() and not is_capturing(device)
    if max_num_draft is None:
        if not host_sync_allowed:
            raise ValueError(f"{op}: argument 'max_num_draft' is required under CUDA graph capture and torch.compile")
        counts = cu_num_draft[1:].long() - cu_num_draft[:-1].long()
        max_num_draft = max(int(counts.max()), 0) if num_requests > 0 else 0
        if max_num_draft > draft_tokens.shape[0]:  # before the output is allocated from it
            raise ValueError(f"{op}: argument 'cu_num_draft' gives a request {max_num_draft} draft tokens, more "
                             f"than the {draft_tokens.shape[0]} in 'draft_tokens'")
    if validate and host_sync_allowed and device.type == "cuda":
        _check_values_on_device(
            op, draft_tokens, cu_num_draft, vocab, max_num_draft, temperatures, rng.offsets, bonus_tokens, truncation
        )
        if draft_vocab is not None:
            check_vocab_map_on_device(op, draft_vocab, target_logits.shape[1])

    args = (
        target_logits, draft_tokens, cu_num_draft, draft_logits, draft_probs, draft_vocab, temperature_value,
        temperatures, rng.seed, rng.seeds, rng.offset, rng.offsets, int(max_num_draft), bonus_tokens,
        *truncation,
    )
    if out is not None:
        if len(out) not in (3, 4):
            raise ValueError(f"{op}: 'out' must be (output_tokens, num_accepted, soft_acceptance[, logprobs])")
        output_tokens, num_accepted, soft = out[:3]
        lp = out[3] if len(out) == 4 else None
        if return_soft_acceptance and soft is None:
            raise ValueError(f"{op}: 'out' needs a soft_acceptance tensor when return_soft_acceptance=True")
        if return_logprobs and lp is None:
            raise ValueError(f"{op}: 'out' needs a logprobs tensor when return_logprobs=True")
        soft = soft if return_soft_acceptance else None
        lp = lp if return_logprobs else None
        if compiling():
            torch.ops.dspark.rejection_sample_out(*args, output_tokens, num_accepted, soft, lp)
        else:
            _launch(*args, output_tokens, num_accepted, soft, lp)
        return RejectionOutput(output_tokens, num_accepted, soft, lp)
    if compiling():
        tokens, accepted, soft, lp = torch.ops.dspark.rejection_sample(*args, return_soft_acceptance, return_logprobs)
    else:
        tokens, accepted, soft, lp = _allocate(target_logits, draft_tokens, cu_num_draft, int(max_num_draft),
                                               return_soft_acceptance, return_logprobs)
        _launch(*args, tokens, accepted, soft if return_soft_acceptance else None, lp if return_logprobs else None)
    return RejectionOutput(tokens, accepted, soft if return_soft_acceptance else None,
                           lp if return_logprobs else None)
