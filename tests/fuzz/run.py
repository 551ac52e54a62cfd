"""Runs the fuzz suite from the command line.

    python tests/fuzz/run.py --seconds 900                 # a long run over every target
    python tests/fuzz/run.py --seconds 60 --target engine  # one target
    python tests/fuzz/run.py --repro rejection_sample:1234 # one case, in this process

Each case runs in a child process with a timeout (tests/fuzz/harness.py);
the summary counts inputs tried and outcomes per target, and every failure,
crash or hang comes with the command that reproduces it. The exit status is 1
when any case was bad.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/: the fuzz package

from fuzz import harness  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=float(os.environ.get("DSPARK_FUZZ_SECONDS", 90)),
                        help="total time budget, shared equally by the targets")
    parser.add_argument("--seed", type=int, default=None,
                        help="first case seed (default: DSPARK_FUZZ_SEED, else the time)")
    parser.add_argument("--target", action="append", help="a target to run (repeatable; default: all)")
    parser.add_argument("--repro", help="TARGET:SEED: run one case in this process and print its outcome")
    parser.add_argument("--verbose", action="store_true", help="print every case")
    args = parser.parse_args(argv)
    if args.repro:
        from fuzz import targets

        name, seed = args.repro.rsplit(":", 1)
        outcome, detail = targets.run_case(name, int(seed))
        print(f"{name}:{seed}: {outcome}\n{detail}")
        return 0 if outcome in (harness.SUCCESS, harness.CLEAN_ERROR) else 1
    from fuzz import targets

    names = args.target or targets.names()
    unknown = [n for n in names if n not in targets.TARGETS]
    if unknown:
        parser.error(f"unknown targets {unknown}; known: {targets.names()}")
    seed = args.seed if args.seed is not None else int(os.environ.get("DSPARK_FUZZ_SEED", int(time.time())))
    print(f"fuzzing {', '.join(names)} for {args.seconds:.0f} s from seed {seed}", flush=True)
    start = time.monotonic()

    def show(result: harness.Result) -> None:
        if args.verbose or result.outcome in harness.BAD:
            print(f"{result.target}:{result.seed} {result.outcome} ({result.seconds:.2f} s)"
                  + (f" {result.detail.strip()[:300]}" if result.outcome in harness.BAD else ""), flush=True)

    tally = harness.run_budget(names, args.seconds, seed, on_result=show)
    print(f"\n{tally.report()}\n\n{time.monotonic() - start:.0f} s")
    return 1 if tally.bad else 0


if __name__ == "__main__":
    sys.exit(main())
