"""Fuzz targets: each turns a seed into one case, runs it and checks it.

A case is valid or carries one hostile change. Valid cases must succeed and
match the reference (or the invariants that define the result); a hostile
change must raise ValueError / TypeError naming the argument (CheckpointError
for model folders; finish_reason "error" for an engine request). The return
value is the outcome (success or clean_error); anything else raises Failure.
"""

from __future__ import annotations

import math
import random
import shutil
import tempfile
import traceback
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from dspark import ops, reference
from dspark.models import CheckpointError

SUCCESS, CLEAN_ERROR = "success", "clean_error"
FLOATS = (torch.float32, torch.float16, torch.bfloat16)
MARGIN = 1e-4  # decisions closer than this to their threshold may go either way (float32 vs float64)


class Failure(AssertionError):
    """The case broke a rule the target checks."""


def check(condition: bool, message: str) -> None:
    if not condition:
        raise Failure(message)


def expect_error(call: Callable[[], object], names: Sequence[str],
                 types: Tuple[type, ...] = (ValueError, TypeError)) -> str:
    """The call must raise one of ``types`` whose message names one of ``names``."""
    try:
        call()
    except types as e:
        message = str(e)
        check(any(name in message for name in names),
              f"{type(e).__name__} does not name any of {list(names)}: {message}")
        return CLEAN_ERROR
    raise Failure(f"no error, expected one naming {list(names)}")


def _gen(rng: random.Random) -> torch.Generator:
    return torch.Generator().manual_seed(rng.getrandbits(62))


def _hostile_logits(x: torch.Tensor, rng: random.Random) -> torch.Tensor:
    """Sprinkles NaN, infinities, huge values or whole rows without mass."""
    x = x.clone()
    flat = x.view(-1, x.shape[-1]) if x.numel() else x
    if not x.numel():
        return x
    for _ in range(rng.randint(1, 4)):
        kind = rng.choice(["nan", "inf", "-inf", "huge", "row -inf", "row nan", "row equal", "tiny"])
        row = rng.randrange(flat.shape[0])
        col = rng.randrange(flat.shape[1])
        if kind == "nan":
            flat[row, col] = math.nan
        elif kind == "inf":
            flat[row, col] = math.inf
        elif kind == "-inf":
            flat[row, col] = -math.inf
        elif kind == "huge":
            flat[row, col] = rng.choice([1e30, -1e30, 3e38, -3e38])
        elif kind == "row -inf":
            flat[row] = -math.inf
        elif kind == "row nan":
            flat[row] = math.nan
        elif kind == "row equal":
            flat[row] = rng.choice([0.0, 5.0, -1e30])
        else:
            flat[row, col] = 1e-30
    return x


def _maybe_strided_matrix(x: torch.Tensor, rng: random.Random) -> torch.Tensor:
    """The same values as a view with other strides: rows of a wider buffer,
    every other column of a wider buffer, or a transposed copy."""
    kind = rng.choice(["contiguous", "contiguous", "wide rows", "column step", "transposed"])
    if kind == "wide rows":
        big = torch.zeros(x.shape[0], x.shape[1] + rng.randint(1, 7), dtype=x.dtype)
        big[:, : x.shape[1]] = x
        return big[:, : x.shape[1]]
    if kind == "column step":
        big = torch.zeros(x.shape[0], 2 * x.shape[1], dtype=x.dtype)
        big[:, ::2] = x
        return big[:, ::2]
    if kind == "transposed":
        return x.t().contiguous().t()
    return x


def _same(a: torch.Tensor, b: torch.Tensor, rtol: float, atol: float) -> bool:
    return bool(torch.isclose(a.double(), b.double(), rtol=rtol, atol=atol, equal_nan=True).all())


def _truncation(rng: random.Random, R: int, V: int) -> Dict[str, object]:
    """Top-k / top-p / min-p as scalars or per-request tensors, often off."""
    kw: Dict[str, object] = {}
    if rng.random() < 0.6:
        return kw
    for name in rng.sample(["top_k", "top_p", "min_p"], rng.randint(1, 3)):
        if name == "top_k":
            values = [rng.choice([0, 1, min(2, V), min(5, V), V]) for _ in range(R)]
            scalar = rng.choice([0, 1, min(3, V), V])
        elif name == "top_p":
            values = [rng.choice([1.0, 0.9, 0.5, 1e-6]) for _ in range(R)]
            scalar = rng.choice([1.0, 0.8, 0.3])
        else:
            values = [rng.choice([0.0, 0.1, 0.5, 1.0]) for _ in range(R)]
            scalar = rng.choice([0.0, 0.05, 0.2])
        if R and rng.random() < 0.5:
            dtype = rng.choice([torch.int32, torch.int64]) if name == "top_k" else torch.float32
            kw[name] = torch.tensor(values, dtype=dtype)
        else:
            kw[name] = scalar
    return kw


def _truncation_mutations(R: int, V: int, rng: random.Random) -> List[Tuple[str, Callable, List[str]]]:
    def put(name, value):
        return lambda a, k: k.__setitem__(name, value)
    return [
        ("top_k range", put("top_k", rng.choice([-1, V + 1, 2**40])), ["top_k"]),
        ("top_k type", put("top_k", rng.choice([1.5, "3", None])), ["top_k"]),
        ("top_k float tensor", put("top_k", torch.ones(max(R, 1))), ["top_k"]),
        ("top_k tensor length", put("top_k", torch.ones(R + 2, dtype=torch.int64)), ["top_k"]),
        ("top_p range", put("top_p", rng.choice([0.0, -0.5, 1.5, math.nan, math.inf])), ["top_p"]),
        ("top_p type", put("top_p", rng.choice(["0.9", None, [0.9]])), ["top_p"]),
        ("top_p int tensor", put("top_p", torch.ones(max(R, 1), dtype=torch.int64)), ["top_p"]),
        ("min_p range", put("min_p", rng.choice([-0.1, 1.5, math.nan])), ["min_p"]),
        ("min_p tensor range", put("min_p", torch.full((R,), rng.choice([-1.0, 2.0, math.nan]))), ["min_p"])
        if R else None,
    ]


# ------------------------------------------------------------ rejection_sample


