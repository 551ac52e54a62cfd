"""``python -m dspark bench drafters``: the paper's central claim at small scale.

DSpark (parallel backbone + Markov head + confidence head) and the
DFlash-style baseline (the same backbone, ``markov_rank = 0``) are trained
with the same recipe, data and budget for SmolLM2-135M-Instruct (or any
target folder) at gamma 7 and 15, then evaluated on held-out code and text
prompts at temperature 1, verifying every draft. Trained drafters are kept
in the cache and loaded on later runs.

The recipe is the shipped drafter's (``train.TrainConfig``'s defaults: the
target's continuations and teacher-forced offline texts, draft layers
initialised from the target's top layers, the draft vocabulary) with a
smaller step budget; only the Markov head and the confidence head differ.
With several training seeds, Welch's t-test (two-sided) says whether DSpark's
gain over the baseline is significant in each cell, and a t-test on the
difference of the log-gains (Welch-Satterthwaite degrees of freedom) whether
the relative gain grows from the smallest to the largest gamma.
"""

from __future__ import annotations

import hashlib
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from . import train
from .models import DSparkDrafter, TargetModel


def _key(kind: str, config: train.TrainConfig, target_dir: Path) -> str:
    blob = json.dumps({"kind": kind, "config": config.to_dict(), "target": str(target_dir.resolve())}, sort_keys=True)
    return f"gamma{config.block_size}-{kind}-{hashlib.sha1(blob.encode()).hexdigest()[:10]}"


