"""Public ops over PyTorch tensors.

Each op validates its arguments (TypeError / ValueError naming the argument),
then runs the CPU or CUDA kernel of the extension on the tensors' device. Ops
are registered as torch.library custom ops in the ``dspark`` namespace with fake
implementations, so they work under torch.compile; on CUDA they launch on the
current stream without allocating from data values or synchronising with the
host, so they can be captured in CUDA graphs.
"""

from __future__ import annotations

import math
from typing import Dict, NamedTuple, Optional, Tuple, Union

import torch

from . import _random
from ._ext import C
from ._tensor import _DTYPE_CODES, is_capturing, stream_handle, view

__all__ = [
    "append_kv",
    "paged_attention",
    "rope",
    "rope_inv_freq",
    "ConfidenceOutput",
    "MarkovOutput",
    "RejectionOutput",
    "ScheduleOutput",
    "confidence",
    "markov_sample",
    "rejection_sample",
    "schedule_prefix",
]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class RejectionOutput(NamedTuple):
    """Result of :func:`rejection_sample`.

    output_tokens: ``[R, max_num_draft + 1]`` int32: the accepted draft tokens,
        then the correction or bonus token, then -1.
    num_accepted: ``[R]`` int32, draft tokens accepted (the round commits
        ``num_accepted + 1`` tokens).
    soft_acceptance: ``[N_draft]`` float32 ``1 - 0.5 * ||p_d - p_t||_1`` per
        draft position when requested, else None.
    """

    output_tokens: torch.Tensor
    num_accepted: torch.Tensor
    soft_acceptance: Optional[torch.Tensor]


# --------------------------------------------------------------------------
# The launch, shared by the eager path and the custom ops.


def _launch(
    target_logits: torch.Tensor,
    draft_tokens: torch.Tensor,
    cu_num_draft: torch.Tensor,
    draft_logits: Optional[torch.Tensor],
    draft_probs: Optional[torch.Tensor],
    temperature: float,
    temperatures: Optional[torch.Tensor],
    seed: int,
    seeds: Optional[torch.Tensor],
    offset: int,
    offsets: Optional[torch.Tensor],
    max_num_draft: int,
    output_tokens: torch.Tensor,
    num_accepted: torch.Tensor,
    soft_acceptance: Optional[torch.Tensor],
) -> None:
    op = "rejection_sample"
    device = target_logits.device
    workspace = None
    if device.type == "cuda":
        nbytes = C.rejection_sample_workspace_bytes(
            cu_num_draft.shape[0] - 1,
            draft_tokens.shape[0],
            target_logits.shape[1],
            draft_logits is not None or draft_probs is not None,
            soft_acceptance is not None,
        )
        workspace = torch.empty(max(nbytes, 1), dtype=torch.uint8, device=device)
    C.rejection_sample(
        view(target_logits, op, "target_logits"),
        view(draft_tokens, op, "draft_tokens"),
        view(cu_num_draft, op, "cu_num_draft"),
        view(draft_logits, op, "draft_logits"),
        view(draft_probs, op, "draft_probs"),
        temperature,
        view(temperatures, op, "temperature"),
        seed,
        view(seeds, op, "seed"),
        offset,
        view(offsets, op, "offset"),
        max_num_draft,
        view(output_tokens, op, "output_tokens"),
        view(num_accepted, op, "num_accepted"),
        view(soft_acceptance, op, "soft_acceptance"),
        view(workspace, op, "workspace"),
        stream_handle(device),
    )