def _rejection_case(rng: random.Random):
    R = rng.choice([0, 1, 1, 2, 3, 5])
    V = rng.choice([1, 2, 3, 7, 16, 64, 2100])
    dtype = rng.choice(FLOATS + (torch.float32,))
    g = _gen(rng)
    counts = [rng.randint(0, 4) for _ in range(R)]
    N = sum(counts)
    cu = torch.zeros(R + 1, dtype=torch.int32)
    if R:
        cu[1:] = torch.cumsum(torch.tensor(counts), 0).to(torch.int32)
    target = torch.randn(N + R, V, generator=g) * rng.choice([0.3, 3.0, 30.0])
    if rng.random() < 0.3:
        target = _hostile_logits(target, rng)
    paired = [cu[r].item() + r + k for r in range(R) for k in range(counts[r])]
    draft = target[torch.tensor(paired, dtype=torch.int64)] + torch.randn(N, V, generator=g) * rng.choice([0.0, 1.0])
    draft = torch.nan_to_num(draft, nan=0.0, posinf=5.0, neginf=-5.0)
    kw: Dict[str, object] = {}
    mode = rng.choice(["one-hot", "logits", "probs"])
    if mode == "logits":
        kw["draft_logits"] = _maybe_strided_matrix(draft.to(dtype), rng)
    elif mode == "probs":
        probs = torch.softmax(draft, -1)
        if rng.random() < 0.3 and N:
            probs[rng.randrange(N), rng.randrange(V)] = rng.choice([-1.0, 2.0, math.nan, math.inf, 0.0])
        kw["draft_probs"] = _maybe_strided_matrix(probs.to(dtype), rng)
    tokens = torch.randint(0, V, (N,), generator=g).to(rng.choice([torch.int32, torch.int64]))
    temp_kind = rng.choice(["scalar", "scalar", "zero", "tensor"])
    if temp_kind == "scalar":
        kw["temperature"] = rng.choice([1.0, 0.7, 1e-3, 50.0, 1])
    elif temp_kind == "zero":
        kw["temperature"] = 0.0
    else:
        kw["temperature"] = torch.tensor([rng.choice([0.0, 0.5, 1.0, 2.0]) for _ in range(R)], dtype=torch.float32)
    seed_kind = rng.choice(["int", "tensor"] if R else ["int"])
    kw["seed"] = (rng.randrange(-(2**63), 2**64) if seed_kind == "int"
                  else torch.randint(-(2**62), 2**62, (R,), generator=g))
    offset_kind = rng.choice(["int", "tensor"])
    kw["offset"] = (rng.randrange(0, 2**32) if offset_kind == "int"
                    else torch.randint(0, 2**32, (rng.choice([1, R]) if R else 1,), generator=g))
    if offset_kind == "tensor" and R == 0:
        kw["offset"] = rng.randrange(0, 2**32)
    kw.update(_truncation(rng, R, V))
    if R and rng.random() < 0.2:  # vLLM's layout: draft rows only, the caller's bonus tokens
        target = target[torch.tensor(paired, dtype=torch.int64)] if N else target[:0]
        kw["bonus_tokens"] = torch.randint(0, V, (R,), generator=g).to(rng.choice([torch.int32, torch.int64]))
    widest = max(counts, default=0)
    if rng.random() < 0.5:
        kw["max_num_draft"] = widest + rng.choice([0, 0, 1, 3])
    kw["return_soft_acceptance"] = rng.random() < 0.5
    kw["return_logprobs"] = rng.random() < 0.4
    if rng.random() < 0.25:
        width = kw.get("max_num_draft", widest) + 1
        buffer = torch.full((R, width + rng.choice([0, 3])), 77, dtype=torch.int32)
        kw["max_num_draft"] = width - 1
        kw["out"] = (buffer[:, :width], torch.empty(R, dtype=torch.int32),
                     torch.empty(N, dtype=torch.float32) if kw["return_soft_acceptance"] else None,
                     torch.empty(R, width, dtype=torch.float32) if kw["return_logprobs"] else None)
    args = [_maybe_strided_matrix(target.to(dtype), rng), tokens, cu]
    return args, kw, counts


