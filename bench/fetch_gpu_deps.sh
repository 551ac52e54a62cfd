#!/usr/bin/env bash
# Downloads what bench/gpu_check.sh needs that a lent GPU machine lacks (it
# reaches no package registry): Debian's Google Benchmark packages, into
# .deps/ (ignored by git). Run on a machine with apt, then carry .deps.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .deps
cd .deps
rm -f ./*.deb
apt-get download libbenchmark-dev libbenchmark1debian >/dev/null
ls -1 ./*.deb
