"""Runs fuzz cases in a child process, one at a time, each with a timeout.

A case is (target, seed): the target regenerates its inputs from the seed, so
the pair is the reproducer. The child (``python -m fuzz.worker``) imports
torch and dspark once and runs cases until one kills it or hangs; then it is
replaced. Outcomes:

    success      valid input: ran, and the result matched the reference
    clean_error  invalid input: the documented exception, naming the argument
    failure      anything else the target checks (a wrong result, a missing or
                 unexpected exception, a message that does not name the argument)
    crash        the child died (a signal: segfault, abort, sanitizer report)
    hang         no answer within the timeout
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional

SUCCESS, CLEAN_ERROR, FAILURE, CRASH, HANG = "success", "clean_error", "failure", "crash", "hang"
OUTCOMES = (SUCCESS, CLEAN_ERROR, FAILURE, CRASH, HANG)
BAD = (FAILURE, CRASH, HANG)

TESTS_DIR = Path(__file__).resolve().parent.parent

# Per-case timeouts (seconds): generous, so that a loaded machine does not
# report a hang; a real hang (a FIFO read, a 10**6-layer model) never ends.
TIMEOUTS = {"engine": 120.0, "target_loader": 90.0, "drafter_loader": 90.0}
DEFAULT_TIMEOUT = 60.0


@dataclass
class Result:
    target: str
    seed: int
    outcome: str
    detail: str = ""
    seconds: float = 0.0

    def reproducer(self) -> str:
        return f"python tests/fuzz/run.py --repro {self.target}:{self.seed}"


@dataclass
class Tally:
    counts: Dict[str, Dict[str, int]] = field(default_factory=dict)
    bad: List[Result] = field(default_factory=list)

    def add(self, result: Result) -> None:
        row = self.counts.setdefault(result.target, {o: 0 for o in OUTCOMES})
        row[result.outcome] += 1
        if result.outcome in BAD:
            self.bad.append(result)

    def table(self) -> str:
        lines = [f"{'target':<18}{'inputs':>8}" + "".join(f"{o:>13}" for o in OUTCOMES)]
        total = {o: 0 for o in OUTCOMES}
        for target, row in sorted(self.counts.items()):
            lines.append(f"{target:<18}{sum(row.values()):>8}" + "".join(f"{row[o]:>13}" for o in OUTCOMES))
            for o in OUTCOMES:
                total[o] += row[o]
        lines.append(f"{'all':<18}{sum(total.values()):>8}" + "".join(f"{total[o]:>13}" for o in OUTCOMES))
        return "\n".join(lines)

    def report(self) -> str:
        text = [self.table()]
        for result in self.bad[:20]:
            text.append(f"\n{result.outcome.upper()} {result.target} seed {result.seed} ({result.seconds:.1f} s): "
                        f"{result.detail.strip()[-3000:]}\n  reproduce: {result.reproducer()}")
        if len(self.bad) > 20:
            text.append(f"\n... and {len(self.bad) - 20} more")
        return "\n".join(text)


def _child_env() -> Dict[str, str]:
    """The child imports dspark from where this process does, and fuzz from tests/."""
    import dspark

    package_parent = str(Path(dspark.__file__).resolve().parent.parent)
    env = dict(os.environ)
    paths = [str(TESTS_DIR), package_parent] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env.setdefault("DSPARK_NUM_THREADS", "2")
    return env


class Worker:
    """One child process running cases; replaced after a crash or a hang."""

    def __init__(self) -> None:
        self.proc: Optional[subprocess.Popen] = None
        self.stderr = tempfile.TemporaryFile()

    def _start(self) -> None:
        self.stderr.seek(0)
        self.stderr.truncate()
        self.proc = subprocess.Popen([sys.executable, "-m", "fuzz.worker"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.stderr, env=_child_env(),
                                     cwd=str(TESTS_DIR), start_new_session=True)
        line = self._read_line(300.0)
        if line is None or json.loads(line).get("ready") is not True:
            detail = self._stderr_tail()
            self.close()
            raise RuntimeError(f"the fuzz worker did not start: {detail}")

    def _read_line(self, timeout: float) -> Optional[str]:
        assert self.proc is not None and self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        chunks = b""
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                return ""  # EOF: the child died
            chunks += chunk
            if chunks.endswith(b"\n"):
                return chunks.decode()

    def _stderr_tail(self, limit: int = 4000) -> str:
        self.stderr.flush()
        self.stderr.seek(0, os.SEEK_END)
        size = self.stderr.tell()
        self.stderr.seek(max(0, size - limit))
        return self.stderr.read().decode(errors="replace")

    def run(self, target: str, seed: int, timeout: Optional[float] = None) -> Result:
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        assert self.proc is not None and self.proc.stdin is not None
        timeout = timeout if timeout is not None else TIMEOUTS.get(target, DEFAULT_TIMEOUT)
        start = time.monotonic()
        try:
            self.proc.stdin.write((json.dumps({"target": target, "seed": seed}) + "\n").encode())
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass
        line = self._read_line(timeout)
        seconds = time.monotonic() - start
        if line is None:
            tail = self._stderr_tail()
            self.close()
            return Result(target, seed, HANG, f"no result within {timeout:.0f} s\n{tail}", seconds)
        if line == "":
            code = self.proc.wait()
            how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"
            tail = self._stderr_tail()
            self.close()
            return Result(target, seed, CRASH, f"the child died ({how})\n{tail}", seconds)
        answer = json.loads(line)
        return Result(target, seed, answer["outcome"], answer.get("detail", ""), seconds)

    def close(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self.proc.wait()
            for stream in (self.proc.stdin, self.proc.stdout):
                if stream is not None:
                    stream.close()
            self.proc = None


def case_seeds(target: str, base: int) -> Iterator[int]:
    """The seeds of one target's cases: base, base + 1, ... (each case derives
    its random choices from (target, seed), so targets draw independently)."""
    seed = base
    while True:
        yield seed
        seed += 1


def run_budget(targets: List[str], seconds: float, base_seed: int, worker: Optional[Worker] = None,
               on_result=None) -> Tally:
    """Runs each target for an equal share of ``seconds`` (at least one case each)."""
    tally = Tally()
    own = worker is None
    worker = worker or Worker()
    try:
        share = seconds / max(len(targets), 1)
        for target in targets:
            end = time.monotonic() + share
            for seed in case_seeds(target, base_seed):
                result = worker.run(target, seed)
                tally.add(result)
                if on_result is not None:
                    on_result(result)
                if time.monotonic() >= end:
                    break
    finally:
        if own:
            worker.close()
    return tally
