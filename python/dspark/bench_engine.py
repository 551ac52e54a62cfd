"""``python -m dspark bench engine``: target-only against speculative decoding.

Every configuration runs the same prompts through ``SpeculativeEngine`` in one
process: target only (``drafter=None``, the baseline), then the drafter with
each policy. Printed: tokens per second, the ratio against target only, ``tau``
(tokens per round per request, bonus included) and drafts verified per round.
On the CPU the target-only path is also timed against ``transformers``'
``generate`` on the same weights (greedy, batch 1).

With ``--target DIR --draft DIR`` the real checkpoints are used. Without them
the models are synthetic: a random Llama target, and a random drafter whose
Markov head is set to the bigram table of the target's own greedy output and
whose confidence head is set to the acceptance rate measured on a warm-up run
at each batch size, on that batch's prompts (no per-token signal). Acceptance
in the synthetic setup is high by construction; it exercises the engine's
mechanics and costs, not a trained drafter's quality. Outside float32 a
verification forward and a one-token step round differently, so speculative
decoding can part from plain decoding's text at a near-tie of the random
target's logits, and a bigram table of plain decoding's text alone knows
nothing after that point (measured in bfloat16 at batch 1: the good drafter
accepted 0.08 at position 1). The table is therefore fitted on plain
decoding's text and on the text ``fixed`` writes with the first fit where it
parts from it.
"""

from __future__ import annotations

import math
import statistics
import tempfile
import time
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

from .engine import SamplingParams, SpeculativeEngine
from .models import DrafterConfig, DSparkDrafter, TargetConfig, TargetModel
from .scheduler import Fixed, HardwareAware, Policy


