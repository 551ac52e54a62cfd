"""A batched, exactly lossless speculative decoding engine (DSPARK.md, section 1).

Each round, for the requests in flight:
  1. the drafter's parallel backbone drafts a block per request,
     ``markov_sample`` samples it, ``confidence`` scores it, and the policy
     picks how many drafts each request verifies;
  2. one host synchronisation reads what the previous round committed and the
     lengths just chosen: finished requests leave, queued ones join (their
     prompts are prefilled and their first token sampled);
  3. one ragged target forward over ``[anchor, drafts...]`` per request,
     ``rejection_sample``, and the commit, all on the device: the new anchors,
     positions and counts, and the drafter's context extended with the target
     hidden states of the committed positions (rejected positions are skipped
     by their cache slots, which rolls both caches back).
Without a drafter the same path is plain autoregressive decoding (every
request verifies 0 drafts and commits the target's sample), the baseline.

Randomness: every request has its own seed (batch-invariant results); round
``t`` of a request uses stream offset ``t`` (the prefill's sample is offset 0).
"""

from __future__ import annotations

import numbers
import time
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Set, Tuple, Union

import torch

from . import ops
from .calibration import CalibrationRecorder
from .models import Batch, DSparkDrafter, PagedKVCache, TargetModel
from .models.common import host_to_device, pack_cpu_linears
from .models.drafter import check_compatible
from .scheduler import Fixed, Policy, SPSTable

__all__ = ["GenerationResult", "RequestMetrics", "RunMetrics", "SamplingParams", "SpeculativeEngine"]

_SEED_MASK = (1 << 62) - 1
_FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def json_rates(values: Sequence[float], digits: Optional[int] = None) -> List[Optional[float]]:
    """Rates for a JSON report (rounded to ``digits`` if given): None where a
    position had no trials, whose rate is nan (strict JSON has no nan)."""
    return [(v if digits is None else round(v, digits)) if v == v else None for v in values]


@dataclass
class SamplingParams:
    temperature: float = 1.0
    seed: Optional[int] = None  # default: derived from the engine's seed and the request's index
    max_new_tokens: int = 64
    stop_tokens: Sequence[int] = ()
    # truncation of the target distribution (ops.rejection_sample): 0 / 1 / 0 = off; the
    # drafter samples from the same truncation of its own distribution
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    logprobs: bool = False  # report log p_t of each generated token (GenerationResult.logprobs)


@dataclass
class RequestMetrics:
    rounds: int = 0  # verification rounds (the prefill's token is not one)
    drafted_verified: int = 0  # draft tokens sent to the target
    accepted: int = 0  # draft tokens accepted

    @property
    def tau(self) -> float:
        """Tokens committed per round, bonus included."""
        return (self.accepted + self.rounds) / self.rounds if self.rounds else 0.0


@dataclass
class GenerationResult:
    tokens: List[int]
    finish_reason: str  # "stop", "length" or "error"
    error: Optional[str] = None
    metrics: RequestMetrics = field(default_factory=RequestMetrics)
    # with SamplingParams(logprobs=True): log p_t of each token under the request's temperature and
    # truncation (greedy: the untruncated softmax at temperature 1)
    logprobs: Optional[List[float]] = None


@dataclass
class RunMetrics:
    """Counters of a ``generate`` call and the rates derived from them.

    Two per-position acceptance rates are kept, for draft position ``k = 1..gamma``
    (list index ``k - 1``), over request-rounds:

    - ``acceptance_by_position`` (conditional, DSPARK.md): rounds that accepted
      ``k`` drafts or more, among rounds that verified ``k`` or more drafts and
      accepted the first ``k - 1``: ``P(x_k accepted | x_1..x_{k-1} accepted)``.
    - ``prefix_acceptance_by_position`` (DeepSpec's ``accept_rate@{k-1}``, the
      rate of the paper's tables): rounds that accepted ``k`` drafts or more,
      among rounds that verified ``k`` or more drafts, whatever happened before
      ``k``: ``P(x_1..x_k all accepted)`` when every round verifies ``k``.

    With every round verifying the whole block, the prefix rate at ``k`` is the
    product of the conditional rates at ``1..k``. ``nan`` where no round
    verified ``k`` drafts (``None`` in ``as_dict``)."""

    generated_tokens: int = 0
    wall_seconds: float = 0.0
    rounds: int = 0  # engine rounds with at least one verification
    drafting_rounds: int = 0  # rounds that drafted (the rest were plain steps)
    request_rounds: int = 0
    verified_drafts: int = 0
    accepted_drafts: int = 0
    # conditional: at k, accepted k among request-rounds that verified k and accepted 1..k-1
    position_trials: List[int] = field(default_factory=list)
    position_accepts: List[int] = field(default_factory=list)
    # prefix: at k, request-rounds that verified k or more drafts, and of those, that accepted k or more
    prefix_trials: List[int] = field(default_factory=list)
    prefix_accepts: List[int] = field(default_factory=list)

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / self.wall_seconds if self.wall_seconds > 0 else 0.0

    @property
    def tau(self) -> float:
        """Tokens committed per request-round, the bonus included (DeepSpec's ``accept_len``)."""
        return (self.accepted_drafts + self.request_rounds) / self.request_rounds if self.request_rounds else 0.0

    @property
    def verified_per_round(self) -> float:
        return self.verified_drafts / self.request_rounds if self.request_rounds else 0.0

    @property
    def acceptance_by_position(self) -> List[float]:
        """Conditional acceptance at positions 1..: see the class docstring."""
        return [a / t if t else float("nan") for a, t in zip(self.position_accepts, self.position_trials)]

    @property
    def prefix_acceptance_by_position(self) -> List[float]:
        """Prefix (unconditional) acceptance at positions 1.., DeepSpec's accept_rate: see the class docstring."""
        return [a / t if t else float("nan") for a, t in zip(self.prefix_accepts, self.prefix_trials)]

    def as_dict(self) -> dict:
        return {"generated_tokens": self.generated_tokens, "wall_seconds": self.wall_seconds,
                "tokens_per_second": self.tokens_per_second, "tau": self.tau, "rounds": self.rounds,
                "drafting_rounds": self.drafting_rounds, "request_rounds": self.request_rounds,
                "verified_per_round": self.verified_per_round,
                "acceptance_by_position": json_rates(self.acceptance_by_position),
                "prefix_acceptance_by_position": json_rates(self.prefix_acceptance_by_position)}

    def record(self, lengths: Sequence[int], accepted: Sequence[int]) -> None:
        for length, acc in zip(lengths, accepted):
            self.request_rounds += 1
            self.verified_drafts += length
            self.accepted_drafts += acc
            while len(self.position_trials) < length:
                self.position_trials.append(0)
                self.position_accepts.append(0)
                self.prefix_trials.append(0)
                self.prefix_accepts.append(0)
            for k in range(min(length, acc + 1)):  # positions 1..acc+1 were tried (if verified)
                self.position_trials[k] += 1
                if k < acc:
                    self.position_accepts[k] += 1
            for k in range(length):  # every verified position counts for the prefix rate
                self.prefix_trials[k] += 1
                if k < acc:
                    self.prefix_accepts[k] += 1