def _allocate(
    target_logits: torch.Tensor, draft_tokens: torch.Tensor, cu_num_draft: torch.Tensor,
    max_num_draft: int, soft_acceptance: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    device = target_logits.device
    num_requests = cu_num_draft.shape[0] - 1
    return (
        torch.empty((num_requests, max_num_draft + 1), dtype=torch.int32, device=device),
        torch.empty((num_requests,), dtype=torch.int32, device=device),
        torch.empty((draft_tokens.shape[0] if soft_acceptance else 0,), dtype=torch.float32, device=device),
    )


@torch.library.custom_op("dspark::rejection_sample", mutates_args=())
def _rejection_sample_op(
    target_logits: torch.Tensor,
    draft_tokens: torch.Tensor,
    cu_num_draft: torch.Tensor,
    draft_logits: Optional[torch.Tensor],
    draft_probs: Optional[torch.Tensor],
    temperature: float,
    temperatures: Optional[torch.Tensor],
    seed: int,
    seeds: Optional[torch.Tensor],
    offset: int,
    offsets: Optional[torch.Tensor],
    max_num_draft: int,
    soft_acceptance: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    tokens, accepted, soft = _allocate(target_logits, draft_tokens, cu_num_draft, max_num_draft, soft_acceptance)
    _launch(
        target_logits, draft_tokens, cu_num_draft, draft_logits, draft_probs, temperature, temperatures,
        seed, seeds, offset, offsets, max_num_draft, tokens, accepted, soft if soft_acceptance else None,
    )
    return tokens, accepted, soft


@_rejection_sample_op.register_fake
def _rejection_sample_fake(
    target_logits, draft_tokens, cu_num_draft, draft_logits, draft_probs, temperature, temperatures,
    seed, seeds, offset, offsets, max_num_draft, soft_acceptance,
):
    return _allocate(target_logits, draft_tokens, cu_num_draft, max_num_draft, soft_acceptance)


@torch.library.custom_op(
    "dspark::rejection_sample_out", mutates_args=("output_tokens", "num_accepted", "soft_acceptance")
)
def _rejection_sample_out_op(
    target_logits: torch.Tensor,
    draft_tokens: torch.Tensor,
    cu_num_draft: torch.Tensor,
    draft_logits: Optional[torch.Tensor],
    draft_probs: Optional[torch.Tensor],
    temperature: float,
    temperatures: Optional[torch.Tensor],
    seed: int,
    seeds: Optional[torch.Tensor],
    offset: int,
    offsets: Optional[torch.Tensor],
    max_num_draft: int,
    output_tokens: torch.Tensor,
    num_accepted: torch.Tensor,
    soft_acceptance: Optional[torch.Tensor],
) -> None:
    _launch(
        target_logits, draft_tokens, cu_num_draft, draft_logits, draft_probs, temperature, temperatures,
        seed, seeds, offset, offsets, max_num_draft, output_tokens, num_accepted, soft_acceptance,
    )


@_rejection_sample_out_op.register_fake
def _rejection_sample_out_fake(*args) -> None:
    return None


# --------------------------------------------------------------------------
# Validation helpers.


def _require_tensor(op: str, name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: argument '{name}' must be a torch.Tensor, got {type(t).__name__}")
    return t


def _float_matrix(op: str, name: str, t: object, device: torch.device) -> torch.Tensor:
    t = _require_tensor(op, name, t)
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{op}: argument '{name}' must be float32, float16 or bfloat16, got {t.dtype}")
    if t.dim() != 2:
        raise ValueError(f"{op}: argument '{name}' must be 2-D, got shape {list(t.shape)}")
    if t.device != device:
        raise ValueError(f"{op}: argument '{name}' must be on {device}, got {t.device}")
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def _on_device(op: str, name: str, t: torch.Tensor, device: torch.device) -> torch.Tensor:
    if t.device != device:
        raise ValueError(f"{op}: argument '{name}' must be on {device}, got {t.device}")
    return t.contiguous()


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def _check_values_on_device(
    op: str,
    draft_tokens: torch.Tensor,
    cu_num_draft: torch.Tensor,
    vocab: int,
    max_num_draft: int,
    temperatures: Optional[torch.Tensor],
    offsets: Optional[torch.Tensor],
) -> None:
    """The value checks the C++ layer makes for CPU tensors, for CUDA tensors
    (one host synchronisation)."""
    counts = cu_num_draft[1:] - cu_num_draft[:-1]
    flags = [
        cu_num_draft[0] != 0,
        (counts < 0).any() if counts.numel() else cu_num_draft.new_zeros((), dtype=torch.bool),
        (counts > max_num_draft).any() if counts.numel() else cu_num_draft.new_zeros((), dtype=torch.bool),
        cu_num_draft[-1] != draft_tokens.shape[0],
        ((draft_tokens < 0) | (draft_tokens >= vocab)).any()
        if draft_tokens.numel()
        else cu_num_draft.new_zeros((), dtype=torch.bool),
        ~(temperatures >= 0).all() if temperatures is not None else cu_num_draft.new_zeros((), dtype=torch.bool),
        ((offsets < 0) | (offsets >= _random.OFFSET_LIMIT)).any()
        if offsets is not None
        else cu_num_draft.new_zeros((), dtype=torch.bool),
    ]
    bad = torch.stack([f.reshape(()).to(torch.bool) for f in flags]).tolist()
    messages = [
        "argument 'cu_num_draft' must start at 0",
        "argument 'cu_num_draft' must be non-decreasing",
        f"a request has more draft tokens than max_num_draft = {max_num_draft}",
        f"argument 'cu_num_draft' must end at the number of draft tokens {draft_tokens.shape[0]}",
        f"argument 'draft_tokens' holds token ids outside the vocabulary [0, {vocab})",
        "argument 'temperature' must be >= 0 (NaN is not allowed)",
        "argument 'offset' must be in [0, 2^32)",
    ]
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
    temperature: Union[float, torch.Tensor] = 1.0,
    generator: Optional[torch.Generator] = None,
    seed: _random.SeedArg = None,
    offset: _random.OffsetArg = 0,
    max_num_draft: Optional[int] = None,
    return_soft_acceptance: bool = False,
    out: Optional[Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]] = None,
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

    Args:
        target_logits: ``[N_draft + R, V]`` float32 / float16 / bfloat16.
        draft_tokens: ``[N_draft]`` int32 or int64.
        cu_num_draft: ``[R + 1]`` int32 prefix offsets (requests may have 0 drafts).
        draft_logits: ``[N_draft, V]``: the drafter's logits (softmax at the same
            temperature), or
        draft_probs: ``[N_draft, V]``: the drafter's probabilities (used as given,
            normalised), or neither: a one-hot drafter (accept with probability
            ``p_t(x)``; the residual is ``p_t`` without ``x``).
        temperature: float or ``[R]`` float32; 0 means greedy for that request
            (accept iff the draft equals the target argmax; no randomness).
        generator: draws the call's seed (default: the device's default generator).
        seed: int (one stream for the batch) or ``[R]`` int64 per-request seeds, which
            make each request's result independent of its position in the batch.
        offset: int in ``[0, 2^32)`` or ``[1]`` / ``[R]`` int64: the stream offset
            (e.g. the round number).
        max_num_draft: width of ``output_tokens`` minus one; computed from
            ``cu_num_draft`` if omitted (a host synchronisation on CUDA; required
            under CUDA graph capture and torch.compile).
        return_soft_acceptance: also return ``1 - 0.5 * ||p_d - p_t||_1`` per draft
            position (the confidence head's training label).
        out: preallocated ``(output_tokens, num_accepted, soft_acceptance or None)``.
        validate: check token ids, ``cu_num_draft`` and temperatures against the
            data (on CUDA this synchronises; it is skipped under graph capture and
            torch.compile, where out-of-range tokens are simply rejected).

    Defined behaviour: NaN and -inf logits have probability 0 (a row with no finite
    logit is uniform); +inf logits share the row's mass; draft probabilities are
    clamped to [0, 1] (NaN -> 0) and normalised, and a draft token with ``p_d = 0``
    is accepted iff ``p_t > 0``; ``R = 0`` returns empty outputs.
    """
    op = "rejection_sample"
    device = _require_tensor(op, "target_logits", target_logits).device
    if device.type not in ("cpu", "cuda"):
        raise TypeError(f"{op}: argument 'target_logits' is on unsupported device {device} (cpu or cuda)")
    target_logits = _float_matrix(op, "target_logits", target_logits, device)
    draft_tokens = _require_tensor(op, "draft_tokens", draft_tokens)
    if draft_tokens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{op}: argument 'draft_tokens' must be int32 or int64, got {draft_tokens.dtype}")
    draft_tokens = _on_device(op, "draft_tokens", draft_tokens, device)
    cu_num_draft = _require_tensor(op, "cu_num_draft", cu_num_draft)
    if cu_num_draft.dtype != torch.int32:
        raise TypeError(f"{op}: argument 'cu_num_draft' must be int32, got {cu_num_draft.dtype}")
    if cu_num_draft.dim() != 1 or cu_num_draft.numel() < 1:
        raise ValueError(f"{op}: argument 'cu_num_draft' must be 1-D with R + 1 >= 1 elements, got shape {list(cu_num_draft.shape)}")
    cu_num_draft = _on_device(op, "cu_num_draft", cu_num_draft, device)
    num_requests = cu_num_draft.shape[0] - 1
    if draft_logits is not None and draft_probs is not None:
        raise ValueError(f"{op}: give at most one of 'draft_logits' and 'draft_probs'")
    if draft_logits is not None:
        draft_logits = _float_matrix(op, "draft_logits", draft_logits, device)
    if draft_probs is not None:
        draft_probs = _float_matrix(op, "draft_probs", draft_probs, device)

    temperatures: Optional[torch.Tensor] = None
    temperature_value = 1.0
    if isinstance(temperature, torch.Tensor):
        if not temperature.is_floating_point():
            raise TypeError(f"{op}: argument 'temperature' must be a float tensor, got {temperature.dtype}")
        temperatures = _on_device(op, "temperature", temperature.to(torch.float32), device)
    elif isinstance(temperature, (int, float)) and not isinstance(temperature, bool):
        temperature_value = float(temperature)
        if not temperature_value >= 0.0:
            raise ValueError(f"{op}: argument 'temperature' must be >= 0, got {temperature}")
    else:
        raise TypeError(f"{op}: argument 'temperature' must be a float or a tensor, got {type(temperature).__name__}")

    rng = _random.resolve(op, device, num_requests, generator, seed, offset)

    host_sync_allowed = not _compiling() and not is_capturing(device)
    if max_num_draft is None:
        if not host_sync_allowed:
            raise ValueError(f"{op}: argument 'max_num_draft' is required under CUDA graph capture and torch.compile")
        max_num_draft = int((cu_num_draft[1:] - cu_num_draft[:-1]).max()) if num_requests > 0 else 0
        max_num_draft = max(max_num_draft, 0)
    if validate and host_sync_allowed and device.type == "cuda":
        _check_values_on_device(
            op, draft_tokens, cu_num_draft, target_logits.shape[1], max_num_draft, temperatures, rng.offsets
        )

    args = (
        target_logits, draft_tokens, cu_num_draft, draft_logits, draft_probs, temperature_value, temperatures,
        rng.seed, rng.seeds, rng.offset, rng.offsets, int(max_num_draft),
    )
    if out is not None:
        output_tokens, num_accepted, soft = out
        if return_soft_acceptance and soft is None:
            raise ValueError(f"{op}: 'out' needs a soft_acceptance tensor when return_soft_acceptance=True")
        soft = soft if return_soft_acceptance else None
        if _compiling():
            torch.ops.dspark.rejection_sample_out(*args, output_tokens, num_accepted, soft)
        else:
            _launch(*args, output_tokens, num_accepted, soft)
        return RejectionOutput(output_tokens, num_accepted, soft)
    if _compiling():
        tokens, accepted, soft = torch.ops.dspark.rejection_sample(*args, return_soft_acceptance)
    else:
        tokens, accepted, soft = _allocate(target_logits, draft_tokens, cu_num_draft, int(max_num_draft), return_soft_acceptance)
        _launch(*args, tokens, accepted, soft if return_soft_acceptance else None)
    return RejectionOutput(tokens, accepted, soft if return_soft_acceptance else None)


# --------------------------------------------------------------------------
# schedule_prefix

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
    conf = _require_tensor(op, "conf", conf)
    device = conf.device
    if device.type not in ("cpu", "cuda"):
        raise TypeError(f"{op}: argument 'conf' is on unsupported device {device} (cpu or cuda)")
    if not conf.is_floating_point():
        raise TypeError(f"{op}: argument 'conf' must be a float tensor, got {conf.dtype}")
    if conf.dim() != 2:
        raise ValueError(f"{op}: argument 'conf' must be [R, gamma], got shape {list(conf.shape)}")
    conf = conf.to(torch.float32).contiguous()
    if mode not in SCHEDULE_MODES:
        raise ValueError(f"{op}: argument 'mode' must be one of {sorted(SCHEDULE_MODES)}, got {mode!r}")
    mode_code = SCHEDULE_MODES[mode]
    if cap is not None:
        cap = _require_tensor(op, "cap", cap)
        if cap.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{op}: argument 'cap' must be an integer tensor, got {cap.dtype}")
        cap = _on_device(op, "cap", cap.to(torch.int32), device)
    if sps is not None:
        sps = _require_tensor(op, "sps", sps)
        if not sps.is_floating_point():
            raise TypeError(f"{op}: argument 'sps' must be a float tensor, got {sps.dtype}")
        sps = _on_device(op, "sps", sps.to(torch.float32), device)
    elif mode in ("causal", "global"):
        raise ValueError(f"{op}: argument 'sps' (the throughput table) is required in {mode} mode")
    budget_value, budgets = 0, None
    if mode == "budget":
        if isinstance(budget, torch.Tensor):
            if budget.dtype not in (torch.int32, torch.int64):
                raise TypeError(f"{op}: argument 'budget' must be an integer tensor, got {budget.dtype}")
            if budget.numel() != 1:
                raise ValueError(f"{op}: argument 'budget' must have one element, got shape {list(budget.shape)}")
            budgets = _on_device(op, "budget", budget.reshape(1), device)
        elif isinstance(budget, int) and not isinstance(budget, bool):
            budget_value = budget
        else:
            raise TypeError(f"{op}: argument 'budget' must be an int or a one-element tensor in budget mode, "
                            f"got {type(budget).__name__}")
    threshold_value = 0.0
    if mode == "threshold":
        if not isinstance(threshold, (int, float)) or isinstance(threshold, bool) or threshold != threshold:
            raise ValueError(f"{op}: argument 'threshold' must be a number in threshold mode, got {threshold!r}")
        threshold_value = float(threshold)
    if (validate and sps is not None and device.type == "cuda" and not _compiling()
            and not is_capturing(device)):
        if not bool(((sps >= 0) & torch.isfinite(sps)).all()):
            raise ValueError(f"{op}: argument 'sps' must be finite and >= 0")
    args = (conf, cap, mode_code, sps, budget_value, budgets, threshold_value)
    if out is not None:
        if _compiling():
            torch.ops.dspark.schedule_prefix_out(*args, *out)
        else:
            _schedule_launch(*args, *out)
        return ScheduleOutput(*out)
    if _compiling():
        return ScheduleOutput(*torch.ops.dspark.schedule_prefix(*args))
    result = _schedule_allocate(conf)
    _schedule_launch(*args, *result)
    return ScheduleOutput(*result)


# --------------------------------------------------------------------------
# markov_sample and confidence

MARKOV_HEADS = {"vanilla": 0, "gated": 1, "rnn": 2}


class MarkovOutput(NamedTuple):
    """Result of :func:`markov_sample`.

    draft_tokens: ``[R, gamma]`` int64.
    logprobs: ``[R, gamma]`` float32, ``log p_d`` of each sampled token (0 when greedy).
    lse: ``[R, gamma]`` float32, log-sum-exp of each corrected row ``(U + B) / T``
        (greedy: ``max(U + B)``), so ``log p_d(v) = (U + B)_v / T - lse``.
    corrected_logits: ``[R, gamma, V]`` float32 ``U + B`` when requested (feed it to
        :func:`rejection_sample` as ``draft_logits``), else None.
    """

    draft_tokens: torch.Tensor
    logprobs: torch.Tensor
    lse: torch.Tensor
    corrected_logits: Optional[torch.Tensor]


def _markov_launch(base_logits, anchor_tokens, w1, w2, head: int, gate_weight, gate_bias, joint_weight,
                   joint_bias, hidden, temperature: float, temperatures, seed: int, seeds, offset: int, offsets,
                   draft_tokens, logprobs, lse, corrected) -> None:
    op = "markov_sample"
    device = base_logits.device
    workspace = None
    if device.type == "cuda":
        R, gamma, V = base_logits.shape
        d = hidden.shape[2] if hidden is not None else 0
        nbytes = C.markov_sample_workspace_bytes(R, gamma, V, w1.shape[1], d, head)
        workspace = torch.empty(max(nbytes, 1), dtype=torch.uint8, device=device)
    C.markov_sample(
        view(base_logits, op, "base_logits"), view(anchor_tokens, op, "anchor_tokens"), view(w1, op, "w1"),
        view(w2, op, "w2"), head, view(gate_weight, op, "gate_weight"), view(gate_bias, op, "gate_bias"),
        view(joint_weight, op, "joint_weight"), view(joint_bias, op, "joint_bias"), view(hidden, op, "hidden"),
        temperature, view(temperatures, op, "temperature"), seed, view(seeds, op, "seed"), offset,
        view(offsets, op, "offset"), view(draft_tokens, op, "draft_tokens"), view(logprobs, op, "logprobs"),
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
                      head: int, gate_weight: Optional[torch.Tensor], gate_bias: Optional[torch.Tensor],
                      joint_weight: Optional[torch.Tensor], joint_bias: Optional[torch.Tensor],
                      hidden: Optional[torch.Tensor], temperature: float, temperatures: Optional[torch.Tensor],
                      seed: int, seeds: Optional[torch.Tensor], offset: int, offsets: Optional[torch.Tensor],
                      corrected: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    out = _markov_allocate(base_logits, corrected)
    _markov_launch(base_logits, anchor_tokens, w1, w2, head, gate_weight, gate_bias, joint_weight, joint_bias,
                   hidden, temperature, temperatures, seed, seeds, offset, offsets, out[0], out[1], out[2],
                   out[3] if corrected else None)
    return out


@_markov_sample_op.register_fake
def _markov_sample_fake(base_logits, anchor_tokens, w1, w2, head, gate_weight, gate_bias, joint_weight, joint_bias,
                        hidden, temperature, temperatures, seed, seeds, offset, offsets, corrected):
    return _markov_allocate(base_logits, corrected)


def _float_tensor(op: str, name: str, t: object, device: torch.device, dim: int) -> torch.Tensor:
    t = _require_tensor(op, name, t)
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{op}: argument '{name}' must be float32, float16 or bfloat16, got {t.dtype}")
    if t.dim() != dim:
        raise ValueError(f"{op}: argument '{name}' must have {dim} dimensions, got shape {list(t.shape)}")
    if t.device != device:
        raise ValueError(f"{op}: argument '{name}' must be on {device}, got {t.device}")
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def _token_tensor(op: str, name: str, t: object, device: torch.device) -> torch.Tensor:
    t = _require_tensor(op, name, t)
    if t.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{op}: argument '{name}' must be int32 or int64, got {t.dtype}")
    return _on_device(op, name, t, device)


def _temperature_args(op: str, temperature, device: torch.device):
    if isinstance(temperature, torch.Tensor):
        if not temperature.is_floating_point():
            raise TypeError(f"{op}: argument 'temperature' must be a float tensor, got {temperature.dtype}")
        return 1.0, _on_device(op, "temperature", temperature.to(torch.float32), device)
    if isinstance(temperature, (int, float)) and not isinstance(temperature, bool):
        if not float(temperature) >= 0.0:
            raise ValueError(f"{op}: argument 'temperature' must be >= 0, got {temperature}")
        return float(temperature), None
    raise TypeError(f"{op}: argument 'temperature' must be a float or a tensor, got {type(temperature).__name__}")


def markov_sample(
    base_logits: torch.Tensor,
    anchor_tokens: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    *,
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
        head: ``vanilla``, ``gated`` (``gate_weight [rank, d + rank]``, ``gate_bias
            [rank]``) or ``rnn`` (``joint_weight [3 rank, 2 rank + d]``, ``joint_bias
            [3 rank]``); the last two need ``hidden [R, gamma, d]``.
        temperature: float or ``[R]``; 0 is greedy (argmax of ``U + B``).
        generator / seed / offset: randomness as in :func:`rejection_sample`.
        return_corrected_logits: also return ``U + B`` ``[R, gamma, V]`` float32, the
            exact values the tokens were sampled from (for ``draft_logits``).
    """
    op = "markov_sample"
    device = _require_tensor(op, "base_logits", base_logits).device
    if device.type not in ("cpu", "cuda"):
        raise TypeError(f"{op}: argument 'base_logits' is on unsupported device {device} (cpu or cuda)")
    base_logits = _float_tensor(op, "base_logits", base_logits, device, 3)
    R, gamma, V = base_logits.shape
    anchor_tokens = _token_tensor(op, "anchor_tokens", anchor_tokens, device)
    w1 = _float_tensor(op, "w1", w1, device, 2).contiguous()
    w2 = _float_tensor(op, "w2", w2, device, 2).contiguous()
    if head not in MARKOV_HEADS:
        raise ValueError(f"{op}: argument 'head' must be one of {sorted(MARKOV_HEADS)}, got {head!r}")
    if head == "vanilla":
        gate_weight = gate_bias = joint_weight = joint_bias = hidden = None
    else:
        if hidden is None:
            raise ValueError(f"{op}: head '{head}' needs argument 'hidden' [R, gamma, d]")
        hidden = _float_tensor(op, "hidden", hidden, device, 3)
        if head == "gated":
            if gate_weight is None or gate_bias is None:
                raise ValueError(f"{op}: head 'gated' needs 'gate_weight' and 'gate_bias'")
            gate_weight = _float_tensor(op, "gate_weight", gate_weight, device, 2).contiguous()
            gate_bias = _float_tensor(op, "gate_bias", gate_bias, device, 1).contiguous()
            joint_weight = joint_bias = None
        else:
            if joint_weight is None or joint_bias is None:
                raise ValueError(f"{op}: head 'rnn' needs 'joint_weight' and 'joint_bias'")
            joint_weight = _float_tensor(op, "joint_weight", joint_weight, device, 2).contiguous()
            joint_bias = _float_tensor(op, "joint_bias", joint_bias, device, 1).contiguous()
            gate_weight = gate_bias = None
    temperature_value, temperatures = _temperature_args(op, temperature, device)
    rng = _random.resolve(op, device, R, generator, seed, offset)
    if validate and device.type == "cuda" and not _compiling() and not is_capturing(device):
        none = torch.zeros((), dtype=torch.bool, device=device)
        flags = [((anchor_tokens < 0) | (anchor_tokens >= V)).any() if R else none,
                 ~(temperatures >= 0).all() if temperatures is not None else none,
                 ((rng.offsets < 0) | (rng.offsets >= _random.OFFSET_LIMIT)).any() if rng.offsets is not None else none]
        bad = torch.stack([f.reshape(()) for f in flags]).tolist()
        messages = (f"argument 'anchor_tokens' holds token ids outside the vocabulary [0, {V})",
                    "argument 'temperature' must be >= 0 (NaN is not allowed)",
                    "argument 'offset' must be in [0, 2^32)")
        for flag, message in zip(bad, messages):
            if flag:
                raise ValueError(f"{op}: {message}")
    args = (base_logits, anchor_tokens, w1, w2, MARKOV_HEADS[head], gate_weight, gate_bias, joint_weight, joint_bias,
            hidden, temperature_value, temperatures, rng.seed, rng.seeds, rng.offset, rng.offsets)
    if _compiling():
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
    ``sigmoid(logit / t_k)``.

    Args: ``hidden [R, gamma, d]``, ``w1 [V, rank]``, ``anchor_tokens [R]``,
    ``draft_tokens [R, gamma]``, ``weight [1, d + rank]`` (or ``[d + rank]``),
    ``bias [1]``. ``validate=False`` skips the value checks of token ids and
    temperatures on CUDA (they read device memory: a synchronisation); shapes
    and dtypes are always checked.
    """
    op = "confidence"
    device = _require_tensor(op, "hidden", hidden).device
    if device.type not in ("cpu", "cuda"):
        raise TypeError(f"{op}: argument 'hidden' is on unsupported device {device} (cpu or cuda)")
    hidden = _float_tensor(op, "hidden", hidden, device, 3)
    w1 = _float_tensor(op, "w1", w1, device, 2).contiguous()
    anchor_tokens = _token_tensor(op, "anchor_tokens", anchor_tokens, device)
    draft_tokens = _token_tensor(op, "draft_tokens", draft_tokens, device)
    weight = _require_tensor(op, "weight", weight)
    weight = _float_tensor(op, "weight", weight.reshape(1, -1) if weight.dim() == 1 else weight, device, 2).contiguous()
    bias = _float_tensor(op, "bias", _require_tensor(op, "bias", bias).reshape(-1), device, 1).contiguous()
    if temperatures is not None:
        temperatures = _require_tensor(op, "temperatures", temperatures)
        if not temperatures.is_floating_point():
            raise TypeError(f"{op}: argument 'temperatures' must be a float tensor, got {temperatures.dtype}")
        temperatures = _on_device(op, "temperatures", temperatures.to(torch.float32), device)
    if validate and device.type == "cuda" and not _compiling() and not is_capturing(device):
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
    if _compiling():
        return ConfidenceOutput(*torch.ops.dspark.confidence(*args))
    out = _confidence_allocate(hidden)
    _confidence_launch(*args, *out)
    return ConfidenceOutput(*out)


# --------------------------------------------------------------------------
# Paged KV cache: append_kv, paged_attention, rope

ATTENTION_MASKS = {"causal": 0, "block": 1}


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
    device = _require_tensor(op, "k", k).device
    if device.type not in ("cpu", "cuda"):
        raise TypeError(f"{op}: argument 'k' is on unsupported device {device} (cpu or cuda)")
    k = _float_tensor(op, "k", k, device, 3)
    v = _float_tensor(op, "v", v, device, 3)
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        cache = _float_tensor(op, name, cache, device, 4)
        if not cache.is_contiguous():
            raise ValueError(f"{op}: argument '{name}' must be contiguous")
    slot_mapping = _require_tensor(op, "slot_mapping", slot_mapping)
    if slot_mapping.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{op}: argument 'slot_mapping' must be an integer tensor, got {slot_mapping.dtype}")
    slot_mapping = _on_device(op, "slot_mapping", slot_mapping.to(torch.int64), device)
    if validate and device.type == "cuda" and not _compiling() and not is_capturing(device):
        capacity = k_cache.shape[0] * k_cache.shape[1]
        if slot_mapping.numel() and bool((slot_mapping >= capacity).any()):
            raise ValueError(f"{op}: argument 'slot_mapping' holds slots past the cache's {capacity}")
    if _compiling():
        torch.ops.dspark.append_kv(k, v, k_cache, v_cache, slot_mapping)
    else:
        _append_kv_launch(k, v, k_cache, v_cache, slot_mapping)


def _append_kv_launch(k, v, k_cache, v_cache, slot_mapping) -> None:
    op = "append_kv"
    C.append_kv(view(k, op, "k"), view(v, op, "v"), view(k_cache, op, "k_cache"), view(v_cache, op, "v_cache"),
                view(slot_mapping, op, "slot_mapping"), stream_handle(k.device))


def _attention_launch(q, k_cache, v_cache, block_table, kv_lens, cu_q, mask: int, scale: float, out, lse) -> None:
    op = "paged_attention"
    workspace = None
    if q.device.type == "cuda":
        nbytes = C.paged_attention_workspace_bytes(q.shape[0], block_table.shape[0], q.shape[1], k_cache.shape[2],
                                                   q.shape[2], block_table.shape[1], k_cache.shape[1],
                                                   _DTYPE_CODES[q.dtype])
        workspace = torch.empty(max(nbytes, 1), dtype=torch.uint8, device=q.device)
    C.paged_attention(view(q, op, "q"), view(k_cache, op, "k_cache"), view(v_cache, op, "v_cache"),
                      view(block_table, op, "block_table"), view(kv_lens, op, "kv_lens"), view(cu_q, op, "cu_q"),
                      mask, scale, view(out, op, "out"), view(lse, op, "lse"), view(workspace, op, "workspace"),
                      stream_handle(q.device))


@torch.library.custom_op("dspark::paged_attention", mutates_args=())
def _paged_attention_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                        kv_lens: torch.Tensor, cu_q: torch.Tensor, mask: int, scale: float
                        ) -> Tuple[torch.Tensor, torch.Tensor]:
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(q.shape[:2], dtype=torch.float32, device=q.device)
    _attention_launch(q, k_cache, v_cache, block_table, kv_lens, cu_q, mask, scale, out, lse)
    return out, lse


@_paged_attention_op.register_fake
def _paged_attention_fake(q, k_cache, v_cache, block_table, kv_lens, cu_q, mask, scale):
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
    Returns the output ``[T, H_q, D]`` and, if ``return_lse``, the log-sum-exp of
    the scaled scores per query and head ``[T, H_q]`` float32 (-inf, with a zero
    output, when a query sees no key).
    """
    op = "paged_attention"
    device = _require_tensor(op, "q", q).device
    if device.type not in ("cpu", "cuda"):
        raise TypeError(f"{op}: argument 'q' is on unsupported device {device} (cpu or cuda)")
    q = _float_tensor(op, "q", q, device, 3)
    k_cache = _float_tensor(op, "k_cache", k_cache, device, 4)
    v_cache = _float_tensor(op, "v_cache", v_cache, device, 4)
    block_table = _require_tensor(op, "block_table", block_table)
    if block_table.dtype != torch.int32:
        raise TypeError(f"{op}: argument 'block_table' must be int32, got {block_table.dtype}")
    block_table = _on_device(op, "block_table", block_table, device)
    for name, t in (("kv_lens", kv_lens), ("cu_q", cu_q)):
        t = _require_tensor(op, name, t)
        if t.dtype != torch.int32:
            raise TypeError(f"{op}: argument '{name}' must be int32, got {t.dtype}")
    kv_lens = _on_device(op, "kv_lens", kv_lens, device)
    cu_q = _on_device(op, "cu_q", cu_q, device)
    if mask not in ATTENTION_MASKS:
        raise ValueError(f"{op}: argument 'mask' must be 'causal' or 'block', got {mask!r}")
    if q.shape[-1] == 0:
        raise ValueError(f"{op}: argument 'q' must have a head dim >= 1, got shape {list(q.shape)}")
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"{op}: argument 'scale' must be a float, got {type(scale).__name__}")
    scale = float(scale)
    if validate and device.type == "cuda" and not _compiling() and not is_capturing(device) and kv_lens.numel():
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
    args = (q, k_cache, v_cache, block_table, kv_lens, cu_q, ATTENTION_MASKS[mask], scale)
    if _compiling():
        result, lse = torch.ops.dspark.paged_attention(*args)
        if out is not None:
            out.copy_(result)
            result = out
    else:
        result = out if out is not None else torch.empty(q.shape, dtype=q.dtype, device=device)
        lse = torch.empty(q.shape[:2], dtype=torch.float32, device=device) if return_lse else None
        _attention_launch(*args, result, lse)
    return (result, lse) if return_lse else result


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
    device = _require_tensor(op, "q", q).device
    if device.type not in ("cpu", "cuda"):
        raise TypeError(f"{op}: argument 'q' is on unsupported device {device} (cpu or cuda)")
    _float_tensor(op, "q", q, device, 3)
    if q.stride(-1) != 1:
        raise ValueError(f"{op}: argument 'q' must have unit stride in its last dimension (it is rotated in place)")
    if k is not None:
        _float_tensor(op, "k", k, device, 3)
        if k.stride(-1) != 1:
            raise ValueError(f"{op}: argument 'k' must have unit stride in its last dimension")
    positions = _token_tensor(op, "positions", positions, device)
    if inv_freq is None:
        rotary_dim = q.shape[-1] if rotary_dim is None else int(rotary_dim)
        if rotary_dim <= 0 or rotary_dim % 2 or rotary_dim > q.shape[-1]:
            raise ValueError(f"{op}: argument 'rotary_dim' must be even and in (0, {q.shape[-1]}], got {rotary_dim}")
        if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not (0.0 < float(theta) < math.inf):
            raise ValueError(f"{op}: argument 'theta' must be a positive finite number, got {theta!r}")
        inv_freq = _cached_inv_freq(rotary_dim, float(theta), device)
    else:
        inv_freq = _on_device(op, "inv_freq", _require_tensor(op, "inv_freq", inv_freq).to(torch.float32), device)
    if _compiling():
        torch.ops.dspark.rope(q, k, positions, inv_freq)
    else:
        _rope_launch(q, k, positions, inv_freq)