def synthetic_target(quick: bool, seed: int = 0) -> TargetModel:
    """A random Llama. Untied embeddings and weights of std 0.05 make its greedy
    text varied (tied random embeddings repeat the last token forever, which
    any drafter predicts)."""
    torch.manual_seed(seed)
    hidden, layers, vocab = (256, 4, 4096) if quick else (512, 8, 8192)
    config = TargetConfig.from_dict(dict(
        model_type="llama", vocab_size=vocab, hidden_size=hidden, intermediate_size=3 * hidden,
        num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=max(1, hidden // 128),
        head_dim=64, rms_norm_eps=1e-6, tie_word_embeddings=False, rope_theta=10000.0,
        max_position_embeddings=4096, bos_token_id=None, eos_token_id=None))
    model = TargetModel(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.05)
    return model.eval()


def synthetic_drafter(target: TargetModel, block_size: int = 8, rank: int = 256, seed: int = 1) -> DSparkDrafter:
    torch.manual_seed(seed)
    t = target.config
    config = DrafterConfig.from_dict(dict(
        hidden_size=t.hidden_size, intermediate_size=t.intermediate_size, num_hidden_layers=1,
        num_attention_heads=t.num_attention_heads, num_key_value_heads=t.num_key_value_heads, head_dim=t.head_dim,
        vocab_size=t.vocab_size, block_size=block_size, rope_theta=10000.0,
        target_layer_ids=[0, t.num_hidden_layers // 2, t.num_hidden_layers - 1], mask_token_id=t.vocab_size - 1,
        markov_rank=rank, markov_head_type="vanilla", enable_confidence_head=True,
        confidence_head_with_markov=True))
    drafter = DSparkDrafter(config)
    with torch.no_grad():
        for name, p in drafter.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)
    return drafter.to(next(target.parameters()).dtype).eval()


@torch.no_grad()
def fit_markov_bigram(drafter: DSparkDrafter, sequences: Sequence[Sequence[int]], strength: float = 60.0,
                      corrupt: float = 0.0, seed: int = 0) -> None:
    """Sets the Markov head so that ``B(x)`` peaks at the most frequent successor
    of ``x`` in the sequences: random unit codes ``e_x`` in ``W1`` and
    ``W2[v] = strength * sum of e_x over the x whose successor is v``. With
    ``corrupt`` = f, a random fraction f of the tokens x get a random successor
    instead (a drafter that is right about 1 - f of the time)."""
    g = torch.Generator().manual_seed(seed)
    V, r = drafter.config.vocab_size, drafter.config.markov_rank
    counts: Dict[int, Dict[int, int]] = {}
    for seq in sequences:
        for a, b in zip(seq[:-1], seq[1:]):
            counts.setdefault(a, {}).setdefault(b, 0)
            counts[a][b] += 1
    head = drafter.markov_head
    codes = torch.randn(V, r)
    codes /= codes.norm(dim=1, keepdim=True)
    w2 = torch.zeros(V, r)
    for a, successors in counts.items():
        b = max(successors, key=successors.get)
        if corrupt and torch.rand(1, generator=g).item() < corrupt:
            b = int(torch.randint(0, V, (1,), generator=g))
        w2[b] += strength * codes[a]
    head.markov_w1.weight.copy_(codes.to(head.markov_w1.weight))
    head.markov_w2.weight.copy_(w2.to(head.markov_w2.weight))


@torch.no_grad()
def set_constant_confidence(drafter: DSparkDrafter, acceptance: float) -> None:
    """Every position's conditional confidence becomes ``acceptance``."""
    a = min(max(acceptance, 1e-3), 1 - 1e-3)
    proj = drafter.confidence_head.proj
    proj.weight.zero_()
    proj.bias.fill_(math.log(a / (1 - a)))
    drafter.sts = None


def _prompts(R: int, vocab: int, seed: int) -> List[List[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(16, 65, (R,), generator=g).tolist()
    return [torch.randint(0, vocab - 1, (n,), generator=g).tolist() for n in lengths]


def _run(engine: SpeculativeEngine, prompts: List[List[int]], params: List[SamplingParams]) -> dict:
    engine.generate(prompts, params)  # warm-up
    results = engine.generate(prompts, params)
    m = engine.metrics
    errors = [r.error for r in results if r.error]
    if errors:
        raise RuntimeError(f"bench engine: a request failed: {errors[0]}")
    d = m.as_dict()
    return {"tokens_per_second": m.tokens_per_second, "tau": m.tau, "verified_per_round": m.verified_per_round,
            "rounds": m.rounds, "acceptance_by_position": d["acceptance_by_position"],
            "prefix_acceptance_by_position": d["prefix_acceptance_by_position"], "tokens": [r.tokens for r in results]}


def transformers_ratio(target: TargetModel, prompt: List[int], max_new_tokens: int) -> Optional[dict]:
    """Greedy, batch 1: dspark's target-only engine against transformers' generate
    on the same weights (CPU). None without transformers."""
    try:
        import transformers
    except ImportError:
        return None
    with tempfile.TemporaryDirectory() as folder:
        target.save(folder)
        hf = transformers.AutoModelForCausalLM.from_pretrained(folder).to(next(target.parameters()).dtype).eval()
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    ids = torch.tensor([prompt])

    def hf_generate() -> List[int]:
        out = hf.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
        return out[0, len(prompt):].tolist()

    engine = SpeculativeEngine(target, None, max_concurrency=1, max_model_len=len(prompt) + max_new_tokens)
    params = SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens)
    timings = {"dspark": [], "transformers": []}
    ours = theirs = None
    for _ in range(3):
        t0 = time.perf_counter()
        ours = engine.generate([prompt], params)[0].tokens
        timings["dspark"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        theirs = hf_generate()
        timings["transformers"].append(time.perf_counter() - t0)
    ours_s, theirs_s = min(timings["dspark"]), min(timings["transformers"])
    return {"dspark_tokens_per_second": max_new_tokens / ours_s,
            "transformers_tokens_per_second": max_new_tokens / theirs_s,
            "ratio": theirs_s / ours_s, "same_tokens": ours == theirs}


QUALITIES = ("good", "mediocre", "useless")
WIDE = 0.15  # a plain row whose ratios to its bracketing runs span more than this flags the run as noisy
GOAL = 0.97  # hardware-aware must reach this share of plain decoding's tokens per second in every row
SIGNIFICANT = 0.05  # a row is below GOAL beyond the run's noise when its sign test's p-value is under this


def goal_verdict(ratios: Sequence[float], goal: float = GOAL) -> Tuple[str, float]:
    """Whether a configuration's per-pass ratios to plain decoding reach ``goal``.

    ``"meets"`` when their median is at least ``goal``. Otherwise the sign test
    of "the median ratio is at least ``goal``" (one-sided; a pass is one trial,
    ties count as reaching it): with ``k`` of ``n`` passes below ``goal``, ``p
    = P(Binomial(n, 1/2) >= k)``; ``"below"`` when ``p < SIGNIFICANT`` (with 5
    passes: all 5 below, p = 1/32), else ``"unclear"`` (below by the median,
    within what the run can tell from ``goal``). Returns the verdict and ``p``
    (1 for ``"meets"``). The test assumes only that the passes are independent
    draws of the ratio, not its distribution: the bracketing plain runs' own
    noise widens it, and the test stays valid."""
    xs = [float(x) for x in ratios]
    if not xs:
        raise ValueError("goal_verdict: no ratios")
    if statistics.median(xs) >= goal:
        return "meets", 1.0
    n, k = len(xs), sum(x < goal for x in xs)
    p = sum(math.comb(n, j) for j in range(k, n + 1)) / 2.0 ** n
    return ("below" if p < SIGNIFICANT else "unclear"), p


def shortfall(ratios: Sequence[float], p: float, trials: str = "passes") -> str:
    """'k of n passes below, sign test p = ...' for a row :func:`goal_verdict`
    did not find meeting the goal."""
    below = sum(float(x) < GOAL for x in ratios)
    return f"{below} of {len(ratios)} {trials} below, sign test p = {p:.3f}"


def repeats_to_show_below() -> int:
    """The fewest passes whose sign test can reach ``p < SIGNIFICANT`` (every one
    below the goal: ``p = 2 ** -n``)."""
    return math.floor(math.log2(1.0 / SIGNIFICANT)) + 1


def fit_drafter(drafter: DSparkDrafter, quality: str, sequences: Sequence[Sequence[int]], seed: int = 0) -> None:
    """Makes a synthetic drafter good (the bigram head of the target's own
    greedy text), mediocre (the same with the successor of 40% of the tokens
    replaced at random) or useless (random weights, and an over-confident
    confidence head: 0.9 at every position, so only measured acceptance can
    tell)."""
    if quality == "useless":
        set_constant_confidence(drafter, 0.9)
        return
    fit_markov_bigram(drafter, sequences, corrupt=0.4 if quality == "mediocre" else 0.0, seed=seed)


def refit_where_parted(drafter: DSparkDrafter, quality: str, target: TargetModel, texts: List[List[int]],
                       prompts_by_R: Dict[int, List[List[int]]], base_tokens: Dict[int, List[List[int]]],
                       max_new_tokens: int, seed: int = 0) -> int:
    """After ``fit_drafter(drafter, quality, texts)``: decodes each batch's
    prompts greedily with ``fixed`` and, where an output parts from plain
    decoding's (``base_tokens``; outside float32 a near-tie can make them
    part), fits the drafter again on ``texts`` and those outputs. Returns the
    number of outputs that parted (0: nothing refitted; a useless drafter is
    left alone)."""
    if quality == "useless":
        return 0
    parted: List[List[int]] = []
    for R, prompts in prompts_by_R.items():
        spec = SpeculativeEngine(target, drafter, max_concurrency=R,
                                 max_model_len=max(len(p) for p in prompts) + max_new_tokens)
        spec.policy = Fixed()
        params = [SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens) for _ in prompts]
        outputs = [r.tokens for r in spec.generate(prompts, params)]
        parted += [p + t for p, t, b in zip(prompts, outputs, base_tokens[R]) if t != b]
    if parted:
        fit_drafter(drafter, quality, list(texts) + parted, seed=seed)
    return len(parted)


def _policies(sps) -> Dict[str, Policy]:
    return {"fixed(gamma)": Fixed(),
            "hardware-aware": HardwareAware(sps),
            "hardware-aware (drafting free)": HardwareAware(sps, draft_cost=False, adaptive=False)}


def engine_benchmark(quick: bool = False, device: str = "cpu", target_dir: Optional[str] = None,
                     draft_dir: Optional[str] = None, dtype: Union[str, torch.dtype] = "auto",
                     concurrency: Sequence[int] = (1, 4, 16), repeats: int = 5) -> dict:
    """Plain decoding against speculative decoding with a good, a mediocre and a
    useless drafter (synthetic models) or with the given drafter (checkpoints),
    at each concurrency: fixed(gamma), hardware-aware (the drafting cost in the
    decision, adaptive drafting) and hardware-aware with drafting taken as free
    (no gate). Every configuration of a concurrency runs once to warm up, then
    ``repeats`` times interleaved with the others (a pass runs each once),
    and plain decoding once more after the last pass; tokens per second is
    the median over the repeats, with its relative spread (max - min over
    median). The speedup is the median over the passes of a configuration's
    tokens per second against the plain runs bracketing its pass (the
    geometric mean of the one that opens it and the one that opens the next),
    so a slow drift of the machine over a pass cancels out.
    """
    from .precision import choose

    synthetic = target_dir is None
    name = dtype if isinstance(dtype, str) else str(dtype).replace("torch.", "")
    if synthetic:
        target = synthetic_target(quick).to(device=device)
    else:
        target = TargetModel.load(target_dir, device=device)
    dtype, dtype_reason = choose(name, device, target if torch.device(device).type == "cpu" else None)
    target = target.to(dtype)
    V = target.config.vocab_size
    max_new = 32 if quick else 96
    if quick:
        concurrency, repeats = tuple(concurrency)[:2], 1
    out: Dict[str, object] = {"synthetic": synthetic, "device": device, "dtype": str(dtype).replace("torch.", ""),
                              "dtype_reason": dtype_reason, "max_new_tokens": max_new, "repeats": repeats,
                              "cpu_isa": _cpu_isa(), "rows": []}
    rows: List[dict] = out["rows"]  # type: ignore[assignment]
    prompts_by_R = {R: _prompts(R, V, seed=R) for R in concurrency}
    greedy = lambda n: [SamplingParams(temperature=0.0, max_new_tokens=max_new) for _ in range(n)]  # noqa: E731
    base_tokens: Dict[int, List[List[int]]] = {}
    for R, prompts in prompts_by_R.items():
        base_tokens[R] = [r.tokens for r in SpeculativeEngine(target, None, max_concurrency=R,
                                                               max_model_len=64 + max_new).generate(prompts,
                                                                                                    greedy(R))]
    calibrated: Dict[tuple, float] = {}  # (quality, R): the constant confidence of that drafter at that batch
    if synthetic:
        texts = [p + t for R in concurrency for p, t in zip(prompts_by_R[R], base_tokens[R])]
        drafters = {}
        for quality in QUALITIES:
            drafter = synthetic_drafter(target, block_size=8).to(dtype)
            fit_drafter(drafter, quality, texts, seed=1)
            refit_where_parted(drafter, quality, target, texts, prompts_by_R, base_tokens, max_new, seed=1)
            if quality != "useless":  # calibrated on each batch's prompts: the confidence is the acceptance there
                for R in concurrency:
                    probe = SpeculativeEngine(target, drafter, max_concurrency=R, max_model_len=64 + max_new)
                    probe.generate(prompts_by_R[R], greedy(R))
                    m = probe.metrics
                    accepted = [a / t for a, t in zip(m.position_accepts, m.position_trials) if t]
                    calibrated[(quality, R)] = sum(accepted) / len(accepted) if accepted else 0.5
            drafters[quality] = drafter
    else:
        drafters = {"checkpoint": DSparkDrafter.load(draft_dir, target, dtype=dtype, device=device)} if draft_dir else {}
    for R in concurrency:
        prompts, params = prompts_by_R[R], greedy(R)
        runs = {("-", "plain decoding"): (SpeculativeEngine(target, None, max_concurrency=R, max_model_len=64 + max_new),
                                          None)}
        for quality, drafter in drafters.items():
            if (quality, R) in calibrated:
                set_constant_confidence(drafter, calibrated[(quality, R)])
            engine = SpeculativeEngine(target, drafter, max_concurrency=R, max_model_len=64 + max_new)
            sps = engine.profile_sps(warmup=1, repeats=5)
            for config, policy in _policies(sps).items():
                runs[(quality, config)] = (engine, policy)
        samples: Dict[tuple, List[dict]] = {key: [] for key in runs}
        plain_key = ("-", "plain decoding")
        for rep in range(repeats + 2):  # the first pass warms up every configuration; the last is plain only
            for key, (engine, policy) in runs.items():
                if rep == repeats + 1 and key != plain_key:
                    break
                if policy is not None:
                    engine.policy = policy
                results = engine.generate(prompts, params)
                if any(r.error for r in results):
                    raise RuntimeError(f"bench engine: a request failed: {next(r.error for r in results if r.error)}")
                m = engine.metrics
                if rep:
                    d = m.as_dict()
                    samples[key].append({"tokens_per_second": m.tokens_per_second, "tau": m.tau,
                                         "verified_per_round": m.verified_per_round, "rounds": m.rounds,
                                         "drafting_rounds": m.drafting_rounds,
                                         "acceptance_by_position": d["acceptance_by_position"],
                                         "prefix_acceptance_by_position": d["prefix_acceptance_by_position"],
                                         "same_tokens": [r.tokens for r in results] == base_tokens[R]})
        # each pass's configurations against the plain runs that bracket the pass (the geometric mean of
        # the one before and the one after): a drift of the machine during the pass moves both alike
        plain_tps = [x["tokens_per_second"] for x in samples[plain_key]]
        baselines = [math.sqrt(a * b) for a, b in zip(plain_tps, plain_tps[1:])]
        samples[plain_key] = samples[plain_key][:repeats]
        for (quality, config), xs in samples.items():
            tps = [x["tokens_per_second"] for x in xs]
            median = statistics.median(tps)
            ratios = [t / b for t, b in zip(tps, baselines)]
            speedup = statistics.median(ratios)
            rows.append({"R": R, "drafter": quality, "config": config, "tokens_per_second": median,
                         "spread": (max(tps) - min(tps)) / median if median else 0.0, "speedup": speedup,
                         "speedup_range": [min(ratios), max(ratios)], "speedup_passes": ratios,
                         "tau": xs[-1]["tau"], "verified_per_round": xs[-1]["verified_per_round"],
                         "rounds": xs[-1]["rounds"], "drafting_rounds": xs[-1]["drafting_rounds"],
                         "acceptance_by_position": xs[-1]["acceptance_by_position"] if quality != "-" else None,
                         "prefix_acceptance_by_position": xs[-1]["prefix_acceptance_by_position"],
                         "same_tokens": all(x["same_tokens"] for x in xs)})
    if torch.device(device).type == "cpu":
        prompt = _prompts(1, V, seed=99)[0]
        out["transformers"] = transformers_ratio(target, prompt, max_new)
    return out


def _cpu_isa() -> str:
    from ._backends import cpu_isa

    return cpu_isa()


def format_rates(rates: List[Optional[float]]) -> str:
    """Rates as '0.91 0.80 -' (None or nan: no round verified that position)."""
    return " ".join("  - " if a is None or a != a else f"{a:.2f}" for a in rates)


def print_goal(rows: Sequence[dict], config: str = "hardware-aware") -> None:
    """One line on the goal: ``config`` at least ``GOAL`` of plain decoding in
    every row, with each row below it by the median and its sign test
    (:func:`goal_verdict`)."""
    judged = [(r, *goal_verdict(r["speedup_passes"])) for r in rows
              if r["config"] == config and r.get("speedup_passes")]
    if not judged:
        return
    short = [(r, verdict, p) for r, verdict, p in judged if verdict != "meets"]
    line = (f"goal {config} >= {GOAL:.2f}x of plain decoding: {len(judged) - len(short)} of {len(judged)} rows "
            "meet it by the median")
    if short:
        parts = []
        for r, verdict, p in short:
            what = "below it beyond this run's noise" if verdict == "below" else "not beyond this run's noise"
            parts.append(f"batch {r['R']} {r['drafter']} {r['speedup']:.4f}x ({shortfall(r['speedup_passes'], p)}: "
                         f"{what})")
        line += "; " + "; ".join(parts)
    print(line)


def print_engine(result: dict) -> None:
    kind = "synthetic models (see `python -m dspark bench engine --help`)" if result["synthetic"] else "checkpoints"
    print(f"engine, {kind}, {result['device']} {result['dtype']} ({result['dtype_reason']}), CPU kernels "
          f"{result['cpu_isa']}; greedy, {result['max_new_tokens']} new tokens per request; tok/s = median of "
          f"{result['repeats']} interleaved passes after a warm-up (spread = (max - min) / median); "
          "x plain = median over the passes of tok/s against the plain runs that bracket the pass (geometric "
          f"mean of the one before and the one after), with its range; * = below {GOAL:.2f}x")
    header = (f"{'R':>3} {'drafter':9} {'config':32} {'tok/s':>8} {'spread':>7} {'x plain':>8} {'range':>11} "
              f"{'tau':>6} {'verified':>9} {'drafting':>9} {'same':>5}")
    print(header)
    print("-" * len(header))
    for r in result["rows"]:
        same = "" if r["drafter"] == "-" else ("yes" if r["same_tokens"] else "NO")
        drafting = "" if r["drafter"] == "-" else f"{r['drafting_rounds']}/{r['rounds']}"
        lo, hi = r.get("speedup_range", [r["speedup"], r["speedup"]])
        flag = "*" if r["speedup"] < GOAL else " "
        print(f"{r['R']:3d} {r['drafter']:9} {r['config']:32} {r['tokens_per_second']:8.1f} {r['spread']:6.0%} "
              f"{r['speedup']:7.2f}{flag} {lo:5.2f}-{hi:<5.2f} {r['tau']:6.2f} {r['verified_per_round']:9.2f} "
              f"{drafting:>9} {same:>5}")
    noisy = [(r["R"], *r["speedup_range"]) for r in result["rows"]
             if r["drafter"] == "-" and "speedup_range" in r and r["speedup_range"][1] - r["speedup_range"][0] > WIDE]
    if noisy:
        spans = ", ".join(f"batch {R}: {lo:.2f}-{hi:.2f}x" for R, lo, hi in noisy)
        print(f"WIDE SPREAD: plain decoding against its own bracketing runs ranged {spans} over the passes (wider "
              f"than {WIDE:.2f}): the machine was busy or noisy, and a row within that of {GOAL:.2f}x cannot be told "
              "from it; rerun before trusting those rows")
    print_goal(result["rows"])
    if result["dtype"] != "float32":
        print(f"same: greedy outputs equal plain decoding's in {result['dtype']}; there a verification forward and a "
              "one-token step round differently (README, Exactness), so a near-tie of the random target's logits can "
              "make them part, and the text after it (which the synthetic drafters were fitted on) with them")
    print("\nacceptance at draft positions 1..: conditional (given 1..k-1 accepted) | prefix (1..k all accepted, "
          "DeepSpec's accept_rate)")
    for r in result["rows"]:
        if r.get("acceptance_by_position"):
            print(f"{r['R']:3d} {r['drafter']:9} {r['config']:32} {format_rates(r['acceptance_by_position'])} | "
                  f"{format_rates(r['prefix_acceptance_by_position'])}")
    hf = result.get("transformers")
    if hf:
        print(f"\nplain decoding vs transformers generate (batch 1, greedy, same weights): dspark "
              f"{hf['dspark_tokens_per_second']:.1f} tok/s, transformers {hf['transformers_tokens_per_second']:.1f} "
              f"tok/s: x{hf['ratio']:.2f}; same tokens: {'yes' if hf['same_tokens'] else 'NO'}")
    elif result["device"] == "cpu":
        print("\n(transformers not installed: no comparison with its generate)")