@dataclass
class _Request:
    index: int
    prompt: List[int]
    params: SamplingParams
    seed: int
    slot: int = -1
    tokens: List[int] = field(default_factory=list)
    metrics: RequestMetrics = field(default_factory=RequestMetrics)
    done: Optional[str] = None
    logprobs: List[float] = field(default_factory=list)


class SpeculativeEngine:
    """Batched generation with a target model and, optionally, a DSpark drafter.

    Args:
        target: the target model.
        drafter: a DSpark (or DFlash-style, ``markov_rank = 0``) drafter, or None for
            plain autoregressive decoding through the same code path.
        policy: chooses verification lengths each round (default: ``Fixed()``,
            verify the whole block); ``Threshold``, ``HardwareAware`` and
            ``AsyncHardwareAware`` need a drafter with a confidence head.
        gamma: drafts per round (default: the drafter's block size; at most that).
        max_concurrency: requests in flight; more wait in a queue and join between
            rounds as others finish (continuous batching).
        max_model_len: the longest prompt + generation a request may have.
        page_size, num_pages: the paged caches (default: room for max_concurrency
            requests of max_model_len tokens).
        max_prefill_tokens: prompt tokens prefilled in one round at most (a longer
            single prompt is still prefilled whole).
        seed: requests without their own seed get one derived from it and their index.
        recorder: a CalibrationRecorder fed with every round's confidence logits.
    """

    def __init__(self, target: TargetModel, drafter: Optional[DSparkDrafter] = None, *, policy: Optional[Policy] = None,
                 gamma: Optional[int] = None, max_concurrency: int = 16, max_model_len: int = 2048,
                 page_size: int = 16, num_pages: Optional[int] = None, max_prefill_tokens: int = 8192, seed: int = 0,
                 recorder: Optional[CalibrationRecorder] = None, progress: bool = False) -> None:
        for name, value in (("max_concurrency", max_concurrency), ("max_model_len", max_model_len),
                            ("page_size", page_size), ("max_prefill_tokens", max_prefill_tokens)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"SpeculativeEngine: {name} must be a positive int, got {value!r}")
        if num_pages is not None and (not isinstance(num_pages, int) or num_pages < 1):
            raise ValueError(f"SpeculativeEngine: num_pages must be a positive int, got {num_pages!r}")
        if policy is not None and not isinstance(policy, Policy):
            raise TypeError(f"SpeculativeEngine: policy must be a dspark.scheduler.Policy, got {type(policy).__name__}")
        self.target = target
        self.drafter = drafter
        self.policy = policy if policy is not None else Fixed()
        if drafter is not None:
            check_compatible(drafter.config, target)
            if gamma is not None and not 1 <= gamma <= drafter.block_size:
                raise ValueError(f"gamma must be in [1, {drafter.block_size}] (the drafter's block size), got {gamma}")
            if not isinstance(self.policy, Fixed) and not drafter.config.enable_confidence_head:
                raise ValueError(f"policy {self.policy.name} needs a drafter with a confidence head")
        self.gamma = 0 if drafter is None else (gamma or drafter.block_size)
        self.block = 0 if drafter is None else drafter.block_size
        self.max_concurrency = max_concurrency
        self.max_model_len = max_model_len
        self.max_prefill_tokens = max_prefill_tokens
        self.page_size = page_size
        self.seed = seed
        self.recorder = recorder
        self.progress = progress
        self.device = next(target.parameters()).device
        pages_per_request = (max_model_len + self.block + 1 + page_size - 1) // page_size
        total = num_pages if num_pages is not None else max_concurrency * pages_per_request
        self.target_cache = target.new_cache(total, page_size, max_concurrency, pages_per_request)
        self.draft_cache: Optional[PagedKVCache] = (
            drafter.new_cache(total, page_size, max_concurrency, pages_per_request) if drafter is not None else None)
        # the drafter's draft vocabulary (None: it scores the whole vocabulary)
        self.draft_vocab = drafter.vocab_map(self.device) if drafter is not None else None
        if self.device.type == "cpu":  # linears run on weights packed once where it pays (models.common.PackedWeight)
            pack_cpu_linears(target)
            if drafter is not None:
                drafter.pack_cpu()
        self.metrics = RunMetrics()
        self._truncating = False  # whether a request of the current run truncates (set by _run)
        # (hidden, positions, request slots, the same slots on the host) of plain rounds, written into the
        # drafter's context in one batch before the next draft or admission (see _flush_context; no page
        # changes hands before)
        self._deferred_context: List[Tuple[torch.Tensor, torch.Tensor, torch.Tensor, List[int]]] = []
        self._logprobs = False  # whether a request of the current run asks for log-probabilities

    # ----------------------------------------------------------------- API

    def generate(self, prompts: Sequence[Sequence[int]],
                 sampling: Union[SamplingParams, Sequence[SamplingParams], None] = None) -> List[GenerationResult]:
        """Generates for every prompt (token ids); results in prompt order.

        Each request is checked when it is admitted: the prompt is a sequence of
        int token ids in ``[0, V)`` (bools and floats are refused, not rounded),
        ``max_new_tokens`` an int >= 1, ``temperature`` a finite number >= 0,
        ``seed`` an int or None, ``stop_tokens`` a sequence of ints, ``top_k`` an
        int in ``[0, V]``, ``top_p`` a number in ``(0, 1]``, ``min_p`` one in
        ``[0, 1]``, ``logprobs`` a bool, and prompt + max_new_tokens fits
        ``max_model_len``. A bad request gets a result with finish_reason 'error'
        and a message, and does not affect the others."""
        if sampling is None or isinstance(sampling, SamplingParams):
            sampling = [sampling or SamplingParams()] * len(prompts)
        if len(sampling) != len(prompts):
            raise ValueError(f"generate: {len(prompts)} prompts but {len(sampling)} sampling parameters")
        self.metrics = RunMetrics()
        self.policy.reset()
        results: List[Optional[GenerationResult]] = [None] * len(prompts)
        queue = []
        for i, (prompt, params) in enumerate(zip(prompts, sampling)):
            request = self._check_request(i, prompt, params)
            if isinstance(request, str):
                results[i] = GenerationResult([], "error", request)
            else:
                queue.append(request)
        start = time.perf_counter()
        self._run(queue, results)
        self.metrics.wall_seconds = time.perf_counter() - start
        self.metrics.generated_tokens = sum(len(res.tokens) for res in results if res is not None)
        return results  # type: ignore[return-value]

    def profile_sps(self, max_batch_tokens: Optional[int] = None, context_len: int = 256, *,
                    draft: bool = True, **kwargs) -> SPSTable:
        """Measures what a round costs here, for the hardware-aware policies: the
        target's verification throughput (forward steps per second) at every
        batch size up to ``max_batch_tokens`` (default: every request in flight
        verifying a whole block) and, with a drafter and ``draft=True``, the
        drafting time of one round (backbone, ``markov_sample``, ``confidence``) for
        1 .. ``max_concurrency`` requests, interleaved with the target's. A batch
        of ``B`` tokens is laid out as in a round: requests of ``gamma + 1`` rows
        after ``context_len`` cached tokens each. Keyword arguments go to
        :meth:`SPSTable.profile` (warmup, repeats, batch_sizes, progress)."""
        per = self.gamma + 1
        B_max = max_batch_tokens if max_batch_tokens is not None else self.max_concurrency * per
        if B_max < 1:
            raise ValueError(f"profile_sps: max_batch_tokens must be >= 1, got {B_max}")
        forward, draft_fn = self.cost_probes(B_max, context_len, draft=draft)
        kwargs.setdefault("device", self.device)
        table = SPSTable.profile(forward, B_max, draft=draft_fn, max_requests=self.max_concurrency if draft_fn else 0,
                                 **kwargs)
        table.meta.update(gamma=self.gamma, context_len=context_len, dtype=str(next(self.target.parameters()).dtype))
        return table

    def cost_probes(self, max_batch_tokens: int, context_len: int = 256, draft: bool = True,
                    rows_per_request: Optional[int] = None):
        """The two callables :meth:`profile_sps` times: ``forward(B)``, a target
        forward over ``B`` batch tokens laid out as in a round (requests of
        ``rows_per_request`` rows, default ``gamma + 1``, after ``context_len``
        cached tokens), and ``draft(R)``, one round's drafting for ``R``
        requests (None without a drafter or with ``draft=False``). Their caches
        are their own."""
        per = rows_per_request or self.gamma + 1
        B_max = max_batch_tokens
        R_max = max((B_max + per - 1) // per, self.max_concurrency if draft and self.drafter is not None else 0)
        page = self.page_size
        pages_per_request = (context_len + max(per, self.block + 1) + page - 1) // page
        cache = self.target.new_cache(R_max * pages_per_request, page, R_max, pages_per_request)
        for r in range(R_max):
            cache.allocate(r, context_len + per)
        dev = self.device
        layers = self.drafter.config.target_layer_ids if self.drafter is not None else ()

        def forward(B: int) -> None:
            R = (B + per - 1) // per
            q_lens = [per] * (R - 1) + [B - per * (R - 1)]
            cu = [0]
            for q in q_lens:
                cu.append(cu[-1] + q)
            requests = host_to_device([r for r, q in enumerate(q_lens) for _ in range(q)], torch.int64, dev)
            positions = host_to_device([context_len + i for q in q_lens for i in range(q)], torch.int64, dev)
            batch = Batch(torch.zeros(B, dtype=torch.int64, device=dev), positions,
                          host_to_device(cu, torch.int32, dev), cache.block_table[:R],
                          host_to_device([context_len + q for q in q_lens], torch.int32, dev),
                          cache.slots(requests, positions))
            self.target(batch, cache, hidden_layers=layers)

        draft_fn = None
        if draft and self.drafter is not None:
            draft_cache = self.drafter.new_cache(R_max * pages_per_request, page, R_max, pages_per_request)
            for r in range(R_max):
                draft_cache.allocate(r, context_len + self.block + 1)

            def draft_fn(R: int) -> None:
                state = _State(
                    anchors=torch.zeros(R, dtype=torch.int64, device=dev),
                    starts=torch.full((R,), context_len, dtype=torch.int64, device=dev),
                    slots=torch.arange(R, dtype=torch.int64, device=dev),
                    generated=torch.zeros(R, dtype=torch.int64, device=dev),
                    max_new=torch.full((R,), 1 << 30, dtype=torch.int64, device=dev),
                    temperatures=torch.ones(R, dtype=torch.float32, device=dev),
                    seeds=torch.arange(R, dtype=torch.int64, device=dev),
                    rounds=torch.ones(R, dtype=torch.int64, device=dev),
                    top_k=torch.zeros(R, dtype=torch.int32, device=dev),
                    top_p=torch.ones(R, dtype=torch.float32, device=dev),
                    min_p=torch.zeros(R, dtype=torch.float32, device=dev))
                self._draft(state, cache=draft_cache, schedule=False)

        return forward, draft_fn

    # ------------------------------------------------------------- helpers

    def _check_request(self, index: int, prompt: object, params: object) -> Union["_Request", str]:
        """The request, with its fields checked by type and range and copied
        (token ids are ints, not bools or floats), or what is wrong with it."""
        V = self.target.config.vocab_size
        if not isinstance(params, SamplingParams):
            return f"sampling parameters must be a SamplingParams, got {type(params).__name__}"
        tokens = _int_sequence(prompt)
        if isinstance(tokens, str):
            return f"prompt {tokens}"
        if not tokens:
            return "empty prompt"
        bad = next((i for i, t in enumerate(tokens) if not 0 <= t < V), None)
        if bad is not None:
            return f"prompt holds token ids outside the vocabulary [0, {V}) (prompt[{bad}] = {tokens[bad]})"
        max_new = params.max_new_tokens
        if isinstance(max_new, bool) or not isinstance(max_new, numbers.Integral) or max_new < 1:
            return f"max_new_tokens must be an int >= 1, got {_show(max_new)}"
        temperature = params.temperature
        if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) or not (
                0.0 <= float(temperature) <= _FLOAT32_MAX):
            return f"temperature must be a finite number >= 0, got {_show(temperature)}"
        seed = params.seed
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)):
            return f"seed must be an int or None, got {_show(seed)}"
        stops = _int_sequence(params.stop_tokens)
        if isinstance(stops, str):
            return f"stop_tokens {stops}"
        top_k, top_p, min_p = params.top_k, params.top_p, params.min_p
        if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or not 0 <= top_k <= V:
            return f"top_k must be an int in [0, {V}] (0: off), got {_show(top_k)}"
        if isinstance(top_p, bool) or not isinstance(top_p, numbers.Real) or not 0.0 < float(top_p) <= 1.0:
            return f"top_p must be a number in (0, 1] (1: off), got {_show(top_p)}"
        if isinstance(min_p, bool) or not isinstance(min_p, numbers.Real) or not 0.0 <= float(min_p) <= 1.0:
            return f"min_p must be a number in [0, 1] (0: off), got {_show(min_p)}"
        if not isinstance(params.logprobs, bool):
            return f"logprobs must be True or False, got {_show(params.logprobs)}"
        total = len(tokens) + int(max_new)
        if total > self.max_model_len:
            return f"prompt ({len(tokens)}) + max_new_tokens ({max_new}) exceeds max_model_len {self.max_model_len}"
        checked = SamplingParams(temperature=float(temperature), seed=None if seed is None else int(seed),
                                 max_new_tokens=int(max_new), stop_tokens=tuple(stops), top_k=int(top_k),
                                 top_p=float(top_p), min_p=float(min_p), logprobs=params.logprobs)
        seed_value = checked.seed if checked.seed is not None else self.seed * 1000003 + index
        return _Request(index, tokens, checked, seed_value & _SEED_MASK)

    def _budget(self, r: _Request) -> int:
        return len(r.prompt) + r.params.max_new_tokens + self.block + 1

    def _finish(self, r: _Request) -> None:
        """Applies stop tokens and the length limit to r.tokens; sets r.done."""
        stops = set(int(s) for s in r.params.stop_tokens)
        for i, t in enumerate(r.tokens):
            if t in stops:
                r.tokens = r.tokens[: i + 1]
                r.logprobs = r.logprobs[: i + 1]
                r.done = "stop"
                return
        if len(r.tokens) >= r.params.max_new_tokens:
            r.tokens = r.tokens[: r.params.max_new_tokens]
            r.logprobs = r.logprobs[: r.params.max_new_tokens]
            r.done = "length"

    # ----------------------------------------------------------- the loop

    def _run(self, queue: List[_Request], results: List[Optional[GenerationResult]]) -> None:
        dev = self.device
        active: List[_Request] = []
        free_slots = list(range(self.max_concurrency - 1, -1, -1))
        # device state of the active requests, in `active` order
        state = _State.empty(dev)
        pending = None  # what the last round committed, read at the next synchronisation
        bar = _progress(self.progress, sum(r.params.max_new_tokens for r in queue))
        V = self.target.config.vocab_size
        self._deferred_context = []
        self._truncating = any(0 < r.params.top_k < V or r.params.top_p < 1.0 or r.params.min_p > 0.0
                               for r in queue)
        self._logprobs = any(r.params.logprobs for r in queue)
        clock = _RoundClock(dev)
        while active or queue or pending is not None:
            # 1. draft (device) for the requests the policy picks: none (a plain step, when it expects that
            # to pay more), all, or a probe's few, the most recently admitted (a plain step for the others)
            drafted = None
            n_draft = 0
            if active and self.drafter is not None:
                # with no request waiting the batch only drains: the policy may weigh when its last one ends
                self.policy.before_round([r.index for r in active], None if queue else
                                         [r.params.max_new_tokens - len(r.tokens) for r in active])
                n_draft = min(max(int(self.policy.draft_requests(len(active))), 0), len(active))
            subset = list(range(len(active) - n_draft, len(active))) if 0 < n_draft < len(active) else None
            if n_draft:
                # the deferred work of earlier plain rounds, for the requests drafted: not timed as this round's
                self._flush_context(None if subset is None else {active[i].slot for i in subset})
            round_start = clock.start()
            if n_draft:
                drafted = self._draft(state if subset is None else state.select(subset))
            # 2. the one synchronisation of the round
            fetch = []
            if pending is not None:
                fetch += [pending.tokens.reshape(-1), pending.accepted]
            if drafted is not None:
                fetch.append(drafted.lengths.to(torch.int64))
            host = torch.cat([t.to(torch.int64).reshape(-1) for t in fetch]).tolist() if fetch else []
            if fetch:
                clock.report(self.policy)  # the last round's time (its events are done)
            at = 0
            if pending is not None:
                n_rows, width = pending.tokens.shape
                tokens = host[at:at + n_rows * width]
                at += n_rows * width
                accepted = host[at:at + n_rows]
                at += n_rows
                logprobs = pending.logprobs.reshape(-1).tolist() if pending.logprobs is not None else None
                before = sum(len(r.tokens) for r in pending.requests)
                round_lengths, round_accepted = [], []
                observed, observed_lengths, observed_accepted = [], [], []  # what the policy learns from
                for i, r in enumerate(pending.requests):
                    count = accepted[i] + 1
                    verified = pending.verified[i]
                    # a request whose remaining token budget (before this round) bound its
                    # verification length says little about the drafter: the policy does not learn from it
                    cap = r.params.max_new_tokens - len(r.tokens) - 1
                    uncapped = verified is not None and (cap >= self.gamma or verified < cap)
                    if pending.drafted_rows is not None and not pending.drafted_rows[i]:
                        uncapped = False  # a plain step within a probe says nothing about the drafter
                    r.tokens.extend(tokens[i * width:i * width + count])
                    if logprobs is not None and r.params.logprobs:
                        r.logprobs.extend(logprobs[i * width:i * width + count])
                    if verified is not None:  # None: the prefill's token, not a round
                        r.metrics.rounds += 1
                        r.metrics.drafted_verified += verified
                        r.metrics.accepted += accepted[i]
                        round_lengths.append(verified)
                        round_accepted.append(accepted[i])
                        if uncapped:
                            observed.append(r.index)
                            observed_lengths.append(verified)
                            observed_accepted.append(accepted[i])
                    self._finish(r)
                if round_lengths:
                    self.metrics.rounds += 1
                    self.metrics.record(round_lengths, round_accepted)
                    if pending.drafted:
                        self.metrics.drafting_rounds += 1
                        self.policy.observe_requests(observed, observed_lengths, observed_accepted)
                bar.update(sum(len(r.tokens) for r in pending.requests) - before)
            lengths = [0] * len(active)
            drafted_rows = None  # a probe: which requests it drafted for
            if drafted is not None:
                lengths = host[at:at + n_draft]
                if subset is not None:  # the probe's requests in place, the others verify nothing
                    placed = [0] * len(active)
                    for j, i in enumerate(subset):
                        placed[i] = lengths[j]
                    lengths, drafted = placed, drafted.place(subset, len(active))
                    drafted_rows = [i in subset for i in range(len(active))]
            pending = None
            # finished requests leave
            keep = [i for i, r in enumerate(active) if r.done is None]
            for r in active:
                if r.done is not None:
                    results[r.index] = GenerationResult(r.tokens, r.done, None, r.metrics,
                                                        r.logprobs if r.params.logprobs else None)
                    self.target_cache.release(r.slot)
                    if self.draft_cache is not None:
                        self.draft_cache.release(r.slot)
                    free_slots.append(r.slot)
            if len(keep) < len(active):
                active = [active[i] for i in keep]
                state = state.select(keep)
                lengths = [lengths[i] for i in keep]
                if drafted is not None:
                    drafted = drafted.select(keep)
                if drafted_rows is not None:
                    drafted_rows = [drafted_rows[i] for i in keep]
            # 3. verify the drafted requests (device), then admit new ones
            committed = None
            if active:
                committed = self._verify(active, state, drafted, lengths)
                committed.drafted_rows = drafted_rows
                clock.stop(round_start, drafted is not None, n_draft if drafted is not None else len(active),
                           len(active) + sum(lengths))
            joined = self._admit(queue, free_slots, results)
            if committed is not None or joined is not None:
                pending = _Pending.concat(committed, joined)
                if joined is not None:
                    active = active + joined.requests
                    state = state.concat(joined.state)
        bar.close()

    # ------------------------------------------------------------ drafting

    def _draft(self, state: "_State", cache: Optional[PagedKVCache] = None, schedule: bool = True) -> "_Drafted":
        """Drafts a block for every request in ``state`` and (``schedule``) lets the
        policy choose the verification lengths."""
        drafter, target = self.drafter, self.target
        gamma = self.gamma if self.policy.max_length is None else max(1, min(self.gamma, self.policy.max_length))
        draft = drafter.draft(target, state.anchors, state.starts, state.slots, cache or self.draft_cache,
                              num_positions=gamma)
        w1, w2 = drafter.markov_weights(self.device)
        hidden = draft.hidden
        sampled = ops.markov_sample(draft.base_logits, state.anchors, w1, w2, draft_vocab=self.draft_vocab,
                                    temperature=state.temperatures, seed=state.seeds, offset=state.rounds,
                                    return_corrected_logits=True, validate=False, **drafter.markov_kwargs(hidden),
                                    **self._truncation(state))
        conf = drafter.confidence(hidden, state.anchors, sampled.draft_tokens)
        if not schedule:
            return _Drafted(sampled.draft_tokens, sampled.corrected_logits, None,
                            conf.logits if conf is not None else None)
        cap = torch.clamp(state.max_new - state.generated - 1, min=0).to(torch.int32)
        probabilities = conf.conf if conf is not None else torch.ones(
            state.anchors.shape[0], gamma, device=self.device)
        lengths = self.policy(probabilities.contiguous(), cap, validate=False)
        lengths = torch.clamp(lengths, max=gamma)
        return _Drafted(sampled.draft_tokens, sampled.corrected_logits, lengths,
                        conf.logits if conf is not None else None)

    def _flush_context(self, requests: Optional[Set[int]] = None) -> None:
        """Writes the committed positions of the plain rounds since the last draft
        into the drafter's context, in one batch: of every request, or of the
        requests in the cache slots ``requests`` (a probe's; the others' wait on).
        Plain rounds defer it: while the policy expects drafting not to pay, a
        round costs one target step and no drafter work at all. It must run for
        a request before it is drafted for (a draft reads the context) and for
        all before a request is admitted (a finished request's pages may be
        handed to it). The values written are the same as when written at once;
        only the drafts (never the committed distribution) could see a rounding
        difference from the batched computation."""
        if not self._deferred_context:
            return
        if requests is None:
            parts, self._deferred_context = self._deferred_context, []
        else:
            parts, kept = [], []
            for entry in self._deferred_context:
                take = [i for i, s in enumerate(entry[3]) if s in requests]
                rest = [i for i, s in enumerate(entry[3]) if s not in requests]
                for rows, into in ((take, parts), (rest, kept)):
                    if len(rows) == len(entry[3]):
                        into.append(entry)
                    elif rows:
                        index = host_to_device(rows, torch.int64, self.device)
                        into.append((entry[0][index], entry[1][index], entry[2][index], [entry[3][i] for i in rows]))
            self._deferred_context = kept
            if not parts:
                return
        hidden, positions, slots = (parts[0][:3] if len(parts) == 1
                                    else (torch.cat(x) for x in list(zip(*parts))[:3]))
        self.drafter.extend_context(hidden, positions, self.draft_cache.slots(slots, positions), self.draft_cache)

    # ------------------------------------------------------------ verifying

    def _verify(self, active: List[_Request], state: "_State", drafted: Optional["_Drafted"],
                lengths: List[int]) -> "_Pending":
        dev = self.device
        # flat rows of [anchor, drafts...] per request, indexed on the host (no
        # boolean masks on the device: they would synchronise)
        req_index, offsets, cu, draft_rows = [], [], [0], []
        for i, length in enumerate(lengths):
            req_index += [i] * (length + 1)
            offsets += list(range(length + 1))
            draft_rows += range(cu[-1] + 1, cu[-1] + 1 + length)
            cu.append(cu[-1] + length + 1)
        req_t = host_to_device(req_index, torch.int64, dev)
        off_t = host_to_device(offsets, torch.int64, dev)
        if drafted is not None:
            table = torch.cat([state.anchors.unsqueeze(1), drafted.tokens], dim=1)  # [R, block + 1]
        else:
            table = state.anchors.unsqueeze(1)
        tokens = table[req_t, off_t]
        positions = state.starts[req_t] + off_t
        lengths_t = host_to_device(lengths, torch.int64, dev)
        batch = Batch(tokens, positions, host_to_device(cu, torch.int32, dev),
                      self.target_cache.block_table[state.slots], (state.starts + lengths_t + 1).to(torch.int32),
                      self.target_cache.slots(state.slots[req_t], positions))
        layers = self.drafter.config.target_layer_ids if self.drafter is not None else ()
        out = self.target(batch, self.target_cache, hidden_layers=layers)
        # draft rows (offset >= 1) and their distributions
        rows_t = host_to_device(draft_rows, torch.int64, dev)
        draft_tokens = tokens[rows_t]
        cu_draft = host_to_device([c - i for i, c in enumerate(cu)], torch.int32, dev)
        kwargs = {}
        if drafted is not None and draft_rows:
            kwargs["draft_logits"] = drafted.corrected[req_t[rows_t], off_t[rows_t] - 1]
            kwargs["draft_vocab"] = self.draft_vocab
        max_len = max(lengths) if lengths else 0
        result = ops.rejection_sample(out.logits, draft_tokens, cu_draft, temperature=state.temperatures,
                                      seed=state.seeds, offset=state.rounds, max_num_draft=max_len, validate=False,
                                      return_logprobs=self._logprobs, **self._truncation(state), **kwargs)
        accepted = result.num_accepted.to(torch.int64)
        if self.recorder is not None and drafted is not None and drafted.conf_logits is not None:
            self.recorder.record(drafted.conf_logits, lengths_t, accepted)
        # commit on the device
        count = accepted + 1
        new_anchor = result.output_tokens.gather(1, accepted.unsqueeze(1)).squeeze(1).to(torch.int64)
        if drafted is None and self.drafter is not None:
            # a plain round (one row per request, all committed): the drafter's context waits for the next
            # draft, and so does the work of finding its cache slots
            self._deferred_context.append((out.hidden, positions, state.slots, [r.slot for r in active]))
        elif self.drafter is not None:
            keep = off_t <= accepted[req_t]  # committed positions extend the drafter's context
            slots = self.draft_cache.slots(state.slots[req_t], positions).masked_fill(~keep, -1)
            self.drafter.extend_context(out.hidden, positions, slots, self.draft_cache)
        state.anchors = new_anchor
        state.starts = state.starts + count
        state.generated = state.generated + count
        state.rounds = state.rounds + 1
        return _Pending(list(active), result.output_tokens, result.num_accepted, list(lengths), drafted is not None,
                        result.logprobs)

    # ------------------------------------------------------------ admitting

    def _admit(self, queue: List[_Request], free_slots: List[int],
               results: List[Optional[GenerationResult]]) -> Optional["_Joined"]:
        """Prefills queued requests while there are free slots and cache pages."""
        if queue and free_slots:
            self._flush_context()
        joined: List[_Request] = []
        prefill_tokens = 0
        while queue and free_slots:
            r = queue[0]
            budget = self._budget(r)
            caches = [self.target_cache] + ([self.draft_cache] if self.draft_cache is not None else [])
            if not all(c.could_ever_hold(budget) for c in caches):
                queue.pop(0)
                results[r.index] = GenerationResult([], "error", f"the request needs {budget} cache slots "
                                                    f"(prompt, max_new_tokens and a block), more than the cache holds")
                continue
            if not all(c.can_hold(budget) for c in caches):
                break  # it joins when others have left
            if joined and prefill_tokens + len(r.prompt) > self.max_prefill_tokens:
                break  # the rest join at the next round
            queue.pop(0)
            r.slot = free_slots.pop()
            for cache in caches:
                cache.allocate(r.slot, budget)
            prefill_tokens += len(r.prompt)
            joined.append(r)
        if not joined:
            return None
        dev = self.device
        lens = [len(r.prompt) for r in joined]
        cu = [0]
        for n in lens:
            cu.append(cu[-1] + n)
        tokens = host_to_device([t for r in joined for t in r.prompt], torch.int64, dev)
        positions = host_to_device([p for n in lens for p in range(n)], torch.int64, dev)
        slot_t = host_to_device([r.slot for r in joined], torch.int64, dev)
        req_t = host_to_device([r.slot for r in joined for _ in r.prompt], torch.int64, dev)
        batch = Batch(tokens, positions, host_to_device(cu, torch.int32, dev),
                      self.target_cache.block_table[slot_t], host_to_device(lens, torch.int32, dev),
                      self.target_cache.slots(req_t, positions))
        layers = self.drafter.config.target_layer_ids if self.drafter is not None else ()
        last = host_to_device([c - 1 for c in cu[1:]], torch.int64, dev)
        out = self.target(batch, self.target_cache, hidden_layers=layers, logits_rows=last)
        if self.drafter is not None:
            self.drafter.extend_context(out.hidden, positions, self.draft_cache.slots(req_t, positions),
                                        self.draft_cache)
        state = _State(
            anchors=torch.zeros(len(joined), dtype=torch.int64, device=dev),
            starts=host_to_device(lens, torch.int64, dev),
            slots=slot_t,
            generated=torch.ones(len(joined), dtype=torch.int64, device=dev),
            max_new=host_to_device([r.params.max_new_tokens for r in joined], torch.int64, dev),
            temperatures=host_to_device([float(r.params.temperature) for r in joined], torch.float32, dev),
            seeds=host_to_device([r.seed for r in joined], torch.int64, dev),
            rounds=torch.ones(len(joined), dtype=torch.int64, device=dev),
            top_k=host_to_device([int(r.params.top_k) for r in joined], torch.int32, dev),
            top_p=host_to_device([float(r.params.top_p) for r in joined], torch.float32, dev),
            min_p=host_to_device([float(r.params.min_p) for r in joined], torch.float32, dev),
        )
        first = ops.rejection_sample(out.logits, torch.zeros(0, dtype=torch.int64, device=dev),
                                     torch.zeros(len(joined) + 1, dtype=torch.int32, device=dev),
                                     temperature=state.temperatures, seed=state.seeds,
                                     offset=torch.zeros(len(joined), dtype=torch.int64, device=dev),
                                     max_num_draft=0, validate=False, return_logprobs=self._logprobs,
                                     **self._truncation(state))
        state.anchors = first.output_tokens[:, 0].to(torch.int64)
        return _Joined(joined, state, first.output_tokens, first.num_accepted, first.logprobs)

    def _truncation(self, state: "_State") -> dict:
        """The requests' top-k / top-p / min-p for the ops (nothing when no request
        of the run truncates: the ops then skip the truncation machinery)."""
        if not self._truncating:
            return {}
        return {"top_k": state.top_k, "top_p": state.top_p, "min_p": state.min_p}

