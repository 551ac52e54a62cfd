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
(no per-token signal). Acceptance in the synthetic setup is high by
construction; it exercises the engine's mechanics and costs, not a trained
drafter's quality.
"""

from __future__ import annotations

import math
import tempfile
import time
from typing import Dict, List, Optional, Sequence

import torch

from .engine import SamplingParams, SpeculativeEngine
from .models import DrafterConfig, DSparkDrafter, TargetConfig, TargetModel
from .scheduler import AsyncHardwareAware, Fixed, HardwareAware, Policy, Threshold


def synthetic_target(quick: bool, seed: int = 0) -> TargetModel:
    torch.manual_seed(seed)
    hidden, layers, vocab = (256, 4, 4096) if quick else (512, 8, 8192)
    config = TargetConfig.from_dict(dict(
        model_type="llama", vocab_size=vocab, hidden_size=hidden, intermediate_size=3 * hidden,
        num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=max(1, hidden // 128),
        head_dim=64, rms_norm_eps=1e-6, tie_word_embeddings=True, rope_theta=10000.0,
        max_position_embeddings=4096, bos_token_id=None, eos_token_id=None))
    model = TargetModel(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)
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
def fit_markov_bigram(drafter: DSparkDrafter, sequences: Sequence[Sequence[int]], strength: float = 60.0) -> None:
    """Sets the Markov head so that ``B(x)`` peaks at the most frequent successor
    of ``x`` in the sequences: random unit codes ``e_x`` in ``W1`` and
    ``W2[v] = strength * sum of e_x over the x whose successor is v``."""
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


def engine_benchmark(quick: bool = False, device: str = "cpu", target_dir: Optional[str] = None,
                     draft_dir: Optional[str] = None, dtype: torch.dtype = torch.float32) -> dict:
    synthetic = target_dir is None
    if synthetic:
        target = synthetic_target(quick).to(device=device, dtype=dtype)
        drafter = synthetic_drafter(target, block_size=8)
    else:
        target = TargetModel.load(target_dir, dtype=dtype, device=device)
        drafter = DSparkDrafter.load(draft_dir, target, dtype=dtype, device=device) if draft_dir else None
    V = target.config.vocab_size
    max_new = 32 if quick else 96
    concurrency = [1, 4] if quick else [1, 8]
    out: Dict[str, object] = {"synthetic": synthetic, "device": device, "dtype": str(dtype).replace("torch.", ""),
                              "max_new_tokens": max_new, "rows": []}
    rows: List[dict] = out["rows"]  # type: ignore[assignment]
    for R in concurrency:
        prompts = _prompts(R, V, seed=R)
        params = [SamplingParams(temperature=0.0, max_new_tokens=max_new) for _ in prompts]
        base_engine = SpeculativeEngine(target, None, max_concurrency=R, max_model_len=64 + max_new)
        base = _run(base_engine, prompts, params)
        rows.append({"R": R, "config": "target only", **{k: v for k, v in base.items() if k != "tokens"},
                     "speedup": 1.0})
        if drafter is None:
            continue
        if synthetic:
            fit_markov_bigram(drafter, [p + t for p, t in zip(prompts, base["tokens"])])
            probe = SpeculativeEngine(target, drafter, max_concurrency=R, max_model_len=64 + max_new)
            probe.generate(prompts, params)
            accepted = [a / t for a, t in zip(probe.metrics.position_accepts, probe.metrics.position_trials) if t]
            set_constant_confidence(drafter, sum(accepted) / len(accepted) if accepted else 0.5)
        engine = SpeculativeEngine(target, drafter, max_concurrency=R, max_model_len=64 + max_new)
        policies: List[Policy] = [Fixed(), Fixed(1)]
        if drafter.config.enable_confidence_head:
            sps = engine.profile_sps(warmup=1, repeats=3)
            policies += [Threshold(0.5), HardwareAware(sps), AsyncHardwareAware(sps)]
        for policy in policies:
            engine.policy = policy
            result = _run(engine, prompts, params)
            lossless = result["tokens"] == base["tokens"]
            rows.append({"R": R, "config": policy.name, **{k: v for k, v in result.items() if k != "tokens"},
                         "speedup": result["tokens_per_second"] / base["tokens_per_second"],
                         "same_tokens": lossless})
    if device == "cpu":
        prompt = _prompts(1, V, seed=99)[0]
        out["transformers"] = transformers_ratio(target, prompt, max_new)
    return out


def format_rates(rates: List[Optional[float]]) -> str:
    """Rates as '0.91 0.80 -' (None or nan: no round verified that position)."""
    return " ".join("  - " if a is None or a != a else f"{a:.2f}" for a in rates)


def print_engine(result: dict) -> None:
    kind = "synthetic models (see `python -m dspark bench engine --help`)" if result["synthetic"] else "checkpoints"
    print(f"engine, {kind}, {result['device']} {result['dtype']}, greedy, {result['max_new_tokens']} new tokens "
          "per request; x target = tokens/s against target only in this run")
    header = f"{'R':>3} {'config':24} {'tok/s':>9} {'x target':>9} {'tau':>6} {'verified':>9} {'rounds':>7} {'same':>5}"
    print(header)
    print("-" * len(header))
    for r in result["rows"]:
        same = "" if "same_tokens" not in r else ("yes" if r["same_tokens"] else "NO")
        print(f"{r['R']:3d} {r['config']:24} {r['tokens_per_second']:9.1f} {r['speedup']:9.2f} {r['tau']:6.2f} "
              f"{r['verified_per_round']:9.2f} {r['rounds']:7d} {same:>5}")
    print("\nacceptance at draft positions 1..: conditional (given 1..k-1 accepted) | prefix (1..k all accepted, "
          "DeepSpec's accept_rate)")
    for r in result["rows"]:
        if r.get("acceptance_by_position"):
            print(f"{r['R']:3d} {r['config']:24} {format_rates(r['acceptance_by_position'])} | "
                  f"{format_rates(r['prefix_acceptance_by_position'])}")
    hf = result.get("transformers")
    if hf:
        print(f"\ntarget only vs transformers generate (batch 1, greedy, same weights): dspark "
              f"{hf['dspark_tokens_per_second']:.1f} tok/s, transformers {hf['transformers_tokens_per_second']:.1f} "
              f"tok/s: x{hf['ratio']:.2f}; same tokens: {'yes' if hf['same_tokens'] else 'NO'}")
    elif result["device"] == "cpu":
        print("\n(transformers not installed: no comparison with its generate)")
