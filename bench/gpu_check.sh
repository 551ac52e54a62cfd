#!/usr/bin/env bash
# The project's one GPU check, for a machine with an NVIDIA GPU, nvcc, CMake,
# ninja, PyTorch, pybind11, pytest and scipy, and no network.
#
#   bash bench/fetch_gpu_deps.sh        # once, where apt and pip work (fills .deps/)
#   OUT=/some/dir bash bench/gpu_check.sh
#
# Stages, most informative first, each with a time limit, so that the whole
# run (build included) ends within 10 minutes on a 16-core H200 machine; a
# stage that fails is reported and the next one still runs, and stages that
# would pass the deadline are skipped:
#   1. build the extension against the installed PyTorch (in place);
#   2. every CUDA test (pytest -m cuda), results per op;
#   3. the C++ microbenchmarks' headline shapes (Google Benchmark from .deps);
#   4. compute-sanitizer memcheck over a few CUDA tests of each op;
#   5. python -m dspark bench engine --device cuda (synthetic models);
#   6. python -m dspark demo --device cuda, when the SmolLM2 GGUF is here
#      (.deps/smollm2/*.gguf, or parts *.gguf.part-* that are joined: the file
#      is 93 MB, more than one device call carries, so fetch_gpu_deps.sh splits
#      it and each part travels in its own call of one lease) and the gguf
#      wheel is in .deps/wheels;
#   7. python -m dspark bench sampling --device cuda.
# $OUT receives summary.txt (per op: tests passed / failed, sanitizer result,
# benchmark rows with time, bytes and fraction of the measured copy
# bandwidth; then the engine and demo rows), rewritten after every stage, and
# logs.tar.gz with every stage's log. REHEARSE=1 goes on without a usable GPU
# (to rehearse the script itself on a CPU machine).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
OUT="${OUT:-$ROOT/gpu-check-out}"
WORK="${WORK:-$(mktemp -d /tmp/dspark-gpu-check.XXXXXX)}"
LOGS="$WORK/logs"  # everything the summary reads; logs.tar.gz packs this folder only
mkdir -p "$OUT" "$LOGS"
export PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
ARCHS="${DSPARK_CUDA_ARCHS:-90}"
JOBS="$(nproc)"
CMAKE="$(dirname "$(command -v "$PY")")/cmake"
[ -x "$CMAKE" ] || CMAKE=cmake
DEADLINE="${DEADLINE:-560}"  # seconds: later stages are skipped rather than pass 10 minutes
: >"$LOGS/stages.txt"

summarise() {
  "$PY" bench/gpu_summary.py "$LOGS" >"$OUT/summary.txt" 2>&1
  tar -czf "$OUT/logs.tar.gz" -C "$LOGS" . 2>/dev/null
}

stage() {  # stage NAME SECONDS COMMAND...
  local name="$1" limit="$2"
  shift 2
  local left=$((DEADLINE - SECONDS))
  if [ "$left" -le 15 ]; then
    printf '%-22s skipped: the %ss deadline is reached\n' "$name" "$DEADLINE" >>"$LOGS/stages.txt"
    summarise
    return 124
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  local start=$SECONDS
  timeout --kill-after=10 "$limit" "$@" >"$LOGS/$name.log" 2>&1
  local rc=$?
  printf '%-22s rc=%-3s %4ss of %ss  (log: %s.log)\n' "$name" "$rc" "$((SECONDS - start))" "$limit" "$name" \
    | tee -a "$LOGS/stages.txt"
  summarise
  return $rc
}

{
  echo "== dspark GPU check, $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv,noheader 2>&1
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" 2>&1
  echo "cores: $JOBS"
} >"$LOGS/head.txt"
cat "$LOGS/head.txt"

# Wheels that travel in .deps/wheels (gguf for the demo's conversion).
if ls .deps/wheels/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$WORK/site" .deps/wheels/*.whl \
    && export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
fi

# 1. The extension, compiled for this GPU, installed in place.
stage build 150 env DSPARK_CUDA=on DSPARK_CUDA_ARCHS="$ARCHS" CMAKE_BUILD_PARALLEL_LEVEL="$JOBS" \
  "$PY" -m pip install --no-build-isolation --no-deps -v -e . || { tail -40 "$LOGS/build.log"; exit 1; }
{
  grep -m1 "dspark: building backends" "$LOGS/build.log"
  "$PY" -c "import dspark, json; print('backends:', json.dumps(dspark.backends()['cuda']))" 2>&1
} >>"$LOGS/head.txt"
"$PY" -c "import dspark,sys; sys.exit(0 if dspark.backends()['cuda']['usable'] else 1)" || [ -n "${REHEARSE:-}" ] \
  || { summarise; cat "$OUT/summary.txt"; exit 1; }

