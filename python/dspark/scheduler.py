"""Confidence-scheduled verification: throughput profiles and the policies an
engine calls every round (DSPARK.md, section 3).

Every policy maps the round's calibrated conditional confidences ``conf``
``[R, gamma]`` (and an optional ``cap`` ``[R]``) to verification lengths ``[R]``
int32 on the same device, with no host synchronisation.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch

from . import ops

__all__ = [
    "AsyncHardwareAware",
    "DraftGate",
    "Fixed",
    "HardwareAware",
    "Policy",
    "SPSTable",
    "Threshold",
]


# --------------------------------------------------------------------------
# Throughput profiles


def _robust(times: Sequence[float]) -> Tuple[float, float]:
    """The median of repeated timings and their relative spread (interquartile
    range over the median)."""
    ordered = sorted(times)
    median = statistics.median(ordered)
    if len(ordered) >= 4:
        q1, _, q3 = statistics.quantiles(ordered, n=4)
    else:
        q1, q3 = ordered[0], ordered[-1]
    return median, (q3 - q1) / median if median > 0 else 0.0


@dataclass
class SPSTable:
    """What a round costs on this machine: target forward steps per second at
    ``B`` batch tokens (``B = 0..B_max``, entry 0 unused) and, when profiled, the
    seconds the drafter takes to draft a block for ``R`` requests
    (``draft_seconds[R]``, ``R = 0..R_max``, entry 0 is 0).

    The measured curve is kept as it is (real curves are jagged: kernel tile
    boundaries, CUDA graph buckets). The hardware-aware policies schedule on a
    model of it: :meth:`envelope`, its non-increasing envelope in ``B`` (timing
    noise that makes a larger batch look faster is not taken for a cliff, real
    cliffs stay), or :meth:`convex`, a convex non-decreasing fit of the step
    time (noise is pooled; the causal scheduler's early stop then finds the
    best round size). Any fixed table keeps every policy lossless: the table is
    a modelling choice, not a part of the acceptance rule.

    ``spread`` / ``draft_spread`` keep the relative interquartile range of each
    profiled entry (empty when unknown), so a caller can tell a trustworthy
    table from a noisy one.
    """

    steps_per_second: List[float]
    meta: Dict[str, Any] = field(default_factory=dict)
    draft_seconds: List[float] = field(default_factory=list)
    spread: List[float] = field(default_factory=list)
    draft_spread: List[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        if len(self.steps_per_second) < 2:
            raise ValueError("SPSTable: need entries for B = 0 and at least B = 1")
        bad = [b for b, v in enumerate(self.steps_per_second) if not (v >= 0.0 and v < float("inf"))]
        if bad:
            raise ValueError(f"SPSTable: entries must be finite and >= 0; bad at B = {bad[:5]}")
        bad = [r for r, v in enumerate(self.draft_seconds) if not (v >= 0.0 and v < float("inf"))]
        if bad:
            raise ValueError(f"SPSTable: draft_seconds must be finite and >= 0; bad at R = {bad[:5]}")

    @property
    def max_batch_tokens(self) -> int:
        return len(self.steps_per_second) - 1

    def __call__(self, batch_tokens: int) -> float:
        return self.steps_per_second[batch_tokens] if 0 <= batch_tokens <= self.max_batch_tokens else 0.0

    def draft_time(self, requests: int) -> float:
        """Seconds of one round's drafting for ``requests`` requests: the profiled
        value, linear in ``R`` past the profiled range, 0 when drafting was not
        profiled (an old table: drafting taken as free)."""
        if requests <= 0 or len(self.draft_seconds) < 2:
            return 0.0
        last = len(self.draft_seconds) - 1
        if requests <= last:
            return self.draft_seconds[requests]
        if last == 1:
            return self.draft_seconds[1] * requests
        slope = max(0.0, self.draft_seconds[last] - self.draft_seconds[last - 1])
        return self.draft_seconds[last] + slope * (requests - last)

    def round_time(self, requests: int, batch_tokens: int, draft: bool = True) -> float:
        """Seconds of a round that drafts for ``requests`` requests (or not,
        ``draft=False``) and verifies ``batch_tokens`` tokens:
        ``t_draft(R) + 1 / SPS(B)``; infinite where the table has no entry."""
        sps = self(batch_tokens)
        if sps <= 0.0:
            return float("inf")
        return (self.draft_time(requests) if draft else 0.0) + 1.0 / sps

    def round_rate(self, requests: int, batch_tokens: int, draft: bool = True) -> float:
        """Rounds per second of that round, ``1 / round_time``; 0 where the table
        has no entry."""
        return 1.0 / self.round_time(requests, batch_tokens, draft)

    def with_draft_cost(self, requests: int) -> List[float]:
        """The table a round of ``requests`` drafted requests is scheduled on:
        ``SPS_R(B) = 1 / (t_draft(R) + 1 / SPS(B))`` (see HardwareAware)."""
        return [0.0] + [self.round_rate(requests, b) for b in range(1, len(self.steps_per_second))]

    def envelope(self) -> "SPSTable":
        """The non-increasing envelope in ``B`` of the steps per second (a
        running minimum) and the non-decreasing envelope in ``R`` of the
        drafting time (a running maximum)."""
        sps, low = [0.0], float("inf")
        for v in self.steps_per_second[1:]:
            low = min(low, v)
            sps.append(low)
        draft, high = [], 0.0
        for v in self.draft_seconds:
            high = max(high, v)
            draft.append(high)
        return SPSTable(sps, dict(self.meta, envelope=True), draft, list(self.spread), list(self.draft_spread))

    def convex(self) -> "SPSTable":
        """The convex model: the step time ``1 / SPS(B)`` fitted by the
        non-decreasing least-squares fit (pool-adjacent-violators), then
        replaced by that fit's greatest convex minorant (its lower convex hull,
        linear between its corners); the drafting time fitted non-decreasing in
        ``R`` the same way. Entries past the first 0 (not admitted) stay 0.

        Why: the causal scheduler stops at the first round size that does not
        raise ``theta = E[tau] / T(B)``, and ``E[tau]`` is concave in ``B``
        (candidates come by survival, descending). With ``T`` convex and
        positive, ``theta`` is quasi-concave, so that first stop is its global
        maximum: the early stop, which losslessness requires, loses nothing.
        On a table with steps (the running-minimum envelope of a noisy
        profile has one wherever a repeat ran slow) it stops in front of the
        first step, however much larger ``theta`` is past it. A CPU forward's
        time grows smoothly with ``B`` at these sizes (bytes first, then
        arithmetic: a maximum of affine functions, convex), so on a CPU the
        steps of a profile are noise, and pooling them is the better model;
        a GPU's steps (tile and graph-bucket boundaries) are real and
        reproducible (see ``HardwareAware``'s ``model``)."""
        times = []
        for v in self.steps_per_second[1:]:
            if v <= 0.0:
                break
            times.append(1.0 / v)
        fitted = _convex_minorant(_non_decreasing_fit(times))
        sps = [0.0] + [1.0 / t for t in fitted] + [0.0] * (self.max_batch_tokens - len(fitted))
        draft = [0.0] + _non_decreasing_fit(self.draft_seconds[1:]) if self.draft_seconds else []
        return SPSTable(sps, dict(self.meta, model="convex"), draft, list(self.spread), list(self.draft_spread))

    def tensor(self, device: Union[str, torch.device] = "cpu", requests: Optional[int] = None) -> torch.Tensor:
        """The ``[B_max + 1]`` float32 table that schedule_prefix takes; with
        ``requests``, the table with that round's drafting cost folded in."""
        values = self.steps_per_second if requests is None else self.with_draft_cost(requests)
        return torch.tensor(values, dtype=torch.float32, device=device)

    @classmethod
    def from_curve(cls, curve: Callable[[int], float], max_batch_tokens: int,
                   draft_curve: Optional[Callable[[int], float]] = None, max_requests: int = 0,
                   **meta: Any) -> "SPSTable":
        draft = [0.0] + [float(draft_curve(r)) for r in range(1, max_requests + 1)] if draft_curve else []
        return cls([0.0] + [float(curve(b)) for b in range(1, max_batch_tokens + 1)], dict(meta), draft)

    @classmethod
    def profile(
        cls,
        forward: Callable[[int], Any],
        max_batch_tokens: int,
        *,
        draft: Optional[Callable[[int], Any]] = None,
        max_requests: int = 0,
        warmup: int = 2,
        repeats: int = 5,
        device: Union[str, torch.device, None] = None,
        batch_sizes: Optional[Iterable[int]] = None,
        progress: bool = False,
        timer: Callable[[], float] = time.perf_counter,
    ) -> "SPSTable":
        """Times ``forward(B)`` (a target forward over ``B`` batch tokens) for every
        ``B`` in ``[1, max_batch_tokens]`` (or ``batch_sizes``) and, with ``draft``,
        ``draft(R)`` (one round's drafting for ``R`` requests) for ``R`` in
        ``[1, max_requests]``.

        Interleaved: after ``warmup`` calls of each, every repeat times each size
        once, so a slow drift of the machine (another process, frequency
        changes) moves every entry alike instead of biasing a few. Each entry is
        the median of its ``repeats`` timings; the relative interquartile range
        is kept as its spread. Sizes between profiled ones get the step time
        interpolated linearly; sizes past the last profiled one get 0 (not
        admitted). On CUDA each call is timed with events on the current stream
        (elsewhere with ``timer``)."""
        if max_batch_tokens < 1:
            raise ValueError(f"SPSTable.profile: max_batch_tokens must be >= 1, got {max_batch_tokens}")
        if repeats < 1:
            raise ValueError(f"SPSTable.profile: repeats must be >= 1, got {repeats}")
        device = torch.device(device) if device is not None else None
        sizes = sorted(set(batch_sizes)) if batch_sizes is not None else list(range(1, max_batch_tokens + 1))
        for b in sizes:
            if not 1 <= b <= max_batch_tokens:
                raise ValueError(f"SPSTable.profile: batch size {b} outside [1, {max_batch_tokens}]")
        request_sizes = list(range(1, max_requests + 1)) if draft is not None else []

        def timed(fn: Callable[[int], Any], n: int) -> float:
            if device is not None and device.type == "cuda":
                start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn(n)
                stop.record()
                stop.synchronize()
                return start.elapsed_time(stop) * 1e-3
            t0 = timer()
            fn(n)
            return timer() - t0

        jobs = [(forward, b) for b in sizes] + [(draft, r) for r in request_sizes]
        for _ in range(warmup):
            for fn, n in jobs:
                fn(n)
        times: Dict[Tuple[int, int], List[float]] = {(id(fn), n): [] for fn, n in jobs}
        iterator: Iterable[int] = range(repeats)
        if progress:
            try:
                from tqdm import tqdm

                iterator = tqdm(iterator, desc="profiling (interleaved repeats)", unit="repeat")
            except ImportError:
                pass
        for _ in iterator:
            for fn, n in jobs:
                times[(id(fn), n)].append(timed(fn, n))
        step = {b: _robust(times[(id(forward), b)]) for b in sizes}
        # step time between profiled sizes: linear interpolation
        seconds = [0.0] * (max_batch_tokens + 1)
        spread = [0.0] * (max_batch_tokens + 1)
        for lo, hi in zip(sizes, sizes[1:] + [None]):
            seconds[lo], spread[lo] = step[lo]
            if hi is not None:
                for b in range(lo + 1, hi):
                    w = (b - lo) / (hi - lo)
                    seconds[b] = (1 - w) * step[lo][0] + w * step[hi][0]
                    spread[b] = max(step[lo][1], step[hi][1])
        table = [0.0] + [1.0 / max(t, 1e-12) if t > 0 else 0.0 for t in seconds[1:]]
        draft_seconds, draft_spread = [], []
        if request_sizes:
            measured = [_robust(times[(id(draft), r)]) for r in request_sizes]
            draft_seconds = [0.0] + [m[0] for m in measured]
            draft_spread = [0.0] + [m[1] for m in measured]
        meta = {"warmup": warmup, "repeats": repeats, "interleaved": True,
                "device": str(device) if device else "cpu", "profiled": time.strftime("%Y-%m-%dT%H:%M:%S")}
        if batch_sizes is not None:
            meta["batch_sizes"] = sizes
        return cls(table, meta, draft_seconds, spread, draft_spread)

    def save(self, path: Union[str, Path]) -> None:
        data: Dict[str, Any] = {"steps_per_second": self.steps_per_second, "meta": self.meta}
        if self.draft_seconds:
            data["draft_seconds"] = self.draft_seconds
        if self.spread:
            data["spread"] = self.spread
        if self.draft_spread:
            data["draft_spread"] = self.draft_spread
        Path(path).write_text(json.dumps(data, indent=1))

    @classmethod
    def load(cls, path: Union[str, Path]) -> "SPSTable":
        """Reads a table written by :meth:`save` (tables without the drafting
        fields, written before they existed, load with drafting taken as free)."""
        data = json.loads(Path(path).read_text())
        floats = lambda key: [float(x) for x in data.get(key, [])]  # noqa: E731
        return cls(floats("steps_per_second"), dict(data.get("meta", {})), floats("draft_seconds"), floats("spread"),
                   floats("draft_spread"))


def _non_decreasing_fit(values: Sequence[float]) -> List[float]:
    """The non-decreasing sequence nearest to ``values`` in least squares
    (pool-adjacent-violators: a run that decreases is replaced by its mean)."""
    blocks: List[List[float]] = []  # [sum, count]
    for v in values:
        blocks.append([float(v), 1.0])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
            total, count = blocks.pop()
            blocks[-1][0] += total
            blocks[-1][1] += count
    out: List[float] = []
    for total, count in blocks:
        out += [total / count] * int(count)
    return out


def _convex_minorant(values: Sequence[float]) -> List[float]:
    """The greatest convex function below the points ``(i, values[i])``
    (their lower convex hull, linear between its corners)."""
    hull: List[int] = []
    for i, v in enumerate(values):
        # drop the last corner while it lies on or above the chord from the one before it to i
        while len(hull) > 1:
            a, b = hull[-2], hull[-1]
            if (values[b] - values[a]) * (i - a) >= (v - values[a]) * (b - a):
                hull.pop()
            else:
                break
        hull.append(i)
    out = list(values)
    for a, b in zip(hull, hull[1:]):
        for i in range(a + 1, b):
            out[i] = values[a] + (values[b] - values[a]) * (i - a) / (b - a)
    return out


# --------------------------------------------------------------------------
# Policies


class Policy:
    """Chooses, each round, whether to draft at all and then per-request
    verification lengths.

    Every decision a policy takes may depend on the past (earlier rounds'
    confidences, acceptances, the profiled costs) and on the current round's
    confidences, but a decision to draft is taken before the round's draft
    exists, and a verification length of position j depends only on what was
    drafted before j (DSPARK.md, section 3): that is what keeps every policy
    lossless.
    """

    name = "policy"

    def __call__(self, conf: torch.Tensor, cap: Optional[torch.Tensor] = None, validate: bool = True) -> torch.Tensor:
        """Lengths ``[R]`` for confidences ``[R, gamma]``; ``validate=False`` skips
        schedule_prefix's value checks (a synchronisation on CUDA)."""
        raise NotImplementedError

    def draft_requests(self, num_requests: int) -> int:
        """For how many of the next round's ``num_requests`` requests the round
        drafts, decided from the past only: 0 makes it a plain decoding step with
        no drafter work; fewer than all drafts for the most recently admitted
        ones (a probe) and is a plain step for the others. Default: all."""
        return num_requests

    def observe(self, lengths: Sequence[int], accepted: Sequence[int]) -> None:
        """What a drafting round verified and accepted, per request (host
        values, read by the engine after the round)."""

    def observe_requests(self, requests: Sequence[int], lengths: Sequence[int], accepted: Sequence[int]) -> None:
        """:meth:`observe` with the requests the values belong to (``requests[i]``
        verified ``lengths[i]`` and accepted ``accepted[i]``); what the engine
        calls. Default: :meth:`observe`."""
        self.observe(lengths, accepted)

    def before_round(self, requests: Sequence[int], remaining: Optional[Sequence[int]]) -> None:
        """Called by the engine before :meth:`draft_requests`: the next round's
        requests (ids, in the order of the batch) and, when no request waits for
        admission (the batch only drains from here), the new tokens each may
        still take (their budgets as of the last round read; None while
        requests wait). Default: nothing."""

    def observe_round(self, drafted: bool, requests: int, batch_tokens: int, seconds: float) -> None:
        """A finished round's wall time (drafting if it drafted, the
        synchronisation, the verification forward and sampling): it drafted for
        ``requests`` requests (or was a plain step for them) and verified
        ``batch_tokens`` tokens. Reported by the engine at the synchronisation
        after the round."""

    def reset(self) -> None:
        """Forgets the history of a run (the engine calls it at every generate)."""

    @property
    def max_length(self) -> Optional[int]:
        """The longest verification length the policy can choose (None: any);
        an engine drafts no further."""
        return None


class Fixed(Policy):
    """Verify ``min(gamma, cap)`` (``gamma = 1`` is the MTP-1 production baseline);
    ``gamma=None`` verifies the whole drafted block."""

    def __init__(self, gamma: Optional[int] = None) -> None:
        if gamma is not None and gamma < 0:
            raise ValueError(f"Fixed: gamma must be >= 0, got {gamma}")
        self.gamma = gamma
        self.name = f"fixed({gamma if gamma is not None else 'gamma'})"

    @property
    def max_length(self) -> Optional[int]:
        return self.gamma

    def __call__(self, conf: torch.Tensor, cap: Optional[torch.Tensor] = None, validate: bool = True) -> torch.Tensor:
        if self.gamma is not None and self.gamma < conf.shape[1]:
            conf = conf[:, : self.gamma]
        return ops.schedule_prefix(conf, mode="fixed", cap=cap, validate=validate).lengths


class Threshold(Policy):
    """Verify up to the first position whose confidence is below ``threshold``
    (the rule of the reference code)."""

    def __init__(self, threshold: float = 0.5) -> None:
        self.threshold = float(threshold)
        self.name = f"threshold({self.threshold:g})"

    def __call__(self, conf: torch.Tensor, cap: Optional[torch.Tensor] = None, validate: bool = True) -> torch.Tensor:
        return ops.schedule_prefix(conf, mode="threshold", threshold=self.threshold, cap=cap,
                                   validate=validate).lengths


def _as_table(sps: Union[SPSTable, torch.Tensor, Sequence[float]]) -> SPSTable:
    if isinstance(sps, SPSTable):
        return sps
    values = sps.tolist() if isinstance(sps, torch.Tensor) else list(sps)
    return SPSTable([float(v) for v in values])


class DraftGate:
    """Adaptive drafting: before each round, whether drafting is expected to pay.

    What it knows, all from rounds already finished:

    * the drafter, from the drafting rounds observed (exponentially weighted,
      ``memory`` per request-round, so the estimate spans about
      ``1 / (1 - memory)`` request-rounds whatever the batch): ``tau`` = tokens
      committed per request and round (bonus included) and ``l`` = drafts
      verified per request and round, under the policy's own choices (the
      engine leaves out requests whose remaining token budget capped the
      block);
    * the machine, from the cost table, corrected by the measured wall time of
      the rounds (``measured=True``): the engine reports every round's seconds
      (:meth:`observe_round`), and the gate keeps, for plain rounds and for
      drafting rounds separately, the exponentially weighted geometric mean
      (``time_memory`` per round) of measured over predicted seconds, ``k_plain``
      and ``k_draft``. A kind not measured yet takes the other kind's
      correction. This absorbs what a profile misses or gets wrong on a noisy
      machine: a table off by tens of percent, the per-round host work
      (sampling, bookkeeping). The deferred context a resumed drafting round
      writes first is the plain rounds' work and is not timed as that round's.

    For a batch of ``R`` requests the expected throughput of drafting is
    ``R tau / (k_draft (t_draft(R) + 1 / SPS(R + R l)))`` and that of a plain step
    (no drafter work) ``R / (k_plain / SPS(R))``. The rule:

    * no observation yet: draft (a probe);
    * while drafting: keep drafting while it is expected to pay at least as
      much as a plain step;
    * while not drafting: resume when a probe makes drafting expected to pay
      ``margin`` more than a plain step (a hysteresis, so that a drafter at
      break-even does not flap between the two on timing noise);
    * when it stops paying: plain steps; after a wait, one drafting round (a
      probe) refreshes the estimates. A probe, and the first round, drafts for
      at most ``probe_requests`` of the requests (the engine takes the most
      recently admitted; the others take a plain step in that round): ``tau``
      and ``l`` are per request, so a few requests measure them, and the
      probe's cost no longer grows with the batch (at batch 16 a probe that
      drafted for every request also wrote every request's deferred drafter
      context, a few percent of the plain steps before it on a small target).
      The policy schedules a probe's verification lengths as for a batch of
      its ``k`` requests (the others add one token each to the forward it
      does not see); any lengths keep the round lossless.
      The wait is the larger of an interval that starts at ``probe_min`` and
      doubles up to ``probe_max`` while probes keep showing that drafting does
      not pay, and the number of plain steps that keeps the probes' extra cost
      under ``probe_budget`` of the time (a probe of ``k`` requests costs
      ``k_draft (t_draft(k) + 1 / SPS(R + k l))`` against ``k_plain / SPS(R)``
      for the plain step it replaces), at most ``probe_cap``;
    * while drafting, with measured times: a plain step now and then (a plain
      probe), so that ``k_plain`` is measured rather than borrowed from the
      drafting rounds. Without it a gate that drafts from the first round on
      never times a plain step, and a table whose plain steps are off by
      more than its drafting rounds (a profile's context length, its first
      shapes) keeps a drafter that does not pay: measured on a 2-core CPU at
      batch 4, the table priced a plain step at 56 ms where the engine's took
      44 ms, and the gate drafted every round at 0.83x of plain decoding. A
      plain probe follows ``w`` drafting rounds after the last plain step,
      ``w`` the larger of ``probe_min`` and the number that keeps its cost under
      ``probe_budget`` of the time: in place of a drafting round it gives up
      ``t_plain (1 - theta_plain / theta_draft)`` of drafting's tokens-time, so
      ``w = t_plain (1 - theta_plain / theta_draft) / (t_draft probe_budget)``,
      at most ``probe_cap`` (frequent where the choice is close, rare where
      drafting pays by far). A plain probe is a plain step: lossless like
      every decision of the gate.

    Every measured round ages both kinds' measurements (by ``time_memory``), so a
    kind not measured for ``n`` rounds keeps ``time_memory ** n`` of its weight and
    its next measurement counts for most of its estimate: measured on a 2-core
    CPU at batch 16, ``k_plain`` learnt in the warm-up's first-call steps (1.34)
    outlived the run's plain probes (1.14) while ``k_draft`` followed the machine,
    and the gate drafted at 0.83x of plain decoding. The gate corrects itself
    either way: a kind it overprices it rarely picks but probes; one it
    underprices it picks, and so measures.

    **A draining batch.** The rule above maximises the tokens per second of a
    round, which is what a queue of waiting requests needs. When no request
    waits (the engine says so, with each request's remaining budget ``n_r``,
    through :meth:`before_round`), what counts is when the last request
    finishes: plain decoding takes ``max_r n_r`` steps, drafting about
    ``max_r n_r / tau_r`` rounds, ``tau_r`` the request's own tokens per round.
    Requests differ (a prompt the drafter knows, one it does not), and the
    request drafting helps least is the one that finishes last: measured at
    batch 4 on text, drafting rounds gave 13-23 % more tokens per second than
    plain steps and the batch still finished at 0.88-1.00x, its slowest
    request needing 54 rounds for 64 tokens where the mean ``tau`` said 43.
    So while the batch drains the gate compares the times to finish,
    ``max_r n_r k_plain / SPS(R)`` for plain steps and ``max_r (n_r / tau_r)
    k_draft (t_draft(R) + 1 / SPS(R + R l))`` for drafting (each as the
    throughput ``R max_r n_r`` tokens over that time; the same comparison as
    the rule above when every request has the same ``tau`` and budget).
    ``tau_r`` is the request's exponentially weighted tokens per round
    (``memory``) with ``prior_rounds`` rounds of the batch's ``tau`` as a prior
    (a request just admitted is the batch's average).
    ``makespan=False`` keeps the per-round rule throughout.

    A round's measured time counts at most a factor ``time_clip`` away from
    its kind's current correction (after the first, which counts at most a
    factor 4 either way): a round stalled by the operating system or the
    hypervisor (steal) moves the estimate by at most ``time_clip ** (1 -
    time_memory)`` (1.041 by default, against 1.149 for a 4x stall
    unclipped), while a lasting change of the machine is still followed,
    one clipped step per round.

    Lossless: the decision for round t uses only rounds before t (their
    acceptance and their wall time are known; round t's draft does not exist
    yet) and the requests' remaining budgets (set by the past too).
    Conditioned on the past, a plain step commits a token from the
    target distribution and a drafting round commits tokens from it too (the
    acceptance rule is exact for any draft and any verification length chosen
    without looking at the drafts it admits), so whichever the gate picks, the
    committed sequence follows the target. With ``measured=False`` decisions
    use the fixed table only, so a run is reproducible (wall times vary between
    runs; with them, a seeded sampled run can take other decisions and so other,
    equally exact, samples).
    """

    def __init__(self, table: SPSTable, *, memory: float = 0.97, probe_min: int = 4, probe_max: int = 64,
                 probe_budget: float = 0.01, probe_cap: int = 1024, margin: float = 0.03, measured: bool = True,
                 time_memory: float = 0.9, probe_requests: Optional[int] = 4, time_clip: float = 1.5,
                 plain_probes: bool = True, makespan: bool = True, prior_rounds: float = 8.0) -> None:
        if not 0.0 <= memory < 1.0:
            raise ValueError(f"DraftGate: memory must be in [0, 1), got {memory}")
        if not 0.0 <= time_memory < 1.0:
            raise ValueError(f"DraftGate: time_memory must be in [0, 1), got {time_memory}")
        if not 1 <= probe_min <= probe_max <= probe_cap:
            raise ValueError(f"DraftGate: need 1 <= probe_min <= probe_max <= probe_cap, got {probe_min}, "
                             f"{probe_max}, {probe_cap}")
        if not 0.0 <= probe_budget < 1.0:
            raise ValueError(f"DraftGate: probe_budget must be in [0, 1), got {probe_budget}")
        if not time_clip >= 1.0:
            raise ValueError(f"DraftGate: time_clip must be >= 1 (inf: unclipped), got {time_clip}")
        if not margin >= 0.0:
            raise ValueError(f"DraftGate: margin must be >= 0, got {margin}")
        if not 0.0 <= prior_rounds < float("inf"):
            raise ValueError(f"DraftGate: prior_rounds must be finite and >= 0, got {prior_rounds}")
        if probe_requests is not None and (isinstance(probe_requests, bool) or not isinstance(probe_requests, int)
                                           or probe_requests < 1):
            raise ValueError(f"DraftGate: probe_requests must be a positive int or None, got {probe_requests!r}")
        self.probe_requests = probe_requests
        self.table = table
        self.memory, self.probe_min, self.probe_max = memory, probe_min, probe_max
        self.probe_budget, self.probe_cap, self.margin = probe_budget, probe_cap, margin
        self.measured, self.time_memory = measured, time_memory
        self.time_clip, self.plain_probes = float(time_clip), bool(plain_probes)
        self.makespan, self.prior_rounds = bool(makespan), float(prior_rounds)
        self.forget()

    def forget(self) -> None:
        self._weight = self._tokens = self._verified = 0.0  # weighted request-rounds and their sums
        self._time_weight = [0.0, 0.0]  # plain, drafting rounds: weights and sums of log(measured / predicted)
        self._time_log = [0.0, 0.0]
        self._drafting = True  # the state before any observation: draft (a probe)
        self._interval = self.probe_min  # the doubling part of the wait before the next probe
        self._countdown = 0
        self._probe = True  # whether the last drafting decision was a probe
        self._since_plain = 0  # drafting rounds since the last plain step
        self.decisions: List[bool] = []  # this gate's decisions, in order (for metrics and tests)
        self.forget_requests()

    def forget_requests(self) -> None:
        """Forgets the per-request estimates and the batch's budgets (a new run:
        they describe requests, not the drafter or the machine)."""
        self._requests: Dict[int, List[float]] = {}  # id -> [weight, tokens] of its drafting rounds
        self._draining: Optional[Tuple[List[int], List[int]]] = None  # (ids, remaining budgets) of a draining batch

    @property
    def estimates(self) -> Optional[Tuple[float, float]]:
        """(tau, drafts verified) per request and round, or None before any observation."""
        if self._weight <= 0.0:
            return None
        return self._tokens / self._weight, self._verified / self._weight

    def correction(self, drafted: bool) -> float:
        """Measured over predicted round time (geometric mean) of drafting or plain
        rounds; the other kind's when this one has no measurement, 1 with none."""
        kind = int(drafted)
        for k in (kind, 1 - kind):
            if self.measured and self._time_weight[k] > 0.0:
                return math.exp(self._time_log[k] / self._time_weight[k])
        return 1.0

    def round_times(self, num_requests: int, drafted: Optional[int] = None) -> Tuple[float, float]:
        """(drafting round, plain step) expected seconds for ``num_requests``
        requests, the drafting round drafting for ``drafted`` of them (default
        all) and verifying the estimated drafts (none before any observation)."""
        R = num_requests
        k = R if drafted is None else drafted
        est = self.estimates
        verified = est[1] if est is not None else 0.0
        drafting = self.correction(True) * self.table.round_time(k, R + int(round(k * verified)))
        return drafting, self.correction(False) * self.table.round_time(R, R, draft=False)

    def probe_size(self, num_requests: int) -> int:
        """Requests a probe drafts for."""
        return num_requests if self.probe_requests is None else min(num_requests, self.probe_requests)

    def request_tau(self, request: int) -> Optional[float]:
        """A request's own tokens per drafting round, shrunk towards the batch's
        ``tau`` by ``prior_rounds`` rounds (the batch's ``tau`` for a request not
        observed; None before any observation)."""
        est = self.estimates
        if est is None:
            return None
        weight, tokens = self._requests.get(request, (0.0, 0.0))
        prior = self.prior_rounds
        if weight + prior <= 0.0:
            return est[0]
        return (tokens + prior * est[0]) / (weight + prior)

    def _rounds_ratio(self, num_requests: int) -> Optional[float]:
        """While the batch drains (makespan): plain steps over expected drafting
        rounds until its last request is done, ``max_r n_r / max_r (n_r / tau_r)``;
        None outside a draining batch of ``num_requests``."""
        if not self.makespan or self._draining is None or self.estimates is None:
            return None
        ids, remaining = self._draining
        if len(ids) != num_requests or not remaining or max(remaining) <= 0:
            return None
        plain_steps = float(max(remaining))
        rounds = max(max(1.0, n / max(1.0, self.request_tau(i))) for i, n in zip(ids, remaining) if n > 0)
        return plain_steps / rounds

    def expected_throughput(self, num_requests: int) -> Tuple[float, float]:
        """(drafting, plain) expected tokens per second for a batch of ``num_requests``
        (drafting is nan before any observation). While the batch drains
        (:meth:`before_round`), drafting's is the throughput it gives the whole
        batch's remaining work, ``R max_r n_r`` tokens in ``max_r (n_r / tau_r)``
        rounds."""
        R = num_requests
        drafting_time, plain_time = self.round_times(R)
        plain = R / plain_time
        est = self.estimates
        if est is None:
            return float("nan"), plain
        ratio = self._rounds_ratio(R)
        return R * (est[0] if ratio is None else ratio) / drafting_time, plain

    def _wait(self, num_requests: int) -> int:
        """Plain steps before the next probe."""
        wait = self._interval
        if self.probe_budget > 0.0:
            drafting_time, plain_time = self.round_times(num_requests, self.probe_size(num_requests))
            if plain_time < float("inf") and drafting_time > plain_time:
                extra = (drafting_time - plain_time) / plain_time  # a probe's extra cost, in plain steps
                wait = max(wait, math.ceil(extra / self.probe_budget))
        return min(wait, self.probe_cap)

    def decide(self, num_requests: int) -> bool:
        if num_requests <= 0:
            return False
        drafting, plain = self.expected_throughput(num_requests)
        threshold = plain if self._drafting else plain * (1.0 + self.margin)
        if drafting != drafting or drafting >= threshold:  # nothing observed yet (a probe), or drafting pays
            self._drafting, self._interval, self._countdown = True, self.probe_min, 0
            self._probe = drafting != drafting
            decision = not (drafting == drafting and self._since_plain >= self._plain_wait(num_requests))
        else:
            if self._drafting:  # it stopped paying: plain steps, then a probe
                self._drafting, self._countdown = False, self._wait(num_requests)
            if self._countdown > 0:
                self._countdown -= 1
                decision = False
            else:  # a probe; if it still does not pay, the next wait is longer
                self._interval = min(2 * self._interval, self.probe_max)
                self._countdown = self._wait(num_requests)
                self._probe = decision = True
        self._since_plain = self._since_plain + 1 if decision else 0
        self.decisions.append(decision)
        return decision

    def _plain_wait(self, num_requests: int) -> float:
        """Drafting rounds before the next plain probe (infinite when there is
        none: ``plain_probes=False``, or no measured drafting round yet)."""
        if not (self.plain_probes and self.measured and self._time_weight[1] > 0.0):
            return float("inf")
        drafting_time, plain_time = self.round_times(num_requests)
        drafting, plain = self.expected_throughput(num_requests)
        if self.probe_budget <= 0.0 or not drafting > 0.0:
            return self.probe_max
        extra = plain_time * max(0.0, 1.0 - plain / drafting) / drafting_time  # in drafting rounds
        return min(max(self.probe_min, math.ceil(extra / self.probe_budget)), self.probe_cap)

    def draft_requests(self, num_requests: int) -> int:
        """:meth:`decide`, as the number of requests to draft for: 0 (a plain
        step), :meth:`probe_size` for a probe, else all of them."""
        if not self.decide(num_requests):
            return 0
        return self.probe_size(num_requests) if self._probe else num_requests

    def observe(self, lengths: Sequence[int], accepted: Sequence[int]) -> None:
        if not lengths:
            return
        keep = self.memory ** len(lengths)
        self._weight = keep * self._weight + len(lengths)
        self._tokens = keep * self._tokens + sum(a + 1 for a in accepted)
        self._verified = keep * self._verified + sum(lengths)

    def observe_requests(self, requests: Sequence[int], lengths: Sequence[int], accepted: Sequence[int]) -> None:
        """The per-request part of :meth:`observe` (``tau_r``, each request's
        weights aged by ``memory`` per round of its own); the batch's estimates
        are :meth:`observe`'s."""
        for request, a in zip(requests, accepted):
            weight, tokens = self._requests.get(int(request), (0.0, 0.0))
            self._requests[int(request)] = [self.memory * weight + 1.0, self.memory * tokens + a + 1.0]

    def before_round(self, requests: Sequence[int], remaining: Optional[Sequence[int]]) -> None:
        """The next round's requests and, while the batch drains, their remaining
        budgets (:meth:`Policy.before_round`). Requests no longer in the batch
        are forgotten."""
        ids = [int(r) for r in requests]
        if len(self._requests) > len(ids):
            present = set(ids)
            self._requests = {k: v for k, v in self._requests.items() if k in present}
        self._draining = None if remaining is None else (ids, [int(n) for n in remaining])

    def observe_round(self, drafted: bool, requests: int, batch_tokens: int, seconds: float) -> None:
        """A finished round's wall time: it drafted for ``requests`` requests (or
        was a plain step for them) and verified ``batch_tokens`` tokens. Ignored
        with ``measured=False``, for empty rounds and where the table has no
        entry; one ratio counts at most a factor of 4 either way, and at most
        ``time_clip`` away from its kind's current correction (a round stalled
        by the operating system does not swing the estimate)."""
        if not self.measured or requests <= 0 or not seconds > 0.0 or seconds == float("inf"):
            return
        predicted = self.table.round_time(requests, batch_tokens, draft=drafted)
        if not 0.0 < predicted < float("inf"):
            return
        ratio = min(max(math.log(seconds / predicted), -_MAX_LOG_RATIO), _MAX_LOG_RATIO)
        kind, keep = int(drafted), self.time_memory
        if self._time_weight[kind] > 0.0 and self.time_clip < float("inf"):  # within time_clip of the estimate
            current, clip = self._time_log[kind] / self._time_weight[kind], math.log(self.time_clip)
            ratio = min(max(ratio, current - clip), current + clip)
        for k in (0, 1):  # every round ages both kinds: a kind measured long ago yields to its next measurement
            weight = self._time_weight[k]
            if weight > 0.0:
                aged = max(keep * weight, _MIN_TIME_WEIGHT)  # never 0: a kind once measured stays measured
                self._time_log[k] *= aged / weight
                self._time_weight[k] = aged
        self._time_weight[kind] += 1.0
        self._time_log[kind] += ratio


_MAX_LOG_RATIO = math.log(4.0)
_MIN_TIME_WEIGHT = 1e-9


TABLE_MODELS = ("auto", "convex", "envelope", "measured")


def _table_model(table: SPSTable, model: str, owner: str) -> SPSTable:
    if model not in TABLE_MODELS:
        raise ValueError(f"{owner}: model must be one of {', '.join(TABLE_MODELS)}, got {model!r}")
    if model == "auto":
        model = "convex" if str(table.meta.get("device", "")).startswith("cpu") else "envelope"
    if model == "convex":
        return table.convex()
    return table.envelope() if model == "envelope" else table


class HardwareAware(Policy):
    """The paper's Algorithm 1 (causal, with early stopping), lossless and
    synchronous: it decides from the current round's confidences, with the
    round's true cost.

    A round drafts a block for its ``R`` requests (``t_draft(R)`` seconds, the
    profiled ``SPSTable.draft_seconds``), then verifies ``B = R + sum_r l_r`` tokens
    in one target forward (``1 / SPS(B)`` seconds), and commits ``tau`` tokens
    whose expectation, by DSPARK.md's prefix survivals ``a``, is
    ``R + sum_r sum_{j <= l_r} a[r][j]``. Its expected throughput is therefore

        theta = E[tau] / (t_draft(R) + 1 / SPS(B)) = E[tau] * SPS_R(B),
        SPS_R(B) = 1 / (t_draft(R) + 1 / SPS(B)).

    ``t_draft(R)`` is the same for every candidate set of the round, so Algorithm
    1 runs unchanged (schedule_prefix, causal mode) on the table ``SPS_R``,
    computed once per ``R``. Without the drafting cost (``draft_cost=False``, or a
    table profiled without it) this is the paper's ``theta = E[tau] SPS(B)``.
    With it, drafting is a sunk cost inside the round: verifying nothing after
    drafting (``R SPS_R(R)``) is worse than a plain step (``R SPS(R)``), which
    the policy cannot undo once the draft exists; ``adaptive=True`` adds a
    :class:`DraftGate` that skips drafting for rounds where it is not expected
    to pay; with ``measured=True`` the gate corrects the table by the measured
    wall time of the engine's rounds (:class:`DraftGate`; ``False``: decisions
    from the table only, reproducible between runs).

    ``model`` is what the table becomes before anything is scheduled on it:
    ``"convex"`` (:meth:`SPSTable.convex`), ``"envelope"``
    (:meth:`SPSTable.envelope`), ``"measured"`` (the table as profiled) or
    ``"auto"``: convex for a table profiled on a CPU (its steps are timing
    noise, and on steps the causal early stop halts in front of the first
    one: measured on a 2-core CPU at batch 4, a drafter accepted at 0.96 per
    position verified 2 to 5 of its 7 drafts per request on the envelope,
    depending on where a profile's noise put the steps, and all 7 on the
    convex fit), the envelope otherwise (a GPU profile's steps are real and
    reproducible; analytic tables are taken as they are meant).
    """

    name = "hardware-aware"

    def __init__(self, sps: Union[SPSTable, torch.Tensor, Sequence[float]], *, draft_cost: bool = True,
                 adaptive: bool = True, model: str = "auto", gate: Optional[DraftGate] = None,
                 measured: bool = True) -> None:
        self.sps = _as_table(sps)
        self.model = _table_model(self.sps, model, type(self).__name__)
        if not draft_cost:
            self.model = SPSTable(self.model.steps_per_second, dict(self.model.meta), [], list(self.model.spread))
        self.draft_cost = draft_cost and bool(self.sps.draft_seconds)
        self.gate = (gate or DraftGate(self.model, measured=measured)) if adaptive else None
        if not draft_cost:
            self.name = f"{type(self).name} (drafting free)"
        elif not adaptive:
            self.name = f"{type(self).name} (always drafts)"
        self._tables: Dict[Tuple[torch.device, int], torch.Tensor] = {}

    def table(self, device: torch.device, num_requests: Optional[int] = None) -> torch.Tensor:
        """The ``[B_max + 1]`` table schedule_prefix runs on for ``num_requests``
        drafted requests (``SPS_R``), on ``device`` (built once per (device, R))."""
        R = int(num_requests) if num_requests is not None and self.draft_cost else 0
        key = (torch.device(device), R)
        if key not in self._tables:
            self._tables[key] = self.model.tensor(device, R if R else None)
        return self._tables[key]

    def __call__(self, conf: torch.Tensor, cap: Optional[torch.Tensor] = None, validate: bool = True) -> torch.Tensor:
        return ops.schedule_prefix(conf, mode="causal", sps=self.table(conf.device, conf.shape[0]), cap=cap,
                                   validate=validate).lengths

    def draft_requests(self, num_requests: int) -> int:
        return self.gate.draft_requests(num_requests) if self.gate is not None else num_requests

    def observe(self, lengths: Sequence[int], accepted: Sequence[int]) -> None:
        if self.gate is not None:
            self.gate.observe(lengths, accepted)

    def observe_requests(self, requests: Sequence[int], lengths: Sequence[int], accepted: Sequence[int]) -> None:
        self.observe(lengths, accepted)
        if self.gate is not None:
            self.gate.observe_requests(requests, lengths, accepted)

    def before_round(self, requests: Sequence[int], remaining: Optional[Sequence[int]]) -> None:
        if self.gate is not None:
            self.gate.before_round(requests, remaining)

    def observe_round(self, drafted: bool, requests: int, batch_tokens: int, seconds: float) -> None:
        if self.gate is not None:
            self.gate.observe_round(drafted, requests, batch_tokens, seconds)

    def reset(self) -> None:
        """The gate's estimates and decisions carry over between runs of the same
        engine (they describe the drafter and the machine, not a run); its
        decision log and its per-request estimates restart."""
        if self.gate is not None:
            self.gate.decisions = []
            self.gate.forget_requests()


class AsyncHardwareAware(HardwareAware):
    """The asynchronous variant (paper, section 5.2): the batch size of step t is
    fixed two steps ahead, so it is known before step t starts.

    At every step t the policy runs the unconstrained global search (no early
    stop, so it steps over cliffs of the SPS curve) on that step's confidences
    and keeps the batch size it found, ``B*_t = R_t + capacity_t``, on the device.
    Step t then verifies ``K_t = max(0, B*_{t-2} - R_t)`` draft tokens: the top
    ``K_t`` candidates by their current survival ``a`` (schedule_prefix's budget
    mode, same tie rule). The admission of a draft never depends on that draft,
    so the policy is lossless. The searches run on the table with the
    drafting cost folded in, as :class:`HardwareAware`'s; the adaptive gate is
    off by default (a skipped drafting round would break the two-step
    pipeline of batch sizes).

    Cold start: steps 0 and 1 have no step t - 2; they use the synchronous
    causal scheduler (HardwareAware). Requests joining or leaving between t - 2
    and t: the kept quantity is the batch size, not a per-request length, so
    ``K_t`` absorbs the change (more requests leave fewer draft tokens each; a
    batch that shrank may verify more); ``K_t`` is further limited to the
    current candidates by budget mode. ``reset()`` starts a new cold start.
    """

    name = "async-hardware-aware"

    def __init__(self, sps: Union[SPSTable, torch.Tensor, Sequence[float]], *, draft_cost: bool = True,
                 adaptive: bool = False, model: str = "auto") -> None:
        super().__init__(sps, draft_cost=draft_cost, adaptive=adaptive, model=model)
        if draft_cost and not adaptive:
            self.name = type(self).name
        self._batch_tokens: List[torch.Tensor] = []  # B* of steps t - 2 and t - 1, on the device

    def reset(self) -> None:
        super().reset()
        self._batch_tokens = []

    def __call__(self, conf: torch.Tensor, cap: Optional[torch.Tensor] = None, validate: bool = True) -> torch.Tensor:
        R = conf.shape[0]
        table = self.table(conf.device, R)
        found = ops.schedule_prefix(conf, mode="global", sps=table, cap=cap, validate=validate)
        if len(self._batch_tokens) < 2:
            lengths = ops.schedule_prefix(conf, mode="causal", sps=table, cap=cap, validate=validate).lengths
        else:
            budget = torch.clamp(self._batch_tokens[0] - R, min=0)
            lengths = ops.schedule_prefix(conf, mode="budget", budget=budget, cap=cap, validate=validate).lengths
        self._batch_tokens = (self._batch_tokens + [found.capacity.to(torch.int64) + R])[-2:]
        return lengths