def _rejection_mutations(args, kw, counts, rng):
    """(description, change, argument names the error must mention)."""
    target, tokens, cu = args
    R, N, V = cu.shape[0] - 1, tokens.shape[0], target.shape[1]
    out = []

    def put(name, value):
        def change(a, k):
            k[name] = value
        return change

    if N:
        bad_tok = tokens.clone()
        bad_tok[rng.randrange(N)] = rng.choice([V, V + 5, -2, 2**31 - 1])  # (-1: "no draft from here on")
        out.append(("draft token out of range", lambda a, k: a.__setitem__(1, bad_tok), ["draft_tokens"]))
        out.append(("max_num_draft too small", put("max_num_draft", max(counts) - 1), ["max_num_draft"]))
    if R:  # changes that can never describe N draft tokens
        bad_cu = cu.clone()
        where = rng.choice(["first", "last"] + (["decrease"] if R > 1 and N else []))
        if where == "first":
            bad_cu[0] += rng.choice([-3, -1, 1, 2**30])
        elif where == "last":
            bad_cu[-1] += rng.choice([-3, -1, 1, 2**30]) if int(bad_cu[-1]) >= 3 else rng.choice([1, 2**30])
        else:
            i = rng.randrange(1, R)
            bad_cu[i] = int(bad_cu[i + 1]) + 1
        out.append(("cu_num_draft values", lambda a, k: a.__setitem__(2, bad_cu), ["cu_num_draft", "draft tokens"]))
    out += [
        ("cu_num_draft int64", lambda a, k: a.__setitem__(2, cu.long()), ["cu_num_draft"]),
        ("cu_num_draft 2-D", lambda a, k: a.__setitem__(2, cu.reshape(1, -1)), ["cu_num_draft"]),
        ("cu_num_draft empty", lambda a, k: a.__setitem__(2, cu[:0]), ["cu_num_draft"]),
        ("target rows", lambda a, k: a.__setitem__(0, torch.randn(target.shape[0] + 1, V)), ["target_logits"]),
        ("target int", lambda a, k: a.__setitem__(0, torch.zeros(target.shape, dtype=torch.int32)),
         ["target_logits"]),
        ("target 1-D", lambda a, k: a.__setitem__(0, torch.zeros(V)), ["target_logits"]),
        ("target not a tensor", lambda a, k: a.__setitem__(0, target.tolist()), ["target_logits"]),
        ("target no columns", lambda a, k: a.__setitem__(0, torch.zeros(target.shape[0], 0)), ["target_logits"]),
        ("tokens float", lambda a, k: a.__setitem__(1, tokens.float()), ["draft_tokens"]),
        ("tokens 2-D", lambda a, k: a.__setitem__(1, tokens.reshape(1, -1)), ["draft_tokens"]),
        ("draft_logits shape", put("draft_logits", torch.randn(N + 1, V)), ["draft_logits"]),
        ("draft_probs dtype", put("draft_probs", torch.zeros(N, V, dtype=torch.int64)), ["draft_probs"]),
        ("both drafts", lambda a, k: k.update(draft_logits=torch.randn(N, V), draft_probs=torch.rand(N, V)),
         ["draft_logits"]),
        ("temperature negative", put("temperature", rng.choice([-1.0, -1e-9, math.nan])), ["temperature"]),
        ("temperature string", put("temperature", "0.5"), ["temperature"]),
        ("temperature bool", put("temperature", True), ["temperature"]),
        ("temperature tensor", put("temperature", torch.full((R,), rng.choice([-1.0, math.nan]))),
         ["temperature"]) if R else None,
        ("temperature int tensor", put("temperature", torch.zeros(R, dtype=torch.int64)), ["temperature"]),
        ("temperature tensor length", put("temperature", torch.ones(R + 2)), ["temperature"]),
        ("seed float", put("seed", 1.5), ["seed"]),
        ("seed bool", put("seed", True), ["seed"]),
        ("seed int32 tensor", put("seed", torch.zeros(max(R, 1), dtype=torch.int32)), ["seed"]),
        ("seed tensor length", put("seed", torch.zeros(R + 2, dtype=torch.int64)), ["seed"]),
        ("seed and generator", lambda a, k: k.update(generator=torch.Generator()), ["generator"]),
        ("offset range", put("offset", rng.choice([-1, 2**32, 2**70])), ["offset"]),
        ("offset float", put("offset", 2.0), ["offset"]),
        ("offset tensor range", put("offset", torch.tensor([rng.choice([-1, 2**32])])), ["offset"]),
        ("max_num_draft", put("max_num_draft", rng.choice([-1, -2, 2**32, 2**31 - 1, 2**31 - 2, 1.0, "3", True,
                                                           N + ops.MAX_PADDING + 1])), ["max_num_draft"]),
        ("out shape", lambda a, k: k.update(out=(torch.empty(R, 1, dtype=torch.int32),
                                                 torch.empty(R, dtype=torch.int32), None),
                                            max_num_draft=max(counts, default=0) + 1),
         ["output_tokens", "out"]),
        ("out dtype", lambda a, k: k.update(out=(torch.empty(R, max(counts, default=0) + 1, dtype=torch.int64),
                                                 torch.empty(R, dtype=torch.int32), None),
                                            max_num_draft=max(counts, default=0)),
         ["output_tokens", "out"]),
    ]
    out += _truncation_mutations(R, V, rng)
    if R:
        out.append(("bonus_tokens range", lambda a, k: k.update(bonus_tokens=torch.full((R,), rng.choice([V, -1]))),
                    ["bonus_tokens", "target_logits"]))
        out.append(("bonus_tokens length", lambda a, k: k.update(bonus_tokens=torch.zeros(R + 1, dtype=torch.int64)),
                    ["bonus_tokens", "target_logits"]))
    if R > 1:
        width = max(counts) + 1
        out.append(("out expanded", lambda a, k: k.update(
            out=(torch.empty(1, width, dtype=torch.int32).expand(R, width), torch.empty(R, dtype=torch.int32), None),
            max_num_draft=width - 1), ["output_tokens", "out"]))
        shared = torch.empty(R * width + R, dtype=torch.int32)
        out.append(("out aliased", lambda a, k: k.update(
            out=(shared[: R * width].view(R, width), shared[R * width - 1: R * width - 1 + R], None),
            max_num_draft=width - 1), ["output_tokens", "num_accepted", "out"]))
    return [m for m in out if m is not None]


def _per_request(kw: dict, name: str, r: int, default):
    value = kw.get(name, default)
    return value[r].item() if isinstance(value, torch.Tensor) else value


def _residual_within_rounding(r, out, ref, target, tokens, cu, kw) -> bool:
    """Whether request r's results differ only in a correction token drawn from a
    residual max(0, p_t - p_d) whose whole mass is within float32 rounding of 0
    (p_t and p_d equal up to rounding): whether it has mass at all, and so
    whether the residual or p_t is sampled, may then go either way."""
    k = int(out.num_accepted[r])
    n = int(cu[r + 1]) - int(cu[r])
    if k != int(ref.num_accepted[r]) or k >= n:
        return False
    T = float(_per_request(kw, "temperature", r, 1.0))
    if not T > 0:
        return False
    begin = int(cu[r])
    row = begin + k if kw.get("bonus_tokens") is not None else begin + r + k
    p_t = reference._softmax2(target[row].cpu(), T)
    top_k, top_p, min_p = (_per_request(kw, "top_k", r, 0), _per_request(kw, "top_p", r, 1.0),
                           _per_request(kw, "min_p", r, 0.0))
    if (top_k, top_p, min_p) != (0, 1.0, 0.0):
        z = torch.log2(p_t.clamp_min(1e-300)).to(torch.float32)
        p_t = torch.where(reference.truncation_mask(z, int(top_k), float(top_p), float(min_p)), p_t,
                          torch.zeros_like(p_t))
        p_t = p_t / p_t.sum()
    if kw.get("draft_logits") is not None:
        p_d = reference._softmax2(kw["draft_logits"][begin + k].cpu(), T)
    elif kw.get("draft_probs") is not None:
        p_d = reference._given_probs(kw["draft_probs"][begin + k].cpu())
    else:
        p_d = torch.zeros_like(p_t)
        p_d[int(tokens[begin + k])] = 1.0
    return float(torch.clamp(p_t.double() - p_d.double(), min=0).sum()) < 1e-5


