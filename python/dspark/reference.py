"""Plain PyTorch oracles of dspark's ops.

They implement each op's definition directly, in float64, one request at a
time, with the same counter-based random numbers as the kernels (Philox4x32-10
addressed by seed, offset, request, position, purpose and column; see
csrc/include/dspark/random.h), so a backend and its oracle make the same
decisions except where a decision sits within float32 rounding of its
threshold; ``return_margins=True`` reports how close each request came.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Union

import torch

__all__ = [
    "PURPOSE_ACCEPT",
    "PURPOSE_DRAFT",
    "PURPOSE_RACE",
    "confidence",
    "exponential",
    "gather_pages",
    "markov_sample",
    "paged_attention",
    "philox4x32_10",
    "random_bits",
    "rejection_sample",
    "rope",
    "schedule_prefix",
    "uniform",
]

_MASK32 = 0xFFFFFFFF
_MUL0, _MUL1 = 0xD2511F53, 0xCD9E8D57
_WEYL0, _WEYL1 = 0x9E3779B9, 0xBB67AE85

PURPOSE_ACCEPT = 1
PURPOSE_RACE = 2

_FLOAT_MAX = float(torch.finfo(torch.float32).max)
_MIN_WEIGHT = 2.0**-100
_LOG2E_F32 = torch.tensor(1.0 / math.log(2.0), dtype=torch.float32)
_ONE_MINUS_ULP = float(torch.nextafter(torch.tensor(1.0), torch.tensor(0.0)))


# ---------------------------------------------------------------- Philox


def _mulhilo(a: int, b: torch.Tensor):
    """(hi, lo) 32-bit words of a * b for a constant a < 2^32 and int64 b in [0, 2^32)."""
    lo_part = a * (b & 0xFFFF)  # < 2^48
    hi_part = a * (b >> 16)  # < 2^48
    low_sum = lo_part + ((hi_part & 0xFFFF) << 16)
    return ((hi_part >> 16) + (low_sum >> 32)) & _MASK32, low_sum & _MASK32


def philox4x32_10(counter: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """Philox4x32-10 of int64 tensors holding 32-bit words: counter ``[..., 4]``,
    key ``[..., 2]`` (broadcast) -> ``[..., 4]``."""
    c0, c1, c2, c3 = (w.to(torch.int64) & _MASK32 for w in counter.unbind(-1))
    k0, k1 = (w.to(torch.int64) & _MASK32 for w in key.unbind(-1))
    for rnd in range(10):
        if rnd > 0:
            k0 = (k0 + _WEYL0) & _MASK32
            k1 = (k1 + _WEYL1) & _MASK32
        hi0, lo0 = _mulhilo(_MUL0, c0)
        hi1, lo1 = _mulhilo(_MUL1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return torch.stack(torch.broadcast_tensors(c0, c1, c2, c3), dim=-1)


def random_bits(
    seed: int, offset: int, request: int, position: int, purpose: int, columns: torch.Tensor
) -> torch.Tensor:
    """The 32-bit words (as int64) the kernels draw at these addresses."""
    seed &= (1 << 64) - 1
    columns = columns.to(torch.int64)
    counter = torch.stack(
        [
            (columns >> 2) | (purpose << 24),
            torch.full_like(columns, position),
            torch.full_like(columns, request),
            torch.full_like(columns, offset),
        ],
        dim=-1,
    )
    key = torch.tensor([seed & _MASK32, seed >> 32], dtype=torch.int64)
    words = philox4x32_10(counter, key)
    return words.gather(-1, (columns & 3).unsqueeze(-1)).squeeze(-1)


def uniform(bits: torch.Tensor) -> torch.Tensor:
    """Uniform in [0, 1) with 24 bits (acceptance tests)."""
    return (bits >> 8).to(torch.float64) * 2.0**-24


def exponential(bits: torch.Tensor) -> torch.Tensor:
    """-log2(1 - t), t = bits 2^-32 + 2^-33 rounded to float32: an exponential
    variate over ln 2 (races compare ratios, so the factor does not matter)."""
    t = bits.to(torch.float32) * 2.0**-32 + 2.0**-33
    t = torch.clamp(t, max=_ONE_MINUS_ULP).to(torch.float64)
    return -torch.log1p(-t) / math.log(2.0)


# ------------------------------------------------------------ distributions


def _sanitize_logits(z: torch.Tensor) -> torch.Tensor:
    return torch.nan_to_num(z, nan=-_FLOAT_MAX, posinf=_FLOAT_MAX, neginf=-_FLOAT_MAX) + 0.0  # -0 -> +0


def _scale(temperature: float) -> torch.Tensor:
    return _LOG2E_F32 / torch.tensor(temperature, dtype=torch.float32)


def _softmax2(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax(logits / T) as the kernels define it: z = sanitize(l * (log2(e) / T))
    in float32, then 2^(z - max z) normalised, in float64."""
    z = _sanitize_logits(logits.to(torch.float32) * _scale(temperature)).to(torch.float64)
    w = torch.exp2(z - z.max())
    p = w / w.sum()
    return torch.where(p >= _MIN_WEIGHT, p, torch.zeros_like(p))


