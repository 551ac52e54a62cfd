"""Command line: ``python -m dspark <command>``.

  info                 what this build compiled and what is usable now
  bench sampling       rejection_sample: the CPU (and CUDA) backend against the
                       PyTorch reference and an eager PyTorch implementation
  bench markov         markov_sample against an eager PyTorch loop and the bare
                       matrix products it cannot avoid
  bench attention      paged_attention against scaled_dot_product_attention on
                       the same data (padded batch)
  bench scheduler      schedule_prefix against the same baselines, and a serving
                       simulation of the scheduling policies
  bench engine         target-only against speculative decoding, every policy,
                       and the target-only path against transformers' generate
  bench drafters       DSpark against the DFlash-style baseline (same recipe
                       and budget) at gamma 7 and 15: tau at temperature 1
  generate             text generation with a target folder and, optionally, a
                       DSpark drafter folder; prints the text and the metrics
  train                train a DSpark (or DFlash-style) drafter for a target
  demo                 SmolLM2-135M-Instruct with the shipped drafter: plain
                       against speculative decoding, side by side
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional


def _info(_: argparse.Namespace) -> int:
    import dspark

    import os

    openmp = {k: os.environ.get(k) for k in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    print(json.dumps({"version": dspark.__version__, "backends": dspark.backends(), "openmp_env": openmp}, indent=2))
    return 0


def _bench(args: argparse.Namespace) -> int:
    from . import bench

    engine_options = None
    if args.suite == "engine":
        if args.draft and not args.target:
            print("error: --draft needs --target", file=sys.stderr)
            return 2
        engine_options = {"target_dir": args.target, "draft_dir": args.draft, "dtype": args.dtype}
    elif args.suite == "round":
        engine_options = {"target_dir": args.target, "dtype": args.dtype}
    elif args.suite == "drafters":
        engine_options = {"target_dir": args.target}
        if args.steps is not None:
            engine_options["steps"] = args.steps
        if args.seeds is not None:
            engine_options["seeds"] = args.seeds
    return bench.run(args.suite, quick=args.quick, json_path=args.json, devices=args.device,
                     engine_options=engine_options)


_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def _default_device() -> str:
    import dspark

    return "cuda" if dspark.backends()["cuda"].get("usable") else "cpu"


def make_policy(name: str, engine, threshold: float, sps_path: Optional[str], gamma: Optional[int]):
    """The policy named on the command line (profiling the target for the
    hardware-aware ones unless an SPS table is given)."""
    from . import scheduler

    if name == "fixed":
        return scheduler.Fixed(gamma)
    if name == "threshold":
        return scheduler.Threshold(threshold)
    if sps_path:
        sps = scheduler.SPSTable.load(sps_path)
    else:
        print("profiling the target's throughput for the scheduler ...", file=sys.stderr)
        sps = engine.profile_sps(warmup=1, repeats=3)
    return scheduler.HardwareAware(sps) if name == "hardware-aware" else scheduler.AsyncHardwareAware(sps)


def _generate(args: argparse.Namespace) -> int:
    from .engine import SamplingParams, SpeculativeEngine
    from .models import CheckpointError, DSparkDrafter, TargetModel
    from .precision import choose
    from .tokenizer import Tokenizer, stop_tokens

    device = args.device or _default_device()
    try:
        if args.dtype == "auto" and device == "cpu":  # measured on the model itself
            target = TargetModel.load(args.target, device=device)
            dtype, dtype_reason = choose(args.dtype, device, target)
            target = target.to(dtype)
        else:
            dtype, dtype_reason = choose(args.dtype, device)
            target = TargetModel.load(args.target, dtype=dtype, device=device)
        drafter = DSparkDrafter.load(args.draft, target, dtype=dtype, device=device) if args.draft else None
    except CheckpointError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    tokenizer = Tokenizer(args.target)
    prompts = [tokenizer.apply_chat_template(p) if args.chat else tokenizer.encode(p) for p in args.prompt]
    stops = [] if args.ignore_eos else stop_tokens(args.target)
    engine = SpeculativeEngine(target, drafter, gamma=args.gamma, max_concurrency=args.max_concurrency,
                               max_model_len=max(len(p) for p in prompts) + args.max_new_tokens,
                               progress=not args.no_progress)
    if args.policy != "fixed" and drafter is None:
        print("error: --policy other than fixed needs --draft", file=sys.stderr)
        return 2
    engine.policy = make_policy(args.policy, engine, args.threshold, args.sps, args.verify)
    if drafter is not None and args.policy != "fixed" and not drafter.config.enable_confidence_head:
        print(f"error: policy {args.policy} needs a drafter with a confidence head", file=sys.stderr)
        return 2
    params = [SamplingParams(temperature=args.temperature, seed=args.seed + i, max_new_tokens=args.max_new_tokens,
                             stop_tokens=stops, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p)
              for i in range(len(prompts))]
    results = engine.generate(prompts, params)
    for text, result in zip(args.prompt, results):
        print(f"=== {text!r}")
        if result.error:
            print(f"error: {result.error}")
            continue
        print(tokenizer.decode(result.tokens))
        m = result.metrics
        print(f"--- {len(result.tokens)} tokens ({result.finish_reason}), {m.rounds} rounds, tau {m.tau:.2f}")
    metrics = engine.metrics
    print(f"\n{'drafter' if drafter else 'target only'}, policy {engine.policy.name}, {dtype_reason}: "
          f"{metrics.generated_tokens} tokens in {metrics.wall_seconds:.2f} s = {metrics.tokens_per_second:.1f} tok/s, "
          f"tau {metrics.tau:.2f}, verified drafts per round {metrics.verified_per_round:.2f}, "
          f"{metrics.rounds} rounds")
    if drafter is not None:
        accept = ", ".join(f"{a:.2f}" for a in metrics.acceptance_by_position)
        prefix = ", ".join(f"{a:.2f}" for a in metrics.prefix_acceptance_by_position)
        print(f"position-wise conditional acceptance (k accepted given 1..k-1 accepted): {accept}")
        print(f"position-wise prefix acceptance (1..k all accepted, DeepSpec's accept_rate): {prefix}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"metrics": metrics.as_dict(), "results": [
                {"tokens": r.tokens, "finish_reason": r.finish_reason, "error": r.error, "tau": r.metrics.tau}
                for r in results]}, f, indent=1)
    return 0 if all(r.error is None for r in results) else 1


def train_config_from_args(args: argparse.Namespace):
    from .train import TrainConfig

    return TrainConfig(block_size=args.block_size, markov_rank=args.markov_rank, markov_head=args.markov_head,
                       confidence=not args.no_confidence, num_layers=args.layers, steps=args.steps,
                       sequences_per_step=args.sequences_per_step, blocks_per_sequence=args.blocks_per_sequence,
                       lr=args.lr, seed=args.seed, train_prompts=args.prompts, requests=args.requests,
                       max_new_tokens=args.max_new_tokens,
                       eval_every=args.eval_every, domains=tuple(args.domains.split(",")),
                       draft_vocab=args.draft_vocab, offline_tokens=args.offline_tokens, offline_mix=args.offline_mix,
                       init=args.init, data_dtype=args.data_dtype)


def _train(args: argparse.Namespace) -> int:
    from pathlib import Path

    from . import smollm2, train

    config = train_config_from_args(args)
    target = Path(args.target) if args.target else smollm2.prepare()
    train.run(target, Path(args.out), config, device=args.device or _default_device(),
              progress=not args.no_progress, text_folder=Path(args.text_corpus) if args.text_corpus else None)
    print(f"drafter written to {args.out}")
    return 0


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    from .train import TrainConfig

    d = TrainConfig()
    parser.add_argument("--block-size", type=int, default=d.block_size, help="gamma (default %(default)s)")
    parser.add_argument("--markov-rank", type=int, default=d.markov_rank, help="0: DFlash-style (default %(default)s)")
    parser.add_argument("--markov-head", default=d.markov_head, choices=["vanilla", "gated", "rnn"])
    parser.add_argument("--draft-vocab", type=int, default=d.draft_vocab,
                        help="draft vocabulary: the N most frequent tokens of the target's generations "
                             "(0: the whole vocabulary; default %(default)s)")
    parser.add_argument("--no-confidence", action="store_true", help="no confidence head")
    parser.add_argument("--layers", type=int, default=d.num_layers, help="draft layers (default %(default)s)")
    parser.add_argument("--steps", type=int, default=d.steps, help="optimiser steps (default %(default)s)")
    parser.add_argument("--sequences-per-step", type=int, default=d.sequences_per_step)
    parser.add_argument("--blocks-per-sequence", type=int, default=d.blocks_per_sequence)
    parser.add_argument("--lr", type=float, default=d.lr)
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--prompts", type=int, default=d.train_prompts, help="training prompts (default %(default)s)")
    parser.add_argument("--requests", type=int, default=d.requests,
                        help="chat requests the target writes itself and continues, as text prompts besides "
                             "--prompts (default %(default)s)")
    parser.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens,
                        help="target continuation length (default %(default)s)")
    parser.add_argument("--offline-tokens", type=int, default=d.offline_tokens,
                        help="teacher-forced answer tokens of offline texts (default %(default)s)")
    parser.add_argument("--offline-mix", type=float, default=d.offline_mix,
                        help="fraction of training sequences from the offline texts (default %(default)s)")
    parser.add_argument("--init", default=d.init, choices=["random", "target"],
                        help="draft layers from scratch or from the target's top layers (default %(default)s)")
    parser.add_argument("--data-dtype", default=d.data_dtype, choices=["auto", "float32", "bfloat16", "float16"],
                        help="the target's dtype while making the data (default %(default)s: the demo's)")
    parser.add_argument("--eval-every", type=int, default=d.eval_every)
    parser.add_argument("--domains", default=",".join(d.domains), help="code,text")
    parser.add_argument("--text-corpus", metavar="DIR", help="fortune files (default /usr/share/games/fortunes)")


def _demo(args: argparse.Namespace) -> int:
    from . import demo

    return demo.main(args.device or _default_device(), args.target, args.draft, args.max_new_tokens, args.plot,
                     progress=not args.no_progress, dtype=args.dtype, repeats=args.repeats)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dspark", description="dspark: DSpark speculative decoding kernels")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="backends compiled into this build and usable now")
    info.set_defaults(func=_info)
    bench = sub.add_parser("bench", help="benchmarks that print tables")
    bench.add_argument("suite", choices=["sampling", "markov", "scheduler", "attention", "linear", "engine", "round", "drafters"], help="which op family")
    bench.add_argument("--quick", action="store_true", help="a few small shapes (smoke test)")
    bench.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    bench.add_argument("--device", action="append", choices=["cpu", "cuda"],
                       help="backends to time (default: cpu, and cuda when usable)")
    bench.add_argument("--target", metavar="DIR", help="engine: a target folder (default: synthetic models)")
    bench.add_argument("--draft", metavar="DIR", help="engine: a DSpark drafter folder for --target")
    bench.add_argument("--dtype", default="auto", choices=["auto"] + sorted(_DTYPES),
                       help="engine, round: model dtype (auto: bfloat16 where the CPU multiplies it natively and it "
                            "measures faster here, else float32; bfloat16 on CUDA)")
    bench.add_argument("--steps", type=int, help="drafters: training steps per drafter (default 800)")
    bench.add_argument("--seeds", type=int, help="drafters: training seeds per drafter, to see the spread of tau "
                       "(default 1)")
    bench.set_defaults(func=_bench)
    gen = sub.add_parser("generate", help="generate text with a target and, optionally, a DSpark drafter")
    gen.add_argument("--target", required=True, metavar="DIR", help="Hugging Face folder of a Llama / Qwen3 model")
    gen.add_argument("--draft", metavar="DIR", help="DSpark drafter folder (DeepSpec layout); none: target only")
    gen.add_argument("--prompt", required=True, action="append", help="a prompt (repeat for a batch)")
    gen.add_argument("--policy", default="fixed", choices=["fixed", "threshold", "hardware-aware", "async"],
                     help="how many drafts each request verifies (default: fixed)")
    gen.add_argument("--gamma", type=int, help="drafts per round (default: the drafter's block size)")
    gen.add_argument("--verify", type=int, help="fixed policy: drafts verified per round (default: gamma)")
    gen.add_argument("--threshold", type=float, default=0.5, help="threshold policy: confidence cut (default 0.5)")
    gen.add_argument("--sps", metavar="PATH", help="hardware-aware policies: an SPSTable JSON (default: profile now)")
    gen.add_argument("--max-new-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--top-k", type=int, default=0, help="keep the k most probable tokens (0: off)")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus: the smallest set reaching this mass (1: off)")
    gen.add_argument("--min-p", type=float, default=0.0, help="keep p >= min_p * max p (0: off)")
    gen.add_argument("--max-concurrency", type=int, default=16)
    gen.add_argument("--chat", action="store_true", help="wrap each prompt in the model's chat template")
    gen.add_argument("--ignore-eos", action="store_true", help="do not stop at the model's end-of-sequence tokens")
    gen.add_argument("--dtype", default="auto", choices=["auto"] + sorted(_DTYPES),
                     help="model dtype (auto: bfloat16 where the CPU multiplies it natively and it measures faster "
                          "here, else float32; bfloat16 on CUDA)")
    gen.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when usable")
    gen.add_argument("--no-progress", action="store_true", help="no progress bar")
    gen.add_argument("--json", metavar="PATH", help="also write tokens and metrics as JSON")
    gen.set_defaults(func=_generate)
    tr = sub.add_parser("train", help="train a DSpark drafter (default target: SmolLM2-135M-Instruct)")
    tr.add_argument("--target", metavar="DIR", help="target folder (default: SmolLM2-135M-Instruct, converted)")
    tr.add_argument("--out", required=True, metavar="DIR", help="where the drafter is written")
    tr.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when usable")
    tr.add_argument("--no-progress", action="store_true")
    add_train_arguments(tr)
    tr.set_defaults(func=_train)
    dm = sub.add_parser("demo", help="plain vs speculative decoding on SmolLM2-135M-Instruct (the main command)")
    dm.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when usable")
    dm.add_argument("--target", metavar="DIR", help="another target folder (default: SmolLM2-135M-Instruct)")
    dm.add_argument("--draft", metavar="DIR", help="another drafter folder (default: the shipped one)")
    dm.add_argument("--max-new-tokens", type=int, default=64, help="per request (default %(default)s)")
    dm.add_argument("--repeats", type=int, default=3, help="timed runs of each configuration (default %(default)s)")
    dm.add_argument("--dtype", default="auto", choices=["auto"] + sorted(_DTYPES),
                    help="model dtype (auto: the device's fast dtype, measured on the CPU)")
    dm.add_argument("--plot", default="dspark-demo.png",
                    help="PNG: tokens/s against batch size, acceptance by position ('' for none)")
    dm.add_argument("--no-progress", action="store_true")
    dm.set_defaults(func=_demo)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
