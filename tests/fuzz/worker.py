"""The fuzz child: reads ``{"target", "seed"}`` lines on stdin, runs each case,
answers ``{"outcome", "detail"}`` on its own copy of stdout. Everything else
the process prints (C++ or Python) goes to stderr, which the parent keeps for
crash reports.

The address space is limited (DSPARK_FUZZ_MEMORY_MB, default 8192), so an
input that makes the library allocate far more than it holds fails as a
MemoryError or RuntimeError instead of exhausting the machine."""

from __future__ import annotations

import json
import os
import sys
import traceback


def main() -> None:
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # stray prints (Python or C++) go to stderr
    sys.stdout = sys.stderr
    import resource

    limit_mb = int(os.environ.get("DSPARK_FUZZ_MEMORY_MB", "8192"))
    if limit_mb > 0 and not os.environ.get("LD_PRELOAD"):  # sanitizers reserve terabytes of address space
        resource.setrlimit(resource.RLIMIT_AS, (limit_mb << 20, limit_mb << 20))

    from fuzz import targets

    protocol.write(json.dumps({"ready": True}) + "\n")
    for line in sys.stdin:
        request = json.loads(line)
        outcome, detail = targets.run_case(request["target"], int(request["seed"]))
        protocol.write(json.dumps({"outcome": outcome, "detail": detail}) + "\n")


if __name__ == "__main__":
    try:
        main()
    except Exception:
        traceback.print_exc()
        raise