# ------------------------------------------------------------------ state


class _RoundClock:
    """Each round's wall time for the policy (``Policy.observe_round``), from
    the round's start (before drafting) to its verification launched, admission
    excluded: host time on the CPU, where every op is synchronous; on CUDA two
    events on the current stream, read after the next round's synchronisation,
    so timing adds none."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.pending: Optional[tuple] = None

    def start(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def stop(self, start, drafted: bool, requests: int, batch_tokens: int) -> None:
        self.pending = (start, self.start(), drafted, requests, batch_tokens)

    def report(self, policy: Policy) -> None:
        if self.pending is None:
            return
        start, stop, drafted, requests, batch_tokens = self.pending
        self.pending = None
        seconds = start.elapsed_time(stop) * 1e-3 if self.cuda else stop - start
        policy.observe_round(drafted, requests, batch_tokens, seconds)


@dataclass
class _State:
    anchors: torch.Tensor  # [R] int64, the last committed token (not yet in the target cache)
    starts: torch.Tensor  # [R] int64, the anchor's position
    slots: torch.Tensor  # [R] int64, cache rows
    generated: torch.Tensor  # [R] int64, tokens generated so far
    max_new: torch.Tensor  # [R] int64
    temperatures: torch.Tensor  # [R] float32
    seeds: torch.Tensor  # [R] int64
    rounds: torch.Tensor  # [R] int64, the next round's stream offset
    top_k: torch.Tensor  # [R] int32
    top_p: torch.Tensor  # [R] float32
    min_p: torch.Tensor  # [R] float32

    FIELDS = ("anchors", "starts", "slots", "generated", "max_new", "temperatures", "seeds", "rounds", "top_k",
              "top_p", "min_p")

    @classmethod
    def empty(cls, device: torch.device) -> "_State":
        z = lambda dtype: torch.zeros(0, dtype=dtype, device=device)  # noqa: E731
        return cls(z(torch.int64), z(torch.int64), z(torch.int64), z(torch.int64), z(torch.int64), z(torch.float32),
                   z(torch.int64), z(torch.int64), z(torch.int32), z(torch.float32), z(torch.float32))

    def select(self, keep: List[int]) -> "_State":
        index = host_to_device(keep, torch.int64, self.anchors.device)
        return _State(*(getattr(self, f)[index] for f in self.FIELDS))

    def concat(self, other: "_State") -> "_State":
        return _State(*(torch.cat([getattr(self, f), getattr(other, f)]) for f in self.FIELDS))


@dataclass
class _Drafted:
    tokens: torch.Tensor  # [R, block]
    corrected: torch.Tensor  # [R, block, V_d] (V_d = V without a draft vocabulary)
    lengths: Optional[torch.Tensor]  # [R] int32 (None: not scheduled)
    conf_logits: Optional[torch.Tensor]  # [R, block]

    def select(self, keep: List[int]) -> "_Drafted":
        index = host_to_device(keep, torch.int64, self.tokens.device)
        return _Drafted(self.tokens[index], self.corrected[index], self.lengths[index],
                        self.conf_logits[index] if self.conf_logits is not None else None)

    def place(self, rows: List[int], total: int) -> "_Drafted":
        """This probe's drafts at ``rows`` of ``total`` requests; the others drafted
        nothing (their length is 0, so their other entries are never read)."""
        index = host_to_device(rows, torch.int64, self.tokens.device)

        def put(t: torch.Tensor, empty: bool = False) -> torch.Tensor:
            out = t.new_empty((total,) + t.shape[1:]) if empty else t.new_zeros((total,) + t.shape[1:])
            out[index] = t
            return out

        return _Drafted(put(self.tokens), put(self.corrected, empty=True), put(self.lengths),
                        put(self.conf_logits) if self.conf_logits is not None else None)


@dataclass
class _Joined:
    requests: List[_Request]
    state: _State
    tokens: torch.Tensor  # [R, 1]
    accepted: torch.Tensor  # [R] (zeros)
    logprobs: Optional[torch.Tensor] = None  # [R, 1] when requested


@dataclass
class _Pending:
    requests: List[_Request]
    tokens: torch.Tensor  # [R, width] committed tokens then -1
    accepted: torch.Tensor  # [R] int32
    verified: List[Optional[int]]  # draft tokens verified per request (None: a prefill)
    drafted: bool = False  # whether the round drafted (a plain step does not)
    logprobs: Optional[torch.Tensor] = None  # [R, width] float32 when requested
    drafted_rows: Optional[List[bool]] = None  # a probe: which requests it drafted for (None: all or none)

    @staticmethod
    def concat(committed: Optional["_Pending"], joined: Optional[_Joined]) -> "_Pending":
        if joined is None:
            return committed  # type: ignore[return-value]
        prefill = _Pending(joined.requests, joined.tokens, joined.accepted, [None] * len(joined.requests),
                           logprobs=joined.logprobs)
        if committed is None:
            return prefill
        width = max(committed.tokens.shape[1], prefill.tokens.shape[1])
        pad = lambda t, v=-1: torch.nn.functional.pad(t, (0, width - t.shape[1]), value=v)  # noqa: E731
        logprobs = None
        if committed.logprobs is not None and prefill.logprobs is not None:
            logprobs = torch.cat([pad(committed.logprobs, -float("inf")), pad(prefill.logprobs, -float("inf"))])
        rows = committed.drafted_rows + [False] * len(prefill.requests) if committed.drafted_rows else None
        return _Pending(committed.requests + prefill.requests, torch.cat([pad(committed.tokens), pad(prefill.tokens)]),
                        torch.cat([committed.accepted, prefill.accepted]), committed.verified + prefill.verified,
                        committed.drafted, logprobs, rows)


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _show(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _int_sequence(value: object) -> Union[List[int], str]:
    """A sequence of integer token ids as a list of ints, or what is wrong with
    it. Lists, tuples, ranges and 1-D integer tensors or arrays are sequences;
    a string, a bool, a float (even 2.0) or anything else is not an id."""
    if isinstance(value, torch.Tensor):
        if value.dim() != 1 or value.dtype == torch.bool or value.is_floating_point() or value.is_complex():
            return f"must be a 1-D integer tensor, got {value.dtype} of shape {list(value.shape)}"
        return value.tolist()
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) and not hasattr(value, "__array__"):
        return f"must be a sequence of int token ids, got {type(value).__name__}"
    try:
        items = list(value)
    except TypeError:
        return f"must be a sequence of int token ids, got {type(value).__name__}"
    for i, t in enumerate(items):
        if isinstance(t, bool) or not isinstance(t, numbers.Integral):
            return f"must hold int token ids, got {type(t).__name__} {_show(t)} at index {i}"
    return [int(t) for t in items]


def _progress(enabled: bool, total: int):
    if not enabled:
        return _NoBar()
    try:
        from tqdm import tqdm

        return tqdm(total=total, desc="generating", unit="tok")
    except ImportError:  # pragma: no cover
        return _NoBar()
