"""The fuzz suite under pytest: a bounded budget of random and hostile cases
per target, each in a child process with a timeout (tests/fuzz/harness.py).

DSPARK_FUZZ_SECONDS sets the total budget (default 60 s, shared by the
targets; 0 skips the suite), DSPARK_FUZZ_SEED the first case seed (default 0,
so a run is reproducible). ``python tests/fuzz/run.py`` runs it longer.
"""

from __future__ import annotations

import os

import pytest

from fuzz import harness, targets

SECONDS = float(os.environ.get("DSPARK_FUZZ_SECONDS", "60"))
SEED = int(os.environ.get("DSPARK_FUZZ_SEED", "0"))

pytestmark = pytest.mark.skipif(SECONDS <= 0, reason="DSPARK_FUZZ_SECONDS=0")


@pytest.fixture(scope="module")
def worker():
    w = harness.Worker()
    yield w
    w.close()


@pytest.mark.parametrize("target", targets.names())
def test_fuzz(worker, target):
    tally = harness.run_budget([target], SECONDS / len(targets.TARGETS), SEED, worker=worker)
    print(f"\n{tally.table()}")
    assert not tally.bad, tally.report()


def test_the_harness_reports_crashes_hangs_and_failures(worker):
    """A case that aborts, one that never answers and one that breaks a rule
    are reported as such, with a reproducer, and the next case still runs."""
    crash = worker.run("_crash", 1)
    assert crash.outcome == harness.CRASH and "SIGABRT" in crash.detail
    hang = worker.run("_hang", 2, timeout=3)
    assert hang.outcome == harness.HANG
    failure = worker.run("_fail", 3)
    assert failure.outcome == harness.FAILURE and "on purpose" in failure.detail
    assert failure.reproducer() == "python tests/fuzz/run.py --repro _fail:3"
    assert worker.run("schedule_prefix", 4).outcome in (harness.SUCCESS, harness.CLEAN_ERROR)