def fuzz_rejection_sample(rng: random.Random) -> str:
    args, kw, counts = _rejection_case(rng)
    if rng.random() < 0.4:
        name, change, names = rng.choice(_rejection_mutations(args, kw, counts, rng))
        change(args, kw)
        return expect_error(lambda: ops.rejection_sample(*args, **kw), names)
    out = ops.rejection_sample(*args, **kw)
    target, tokens, cu = args
    R, V = cu.shape[0] - 1, target.shape[1]
    width = kw.get("max_num_draft", max(counts, default=0)) + 1
    check(tuple(out.output_tokens.shape) == (R, width), f"output shape {list(out.output_tokens.shape)}")
    for r in range(R):
        a = int(out.num_accepted[r])
        row = out.output_tokens[r].tolist()
        check(0 <= a <= counts[r], f"request {r}: num_accepted {a} of {counts[r]} drafts")
        check(row[: a] == tokens[cu[r]: cu[r] + a].tolist(), f"request {r}: accepted tokens are not the drafts")
        check(0 <= row[a] < V, f"request {r}: correction token {row[a]} outside [0, {V})")
        check(all(t == -1 for t in row[a + 1:]), f"request {r}: padding is not -1: {row}")
    ref_kw = {k: v for k, v in kw.items() if k not in ("out",)}
    ref = reference.rejection_sample(target, tokens, cu, return_margins=True, **ref_kw)
    close = ref.margins < MARGIN
    same = (out.output_tokens == ref.output_tokens).all(-1) & (out.num_accepted == ref.num_accepted)
    differ = [r for r in torch.nonzero(~same & ~close).flatten().tolist()
              if not _residual_within_rounding(r, out, ref, target, tokens, cu, kw)]
    check(not differ, f"requests {differ} differ from the reference: {out.output_tokens.tolist()} vs "
                      f"{ref.output_tokens.tolist()}")
    if kw.get("return_soft_acceptance"):
        check(out.soft_acceptance is not None and _same(out.soft_acceptance, ref.soft_acceptance, 1e-4, 1e-4),
              f"soft acceptance {out.soft_acceptance} vs {ref.soft_acceptance}")
    if kw.get("return_logprobs"):
        check(out.logprobs is not None and tuple(out.logprobs.shape) == (R, width), "logprobs shape")
        for r in torch.nonzero(same).flatten().tolist():
            n = int(out.num_accepted[r]) + 1
            check(_same(out.logprobs[r, :n], ref.logprobs[r, :n], 1e-4, 2e-3),
                  f"request {r}: logprobs {out.logprobs[r, :n].tolist()} vs {ref.logprobs[r, :n].tolist()}")
    return SUCCESS


# ------------------------------------------------------------ markov_sample / confidence


def _markov_case(rng: random.Random):
    R, gamma = rng.choice([0, 1, 2, 3]), rng.randint(1, 5)
    V, rank, d = rng.choice([1, 5, 64, 300]), rng.choice([1, 4, 16]), rng.choice([3, 8])
    head = rng.choice(["vanilla", "gated", "rnn"])
    g = _gen(rng)
    wdtype = rng.choice([torch.float32, torch.float32, torch.bfloat16, torch.float16])
    base = torch.randn(R, gamma, V, generator=g) * rng.choice([0.5, 3.0])
    if rng.random() < 0.3:
        base = _hostile_logits(base, rng)
    kw: Dict[str, object] = dict(head=head)
    hidden = torch.randn(R, gamma, d, generator=g)
    if head == "gated":
        kw.update(gate_weight=(0.3 * torch.randn(rank, d + rank, generator=g)).to(wdtype),
                  gate_bias=(0.3 * torch.randn(rank, generator=g)).to(wdtype), hidden=hidden)
    elif head == "rnn":
        kw.update(joint_weight=(0.3 * torch.randn(3 * rank, 2 * rank + d, generator=g)).to(wdtype),
                  joint_bias=(0.3 * torch.randn(3 * rank, generator=g)).to(wdtype), hidden=hidden)
    temp_kind = rng.choice(["scalar", "zero", "tensor"])
    kw["temperature"] = (rng.choice([1.0, 0.6, 2.0]) if temp_kind == "scalar" else 0.0 if temp_kind == "zero"
                         else torch.tensor([rng.choice([0.0, 0.7, 1.3]) for _ in range(R)]))
    kw["seed"] = (rng.randrange(-(2**63), 2**63) if rng.random() < 0.5 or R == 0
                  else torch.randint(0, 2**62, (R,), generator=g))
    kw["offset"] = rng.randrange(0, 2**32)
    kw.update(_truncation(rng, R, V))
    kw["return_corrected_logits"] = rng.random() < 0.5
    args = [base, torch.randint(0, V, (R,), generator=g), (0.5 * torch.randn(V, rank, generator=g)).to(wdtype),
            (0.5 * torch.randn(V, rank, generator=g)).to(wdtype)]
    return args, kw, wdtype


def fuzz_markov_sample(rng: random.Random) -> str:
    args, kw, wdtype = _markov_case(rng)
    base, anchor, w1, w2 = args
    R, gamma, V = base.shape
    rank = w1.shape[1]
    if rng.random() < 0.4:
        def put(name, value):
            return lambda a, k: k.__setitem__(name, value)
        mutations = [
            ("anchor range", lambda a, k: a.__setitem__(1, torch.full((R,), V)), ["anchor_tokens"]) if R else None,
            ("anchor float", lambda a, k: a.__setitem__(1, anchor.float()), ["anchor_tokens"]),
            ("w1 shape", lambda a, k: a.__setitem__(2, torch.randn(V + 1, rank)), ["w1"]),
            ("w2 shape", lambda a, k: a.__setitem__(3, torch.randn(V, rank + 1)), ["w2"]),
            ("w2 int", lambda a, k: a.__setitem__(3, torch.zeros(V, rank, dtype=torch.int32)), ["w2"]),
            ("base 2-D", lambda a, k: a.__setitem__(0, base.reshape(R * gamma, V)), ["base_logits"]),
            ("head", put("head", rng.choice(["lstm", "", None, ["vanilla"], 1])), ["head"]),
            ("hidden missing", lambda a, k: k.update(head="gated", hidden=None), ["hidden"]),
            ("gate weight shape", lambda a, k: k.update(head="gated", hidden=torch.randn(R, gamma, 4),
                                                        gate_weight=torch.randn(rank, 3), gate_bias=torch.randn(rank)),
             ["gate_weight"]),
            ("temperature", put("temperature", rng.choice([-1.0, math.nan, "1", None])), ["temperature"]),
            ("seed", put("seed", rng.choice([1.5, "1", True])), ["seed"]),
            ("offset", put("offset", rng.choice([-5, 2**32, 0.5])), ["offset"]),
        ] + _truncation_mutations(R, V, rng)
        name, change, names = rng.choice([m for m in mutations if m is not None])
        change(args, kw)
        return expect_error(lambda: ops.markov_sample(*args, **kw), names)
    out = ops.markov_sample(*args, **kw)
    check(tuple(out.draft_tokens.shape) == (R, gamma), "draft_tokens shape")
    check(bool(((out.draft_tokens >= 0) & (out.draft_tokens < V)).all()), "a draft token outside [0, V)")
    check(bool((out.logprobs <= 1e-5).all()), f"a logprob above 0: {out.logprobs}")
    check(not bool(torch.isnan(out.lse).any()), f"NaN lse: {out.lse}")
    ref = reference.markov_sample(base, anchor, w1, w2, **{k: v for k, v in kw.items()
                                                            if k != "return_corrected_logits"})
    if wdtype == torch.float32 or kw["head"] == "vanilla":
        for r in range(R):
            for k in range(gamma):
                if float(ref.margins[r, k]) < MARGIN:
                    break  # a near tie: this and later positions may differ
                check(int(out.draft_tokens[r, k]) == int(ref.draft_tokens[r, k]),
                      f"request {r} position {k}: token {int(out.draft_tokens[r, k])} vs the reference's "
                      f"{int(ref.draft_tokens[r, k])}")
                check(_same(out.lse[r, k], ref.lse[r, k], 1e-4, 2e-3), f"lse {float(out.lse[r, k])} vs "
                                                                      f"{float(ref.lse[r, k])}")
                check(_same(out.logprobs[r, k], ref.logprobs[r, k], 1e-4, 2e-3),
                      f"logprob {float(out.logprobs[r, k])} vs {float(ref.logprobs[r, k])}")
    return SUCCESS


