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
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional


def _info(_: argparse.Namespace) -> int:
    import dspark

    print(json.dumps({"version": dspark.__version__, "backends": dspark.backends()}, indent=2))
    return 0


def _bench(args: argparse.Namespace) -> int:
    from . import bench

    return bench.run(args.suite, quick=args.quick, json_path=args.json, devices=args.device)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dspark", description="dspark: DSpark speculative decoding kernels")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="backends compiled into this build and usable now")
    info.set_defaults(func=_info)
    bench = sub.add_parser("bench", help="benchmarks that print tables")
    bench.add_argument("suite", choices=["sampling", "markov", "scheduler", "attention"], help="which op family")
    bench.add_argument("--quick", action="store_true", help="a few small shapes (smoke test)")
    bench.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    bench.add_argument("--device", action="append", choices=["cpu", "cuda"],
                       help="backends to time (default: cpu, and cuda when usable)")
    bench.set_defaults(func=_bench)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
