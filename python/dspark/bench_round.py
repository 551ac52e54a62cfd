"""``python -m dspark bench round``: what one speculative round costs, by part,
with the drafter scoring the whole vocabulary and a draft vocabulary.

The target is SmolLM2-135M-Instruct when its converted folder is in the cache
(or ``--target DIR``), else random weights of its shape (the cost does not
depend on the values). Two drafters of the shipped drafter's shape (2 layers,
gamma 7, Markov rank 64, confidence head) with random weights: one scoring
the whole vocabulary, one scoring a draft vocabulary of 8192 ids. For each
batch size ``R`` the run times, interleaved over the repeats so that a drift of
the machine moves every entry alike:

* a plain step: the target forward over ``R`` tokens;
* drafting alone: the backbone, the LM head rows, ``markov_sample`` and
  ``confidence`` for ``R`` requests;
* a whole round: drafting, the verification forward over ``R (gamma + 1)``
  tokens and ``rejection_sample``.

It prints medians with their relative interquartile spread and the ratio of
the full-vocabulary drafter's cost to the draft vocabulary's.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from . import ops
from .engine import SpeculativeEngine
from .models import DrafterConfig, DSparkDrafter, TargetConfig, TargetModel

SMOLLM2 = dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
               num_attention_heads=9, num_key_value_heads=3, head_dim=64, rms_norm_eps=1e-5,
               tie_word_embeddings=True, rope_theta=100000.0, max_position_embeddings=8192)
DRAFT_VOCAB = 8192


def _random_init(module: torch.nn.Module, seed: int) -> None:
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)


def smollm2_shaped_target(target_dir: Optional[str], dtype: torch.dtype, device: str) -> Tuple[TargetModel, str]:
    """The converted model when it is there, else random weights of its shape."""
    from . import smollm2

    folder = Path(target_dir) if target_dir else smollm2.cache_dir() / smollm2.FOLDER_NAME
    if (folder / "config.json").is_file():
        return TargetModel.load(folder, dtype=dtype, device=device), folder.name
    model = TargetModel(TargetConfig.from_dict(dict(SMOLLM2)))
    _random_init(model, 0)
    return model.to(device=device, dtype=dtype).eval(), "random weights, SmolLM2-135M-Instruct's shape"


def shipped_shaped_drafter(target: TargetModel, draft_vocab: int, dtype: torch.dtype, device: str) -> DSparkDrafter:
    t = target.config
    config = DrafterConfig.from_dict(dict(
        architectures=["DSparkDraftModel"], hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
        num_hidden_layers=2, num_attention_heads=t.num_attention_heads, num_key_value_heads=t.num_key_value_heads,
        head_dim=t.head_dim, rms_norm_eps=t.rms_norm_eps, vocab_size=t.vocab_size, rope_theta=100000.0,
        block_size=7, target_layer_ids=[1, t.num_hidden_layers // 2, t.num_hidden_layers - 2], mask_token_id=0,
        markov_rank=64, markov_head_type="vanilla", enable_confidence_head=True, confidence_head_with_markov=True,
        draft_vocab_size=draft_vocab))
    drafter = DSparkDrafter(config)
    _random_init(drafter, 1)
    if draft_vocab:
        with torch.no_grad():
            drafter.draft_vocab.copy_(torch.arange(draft_vocab, dtype=torch.int32))
    return drafter.to(device=device, dtype=dtype).eval()


def _spread(times: List[float]) -> float:
    if len(times) < 4:
        return (max(times) - min(times)) / statistics.median(times)
    q1, _, q3 = statistics.quantiles(times, n=4)
    return (q3 - q1) / statistics.median(times)


def round_benchmark(quick: bool = False, device: str = "cpu", dtype: str = "auto",
                    target_dir: Optional[str] = None, batch_sizes: Sequence[int] = (1, 4, 16),
                    repeats: int = 7) -> dict:
    from .precision import choose

    if quick:
        batch_sizes, repeats = (1, 4), 3
    target, target_name = smollm2_shaped_target(target_dir, torch.float32, device)
    dtype, dtype_reason = choose(dtype, device, target if torch.device(device).type == "cpu" else None)
    target = target.to(dtype)
    R_max = max(batch_sizes)
    gamma = 7
    engines: Dict[str, SpeculativeEngine] = {}
    probes = {}
    for label, vocab in (("full", 0), (str(DRAFT_VOCAB), DRAFT_VOCAB)):
        drafter = shipped_shaped_drafter(target, vocab, dtype, device)
        engine = SpeculativeEngine(target, drafter, max_concurrency=R_max, max_model_len=512)
        engines[label] = engine
        probes[label] = engine.cost_probes(R_max * (gamma + 1), context_len=256)
    V = target.config.vocab_size

    def rejection(R: int, label: str) -> None:
        ops.rejection_sample(logits[R], tokens[R], cu[R], draft_logits=draft_rows[(label, R)],
                             draft_vocab=engines[label].draft_vocab, temperature=1.0, seed=1, max_num_draft=gamma,
                             validate=False)

    g = torch.Generator().manual_seed(0)
    logits, tokens, cu, draft_rows = {}, {}, {}, {}
    for R in batch_sizes:
        logits[R] = torch.randn(R * (gamma + 1), V, generator=g).to(device)
        tokens[R] = torch.randint(0, DRAFT_VOCAB, (R * gamma,), generator=g).to(device)
        cu[R] = torch.arange(0, R * gamma + 1, gamma, dtype=torch.int32).to(device)
        for label in probes:
            columns = V if label == "full" else DRAFT_VOCAB
            draft_rows[(label, R)] = torch.randn(R * gamma, columns, generator=g).to(device)

    def sync() -> None:
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()

    jobs = []
    for R in batch_sizes:
        forward0, _ = probes["full"]
        jobs.append(("plain step", "-", R, lambda R=R, f=forward0: f(R)))
        for label, (forward, draft) in probes.items():
            jobs.append(("drafting", label, R, lambda R=R, d=draft: d(R)))
            jobs.append(("round", label, R,
                         lambda R=R, f=forward, d=draft, lab=label: (d(R), f(R * (gamma + 1)), rejection(R, lab))))
    times: Dict[tuple, List[float]] = {(kind, label, R): [] for kind, label, R, _ in jobs}
    for _, _, _, fn in jobs:  # warm-up
        fn()
    for _ in range(repeats):
        for kind, label, R, fn in jobs:
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[(kind, label, R)].append(time.perf_counter() - t0)
    rows = []
    for (kind, label, R), ts in times.items():
        rows.append(dict(part=kind, vocabulary=label, R=R, ms=statistics.median(ts) * 1e3, spread=_spread(ts)))
    return {"device": device, "dtype": str(dtype).replace("torch.", ""), "dtype_reason": dtype_reason,
            "target": target_name, "gamma": gamma,
            "draft_vocab": DRAFT_VOCAB, "vocab": V, "repeats": repeats, "rows": rows}


def print_round(result: dict) -> None:
    print(f"round costs: target {result['target']}, drafter of the shipped shape (2 layers, gamma "
          f"{result['gamma']}, Markov rank 64), {result['device']} {result['dtype_reason']}; median ms (relative IQR) "
          f"over {result['repeats']} interleaved repeats")
    rows = result["rows"]
    full, sub = "full", str(result["draft_vocab"])
    header = (f"{'R':>3} {'plain step':>16} {'drafting, V=' + str(result['vocab']):>24} "
              f"{'drafting, V_d=' + sub:>24} {'x':>6} {'round, V':>18} {'round, V_d':>18} {'x':>6}")
    print(header)
    print("-" * len(header))
    get = lambda part, label, R: next(r for r in rows if (r["part"], r["vocabulary"], r["R"]) == (part, label, R))  # noqa: E731
    cell = lambda r: f"{r['ms']:9.2f} ({r['spread']:4.0%})"  # noqa: E731
    for R in sorted({r["R"] for r in rows}):
        plain = get("plain step", "-", R)
        d_full, d_sub = get("drafting", full, R), get("drafting", sub, R)
        r_full, r_sub = get("round", full, R), get("round", sub, R)
        print(f"{R:3d} {cell(plain):>16} {cell(d_full):>24} {cell(d_sub):>24} {d_full['ms'] / d_sub['ms']:6.2f} "
              f"{cell(r_full):>18} {cell(r_sub):>18} {r_full['ms'] / r_sub['ms']:6.2f}")