def fuzz_confidence(rng: random.Random) -> str:
    R, gamma, d, V, rank = rng.choice([0, 1, 3]), rng.randint(1, 5), rng.choice([2, 8]), rng.choice([1, 9, 40]), \
        rng.choice([1, 4])
    g = _gen(rng)
    dtype = rng.choice(FLOATS)
    hidden = torch.randn(R, gamma, d, generator=g).to(dtype)
    if rng.random() < 0.2 and hidden.numel():
        hidden.view(-1)[rng.randrange(hidden.numel())] = rng.choice([math.nan, math.inf, 1e30])
    w1 = torch.randn(V, rank, generator=g).to(dtype)
    anchors = torch.randint(0, V, (R,), generator=g)
    drafts = torch.randint(0, V, (R, gamma), generator=g)
    weight = torch.randn(1, d + rank, generator=g).to(dtype)
    bias = torch.randn(1, generator=g).to(dtype)
    temps = torch.rand(gamma, generator=g) * 3 + 0.05 if rng.random() < 0.5 else None
    args = [hidden, w1, anchors, drafts, weight, bias]
    kw: Dict[str, object] = {"temperatures": temps}
    if rng.random() < 0.4:
        mutations = [
            ("anchor range", lambda: args.__setitem__(2, torch.full((R,), V)), ["anchor_tokens"]) if R else None,
            ("draft range", lambda: args.__setitem__(3, torch.full((R, gamma), -1)), ["draft_tokens"]) if R else None,
            ("draft shape", lambda: args.__setitem__(3, torch.zeros(R, gamma + 1, dtype=torch.int64)),
             ["draft_tokens"]),
            ("weight shape", lambda: args.__setitem__(4, torch.randn(1, d + rank + 1)), ["weight"]),
            ("temperatures", lambda: kw.update(temperatures=torch.full((gamma,), rng.choice([0.0, -1.0,
                                                                                             math.nan]))),
             ["temperatures"]),
            ("temperatures length", lambda: kw.update(temperatures=torch.ones(gamma + 1)), ["temperatures"]),
            ("hidden int", lambda: args.__setitem__(0, torch.zeros(R, gamma, d, dtype=torch.int32)), ["hidden"]),
        ]
        name, change, names = rng.choice([m for m in mutations if m is not None])
        change()
        return expect_error(lambda: ops.confidence(*args, **kw), names)
    out = ops.confidence(*args, **kw)
    ref = reference.confidence(*args, **kw)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for got, want, name in zip(out, ref, ("logits", "conf", "survival")):
        check(_same(got, want, tol, tol), f"{name}: {got} vs {want}")
    return SUCCESS


# ------------------------------------------------------------ schedule_prefix


