"""Writes the one summary of bench/gpu_check.sh: per op, the CUDA tests
passed / failed, the compute-sanitizer result and the headline benchmark
rows (time, bytes, fraction of the measured copy bandwidth); then the engine
and demo rows. Reads what the stages left in the work folder; a stage that did
not run (or was cut short) shows as such.

    python bench/gpu_summary.py WORK_DIR > summary.txt
"""

from __future__ import annotations

import json
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Dict, List, Optional

# Test files and benchmark name prefixes of each op family.
OPS = {
    "rejection_sample": (("test_rejection_cuda.py", "test_rejection_sample.py", "test_rejection_exactness.py"),
                         "rejection_sample/"),
    "markov_sample": (("test_markov_sample.py",), "markov_sample/"),
    "paged_attention": (("test_attention.py",), "paged_attention/"),
    "schedule_prefix": (("test_schedule_prefix.py",), "schedule_prefix/"),
    "engine": (("test_engine_cuda.py", "test_train_cuda.py"), None),
}
# Benchmark rows worth a line each (regular expressions on the benchmark name).
HEADLINE = [
    r"rejection_sample/cuda/logits/bfloat16/R=(1|64|512)/n=7/V=151936/",
    r"markov_sample/cuda/R=(1|16|128|512)/gamma=7/V=151936/r=256/",
    r"markov_sample/cuda/(gated|rnn)/R=(16|512)/",
    r"paged_attention/cuda/.*",
    r"schedule_prefix/cuda/R=(64|256|1024)/gamma=(7|16)/",
]


def op_of_test(classname: str, file: str) -> Optional[str]:
    name = Path(file or classname.replace(".", "/")).name
    for op, (files, _) in OPS.items():
        if any(name.startswith(f.removesuffix(".py")) for f in files):
            return op
    return "other"


def tests(work: Path) -> Dict[str, Dict[str, int]]:
    counts: Dict[str, Dict[str, int]] = {}
    xml = work / "pytest_cuda.xml"
    if not xml.is_file():
        return counts
    try:
        root = ET.parse(xml).getroot()
    except ET.ParseError:
        return counts
    for case in root.iter("testcase"):
        op = op_of_test(case.get("classname", ""), case.get("file", ""))
        c = counts.setdefault(op, {"passed": 0, "failed": 0, "skipped": 0})
        if case.find("failure") is not None or case.find("error") is not None:
            c["failed"] += 1
        elif case.find("skipped") is not None:
            c["skipped"] += 1
        else:
            c["passed"] += 1
    return counts


def failures(work: Path, limit: int = 12) -> List[str]:
    xml = work / "pytest_cuda.xml"
    if not xml.is_file():
        return []
    try:
        root = ET.parse(xml).getroot()
    except ET.ParseError:
        return ["(pytest_cuda.xml is incomplete: the stage was cut short)"]
    out = []
    for case in root.iter("testcase"):
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        if bad is not None:
            message = (bad.get("message") or "").splitlines()[0][:160] if bad.get("message") else ""
            out.append(f"  {case.get('classname')}::{case.get('name')}: {message}")
    return out[:limit] + ([f"  ... and {len(out) - limit} more"] if len(out) > limit else [])


def memcheck(work: Path, op: str) -> str:
    log = work / f"memcheck_{op}.log"
    if not log.is_file():
        return "not run"
    text = log.read_text(errors="replace")
    errors = re.findall(r"ERROR SUMMARY: (\d+) error", text)
    result = re.findall(r"=+ .*?(\d+ (?:passed|failed).*?) in [\d.]+s", text)
    if not errors:
        return "no summary (cut short or did not start)" + (f"; pytest: {result[-1]}" if result else "")
    return f"{errors[-1]} errors" + (f"; pytest: {result[-1]}" if result else "")


def bench_rows(work: Path) -> List[dict]:
    path = work / "bench_cpp.json"
    if not path.is_file():
        return []
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError:
        return []
    return [b for b in data.get("benchmarks", []) if b.get("run_type", "iteration") == "iteration"]


def format_bench(b: dict) -> str:
    unit = b.get("time_unit", "us")
    name = b["name"].replace("/manual_time", "").replace("/real_time", "")
    return (f"    {name:72} {b.get('real_time', 0):9.2f} {unit}  {b.get('MB', 0):9.1f} MB  "
            f"{b.get('GB_per_s', 0):7.1f} GB/s  {b.get('frac_of_copy', 0):5.2f} of copy")


def stage_lines(work: Path) -> List[str]:
    path = work / "stages.txt"
    return path.read_text().splitlines() if path.is_file() else []


def main(work: Path) -> None:
    head = work / "head.txt"
    if head.is_file():
        print(head.read_text().rstrip())
    print("\n== stages (rc 0 = passed; 124 = stopped at its time limit)")
    for line in stage_lines(work):
        print("  " + line)
    counts = tests(work)
    rows = bench_rows(work)
    print("\n== per op: CUDA tests (passed / failed / skipped), compute-sanitizer memcheck, headline benchmarks")
    for op, (_, prefix) in OPS.items():
        c = counts.get(op)
        t = f"{c['passed']} / {c['failed']} / {c['skipped']}" if c else "not run"
        print(f"{op:18} tests {t:14} memcheck: {memcheck(work, op) if prefix else '-'}")
        if prefix:
            picked = [b for b in rows if b["name"].startswith(prefix) and
                      any(re.match(h, b["name"]) for h in HEADLINE)]
            for b in picked:
                print(format_bench(b))
            if not picked:
                print("    (no benchmark rows)")
    if "other" in counts:
        c = counts["other"]
        print(f"{'other':18} tests {c['passed']} / {c['failed']} / {c['skipped']}")
    bad = failures(work)
    if bad:
        print("\nfailed tests:")
        print("\n".join(bad))
    for name, title, lines in (("bench_engine.log", "python -m dspark bench engine --device cuda", 40),
                               ("demo.log", "python -m dspark demo --device cuda", 30),
                               ("bench_sampling.log", "python -m dspark bench sampling --device cuda", 16)):
        path = work / name
        print(f"\n== {title}")
        print("\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.is_file() else "(not run)")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