# 2. Every CUDA test, with per-test results for the summary.
stage pytest_cuda 170 "$PY" -m pytest -q -m cuda tests -rfE -p no:cacheprovider --junitxml="$LOGS/pytest_cuda.xml"

# 3. C++ microbenchmarks of the headline shapes (Google Benchmark from .deps, see fetch_gpu_deps.sh).
if ls .deps/libbenchmark-dev_*.deb >/dev/null 2>&1; then
  rm -rf "$WORK/deb" && mkdir -p "$WORK/deb"
  for deb in .deps/*.deb; do dpkg -x "$deb" "$WORK/deb"; done
  export LD_LIBRARY_PATH="$WORK/deb/usr/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}"
  stage bench_build 90 bash -c "'$CMAKE' -S . -B build-gpu -G Ninja -DDSPARK_CUDA=on -DDSPARK_CUDA_ARCHS='$ARCHS' \
      -DDSPARK_BUILD_BENCHMARKS=on -Dbenchmark_DIR='$WORK/deb/usr/lib/x86_64-linux-gnu/cmake/benchmark' \
      && '$CMAKE' --build build-gpu -j '$JOBS' --target dspark_bench dspark_cpp_tests"
  stage cpp_tests 20 ./build-gpu/dspark_cpp_tests
  FILTER='^(rejection_sample/cuda/logits/bfloat16/R=(1|8|64|256|512)/n=(1|5|7|16)/V=(32000|151936)'
  FILTER+='|schedule_prefix/cuda|markov_sample/cuda/R=(1|16|128|512)/gamma=7/V=(49152|151936)/r=256'
  FILTER+='|markov_sample/cuda/(gated|rnn)/|paged_attention/cuda)'
  stage bench_cpp 100 ./build-gpu/dspark_bench --dspark_backends=cuda --benchmark_min_time=0.05 \
    --benchmark_filter="$FILTER" --benchmark_out="$LOGS/bench_cpp.json" --benchmark_out_format=json
else
  echo "bench_cpp              skipped: no .deps/libbenchmark-dev_*.deb (run bench/fetch_gpu_deps.sh, carry .deps)" \
    | tee -a "$LOGS/stages.txt"
fi

# 4. compute-sanitizer memcheck over a few CUDA tests per op (the tool slows
#    kernels down by orders of magnitude: small shapes only).
SAN="$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)"
memcheck() {  # memcheck OP SECONDS PYTEST-ARGS...
  local op="$1" limit="$2"
  shift 2
  stage "memcheck_$op" "$limit" "$SAN" --tool memcheck --error-exitcode 3 --target-processes all \
    "$PY" -m pytest -q -p no:cacheprovider "$@"
}
memcheck rejection_sample 45 tests/test_rejection_cuda.py -k "equals_cpu and (4099 or 2048 or -7-) or unaligned or graph or out_of_range"
memcheck markov_sample 45 tests/test_markov_sample.py -m cuda -k "(1000-32-20 or 3001-40-37) or graph"
memcheck paged_attention 60 tests/test_attention.py -m cuda -k "16-bfloat16-64-8-2 or 64-float32-64-4-4 or graph \
  or (large_head_dims and bfloat16 and 512 and 32-4 and causal-100) or (never_reads and 512)"
memcheck schedule_prefix 40 tests/test_schedule_prefix.py -m cuda -k "not 16384 and not many_ties"

# 5. The engine, target only against speculative decoding, on synthetic models.
stage bench_engine 70 "$PY" -m dspark bench engine --quick --device cuda --json "$LOGS/bench_engine.json"

# 6. The demo on SmolLM2-135M-Instruct, when its GGUF travelled.
GGUF="$(ls .deps/smollm2/*.gguf 2>/dev/null | head -1)"
if [ -z "$GGUF" ] && ls .deps/smollm2/*.gguf.part-* >/dev/null 2>&1; then
  first="$(ls .deps/smollm2/*.gguf.part-* | head -1)"
  GGUF="$WORK/${first##*/}"
  GGUF="${GGUF%.part-*}"
  cat .deps/smollm2/*.gguf.part-* >"$GGUF"
fi
if [ -n "$GGUF" ]; then
  stage demo 150 env DSPARK_SMOLLM2_GGUF="$GGUF" DSPARK_CACHE="$WORK/cache" "$PY" -m dspark demo --device cuda \
    --no-progress --plot ''
else
  echo "demo                   skipped: no SmolLM2 GGUF in .deps/smollm2 (see the header of this script)" \
    | tee -a "$LOGS/stages.txt"
fi
stage bench_sampling 40 "$PY" -m dspark bench sampling --device cuda --json "$LOGS/bench_sampling.json"

summarise
cat "$OUT/summary.txt"
echo "(summary: $OUT/summary.txt; logs: $OUT/logs.tar.gz)"