def fuzz_schedule_prefix(rng: random.Random) -> str:
    R, gamma = rng.choice([0, 1, 2, 5, 17]), rng.randint(1, 8)
    g = _gen(rng)
    conf = torch.rand(R, gamma, generator=g) ** rng.choice([0.2, 1.0, 3.0])
    if rng.random() < 0.3 and conf.numel():
        conf.view(-1)[rng.randrange(conf.numel())] = rng.choice([math.nan, -1.0, 2.0, math.inf, 0.0])
    mode = rng.choice(["causal", "global", "budget", "threshold", "fixed"])
    kw: Dict[str, object] = dict(mode=mode)
    B = R * (gamma + 1) + rng.randint(-3, 3)
    if mode in ("causal", "global") or rng.random() < 0.3:
        kind = rng.choice(["curve", "flat", "near max", "zeros", "short"])
        size = max(1, B + 1 if kind != "short" else rng.randint(1, 4))
        if kind == "curve":
            sps = 1.0 / (0.02 + 1e-3 * torch.arange(size, dtype=torch.float32) * rng.random())
        elif kind == "flat":
            sps = torch.full((size,), 10.0)
        elif kind == "near max":
            sps = torch.full((size,), rng.choice([3.0e38, 3.4e38, 1e37]))
        elif kind == "zeros":
            sps = torch.zeros(size)
        else:
            sps = torch.rand(size, generator=g) * 100
        kw["sps"] = sps
    if mode == "budget":
        kw["budget"] = rng.choice([0, 1, 3, -2, 10**6, R * gamma])
    if mode == "threshold":
        kw["threshold"] = rng.choice([0.0, 0.5, 1.0, 0.99, -1.0, math.inf])
    if rng.random() < 0.4:
        kw["cap"] = torch.randint(-2, gamma + 3, (R,), generator=g, dtype=torch.int32)
    if rng.random() < 0.35:
        def put(name, value):
            return lambda: kw.__setitem__(name, value)
        mutations = [
            ("sps values", put("sps", torch.tensor([1.0, rng.choice([-1.0, math.nan, math.inf])])), ["sps"]),
            ("sps empty", put("sps", torch.zeros(0)), ["sps"]),
            ("sps int", put("sps", torch.ones(3, dtype=torch.int32)), ["sps"]),
            ("mode", put("mode", rng.choice(["fast", None, 3, ["causal"]])), ["mode"]),
            ("budget", lambda: kw.update(mode="budget", budget=rng.choice([1.5, "3", None, True, 2**70])),
             ["budget"]),
            ("threshold", lambda: kw.update(mode="threshold", threshold=rng.choice([math.nan, "0.5", None])),
             ["threshold"]),
            ("cap length", put("cap", torch.zeros(R + 1, dtype=torch.int32)), ["cap"]),
            ("cap float", put("cap", torch.zeros(R)), ["cap"]),
            ("causal without sps", lambda: kw.update(mode="causal", sps=None), ["sps"]),
            ("conf int", lambda: None, ["conf"]),
        ]
        name, change, names = rng.choice(mutations)
        change()
        conf_arg = torch.zeros(R, gamma, dtype=torch.int32) if name == "conf int" else conf
        return expect_error(lambda: ops.schedule_prefix(conf_arg, **kw), names)
    got = ops.schedule_prefix(conf, **kw)
    want = reference.schedule_prefix(conf, **kw)
    throughput = float(got.throughput)
    check(math.isfinite(throughput) and throughput >= 0, f"throughput {throughput}")
    check(_same(torch.tensor(throughput), torch.tensor(min(want.throughput, 3.4028234663852886e38)), 1e-5, 0.0),
          f"throughput {throughput} vs {want.throughput}")
    limits = conf.shape[1] if kw.get("cap") is None else kw["cap"].clamp(0, conf.shape[1])
    check(bool(((got.lengths >= 0) & (got.lengths <= limits)).all()), f"lengths {got.lengths} outside the caps")
    check(int(got.capacity) == int(got.lengths.sum()), "capacity is not the sum of the lengths")
    if got.lengths.tolist() != want.lengths.tolist():
        # causal / global compare throughputs: the kernel sums survivals in fixed
        # point (2^-40), the reference in float64, so steps that change theta by
        # less than that resolution may be taken by one and not the other; the
        # two choices must then be worth the same
        check(mode in ("causal", "global"), f"lengths {got.lengths.tolist()} vs the reference's "
                                            f"{want.lengths.tolist()}")
        mine, theirs = _theta(conf, got.lengths.tolist(), kw["sps"]), _theta(conf, want.lengths.tolist(), kw["sps"])
        check(abs(mine - theirs) <= 1e-9 * max(abs(theirs), 1e-300),
              f"lengths {got.lengths.tolist()} (theta {mine}) vs the reference's {want.lengths.tolist()} "
              f"(theta {theirs})")
    return SUCCESS


def _theta(conf: torch.Tensor, lengths: List[int], sps: torch.Tensor) -> float:
    """(R + the admitted prefix survivals a_1..a_length of every request) *
    SPS(R + admitted), in float64."""
    R = conf.shape[0]
    tokens = float(R) + sum(sum(reference._survivals(conf[r], n)) for r, n in enumerate(lengths))
    batch = R + sum(lengths)
    return tokens * float(sps[batch]) if batch < sps.shape[0] else 0.0


# ------------------------------------------------------------ attention


