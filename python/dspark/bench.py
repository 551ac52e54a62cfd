"""Python-side benchmarks (``python -m dspark bench ...``).

Each prints a table of median times with ratios against baselines measured in
the same run on the same inputs:
  reference: dspark.reference (the float64 oracle, one request at a time);
  eager:     a batched float32 PyTorch implementation of the same round the
             way engines write it (softmax of every row, gather, compare, a
             recovered token for every position, bonus), on the same device.
"""

from __future__ import annotations

import json
import statistics
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch

from . import ops, reference
from ._backends import backends


def _time(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 1) -> float:
    """Median seconds per call (CUDA timed with events)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            stop.record()
            stop.synchronize()
            times.append(start.elapsed_time(stop) * 1e-3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def eager_rejection_sample(target_logits: torch.Tensor, draft_tokens: torch.Tensor, cu_num_draft: torch.Tensor,
                           draft_logits: torch.Tensor, temperature: float,
                           generator: Optional[torch.Generator] = None):
    """A batched float32 PyTorch rejection sampler, as engines write it."""
    device = target_logits.device
    R = cu_num_draft.numel() - 1
    n = (cu_num_draft[1:] - cu_num_draft[:-1]).long()
    N = draft_tokens.numel()
    request = torch.repeat_interleave(torch.arange(R, device=device), n)
    target_row = torch.arange(N, device=device) + request
    bonus_row = cu_num_draft[1:].long() + torch.arange(R, device=device)
    pt = torch.softmax(target_logits.float() / temperature, -1)
    pd = torch.softmax(draft_logits.float() / temperature, -1)
    x = draft_tokens.long()
    ratio = pt[target_row, x] / pd[torch.arange(N, device=device), x]
    u = torch.rand(N, device=device, generator=generator)
    accept = u < ratio
    residual = torch.clamp(pt[target_row] - pd, min=0)
    q = torch.empty_like(residual).exponential_(generator=generator)
    recovered = (residual / q).argmax(-1)
    q_bonus = torch.empty(R, pt.shape[1], device=device).exponential_(generator=generator)
    bonus = (pt[bonus_row] / q_bonus).argmax(-1)
    # accepted prefix length per request
    width = int(n.max()) if R else 0
    padded = torch.ones(R, width + 1, dtype=torch.bool, device=device)
    position = torch.arange(N, device=device) - cu_num_draft[:-1].long()[request]
    padded[request, position] = accept
    padded[:, width] = False
    num_accepted = padded.long().cumprod(-1).sum(-1)
    out = torch.full((R, width + 1), -1, dtype=torch.int32, device=device)
    keep = position < num_accepted[request]
    out[request[keep], position[keep]] = x[keep].int()
    rejected_at = cu_num_draft[:-1].long() + num_accepted
    final = torch.where(num_accepted < n, recovered[rejected_at.clamp(max=max(N - 1, 0))] if N else bonus, bonus)
    out[torch.arange(R, device=device), num_accepted] = final.int()
    return out, num_accepted.int()


def _sampling_cases(quick: bool) -> List[Dict[str, int]]:
    if quick:
        return [dict(R=4, n=5, V=32000), dict(R=16, n=7, V=32000)]
    return [dict(R=1, n=7, V=151936), dict(R=8, n=5, V=32000), dict(R=8, n=7, V=129280),
            dict(R=64, n=5, V=32000), dict(R=64, n=7, V=151936)]


def _make_batch(R: int, n: int, V: int, device: torch.device, dtype: torch.dtype):
    g = torch.Generator().manual_seed(R * 1000 + n * 10 + V)
    target = torch.randn(R * (n + 1), V, generator=g) * 3
    rows = torch.cat([torch.arange(r * (n + 1), r * (n + 1) + n) for r in range(R)])
    draft = target[rows] + torch.randn(R * n, V, generator=g)
    tokens = torch.multinomial(torch.softmax(draft, -1), 1, generator=g).squeeze(-1)
    cu = torch.arange(0, R * n + 1, n, dtype=torch.int32)
    return (target.to(device, dtype), tokens.to(device), cu.to(device), draft.to(device, dtype))


def sampling(quick: bool = False, devices: Optional[Sequence[str]] = None) -> List[dict]:
    if devices is None:
        devices = ["cpu"] + (["cuda"] if backends()["cuda"]["usable"] and torch.cuda.is_available() else [])
    rows = []
    reference_seconds: Dict[tuple, float] = {}  # the reference runs on the CPU whatever the device
    for dev_name in devices:
        device = torch.device(dev_name)
        repeats = 3 if device.type == "cpu" else 20
        for case in _sampling_cases(quick):
            for dtype in (torch.float32, torch.bfloat16):
                target, tokens, cu, draft = _make_batch(case["R"], case["n"], case["V"], device, dtype)
                dspark_s = _time(lambda: ops.rejection_sample(target, tokens, cu, draft_logits=draft, seed=1,
                                                              max_num_draft=case["n"]), device, repeats)
                eager_s = _time(lambda: eager_rejection_sample(target, tokens, cu, draft, 1.0), device, repeats)
                key = (case["R"], case["n"], case["V"], dtype)
                if key not in reference_seconds:
                    reference_seconds[key] = _time(
                        lambda: reference.rejection_sample(target, tokens, cu, draft_logits=draft, seed=1),
                        torch.device("cpu"), 1, warmup=0)
                ref_s = reference_seconds[key]
                rows.append(dict(device=dev_name, dtype=str(dtype).replace("torch.", ""), **case,
                                 dspark_ms=dspark_s * 1e3, eager_ms=eager_s * 1e3,
                                 reference_ms=ref_s * 1e3, speedup_vs_eager=eager_s / dspark_s,
                                 speedup_vs_reference=ref_s / dspark_s))
    return rows


def mask_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """What a caller does without truncation in the op: sort every row, mask
    logits below the k-th largest and outside the top-p nucleus to -inf
    (at temperature 1), in PyTorch."""
    values, order = logits.float().sort(dim=-1, descending=True)
    kth = values[:, top_k - 1:top_k]
    probs = torch.softmax(torch.where(values >= kth, values, torch.full_like(values, -float("inf"))), -1)
    before = probs.cumsum(-1) - probs  # mass of the tokens ranked above
    keep_sorted = (values >= kth) & (before < top_p)
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    return torch.where(keep, logits, torch.full_like(logits, -float("inf")))


TRUNCATION = dict(top_k=50, top_p=0.9)


def sampling_truncation(quick: bool = False, devices: Optional[Sequence[str]] = None) -> List[dict]:
    """rejection_sample with top-k 50 and top-p 0.9 inside the op, against the
    caller masking the target logits first (a sort per row in PyTorch, then
    the op without truncation), and against the op without truncation."""
    if devices is None:
        devices = ["cpu"] + (["cuda"] if backends()["cuda"]["usable"] and torch.cuda.is_available() else [])
    rows = []
    for dev_name in devices:
        device = torch.device(dev_name)
        repeats = 3 if device.type == "cpu" else 20
        for case in _sampling_cases(quick):
            target, tokens, cu, draft = _make_batch(case["R"], case["n"], case["V"], device, torch.bfloat16)
            kw = dict(draft_logits=draft, seed=1, max_num_draft=case["n"])
            fused_s = _time(lambda: ops.rejection_sample(target, tokens, cu, **TRUNCATION, **kw), device, repeats)
            plain_s = _time(lambda: ops.rejection_sample(target, tokens, cu, **kw), device, repeats)
            masked_s = _time(lambda: ops.rejection_sample(mask_top_k_top_p(target, **TRUNCATION), tokens, cu, **kw),
                             device, repeats)
            rows.append(dict(device=dev_name, **case, fused_ms=fused_s * 1e3, mask_first_ms=masked_s * 1e3,
                             plain_ms=plain_s * 1e3, speedup_vs_mask_first=masked_s / fused_s,
                             cost_vs_plain=fused_s / plain_s))
    return rows


def _print_truncation(rows: List[dict]) -> None:
    print(f"\ntruncation (top-k {TRUNCATION['top_k']}, top-p {TRUNCATION['top_p']}, bfloat16 logits): fused in the op "
          "against the caller masking first (sort per row, then the op)")
    header = f"{'device':6} {'R':>4} {'n':>3} {'V':>7} {'fused ms':>9} {'mask-first ms':>14} {'x mask-first':>13} " \
             f"{'no-trunc ms':>12} {'cost':>6}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['device']:6} {r['R']:4d} {r['n']:3d} {r['V']:7d} {r['fused_ms']:9.3f} {r['mask_first_ms']:14.3f} "
              f"{r['speedup_vs_mask_first']:13.2f} {r['plain_ms']:12.3f} {r['cost_vs_plain']:6.2f}")


def _print_table(rows: List[dict]) -> None:
    header = f"{'device':6} {'dtype':8} {'R':>4} {'n':>3} {'V':>7} {'dspark ms':>10} {'eager ms':>10} " \
             f"{'x eager':>8} {'reference ms':>13} {'x reference':>12}"
    print(header)
    print("-" * len(header))
    for r in rows:
        ref = f"{r['reference_ms']:13.2f} {r['speedup_vs_reference']:12.1f}"
        print(f"{r['device']:6} {r['dtype']:8} {r['R']:4d} {r['n']:3d} {r['V']:7d} {r['dspark_ms']:10.3f} "
              f"{r['eager_ms']:10.3f} {r['speedup_vs_eager']:8.2f} {ref}")


# --------------------------------------------------------------------------
# scheduler


def eager_causal_schedule(conf: torch.Tensor, sps: torch.Tensor) -> torch.Tensor:
    """Algorithm 1 with PyTorch tensor ops (sort, cumsum, first non-improving
    step), the way one would write it without a kernel."""
    R, gamma = conf.shape
    survival = torch.cumprod(conf.clamp(0, 1), dim=1)
    j = torch.arange(1, gamma + 1, device=conf.device).expand(R, gamma)
    r = torch.arange(R, device=conf.device).unsqueeze(1).expand(R, gamma)
    a, jj, rr = survival.flatten(), j.flatten(), r.flatten()
    order = torch.argsort(jj * R + rr)  # (j, r) order, then a stable sort by a descending
    order = order[torch.argsort(-a[order], stable=True)]
    a, rr = a[order], rr[order]
    t = torch.arange(1, a.numel() + 1, device=conf.device)
    batch = (R + t).clamp(max=sps.numel() - 1)
    theta = (R + torch.cumsum(a.double(), 0)) * sps[batch].double()
    theta = torch.where((R + t < sps.numel()) & (a > 0), theta, torch.zeros_like(theta))
    previous = torch.cat([(R * sps[min(R, sps.numel() - 1)]).double().reshape(1), theta[:-1]])
    stops = torch.nonzero(theta <= previous)
    admitted = int(stops[0]) if stops.numel() else a.numel()
    return torch.bincount(rr[:admitted], minlength=R).to(torch.int32)


def _schedule_inputs(R: int, gamma: int, device: torch.device):
    g = torch.Generator().manual_seed(R * 100 + gamma)
    conf = torch.sigmoid(1.5 + torch.randn(R, gamma, generator=g))
    b = torch.arange(R * (gamma + 1) + 1, dtype=torch.float32)
    sps = 1.0 / (1.0 + 0.002 * b + 0.05 * torch.div(b, 64, rounding_mode="floor"))
    return conf.to(device), sps.to(device)


def scheduler_timing(quick: bool = False, devices: Optional[Sequence[str]] = None) -> List[dict]:
    if devices is None:
        devices = ["cpu"] + (["cuda"] if backends()["cuda"]["usable"] and torch.cuda.is_available() else [])
    shapes = [(1, 7), (64, 7), (256, 7)] if quick else [(1, 5), (64, 7), (256, 7), (1024, 7), (1024, 16)]
    rows = []
    for dev_name in devices:
        device = torch.device(dev_name)
        for R, gamma in shapes:
            conf, sps = _schedule_inputs(R, gamma, device)
            repeats = 20 if device.type == "cpu" else 100
            dspark_s = _time(lambda: ops.schedule_prefix(conf, mode="causal", sps=sps), device, repeats, warmup=3)
            eager_s = _time(lambda: eager_causal_schedule(conf, sps), device, repeats, warmup=3)
            ref_s = _time(lambda: reference.schedule_prefix(conf, mode="causal", sps=sps), torch.device("cpu"), 3)
            rows.append(dict(device=dev_name, R=R, gamma=gamma, dspark_us=dspark_s * 1e6, eager_us=eager_s * 1e6,
                             reference_us=ref_s * 1e6, speedup_vs_eager=eager_s / dspark_s,
                             speedup_vs_reference=ref_s / dspark_s))
    return rows


# A synthetic serving scenario: confidences per domain and a jagged SPS curve.
DOMAINS = {"code": (8.0, 1.2), "chat": (3.0, 2.0)}  # Beta(alpha, beta) of the conditional confidences


def _jagged_sps(max_tokens: int) -> torch.Tensor:
    """Steps per second of a memory-bound target: flat until the batch fills the
    GPU, then slower per token, with a cliff every 128 tokens (tile/graph buckets)."""
    b = torch.arange(max_tokens + 1, dtype=torch.float64)
    seconds = 0.02 + 0.00004 * b + 0.0015 * torch.div(b, 128, rounding_mode="floor") + 0.000004 * b.clamp(min=256)
    return (1.0 / seconds).float()


def scheduler_simulation(quick: bool = False, gamma: int = 7, draws: int = 8) -> List[dict]:
    from .scheduler import AsyncHardwareAware, Fixed, HardwareAware, Threshold

    concurrency = [1, 8, 64, 256] if quick else [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]
    sps = _jagged_sps(512 * (gamma + 1))
    rows = []
    for domain, (alpha, beta) in DOMAINS.items():
        dist = torch.distributions.Beta(alpha, beta)
        for R in concurrency:
            policies = [Fixed(1), Fixed(gamma), Threshold(0.6), HardwareAware(sps), AsyncHardwareAware(sps)]
            totals = {p.name: [0.0, 0.0] for p in policies}
            torch.manual_seed(R)
            for _ in range(draws):
                conf = dist.sample((R, gamma))
                survival = torch.cumprod(conf, 1)
                for p in policies:
                    lengths = p(conf)
                    admitted = torch.arange(1, gamma + 1).unsqueeze(0) <= lengths.long().unsqueeze(1)
                    tokens = R + float((survival * admitted).sum())
                    batch = R + int(lengths.sum())
                    totals[p.name][0] += tokens * float(sps[batch]) / draws
                    totals[p.name][1] += int(lengths.sum()) / R / draws
            for name, (tps, budget) in totals.items():
                rows.append(dict(domain=domain, R=R, policy=name, tokens_per_s=tps, per_user_tokens_per_s=tps / R,
                                 verified_per_request=budget))
    return rows


def _print_scheduler(timing: List[dict], simulation: List[dict]) -> None:
    print("schedule_prefix (causal): median time per call; x = times faster than that baseline in this run")
    header = f"{'device':6} {'R':>5} {'gamma':>5} {'dspark us':>10} {'eager us':>10} {'x eager':>8} {'reference us':>13} {'x reference':>12}"
    print(header)
    print("-" * len(header))
    for r in timing:
        print(f"{r['device']:6} {r['R']:5d} {r['gamma']:5d} {r['dspark_us']:10.1f} {r['eager_us']:10.1f} "
              f"{r['speedup_vs_eager']:8.1f} {r['reference_us']:13.1f} {r['speedup_vs_reference']:12.1f}")
    print()
    print("Simulation: expected tokens/s by policy as concurrency grows (gamma = 7, jagged SPS curve);")
    print("in parentheses: draft tokens verified per request")
    policies = list(dict.fromkeys(r["policy"] for r in simulation))
    for domain in DOMAINS:
        print(f"\n[{domain}]")
        print(f"{'R':>5} " + " ".join(f"{p:>24}" for p in policies))
        for R in sorted({r["R"] for r in simulation}):
            cells = []
            for p in policies:
                row = next(x for x in simulation if x["domain"] == domain and x["R"] == R and x["policy"] == p)
                cells.append(f"{row['tokens_per_s']:15.0f} ({row['verified_per_request']:4.2f})")
            print(f"{R:5d} " + " ".join(f"{c:>24}" for c in cells))


# --------------------------------------------------------------------------
# markov


def eager_markov_loop(U: torch.Tensor, anchor: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
                      temperature: float, per_request: bool = False):
    """The sequential stage as an eager PyTorch loop (DeepSpec style), sampling
    with torch's softmax and multinomial: per position a gather, the bias
    product, the add, the softmax, the draw and the log-probability. With
    per_request=True each request does its own product (W2 read once per
    request), as a loop that drafts one request at a time does."""
    R, gamma, V = U.shape
    prev = anchor
    tokens = torch.empty(R, gamma, dtype=torch.int64, device=U.device)
    logprobs = torch.empty(R, gamma, device=U.device)
    for k in range(gamma):
        e = w1[prev].to(w2.dtype)
        if per_request:
            bias = torch.cat([e[r:r + 1] @ w2.T for r in range(R)])
        else:
            bias = e @ w2.T
        probs = torch.softmax((U[:, k].float() + bias.float()) / temperature, dim=-1)
        prev = torch.multinomial(probs, 1).squeeze(-1)
        tokens[:, k] = prev
        logprobs[:, k] = probs.gather(-1, prev.unsqueeze(-1)).squeeze(-1).log()
    return tokens, logprobs


def markov_timing(quick: bool = False, devices: Optional[Sequence[str]] = None) -> List[dict]:
    if devices is None:
        devices = ["cpu"] + (["cuda"] if backends()["cuda"]["usable"] and torch.cuda.is_available() else [])
    rows = []
    for dev_name in devices:
        device = torch.device(dev_name)
        if device.type == "cpu":
            shapes = [(16, 7, 49152, 256)] if quick else [(1, 7, 49152, 256), (16, 7, 49152, 256), (16, 5, 151936, 128)]
        else:
            # the C++ benchmark covers the full grid; here the headline shapes
            shapes = [(16, 7, 49152, 256)] if quick else [(R, 7, 151936, 256) for R in (1, 16, 128, 512)]
        for R, gamma, V, rank in shapes:
            for wdtype in (torch.float32, torch.bfloat16):
                g = torch.Generator().manual_seed(R + gamma + V + rank)
                U = (torch.randn(R, gamma, V, generator=g) * 2).to(device)
                anchor = torch.randint(0, V, (R,), generator=g).to(device)
                w1 = (torch.randn(V, rank, generator=g) * 0.1).to(device, wdtype)
                w2 = (torch.randn(V, rank, generator=g) * 0.1).to(device, wdtype)
                e = w1[anchor].to(wdtype)
                repeats = 3 if device.type == "cpu" else 20
                dspark_s = _time(lambda: ops.markov_sample(U, anchor, w1, w2, temperature=1.0, seed=1), device, repeats)
                eager_s = _time(lambda: eager_markov_loop(U, anchor, w1, w2, 1.0), device, repeats)
                bare_s = _time(lambda: [e @ w2.T for _ in range(gamma)], device, repeats)
                per_request_s = None
                if R <= 16:
                    per_request_s = _time(lambda: eager_markov_loop(U, anchor, w1, w2, 1.0, per_request=True),
                                          device, max(1, repeats // 2))
                bytes_floor = gamma * (V * rank * w2.element_size() + R * V * U.element_size())
                rows.append(dict(device=dev_name, R=R, gamma=gamma, V=V, rank=rank,
                                 weights=str(wdtype).replace("torch.", ""), dspark_ms=dspark_s * 1e3,
                                 eager_ms=eager_s * 1e3, eager_per_request_ms=None if per_request_s is None
                                 else per_request_s * 1e3, bare_products_ms=bare_s * 1e3,
                                 speedup_vs_eager=eager_s / dspark_s,
                                 speedup_vs_eager_per_request=None if per_request_s is None else per_request_s / dspark_s,
                                 ratio_to_bare_products=dspark_s / bare_s, bytes_floor=bytes_floor,
                                 gbytes_per_s=bytes_floor / dspark_s * 1e-9))
    return rows


def _print_markov(rows: List[dict]) -> None:
    from ._backends import cpu_isa

    print(f"markov_sample (vanilla head, temperature 1; CPU kernels {cpu_isa()}, torch CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}): median time per call, against in the same run:")
    print("  eager = batched PyTorch loop (gather, matmul, add, softmax, multinomial per position);")
    print("  per-request = the same loop one request at a time; bare = the gamma matmuls alone")
    header = (f"{'device':6} {'R':>4} {'g':>3} {'V':>7} {'r':>4} {'weights':8} {'dspark ms':>10} {'x eager':>8} "
              f"{'x per-req':>9} {'/ bare':>7} {'GB/s':>7}")
    print(header)
    print("-" * len(header))
    for r in rows:
        per = f"{r['speedup_vs_eager_per_request']:9.1f}" if r["speedup_vs_eager_per_request"] else f"{'-':>9}"
        print(f"{r['device']:6} {r['R']:4d} {r['gamma']:3d} {r['V']:7d} {r['rank']:4d} {r['weights']:8} "
              f"{r['dspark_ms']:10.2f} {r['speedup_vs_eager']:8.2f} {per} {r['ratio_to_bare_products']:7.2f} "
              f"{r['gbytes_per_s']:7.1f}")


# --------------------------------------------------------------------------
# attention


def _attention_batch(R: int, q_len: int, context: int, Hq: int, Hkv: int, D: int, page_size: int,
                     dtype: torch.dtype, device: torch.device):
    g = torch.Generator().manual_seed(R * 7 + q_len + context)
    kv = context + q_len
    pages_per = (kv + page_size - 1) // page_size
    k_cache = torch.randn(R * pages_per, page_size, Hkv, D, generator=g).to(device, dtype)
    v_cache = torch.randn(R * pages_per, page_size, Hkv, D, generator=g).to(device, dtype)
    table = torch.randperm(R * pages_per, generator=g).reshape(R, pages_per).int().to(device)
    q = torch.randn(R * q_len, Hq, D, generator=g).to(device, dtype)
    kv_lens = torch.full((R,), kv, dtype=torch.int32, device=device)
    cu = torch.arange(0, R * q_len + 1, q_len, dtype=torch.int32, device=device)
    return q, k_cache, v_cache, table, kv_lens, cu


# (name, H_q, H_kv, head dim, sliding window): the headline layer, Gemma 4's sliding-window and global layers,
# and SmolLM2-135M's layer (the demo's target; CPU only, in bfloat16 at the demo's batches and context)
ATTENTION_LAYERS = (("headline", 32, 8, 128, 0), ("gemma4-sliding", 32, 16, 256, 1024),
                    ("gemma4-global", 32, 4, 512, 0), ("smollm2", 9, 3, 64, 0))


def attention_timing(quick: bool = False, devices: Optional[Sequence[str]] = None) -> List[dict]:
    if devices is None:
        devices = ["cpu"] + (["cuda"] if backends()["cuda"]["usable"] and torch.cuda.is_available() else [])
    rows = []
    page_size = 16
    for dev_name in devices:
        device = torch.device(dev_name)
        for layer, Hq, Hkv, D, window in ATTENTION_LAYERS:
            headline = layer == "headline"
            if layer == "smollm2":
                if device.type != "cpu":
                    continue
                # a one-token step, and verifications of gamma + 1 = 8 tokens at batch 1, 4, 16
                shapes = [(1, 1, 256), (1, 8, 256)] if quick else [(1, 1, 256), (1, 8, 256), (4, 8, 256), (16, 8, 256)]
                dtype = torch.bfloat16
            elif device.type == "cpu":
                if quick:
                    shapes = [(1, 1, 1024), (4, 4, 1024)] if headline else [(1, 1, 2048)]
                else:
                    shapes = [(1, 1, 4096), (4, 4, 2048), (16, 1, 1024), (8, 8, 1024)] if headline else [
                        (1, 1, 4096), (4, 8, 2048)]
                dtype = torch.float32
            else:
                if quick:
                    shapes = [(1, 1, 8192), (16, 4, 4096)] if headline else [(16, 8, 8192)]
                else:
                    shapes = [(R, ql, ctx) for R in (1, 16, 64, 256) for ql in (1, 4, 16) for ctx in (1024, 8192, 32768)
                              if R * ctx <= 256 * 8192] if headline else [
                        (R, ql, ctx) for R in (1, 16, 64) for ql in (1, 8) for ctx in (8192, 32768)
                        if R * ctx <= 64 * 8192]
                dtype = torch.bfloat16
            for R, q_len, context in shapes:
                rows.append(_attention_row(dev_name, device, dtype, layer, Hq, Hkv, D, window, page_size, R, q_len,
                                           context))
    return rows


def _attention_row(dev_name: str, device: torch.device, dtype: torch.dtype, layer: str, Hq: int, Hkv: int, D: int,
                   window: int, page_size: int, R: int, q_len: int, context: int) -> dict:
    q, k_cache, v_cache, table, kv_lens, cu = _attention_batch(R, q_len, context, Hq, Hkv, D, page_size, dtype, device)
    repeats = (3 if R * q_len * context >= 1 << 16 else 50) if device.type == "cpu" else 20
    dspark_s = _time(lambda: ops.paged_attention(q, k_cache, v_cache, table, kv_lens, cu, window=window,
                                                 validate=False), device, repeats)
    # the same data as a padded batch for scaled_dot_product_attention
    kv = context + q_len
    K = k_cache[table.long()].reshape(R, -1, Hkv, D)[:, :kv].transpose(1, 2)
    V = v_cache[table.long()].reshape(R, -1, Hkv, D)[:, :kv].transpose(1, 2)
    Q = q.reshape(R, q_len, Hq, D).transpose(1, 2)
    i = torch.arange(q_len, device=device).unsqueeze(1)
    j = torch.arange(kv, device=device).unsqueeze(0)
    mask = j <= kv - q_len + i
    if window:
        mask = mask & (j > kv - q_len + i - window)
    sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(Q, K, V, attn_mask=mask, enable_gqa=True)
    sdpa_s = _time(sdpa, device, repeats)
    seen = min(kv, window + q_len - 1) if window else kv  # keys the queries can see
    bytes_moved = 2 * R * seen * Hkv * D * k_cache.element_size() + 2 * q.numel() * q.element_size()
    return dict(device=dev_name, layer=layer, H_q=Hq, H_kv=Hkv, D=D, window=window, R=R, q_len=q_len,
                context=context, dtype=str(dtype).replace("torch.", ""), dspark_ms=dspark_s * 1e3,
                sdpa_ms=sdpa_s * 1e3, speedup_vs_sdpa=sdpa_s / dspark_s, gbytes_per_s=bytes_moved / dspark_s * 1e-9)


def _print_attention(rows: List[dict]) -> None:
    print("paged_attention (causal, pages of 16): median time per call, against scaled_dot_product_attention on the")
    print("same data as a padded contiguous batch (gathered outside the timing). Layers: headline (H_q 32, H_kv 8,")
    print("D 128), gemma4-sliding (H_q 32, H_kv 16, D 256, window 1024), gemma4-global (H_q 32, H_kv 4, D 512),")
    print("smollm2 (H_q 9, H_kv 3, D 64; CPU, bfloat16)")
    header = (f"{'device':6} {'layer':15} {'R':>4} {'q_len':>5} {'context':>7} {'dtype':8} {'dspark ms':>10} "
              f"{'sdpa ms':>9} {'x sdpa':>7} {'GB/s':>8}")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['device']:6} {r['layer']:15} {r['R']:4d} {r['q_len']:5d} {r['context']:7d} {r['dtype']:8} "
              f"{r['dspark_ms']:10.3f} {r['sdpa_ms']:9.3f} {r['speedup_vs_sdpa']:7.2f} {r['gbytes_per_s']:8.1f}")


def run(suite: str, quick: bool = False, json_path: Optional[str] = None, devices: Optional[Sequence[str]] = None,
        engine_options: Optional[dict] = None) -> int:
    if suite == "sampling":
        print("rejection_sample (draft_logits mode, temperature 1): median time per call;")
        print("x eager / x reference = how many times faster dspark is than that baseline in this run")
        rows = sampling(quick=quick, devices=devices)
        _print_table(rows)
        truncated = sampling_truncation(quick=quick, devices=devices)
        _print_truncation(truncated)
        results: object = {"rows": rows, "truncation": truncated}
    elif suite == "attention":
        rows = attention_timing(quick=quick, devices=devices)
        _print_attention(rows)
        results = rows
    elif suite == "markov":
        rows = markov_timing(quick=quick, devices=devices)
        _print_markov(rows)
        results = rows
    elif suite == "scheduler":
        timing = scheduler_timing(quick=quick, devices=devices)
        simulation = scheduler_simulation(quick=quick)
        _print_scheduler(timing, simulation)
        results = {"timing": timing, "simulation": simulation}
    elif suite == "engine":
        from .bench_engine import engine_benchmark, print_engine

        opts = engine_options or {}
        results = []
        for device in devices or (["cuda"] if backends()["cuda"].get("usable") else ["cpu"]):
            result = engine_benchmark(quick=quick, device=device, **opts)
            print_engine(result)
            results.append(result)
    elif suite == "round":
        from .bench_round import print_round, round_benchmark

        opts = engine_options or {}
        results = []
        for device in devices or (["cuda"] if backends()["cuda"].get("usable") else ["cpu"]):
            result = round_benchmark(quick=quick, device=device, dtype=opts.get("dtype", "auto"),
                                     target_dir=opts.get("target_dir"))
            print_round(result)
            results.append(result)
    elif suite == "linear":
        from .bench_linear import linear_benchmark, print_linear

        result = linear_benchmark(quick=quick)
        print_linear(result)
        results = result
    elif suite == "drafters":
        from pathlib import Path

        from .bench_drafters import drafters_benchmark, print_drafters

        opts = dict(engine_options or {})
        target_dir = opts.pop("target_dir", None)
        opts.pop("draft_dir", None)
        opts.pop("dtype", None)
        device = (devices or ["cuda" if backends()["cuda"].get("usable") else "cpu"])[0]
        if quick:
            opts.update(gammas=(4,), steps=20, eval_prompts=2, new_tokens=16)
        results = drafters_benchmark(Path(target_dir) if target_dir else None, device=device, **opts)
        print_drafters(results)
    else:
        raise ValueError(f"unknown benchmark suite {suite!r}")
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"suite": suite, "backends": backends(), "results": results}, f, indent=2)
    return 0