def _scaled(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """z = sanitize(l * (log2(e) / T)) in float32."""
    return _sanitize_logits(logits.to(torch.float32) * _scale(temperature))


def truncation_mask(z: torch.Tensor, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0) -> torch.Tensor:
    """The tokens a row of base-2 logits ``z`` (float32) keeps under top-k, min-p
    and then top-p (dspark/truncation.h), by their definitions: sort-based, in
    float64 (top-k keeps every value tied with the k-th largest; min-p keeps
    ``z >= M + log2(min_p)``; top-p keeps the smallest set of most probable
    tokens, whole tie groups, whose mass reaches top_p of what top-k and min-p
    kept)."""
    V = z.numel()
    keep = torch.ones(V, dtype=torch.bool)
    M = z.max()
    if 0 < top_k < V:
        kth = torch.sort(z, descending=True).values[top_k - 1]
        keep &= z >= kth
    if min_p > 2.0**-100 and min_p == min_p:
        cut = (M + torch.tensor(math.log2(min(min_p, 1.0)), dtype=torch.float32)).to(torch.float32)
        keep &= z >= cut
    if top_p < 1.0:
        w = torch.where(keep, torch.exp2(z.to(torch.float64) - float(M)), torch.zeros(V, dtype=torch.float64))
        need = top_p * float(w.sum())
        values = torch.unique(z[keep], sorted=True).flip(0)  # distinct kept values, descending
        mass = 0.0
        for v in values:
            mass += float(w[z == v].sum())
            if mass >= need:
                keep &= z >= v
                break
    return keep


def _truncated_softmax2(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                        min_p: float) -> torch.Tensor:
    """softmax(logits / T) restricted to the truncation's kept set, renormalised."""
    z = _scaled(logits, temperature)
    keep = truncation_mask(z, top_k, top_p, min_p)
    w = torch.where(keep, torch.exp2(z.to(torch.float64) - float(z.max())), torch.zeros(z.numel(), dtype=torch.float64))
    p = w / w.sum()
    return torch.where(p >= _MIN_WEIGHT, p, torch.zeros_like(p))


def _given_probs(q: torch.Tensor) -> torch.Tensor:
    """Draft probabilities as the kernels normalise them (rejection.h): cleaned
    to [0, 1] in float32, summed in 2^-40 fixed point (each value rounded), the
    sum rounded to float32; a row whose sum rounds to 0 (below about 2^-41)
    has no mass (every p_d is 0)."""
    q = q.to(torch.float32)
    q = torch.where(q >= _MIN_WEIGHT, q, torch.zeros_like(q))  # NaN and negatives -> 0
    q = torch.clamp(q, max=1.0)
    fixed = int(torch.round(q.to(torch.float64) * 2.0**40).sum())
    if fixed == 0:
        return torch.zeros_like(q, dtype=torch.float64)
    total = torch.tensor(float(fixed), dtype=torch.float32) * torch.tensor(2.0**-40, dtype=torch.float32)
    p = q * (torch.tensor(1.0, dtype=torch.float32) / total)
    return torch.where(p >= _MIN_WEIGHT, p, torch.zeros_like(p)).to(torch.float64)


def _greedy_argmax(logits: torch.Tensor) -> int:
    return int(torch.argmax(_sanitize_logits(logits.to(torch.float32))))


class ReferenceOutput(NamedTuple):
    output_tokens: torch.Tensor
    num_accepted: torch.Tensor
    soft_acceptance: Optional[torch.Tensor]
    margins: Optional[torch.Tensor]
    logprobs: Optional[torch.Tensor] = None


def _race(weights: torch.Tensor, bits: torch.Tensor):
    keys = weights / exponential(bits)
    best = int(torch.argmax(keys))
    top = torch.topk(keys, min(2, keys.numel())).values
    margin = float((top[0] - top[1]) / top[0]) if top.numel() > 1 and top[0] > 0 else math.inf
    return best, float(keys[best]), margin


def rejection_sample(
    target_logits: torch.Tensor,
    draft_tokens: torch.Tensor,
    cu_num_draft: torch.Tensor,
    *,
    draft_logits: Optional[torch.Tensor] = None,
    draft_probs: Optional[torch.Tensor] = None,
    draft_vocab: Optional[torch.Tensor] = None,
    temperature: Union[float, torch.Tensor] = 1.0,
    seed: Union[int, torch.Tensor] = 0,
    offset: Union[int, torch.Tensor] = 0,
    max_num_draft: Optional[int] = None,
    bonus_tokens: Optional[torch.Tensor] = None,
    top_k: Union[int, torch.Tensor] = 0,
    top_p: Union[float, torch.Tensor] = 1.0,
    min_p: Union[float, torch.Tensor] = 0.0,
    return_soft_acceptance: bool = False,
    return_logprobs: bool = False,
    return_margins: bool = False,
) -> ReferenceOutput:
    """The oracle of :func:`dspark.ops.rejection_sample` (same arguments, explicit
    seeds only). ``margins[r]`` is the smallest relative distance of request r's
    decisions from their thresholds (inf when all were exact comparisons). With
    ``draft_vocab`` the draft distribution over the target vocabulary is the
    draft row's, placed at the map's ids, and 0 elsewhere (built here in full:
    the oracle is allowed what the op avoids). Truncation is applied by its
    definition (:func:`truncation_mask`, sort-based)."""
    target_logits = target_logits.cpu()
    draft_tokens = draft_tokens.cpu().to(torch.int64)
    cu = [int(x) for x in cu_num_draft.cpu()]
    num_requests = len(cu) - 1
    vocab = target_logits.shape[1]
    if max_num_draft is None:
        max_num_draft = max([cu[r + 1] - cu[r] for r in range(num_requests)], default=0)
    temps = (
        [float(t) for t in temperature.cpu()] if isinstance(temperature, torch.Tensor) else [float(temperature)] * num_requests
    )
    seeds = [int(s) for s in seed.cpu()] if isinstance(seed, torch.Tensor) else [int(seed)]
    offsets = [int(o) for o in offset.cpu()] if isinstance(offset, torch.Tensor) else [int(offset)]
    per_request_seed = len(seeds) > 1

    def per_request(value, cast):
        return [cast(v) for v in value.cpu()] if isinstance(value, torch.Tensor) else [cast(value)] * num_requests

    top_ks, top_ps, min_ps = per_request(top_k, int), per_request(top_p, float), per_request(min_p, float)
    bonus = [int(b) for b in bonus_tokens.cpu()] if bonus_tokens is not None else None
    draft = draft_logits if draft_logits is not None else draft_probs
    draft = draft.cpu() if draft is not None else None
    columns = torch.arange(vocab, dtype=torch.int64)
    vocab_map = draft_vocab.cpu().to(torch.int64) if draft_vocab is not None else None

    def on_targets(dist: torch.Tensor) -> torch.Tensor:
        if vocab_map is None:
            return dist
        full = torch.zeros(vocab, dtype=dist.dtype)
        full[vocab_map] = dist
        return full

    output = torch.full((num_requests, max_num_draft + 1), -1, dtype=torch.int32)
    accepted = torch.zeros(num_requests, dtype=torch.int32)
    soft = torch.zeros(draft_tokens.shape[0], dtype=torch.float32)
    margins = torch.full((num_requests,), math.inf, dtype=torch.float64)
    logprobs = torch.full((num_requests, max_num_draft + 1), -math.inf, dtype=torch.float32)

    for r in range(num_requests):
        begin, n = cu[r], cu[r + 1] - cu[r]
        T = temps[r]
        greedy = not T > 0
        seed_r = seeds[r if per_request_seed else 0]
        offset_r = offsets[r if len(offsets) > 1 else 0]
        request = 0 if per_request_seed else r

        trow = begin + (0 if bonus is not None else r)  # the target row of draft 1

        def target_dist(k: int) -> torch.Tensor:
            return _truncated_softmax2(target_logits[trow + k], T, top_ks[r], top_ps[r], min_ps[r])

        def draft_dist(k: int) -> torch.Tensor:
            if draft_logits is not None:
                return on_targets(_softmax2(draft[begin + k], T))
            return on_targets(_given_probs(draft[begin + k]))

        if return_soft_acceptance:
            for k in range(n):
                x = int(draft_tokens[begin + k])
                if x == -1:
                    soft[begin + k] = 0.0
                    continue
                if greedy:
                    best = _greedy_argmax(target_logits[trow + k])
                    if draft is None:
                        value = float(x == best)
                    elif draft_logits is not None:
                        column = _greedy_argmax(draft[begin + k])
                        value = float((int(vocab_map[column]) if vocab_map is not None else column) == best)
                    else:
                        value = float(on_targets(_given_probs(draft[begin + k]))[best])
                elif draft is None:
                    value = float(target_dist(k)[x])
                else:
                    value = float(torch.minimum(target_dist(k), draft_dist(k)).sum().clamp(max=1.0))
                soft[begin + k] = value

        tokens = []
        final = None
        for k in range(n):
            x = int(draft_tokens[begin + k])
            if x == -1:  # no draft from here on: the final token from p_t of this row
                if greedy:
                    final = _greedy_argmax(target_logits[trow + k])
                else:
                    bits = random_bits(seed_r, offset_r, request, k, PURPOSE_RACE, columns)
                    final, _, margin = _race(target_dist(k), bits)
                    margins[r] = min(float(margins[r]), margin)
                break
            if greedy:
                best = _greedy_argmax(target_logits[trow + k])
                if x == best:
                    tokens.append(x)
                    continue
                final = best
                break
            pt_row = target_dist(k)
            pt = float(pt_row[x])
            pd_row = draft_dist(k) if draft is not None else None
            pd = float(pd_row[x]) if pd_row is not None else 1.0
            u = float(uniform(random_bits(seed_r, offset_r, request, k, PURPOSE_ACCEPT, torch.tensor([0])))[0])
            if pd > 0:
                margins[r] = min(float(margins[r]), abs(u - pt / pd))
            if u * pd < pt:
                tokens.append(x)
                continue
            if pd_row is None:
                residual = pt_row.clone()
                residual[x] = 0.0
            else:
                residual = torch.clamp(pt_row - pd_row, min=0.0)
                residual = torch.where(residual >= _MIN_WEIGHT, residual, torch.zeros_like(residual))
            bits = random_bits(seed_r, offset_r, request, k, PURPOSE_RACE, columns)
            weights = residual if residual.max() > 0 else pt_row
            final, _, margin = _race(weights, bits)
            margins[r] = min(float(margins[r]), margin)
            break
        if final is None and bonus is not None:
            final = bonus[r]
        if final is None:
            if greedy:
                final = _greedy_argmax(target_logits[trow + n])
            else:
                bits = random_bits(seed_r, offset_r, request, n, PURPOSE_RACE, columns)
                final, _, margin = _race(target_dist(n), bits)
                margins[r] = min(float(margins[r]), margin)
        accepted[r] = len(tokens)
        row = tokens + [final]
        output[r, : len(row)] = torch.tensor(row, dtype=torch.int32)
        if return_logprobs:
            for j, token in enumerate(row):
                if bonus is not None and j == n:
                    logprobs[r, j] = 0.0
                    continue
                if greedy:
                    z = _scaled(target_logits[trow + j], 1.0).to(torch.float64)
                    lp = (z[token] - z.max() - torch.log2(torch.exp2(z - z.max()).sum())) * math.log(2.0)
                else:
                    dist = target_dist(j)
                    lp = torch.log(dist[token]) if dist[token] > 0 else torch.tensor(-math.inf)
                logprobs[r, j] = float(lp)

    return ReferenceOutput(
        output, accepted, soft if return_soft_acceptance else None, margins if return_margins else None,
        logprobs if return_logprobs else None,
    )


# ---------------------------------------------------------------- scheduler


class ScheduleReference(NamedTuple):
    lengths: torch.Tensor
    throughput: float
    capacity: int
    thetas: list  # theta_0, theta_1, ... of the steps the search evaluated


def _survivals(conf_row: torch.Tensor, limit: int):
    """a_1..a_limit as float32 products, left to right (c clamped to [0, 1])."""
    c = torch.nan_to_num(conf_row.to(torch.float32), nan=0.0).clamp(0.0, 1.0)
    out, a = [], torch.tensor(1.0, dtype=torch.float32)
    for j in range(limit):
        a = a * c[j]
        out.append(float(a))
    return out


def schedule_prefix(
    conf: torch.Tensor,
    *,
    mode: str = "causal",
    sps: Optional[torch.Tensor] = None,
    budget: Optional[int] = None,
    threshold: Optional[float] = None,
    cap: Optional[torch.Tensor] = None,
) -> ScheduleReference:
    """The oracle of :func:`dspark.ops.schedule_prefix`: Algorithm 1 of the paper
    written out as in DSPARK.md, in float64."""
    conf = conf.cpu()
    R, gamma = conf.shape
    limits = [gamma if cap is None else max(0, min(gamma, int(cap[r]))) for r in range(R)]
    table = [float(x) for x in sps.cpu()] if sps is not None else []

    def theta(tokens: float, batch: int) -> float:
        return tokens * table[batch] if batch < len(table) else 0.0

    lengths = [0] * R
    thetas: list = []
    if mode == "fixed":
        lengths = list(limits)
    elif mode == "threshold":
        for r in range(R):
            c = torch.nan_to_num(conf[r].float(), nan=0.0).clamp(0, 1)
            while lengths[r] < limits[r] and float(c[lengths[r]]) >= threshold:
                lengths[r] += 1
    else:
        candidates = []
        for r in range(R):
            for j, a in enumerate(_survivals(conf[r], limits[r]), start=1):
                if a > 0:
                    candidates.append((a, j, r))
        candidates.sort(key=lambda x: (-x[0], x[1], x[2]))
        if mode == "budget":
            chosen = candidates[: max(0, min(int(budget), len(candidates)))]
        else:
            chosen = []
            if R < len(table):
                tau, batch = float(R), R
                best = theta(tau, batch)
                thetas.append(best)
                current = []
                for a, j, r in candidates:
                    if batch + 1 >= len(table):
                        break
                    current.append((a, j, r))
                    tau += a
                    batch += 1
                    value = theta(tau, batch)
                    thetas.append(value)
                    if value > best:
                        best = value
                        chosen = list(current)
                    elif mode == "causal":
                        break
        for _, j, r in chosen:
            lengths[r] = max(lengths[r], j)
    tokens = float(R) + sum(sum(_survivals(conf[r], lengths[r])) for r in range(R))
    total = sum(lengths)
    return ScheduleReference(torch.tensor(lengths, dtype=torch.int32), theta(tokens, R + total) if table else 0.0,
                             total, thetas)


# ------------------------------------------------------------ Markov head

PURPOSE_DRAFT = 3
MARKOV_CHUNK = 256


class MarkovReference(NamedTuple):
    draft_tokens: torch.Tensor
    logprobs: torch.Tensor
    lse: torch.Tensor
    corrected_logits: torch.Tensor
    margins: torch.Tensor  # [R, gamma]: relative gap of the two best race keys (inf when greedy ties are exact)


def _row_lse(row_max: float, lse: float) -> float:
    """markov.h's row_lse: a row whose maximum sits at a float limit (no logit
    above -FLT_MAX: no mass, sampled uniformly; or one at +FLT_MAX) reports
    that limit's infinity."""
    if row_max <= -_FLOAT_MAX:
        return -math.inf
    if row_max >= _FLOAT_MAX:
        return math.inf
    return lse


def _round_like(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x.to(dtype).to(torch.float64) if dtype in (torch.bfloat16, torch.float16) else x


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
    seed: Union[int, torch.Tensor] = 0,
    offset: Union[int, torch.Tensor] = 0,
    top_k: Union[int, torch.Tensor] = 0,
    top_p: Union[float, torch.Tensor] = 1.0,
    min_p: Union[float, torch.Tensor] = 0.0,
) -> MarkovReference:
    """The oracle of :func:`dspark.ops.markov_sample`: the DeepSpec-style loop
    (one position at a time, the head as written in DSPARK.md) in float64, with
    the project's random numbers: the token of position k is
    ``argmax_v 2^(z_v) / E_v``, ``z = sanitize(c log2(e) / T)`` from the float32
    corrected logits ``c`` (computed here in float64 and rounded), E from
    Philox (purpose 3, position k, column v). With ``draft_vocab`` the rows have
    its V_d columns and the sampled column is reported as its target id. A
    truncated row (top_k / top_p / min_p, :func:`truncation_mask`) races over
    its kept columns and reports the truncated distribution's lse and logprob;
    its corrected logits are -inf outside the kept set."""
    base_logits = base_logits.cpu()
    R, gamma, V = base_logits.shape
    ids = draft_vocab.cpu().to(torch.int64) if draft_vocab is not None else torch.arange(V)
    w1d, w2d = w1.cpu().double(), w2.cpu().double()
    rank = w1.shape[1]
    temps = ([float(t) for t in temperature.cpu()] if isinstance(temperature, torch.Tensor)
             else [float(temperature)] * R)
    seeds = [int(s) for s in seed.cpu()] if isinstance(seed, torch.Tensor) else [int(seed)]
    offsets = [int(o) for o in offset.cpu()] if isinstance(offset, torch.Tensor) else [int(offset)]
    per_request_seed = len(seeds) > 1

    def per_request(value, cast):
        return [cast(v) for v in value.cpu()] if isinstance(value, torch.Tensor) else [cast(value)] * R

    top_ks, top_ps, min_ps = per_request(top_k, int), per_request(top_p, float), per_request(min_p, float)
    columns = torch.arange(V, dtype=torch.int64)
    tokens = torch.zeros(R, gamma, dtype=torch.int64)
    logprobs = torch.zeros(R, gamma, dtype=torch.float32)
    lse = torch.zeros(R, gamma, dtype=torch.float32)
    corrected = torch.zeros(R, gamma, V, dtype=torch.float32)
    margins = torch.full((R, gamma), math.inf, dtype=torch.float64)
    for r in range(R):
        prev = int(anchor_tokens[r])
        state = torch.zeros(rank, dtype=torch.float64)
        for k in range(gamma):
            e = w1d[prev]
            if head == "gated":
                x = torch.cat([hidden[r, k].cpu().double(), e])
                g = torch.sigmoid(gate_weight.cpu().double() @ x + gate_bias.cpu().double())
                a = g * e
            elif head == "rnn":
                x = torch.cat([state, e, hidden[r, k].cpu().double()])
                y = joint_weight.cpu().double() @ x + joint_bias.cpu().double()
                gate, cand, out = y[:rank], y[rank:2 * rank], y[2 * rank:]
                state = torch.sigmoid(gate) * state + (1 - torch.sigmoid(gate)) * torch.tanh(cand)
                a = torch.tanh(out)
            else:
                a = e
            a = _round_like(a, w2.dtype)  # 16-bit inputs to the product (markov.h)
            c = (base_logits[r, k].double() + w2d @ a).to(torch.float32)
            corrected[r, k] = c
            T = temps[r]
            if not T > 0:
                clean = _sanitize_logits(c)
                token = int(ids[int(torch.argmax(clean))])
                top = torch.topk(clean.double(), min(2, V)).values
                if top.numel() > 1:
                    margins[r, k] = float((top[0] - top[1]) / max(1.0, abs(float(top[0]))))
                tokens[r, k] = token
                lse[r, k] = _row_lse(float(clean.max()), float(clean.max()))
            else:
                z32 = _sanitize_logits(c * _scale(T))
                z = z32.to(torch.float64)
                m = z.max()
                w = torch.exp2(z - m)
                keep = truncation_mask(z32, top_ks[r], top_ps[r], min_ps[r])
                if not keep.all():
                    w = torch.where(keep, w, torch.zeros_like(w))
                    corrected[r, k] = torch.where(keep, c, torch.full_like(c, -math.inf))
                s = w.sum()
                bits = random_bits(seeds[r if per_request_seed else 0], offsets[r if len(offsets) > 1 else 0],
                                   0 if per_request_seed else r, k, PURPOSE_DRAFT, columns)
                column, _, margin = _race(w, bits)
                token = int(ids[column])
                margins[r, k] = margin
                tokens[r, k] = token
                lse[r, k] = _row_lse(float(m), float(math.log(2.0) * (m + torch.log2(s))))
                logprobs[r, k] = float(math.log(2.0) * (z[column] - m - torch.log2(s)))
            prev = int(tokens[r, k])
    return MarkovReference(tokens, logprobs, lse, corrected, margins)


def confidence(
    hidden: torch.Tensor,
    w1: torch.Tensor,
    anchor_tokens: torch.Tensor,
    draft_tokens: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    *,
    temperatures: Optional[torch.Tensor] = None,
):
    """The oracle of :func:`dspark.ops.confidence` in float64: (logits, conf, survival)."""
    hidden = hidden.cpu().double()
    R, gamma, _ = hidden.shape
    prev = torch.cat([anchor_tokens.cpu().reshape(R, 1).long(), draft_tokens.cpu().long()[:, : gamma - 1]], dim=1)
    x = torch.cat([hidden, w1.cpu().double()[prev]], dim=-1)
    logits = x @ weight.cpu().double().reshape(-1) + bias.cpu().double().reshape(())
    t = temperatures.cpu().double() if temperatures is not None else torch.ones(gamma, dtype=torch.float64)
    conf = torch.sigmoid(logits / t)
    return logits.float(), conf.float(), torch.cumprod(conf, dim=1).float()


# ---------------------------------------------------------------- attention


def gather_pages(cache: torch.Tensor, block_table_row: torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` entries ``[length, H_kv, D]`` of one request's paged cache."""
    page_size = cache.shape[1]
    pages = block_table_row[: (length + page_size - 1) // page_size].long().cpu()
    return cache.cpu()[pages].reshape(-1, cache.shape[2], cache.shape[3])[:length]


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
):
    """The oracle of :func:`dspark.ops.paged_attention`: gathers each request's
    pages and runs ``scaled_dot_product_attention`` with an explicit mask, in
    float64. Returns (output in q's dtype, lse float32); queries that see no
    key get a zero output and lse -inf. ``window`` W: query i (at position
    ``kv - q_len + i``) also sees only keys ``j > kv - q_len + i - W``."""
    q64 = q.cpu().double()
    T, Hq, D = q.shape
    Hkv = k_cache.shape[2]
    G = Hq // Hkv
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    out = torch.zeros(T, Hq, D, dtype=torch.float64)
    lse = torch.full((T, Hq), -math.inf, dtype=torch.float64)
    cu = [int(x) for x in cu_q.cpu()]
    for r in range(len(cu) - 1):
        q_len, kv = cu[r + 1] - cu[r], int(kv_lens[r])
        if q_len == 0:
            continue
        K = gather_pages(k_cache, block_table[r], kv).double().repeat_interleave(G, dim=1)  # [kv, Hq, D]
        V = gather_pages(v_cache, block_table[r], kv).double().repeat_interleave(G, dim=1)
        i = torch.arange(q_len).unsqueeze(1)
        j = torch.arange(kv).unsqueeze(0)
        visible = j <= kv - q_len + i if mask == "causal" else torch.ones(q_len, kv, dtype=torch.bool)
        if window:
            visible = visible & (j > kv - q_len + i - window)
        rows = visible.any(dim=1)
        if kv == 0 or not rows.any():
            continue
        qr = q64[cu[r]:cu[r + 1]].transpose(0, 1)  # [Hq, q_len, D]
        o = torch.nn.functional.scaled_dot_product_attention(
            qr, K.transpose(0, 1), V.transpose(0, 1), attn_mask=visible, scale=scale)
        scores = (qr @ K.transpose(0, 1).transpose(1, 2)) * scale
        scores = scores.masked_fill(~visible, -math.inf)
        out[cu[r]:cu[r + 1]][rows] = o.transpose(0, 1)[rows]
        lse[cu[r]:cu[r + 1]][rows] = torch.logsumexp(scores, dim=-1).transpose(0, 1)[rows]
    return out.to(q.dtype), lse.float()


def rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate-half rotary embedding as Llama / Qwen3 apply it (a new tensor):
    angles position * inv_freq in float32, then in float64 x cos + rotate_half(x) sin
    on the first 2 len(inv_freq) dimensions."""
    half = inv_freq.shape[0]
    angles = positions.cpu().float().unsqueeze(-1) * inv_freq.cpu().float().unsqueeze(0)  # [T, half]
    cos, sin = torch.cos(angles).double().unsqueeze(1), torch.sin(angles).double().unsqueeze(1)
    y = x.cpu().double().clone()
    x1, x2 = y[..., :half].clone(), y[..., half:2 * half].clone()
    y[..., :half] = x1 * cos - x2 * sin
    y[..., half:2 * half] = x2 * cos + x1 * sin
    return y.to(x.dtype)