def fuzz_attention(rng: random.Random) -> str:
    R = rng.choice([0, 1, 2, 3])
    Hkv = rng.choice([1, 2])
    Hq = Hkv * rng.choice([1, 2, 3])
    D = rng.choice([2, 4, 8, 64])
    page_size = rng.choice([1, 3, 16])
    dtype = rng.choice(FLOATS)
    g = _gen(rng)
    q_lens = [rng.randint(0, 4) for _ in range(R)]
    ctx = [rng.randint(0, 20) for _ in range(R)]
    kv_lens = [c + q for c, q in zip(ctx, q_lens)]
    pages_per = [(n + page_size - 1) // page_size for n in kv_lens]
    max_pages = max(pages_per + [1])
    num_pages = sum(pages_per) + rng.randint(1, 3)
    order = torch.randperm(num_pages, generator=g).tolist()
    table = torch.zeros(R, max_pages, dtype=torch.int32)
    used = 0
    for r in range(R):
        for i in range(pages_per[r]):
            table[r, i] = order[used]
            used += 1
    k_cache = torch.randn(num_pages, page_size, Hkv, D, generator=g).to(dtype)
    v_cache = torch.randn(num_pages, page_size, Hkv, D, generator=g).to(dtype)
    T = sum(q_lens)
    cu = torch.zeros(R + 1, dtype=torch.int32)
    if R:
        cu[1:] = torch.cumsum(torch.tensor(q_lens), 0).to(torch.int32)
    k_new = torch.randn(T, Hkv, D, generator=g).to(dtype)
    v_new = torch.randn(T, Hkv, D, generator=g).to(dtype)
    q = torch.randn(T, Hq, D, generator=g).to(dtype)
    positions = torch.tensor([ctx[r] + i for r in range(R) for i in range(q_lens[r])], dtype=torch.int64)
    req = [r for r in range(R) for _ in range(q_lens[r])]
    slots = torch.tensor([int(table[r, int(p) // page_size]) * page_size + int(p) % page_size
                          for r, p in zip(req, positions)], dtype=torch.int64)
    if T and rng.random() < 0.2:
        slots[rng.randrange(T)] = -1  # padding: skipped
    mask = rng.choice(["causal", "block"])
    scale = rng.choice([None, 0.1, 1.0, 3.0])
    theta = rng.choice([10000.0, 1e6, 1.5])
    kv_lens_t = torch.tensor(kv_lens, dtype=torch.int32)
    if rng.random() < 0.4:
        choices = [
            ("slot range", lambda: ops.append_kv(k_new, v_new, k_cache, v_cache,
                                                 torch.full((T,), num_pages * page_size, dtype=torch.int64)),
             ["slot"]) if T else None,
            ("k and v dtypes", lambda: ops.append_kv(k_new, v_new.double(), k_cache, v_cache, slots), ["v"]),
            ("one cache for both", lambda: ops.append_kv(k_new, v_new, k_cache, k_cache, slots), ["k_cache"]),
            ("cache expanded", lambda: ops.append_kv(k_new, v_new, k_cache[:1].expand(num_pages, -1, -1, -1),
                                                     v_cache, slots), ["k_cache"]) if num_pages > 1 else None,
            ("kv_lens too long", lambda: ops.paged_attention(q, k_cache, v_cache, table, kv_lens_t + max_pages *
                                                             page_size + 1, cu), ["kv_lens"]) if R else None,
            ("block table page", lambda: ops.paged_attention(q, k_cache, v_cache, torch.full_like(table, num_pages),
                                                             kv_lens_t.clamp(min=1), cu), ["block_table"])
            if R else None,
            ("cu_q", lambda: ops.paged_attention(q, k_cache, v_cache, table, kv_lens_t, cu + 1), ["cu_q"]),
            ("scale", lambda: ops.paged_attention(q, k_cache, v_cache, table, kv_lens_t, cu,
                                                  scale=rng.choice([0.0, -1.0, math.nan, math.inf, "x", 1e39])),
             ["scale"]),
            ("mask", lambda: ops.paged_attention(q, k_cache, v_cache, table, kv_lens_t, cu,
                                                 mask=rng.choice(["full", None, ["causal"]])), ["mask"]),
            ("heads", lambda: ops.paged_attention(torch.randn(T, Hkv * 2 + 1, D).to(dtype), k_cache, v_cache, table,
                                                  kv_lens_t, cu), ["heads", "q"]) if Hkv > 1 else None,
            ("out is q", lambda: ops.paged_attention(q, k_cache, v_cache, table, kv_lens_t, cu, out=q), ["out"])
            if T else None,
            ("rope theta", lambda: ops.rope(q, None, positions, theta=rng.choice([0.0, -1.0, math.nan, "1e4"])),
             ["theta"]),
            ("rope rotary_dim", lambda: ops.rope(q, None, positions, rotary_dim=rng.choice([D + 2, 3, 0, 2.0])),
             ["rotary_dim"]),
            ("rope positions", lambda: ops.rope(q, None, torch.zeros(T + 1, dtype=torch.int64)), ["positions"]),
            ("rope expanded q", lambda: ops.rope(torch.randn(1, Hq, D).to(dtype).expand(3, Hq, D), None,
                                                 torch.arange(3)), ["q"]),
            ("rope q is k", lambda: ops.rope(q, q, positions), ["q", "k"]) if T and Hq == Hkv else None,
        ]
        name, call, names = rng.choice([c for c in choices if c is not None])
        return expect_error(call, names)
    ops.append_kv(k_new, v_new, k_cache, v_cache, slots)
    written = slots >= 0
    flat_k = k_cache.view(-1, Hkv, D)
    check(torch.equal(flat_k[slots[written]], k_new[written]), "append_kv did not write the keys")
    q_rot = q.clone()
    ops.rope(q_rot, None, positions, theta=theta)
    inv_freq = ops.rope_inv_freq(D, theta)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    check(_same(q_rot, reference.rope(q, positions, inv_freq), tol, tol), "rope differs from the reference")
    out, lse = ops.paged_attention(q_rot, k_cache, v_cache, table, kv_lens_t, cu, mask=mask, scale=scale,
                                   return_lse=True)
    want, want_lse = reference.paged_attention(q_rot, k_cache, v_cache, table, kv_lens_t, cu, mask=mask, scale=scale)
    check(_same(out, want, tol, tol), f"attention output differs from the reference ({dtype}, D {D})")
    check(_same(lse, want_lse, tol, tol), "lse differs from the reference")
    return SUCCESS


# ------------------------------------------------------------ loaders


_TEMPLATES: Dict[Tuple[str, bool], Path] = {}
_MODELS: Dict[str, object] = {}


def _models():
    if not _MODELS:
        from fuzz.corpus import tiny_drafter, tiny_target

        target = tiny_target()
        _MODELS.update(target=target, drafter=tiny_drafter(target), drafter_gated=tiny_drafter(target, head="gated"))
    return _MODELS


def _template(kind: str, sharded: bool) -> Path:
    """A valid folder of each kind, written once per process."""
    key = (kind, sharded)
    if key not in _TEMPLATES:
        from fuzz.corpus import write_drafter, write_target

        root = Path(tempfile.mkdtemp(prefix="dspark-fuzz-"))
        models = _models()
        folder = root / f"{kind}-{int(sharded)}"
        if kind == "target":
            write_target(folder, models["target"], sharded=sharded)
        else:
            write_drafter(folder, models["drafter"], sharded=sharded, target=models["target"])
        _TEMPLATES[key] = folder
    return _TEMPLATES[key]


# pairs of corruptions where the second can restore what the first broke (a header
# length moved by +1 then -1; the tensor added, then dropped): the folder would be valid
_UNDOING = {frozenset(("extra tensor", "drop tensor"))}


def _fuzz_loader(kind: str, rng: random.Random) -> str:
    from fuzz.corpus import EITHER, MUTATIONS
    from dspark.models import DSparkDrafter, TargetModel

    mutations = [m for m in MUTATIONS if kind in m.kinds]
    stack = [rng.choice(mutations)]
    if rng.random() < 0.25:  # a second, different one that cannot undo the first
        stack.append(rng.choice([m for m in mutations if m.name != stack[0].name
                                 and frozenset((m.name, stack[0].name)) not in _UNDOING]))
    stack.sort(key=lambda m: m.name == "special file")  # a FIFO or a loop last: the others read the files
    sharded = rng.random() < 0.4
    if any(m.sharded is True for m in stack):
        sharded = True
    work = Path(tempfile.mkdtemp(prefix="dspark-fuzz-case-"))
    try:
        folder = work / "model"
        shutil.copytree(_template(kind, sharded), folder, symlinks=True)
        descriptions = []
        for m in stack:
            if m.sharded is True and not (folder / "model.safetensors.index.json").exists():
                continue
            try:
                descriptions.append(f"{m.name}: {m.apply(folder, rng)}")
            except Exception as e:  # a first mutation can leave nothing for the second to work on
                descriptions.append(f"{m.name}: not applicable ({type(e).__name__})")
        target = _models()["target"]
        load = (lambda: TargetModel.load(folder)) if kind == "target" else (
            lambda: DSparkDrafter.load(folder, target))
        try:
            model = load()
        except CheckpointError as e:
            check(str(folder) in str(e) or "config" in str(e) or "sts" in str(e),
                  f"{'; '.join(descriptions)}: the CheckpointError names no file: {e}")
            return CLEAN_ERROR
        except Exception as e:
            raise Failure(f"{'; '.join(descriptions)}: {type(e).__name__} escaped the loader: {e}") from None
        must_fail = [m.name for m in stack if m.expect != EITHER]
        applied = [d for d in descriptions if "not applicable" not in d]
        check(not must_fail or len(applied) < len(stack), f"{'; '.join(descriptions)}: loaded, but must fail")
        _smoke(kind, model)
        return SUCCESS
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _smoke(kind: str, model) -> None:
    """A loaded model runs: a short greedy generation."""
    from dspark.engine import SamplingParams, SpeculativeEngine

    if kind == "target":
        engine = SpeculativeEngine(model, max_model_len=32, max_concurrency=2)
    else:
        engine = SpeculativeEngine(_models()["target"], model, max_model_len=32, max_concurrency=2)
    result = engine.generate([[1, 2, 3]], SamplingParams(0.0, max_new_tokens=3))[0]
    check(result.error is None and len(result.tokens) >= 1, f"the loaded model does not generate: {result}")


def fuzz_target_loader(rng: random.Random) -> str:
    return _fuzz_loader("target", rng)


def fuzz_drafter_loader(rng: random.Random) -> str:
    return _fuzz_loader("drafter", rng)


# ------------------------------------------------------------ engine


_HOSTILE_FIELDS = {
    "prompt": [[], ["a"], [1.7], [True], "abc", None, 5, [-1], [96], [1, 2.0], torch.tensor([1.0]),
               torch.tensor([[1, 2]])],
    "max_new_tokens": [0, -1, 2.5, "4", None, True, 10**9],
    "temperature": [-0.1, math.nan, math.inf, "0.5", None, 1e39, True],
    "seed": [1.5, "7", True, [1]],
    "stop_tokens": [None, "ab", [1.0], 7, [True]],
}


def fuzz_engine(rng: random.Random) -> str:
    from dspark.engine import SamplingParams, SpeculativeEngine
    from dspark.scheduler import Fixed, Threshold

    models = _models()
    target = models["target"]
    V = target.config.vocab_size
    drafter = rng.choice([None, models["drafter"], models["drafter_gated"]])
    policy = rng.choice([Fixed(), Fixed(1), Threshold(0.3)]) if drafter is not None else None
    engine = SpeculativeEngine(target, drafter, policy=policy, max_model_len=48, max_concurrency=rng.randint(1, 4),
                               seed=rng.randrange(1000))
    count = rng.randint(1, 6)
    prompts, params, bad = [], [], []
    for i in range(count):
        prompt = [rng.randrange(V) for _ in range(rng.randint(1, 12))]
        fields = dict(temperature=rng.choice([0.0, 0.0, 0.5, 1.0, 2.0]), max_new_tokens=rng.randint(1, 10),
                      seed=rng.choice([None, rng.randrange(-(2**63), 2**64)]),
                      stop_tokens=rng.choice([(), (rng.randrange(V),), [rng.randrange(V), rng.randrange(V)]]))
        if rng.random() < 0.35:
            field = rng.choice(sorted(_HOSTILE_FIELDS))
            value = rng.choice(_HOSTILE_FIELDS[field])
            if field == "prompt":
                prompt = value
            else:
                fields[field] = value
            bad.append(i)
        prompts.append(prompt)
        params.append(SamplingParams(**fields))
    results = engine.generate(prompts, params)
    check(len(results) == count, "one result per prompt")
    for i, result in enumerate(results):
        if i in bad:
            check(result.finish_reason == "error" and result.error, f"request {i} ({prompts[i]!r}, {params[i]}) "
                                                                    f"was not refused: {result}")
            continue
        check(result.finish_reason in ("stop", "length"), f"request {i}: {result}")
        check(all(0 <= t < V for t in result.tokens), f"request {i}: a token outside the vocabulary")
        check(1 <= len(result.tokens) <= params[i].max_new_tokens, f"request {i}: {len(result.tokens)} tokens")
        if result.finish_reason == "stop":
            check(result.tokens[-1] in set(params[i].stop_tokens), f"request {i}: stopped without a stop token")
    good = [i for i in range(count) if i not in bad]
    if good:
        # the good requests alone, under their original seeds, give the same tokens
        alone_params = [SamplingParams(params[i].temperature, engine.seed * 1000003 + i
                                       if params[i].seed is None else params[i].seed,
                                       params[i].max_new_tokens, params[i].stop_tokens) for i in good]
        alone = engine.generate([prompts[i] for i in good], alone_params)
        for i, result in zip(good, alone):
            check(result.tokens == results[i].tokens, f"request {i}: {results[i].tokens} in the batch, "
                                                      f"{result.tokens} without the bad requests")
    return CLEAN_ERROR if bad else SUCCESS


# ------------------------------------------------------------ registry


TARGETS: Dict[str, Callable[[random.Random], str]] = {
    "rejection_sample": fuzz_rejection_sample,
    "markov_sample": fuzz_markov_sample,
    "confidence": fuzz_confidence,
    "schedule_prefix": fuzz_schedule_prefix,
    "attention": fuzz_attention,
    "target_loader": fuzz_target_loader,
    "drafter_loader": fuzz_drafter_loader,
    "engine": fuzz_engine,
}


def _self_test_crash(rng: random.Random) -> str:
    import os

    os.abort()
    return SUCCESS


def _self_test_hang(rng: random.Random) -> str:
    import time

    time.sleep(3600)
    return SUCCESS


# Cases that misbehave on purpose, to show that the harness reports them.
SELF_TESTS: Dict[str, Callable[[random.Random], str]] = {"_crash": _self_test_crash, "_hang": _self_test_hang,
                                                         "_fail": lambda rng: check(False, "on purpose") or SUCCESS}


def case_rng(target: str, seed: int) -> random.Random:
    return random.Random(f"{target}:{seed}")


def run_case(target: str, seed: int) -> Tuple[str, str]:
    """(outcome, detail) of one case, in this process."""
    torch.manual_seed(seed)
    try:
        return {**TARGETS, **SELF_TESTS}[target](case_rng(target, seed)), ""
    except Failure as e:
        return "failure", str(e)
    except Exception as e:
        return "failure", f"unexpected {type(e).__name__}: {e}\n{traceback.format_exc()[-2500:]}"


def names() -> List[str]:
    return list(TARGETS)


def describe(target: str) -> Optional[str]:
    fn = TARGETS.get(target)
    return fn.__doc__ if fn else None