def recipe(kind: str, gamma: int, steps: int, seed: int) -> train.TrainConfig:
    """The shared recipe: the token budget per step is held near 224 block
    positions whatever gamma (blocks per sequence shrink as gamma grows)."""
    dspark = kind == "dspark"
    return train.TrainConfig(block_size=gamma, markov_rank=64 if dspark else 0, markov_head="vanilla",
                             confidence=dspark, steps=steps, blocks_per_sequence=max(1, 28 // gamma),
                             warmup=min(100, max(1, steps // 10)), eval_every=0, seed=seed)


DEFAULT_STEPS = 800


def drafters_benchmark(target_dir: Optional[Path] = None, gammas: Sequence[int] = (7, 15), steps: int = DEFAULT_STEPS,
                       seeds: int = 1, eval_prompts: int = 16, new_tokens: int = 64, device: str = "cpu",
                       seed: int = 0, cache: Optional[Path] = None, progress: bool = True,
                       code_root: Optional[Path] = None, text_folder: Optional[Path] = None) -> dict:
    """Train (or load) and evaluate every (gamma, drafter, training seed).

    ``seeds`` training seeds ``seed, seed + 1, ...`` per drafter measure how
    much ``tau`` moves with the initialisation and the anchors drawn alone:
    the data (made once, with ``seed``) and the held-out prompts are the
    same for all of them."""
    from . import smollm2
    from .tokenizer import Tokenizer, stop_tokens

    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    target_dir = target_dir or smollm2.prepare()
    cache = cache or smollm2.cache_dir()
    target = TargetModel.load(target_dir, device=device)
    tokenizer = Tokenizer(target_dir)
    stops = stop_tokens(target_dir)
    domains = ("code", "text")
    held = train.domain_prompts(domains, "held-out", eval_prompts * len(domains), seed + 123, code_root, text_folder)
    eval_sets = {d: train.encode_prompts(tokenizer, [p for p in held if p.domain == d], 256) for d in domains}
    # the data depends on the fields every recipe shares and on the base seed
    data_config = recipe("dspark", gammas[0], steps, seed)
    rows: List[Dict[str, object]] = []
    data = None
    normalisers: Dict[str, list] = {}  # computed by the first drafter trained, read by the others
    for gamma in gammas:
        for kind in ("dflash", "dspark"):
            for train_seed in range(seed, seed + seeds):
                config = recipe(kind, gamma, steps, train_seed)
                folder = cache / "drafters-bench" / _key(kind, config, target_dir)
                if (folder / "config.json").is_file():
                    drafter = DSparkDrafter.load(folder, target, device=device)
                    print(f"loaded {folder}", file=sys.stderr)
                else:
                    if data is None:
                        data = train.prepare_data(target_dir, data_config, device, cache / "train-data", progress,
                                                  code_root, text_folder)
                    print(f"training {kind} at gamma {gamma} for {steps} steps (seed {train_seed}) ...",
                          file=sys.stderr)
                    trained, _ = train.train_drafter(target, data, config, None, None, stops, progress,
                                                     log=lambda s: print(s, file=sys.stderr),
                                                     normalisers=normalisers)
                    train.save_checkpoint(trained, folder, config, [])
                    # evaluated as saved (save_dtype), like a cached one
                    drafter = DSparkDrafter.load(folder, target, device=device)
                row: Dict[str, object] = {"gamma": gamma, "drafter": kind, "steps": steps, "seed": train_seed}
                for domain, ids in eval_sets.items():
                    result = train.evaluate_tau(target, drafter, ids, new_tokens, 1.0, seed + 5, stops)
                    row[f"tau_{domain}"] = result["tau"]
                    row[f"acceptance_{domain}"] = result["acceptance_by_position"]
                rows.append(row)
                print(json.dumps({k: v for k, v in row.items() if not k.startswith("acceptance")}), file=sys.stderr)
    summary = summarise(rows)
    return {"target": str(target_dir), "temperature": 1.0, "eval_prompts": eval_prompts, "new_tokens": new_tokens,
            "seeds": seeds, "rows": rows, "summary": summary, "tests": significance(rows)}


def _welch(a: Sequence[float], b: Sequence[float]) -> Tuple[float, float, float]:
    """(t, degrees of freedom, two-sided p) of Welch's t-test of mean(a) - mean(b)."""
    from scipy import stats

    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    if va + vb == 0:
        return float("nan"), float("nan"), float("nan")
    t = (statistics.fmean(a) - statistics.fmean(b)) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    return t, df, float(2 * stats.t.sf(abs(t), df))


def significance(rows: Sequence[dict]) -> List[Dict[str, object]]:
    """Needs two seeds or more per drafter. Per gamma and domain: DSpark against
    the DFlash-style baseline (Welch's t-test on tau over the training seeds).
    Per domain, between the smallest and the largest gamma: whether DSpark's
    relative gain grows (t-test on the difference of the mean log-gains,
    ``mean log tau_dspark - mean log tau_dflash``, with Welch-Satterthwaite
    degrees of freedom; two-sided p and the one-sided p for growth)."""
    from scipy import stats

    groups: Dict[tuple, List[dict]] = {}
    for r in rows:
        groups.setdefault((r["gamma"], r["drafter"]), []).append(r)
    if any(len(v) < 2 for v in groups.values()):
        return []
    gammas = sorted({g for g, _ in groups})
    out: List[Dict[str, object]] = []
    for domain in ("code", "text"):
        for g in gammas:
            if (g, "dspark") not in groups or (g, "dflash") not in groups:
                continue
            a = [float(r[f"tau_{domain}"]) for r in groups[(g, "dspark")]]
            b = [float(r[f"tau_{domain}"]) for r in groups[(g, "dflash")]]
            t, df, p = _welch(a, b)
            out.append({"test": "gain", "domain": domain, "gamma": g, "t": t, "df": df, "p": p,
                        "gain": statistics.fmean(a) / statistics.fmean(b) - 1})
        if len(gammas) >= 2:
            lo, hi = gammas[0], gammas[-1]
            logs = {key: [math.log(float(r[f"tau_{domain}"])) for r in groups[key]]
                    for key in ((lo, "dspark"), (lo, "dflash"), (hi, "dspark"), (hi, "dflash")) if key in groups}
            if len(logs) == 4:
                gain = lambda g: statistics.fmean(logs[(g, "dspark")]) - statistics.fmean(logs[(g, "dflash")])  # noqa: E731
                parts = [statistics.variance(v) / len(v) for v in logs.values()]
                se = math.sqrt(sum(parts))
                diff = gain(hi) - gain(lo)
                if se > 0:
                    df = sum(parts) ** 2 / sum(p ** 2 / (len(v) - 1) for p, v in zip(parts, logs.values()))
                    t = diff / se
                    out.append({"test": "growth", "domain": domain, "gammas": [lo, hi], "t": t, "df": df,
                                "p": float(2 * stats.t.sf(abs(t), df)), "p_grows": float(stats.t.sf(t, df)),
                                "gain_lo": math.exp(gain(lo)) - 1, "gain_hi": math.exp(gain(hi)) - 1})
    return out


def summarise(rows: Sequence[dict]) -> List[Dict[str, object]]:
    """Per (gamma, drafter): the mean ``tau`` over training seeds and its
    sample standard deviation (0 for one seed), in the order first seen."""
    groups: Dict[tuple, List[dict]] = {}
    for r in rows:
        groups.setdefault((r["gamma"], r["drafter"]), []).append(r)
    out = []
    for (gamma, kind), rs in groups.items():
        entry: Dict[str, object] = {"gamma": gamma, "drafter": kind, "steps": rs[0]["steps"], "seeds": len(rs)}
        for domain in ("code", "text"):
            values = [float(r[f"tau_{domain}"]) for r in rs]
            entry[f"tau_{domain}"] = statistics.fmean(values)
            entry[f"sd_{domain}"] = statistics.stdev(values) if len(values) > 1 else 0.0
        out.append(entry)
    return out


def print_drafters(result: dict) -> None:
    seeds = result["seeds"]
    print(f"accepted length tau (bonus included) at temperature 1, verifying every draft; "
          f"{result['eval_prompts']} held-out prompts per domain, {result['new_tokens']} new tokens each"
          + (f"; mean +- sd over {seeds} training seeds" if seeds > 1 else ""))
    width = 14 if seeds > 1 else 9
    header = f"{'gamma':>5} {'drafter':8} {'steps':>6} {'tau code':>{width}} {'tau text':>{width}} {'vs DFlash':>10}"
    print(header)
    print("-" * len(header))

    def cell(r: dict, domain: str) -> str:
        text = f"{r[f'tau_{domain}']:.2f}"
        if seeds > 1:
            text += f" +- {r[f'sd_{domain}']:.2f}"
        return f"{text:>{width}}"

    base: Dict[int, dict] = {}
    for r in result["summary"]:
        gain = ""
        if r["drafter"] == "dflash":
            base[r["gamma"]] = r
        elif r["gamma"] in base:
            b = base[r["gamma"]]
            code = 100 * (r["tau_code"] / b["tau_code"] - 1)
            text = 100 * (r["tau_text"] / b["tau_text"] - 1)
            gain = f"{code:+.0f}% / {text:+.0f}%"
        print(f"{r['gamma']:5d} {r['drafter']:8} {r['steps']:6d} {cell(r, 'code')} {cell(r, 'text')} {gain:>10}")
    for test in result.get("tests", []):
        if test["test"] == "gain":
            print(f"gamma {test['gamma']:2d} {test['domain']}: DSpark {test['gain']:+.1%} over DFlash-style, Welch's "
                  f"t = {test['t']:.2f} (df {test['df']:.1f}), p = {test['p']:.3g}")
        else:
            lo, hi = test["gammas"]
            print(f"{test['domain']}: gain {test['gain_lo']:+.1%} at gamma {lo} -> {test['gain_hi']:+.1%} at gamma "
                  f"{hi}; t = {test['t']:.2f} (df {test['df']:.1f}), two-sided p = {test['p']:.3g}, p(grows) = "
                  f"{test['p_grows']:.3g}")
