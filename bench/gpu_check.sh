#!/usr/bin/env bash
# The project's one GPU check, for a machine with an NVIDIA GPU, nvcc, CMake,
# ninja, PyTorch, pybind11, pytest and scipy, and no network.
#
#   bash bench/fetch_gpu_deps.sh        # once, where apt works (fills .deps/)
#   OUT=/some/dir bash bench/gpu_check.sh
#
# Builds the extension against the installed PyTorch, runs every CUDA test,
# runs compute-sanitizer (memcheck) over the CUDA tests of each op, runs the
# C++ microbenchmarks and `python -m dspark bench`, and writes logs and a
# summary to $OUT. Each stage has a time limit so the whole run stays under
# 8 minutes; a failing stage is reported and the next one still runs.
# REHEARSE=1 goes on without a usable GPU (to rehearse the script itself).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu-check-out}"
mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"
export PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
ARCHS="${DSPARK_CUDA_ARCHS:-90}"
JOBS="$(nproc)"
CMAKE="$(dirname "$(command -v "$PY")")/cmake"
[ -x "$CMAKE" ] || CMAKE=cmake

note() { echo "$*" | tee -a "$SUMMARY"; }

DEADLINE="${DEADLINE:-460}"  # seconds: later stages are skipped rather than overrun 8 minutes

stage() {  # stage NAME SECONDS COMMAND...
  local name="$1" limit="$2"
  shift 2
  local left=$((DEADLINE - SECONDS))
  if [ "$left" -le 10 ]; then
    note "$(printf '%-22s skipped: the %ss deadline is reached' "$name" "$DEADLINE")"
    return 124
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  local start=$SECONDS
  timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  note "$(printf '%-22s rc=%-3s %4ss  (log: %s.log)' "$name" "$rc" "$((SECONDS - start))" "$name")"
  return $rc
}

note "== dspark GPU check, $(date -u +%Y-%m-%dT%H:%M:%SZ)"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv,noheader 2>&1 | tee -a "$SUMMARY"
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" 2>&1 | tee -a "$SUMMARY"

# 1. The extension, compiled for this GPU, installed in place.
stage build 240 env DSPARK_CUDA=on DSPARK_CUDA_ARCHS="$ARCHS" CMAKE_BUILD_PARALLEL_LEVEL="$JOBS" \
  "$PY" -m pip install --no-build-isolation --no-deps -v -e . || { tail -40 "$OUT/build.log"; exit 1; }
grep -m1 "dspark: building backends" "$OUT/build.log" | tee -a "$SUMMARY"
"$PY" -m dspark info >"$OUT/info.json" 2>&1
"$PY" -c "import dspark,sys; b=dspark.backends()['cuda']; print('cuda usable:', b['usable'], b['reason']); sys.exit(0 if b['usable'] else 1)" \
  2>&1 | tee -a "$SUMMARY" || [ -n "${REHEARSE:-}" ] || exit 1

# 2. Every CUDA test, then the whole suite.
stage pytest_cuda 150 "$PY" -m pytest -q -m cuda tests -rs
tail -3 "$OUT/pytest_cuda.log" | tee -a "$SUMMARY"

# 3. compute-sanitizer memcheck over each op's CUDA tests (a small subset of
#    shapes: the tool slows kernels down by orders of magnitude).
SAN="$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)"
stage memcheck_rejection 90 "$SAN" --tool memcheck --error-exitcode 3 --target-processes all \
  "$PY" -m pytest -q -x tests/test_rejection_cuda.py -k "equals_cpu and (4099 or 2048 or -7-) or unaligned or graph or out_of_range"
grep -E "ERROR SUMMARY|passed|failed" "$OUT/memcheck_rejection.log" | tail -3 | tee -a "$SUMMARY"
stage memcheck_markov 90 "$SAN" --tool memcheck --error-exitcode 3 --target-processes all \
  "$PY" -m pytest -q -x tests/test_markov_sample.py -m cuda -k "1000 or graph"
grep -E "ERROR SUMMARY|passed|failed" "$OUT/memcheck_markov.log" | tail -3 | tee -a "$SUMMARY"
stage memcheck_attention 90 "$SAN" --tool memcheck --error-exitcode 3 --target-processes all \
  "$PY" -m pytest -q -x tests/test_attention.py -m cuda -k "(bfloat16 and 64-8-2 and 16) or float32-64-64-4-4 or graph"
grep -E "ERROR SUMMARY|passed|failed" "$OUT/memcheck_attention.log" | tail -3 | tee -a "$SUMMARY"
stage memcheck_schedule 60 "$SAN" --tool memcheck --error-exitcode 3 --target-processes all \
  "$PY" -m pytest -q -x tests/test_schedule_prefix.py -m cuda -k "not 16384"
grep -E "ERROR SUMMARY|passed|failed" "$OUT/memcheck_schedule.log" | tail -3 | tee -a "$SUMMARY"

# 4. C++ microbenchmarks (Google Benchmark from .deps, see fetch_gpu_deps.sh).
if ls .deps/libbenchmark-dev_*.deb >/dev/null 2>&1; then
  rm -rf .deps/root && mkdir -p .deps/root
  for deb in .deps/*.deb; do dpkg -x "$deb" .deps/root; done
  export LD_LIBRARY_PATH="$PWD/.deps/root/usr/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}"
  stage bench_build 120 bash -c "'$CMAKE' -S . -B build-gpu -G Ninja -DDSPARK_CUDA=on -DDSPARK_CUDA_ARCHS='$ARCHS' \
      -DDSPARK_BUILD_BENCHMARKS=on -Dbenchmark_DIR='$PWD/.deps/root/usr/lib/x86_64-linux-gnu/cmake/benchmark' \
      && '$CMAKE' --build build-gpu -j '$JOBS' --target dspark_bench dspark_cpp_tests"
  stage cpp_tests 30 ./build-gpu/dspark_cpp_tests
  # The headline shapes of each op (the full grid is --dspark_grid=full without a filter).
  FILTER='^(rejection_sample/cuda/logits/bfloat16/R=(1|8|64|256|512)/n=(1|5|7|16)/V=(32000|151936)'
  FILTER+='|schedule_prefix/cuda|markov_sample/cuda/R=(1|16|128|512)/gamma=7/V=(49152|151936)/r=256'
  FILTER+='|paged_attention/cuda)'
  stage bench_cpp 100 ./build-gpu/dspark_bench --dspark_backends=cuda --benchmark_min_time=0.05 \
    --benchmark_filter="$FILTER" \
    --benchmark_out="$OUT/bench_cpp.json" --benchmark_out_format=json
  grep -E "^dspark_bench|(rejection_sample|schedule_prefix|markov_sample|paged_attention)/cuda" "$OUT/bench_cpp.log" | sed -E 's/ +/ /g' >"$OUT/bench_cpp_table.txt"
else
  note "bench_cpp skipped: no .deps/libbenchmark-dev_*.deb (run bench/fetch_gpu_deps.sh and carry .deps)"
fi

# 5. Python-side benchmark (CUDA vs eager PyTorch on the same device).
stage bench_py 60 "$PY" -m dspark bench sampling --device cuda --json "$OUT/bench_sampling.json"
stage bench_py_scheduler 30 "$PY" -m dspark bench scheduler --device cuda --quick --json "$OUT/bench_scheduler.json"
stage bench_py_markov 60 "$PY" -m dspark bench markov --device cuda --json "$OUT/bench_markov.json"
stage bench_py_attention 60 "$PY" -m dspark bench attention --device cuda --json "$OUT/bench_attention.json"
stage bench_py_engine 90 "$PY" -m dspark bench engine --quick --device cuda --json "$OUT/bench_engine.json"

note "== results"
cat "$OUT/bench_py.log" 2>/dev/null | tail -14 | tee -a "$SUMMARY"
head -8 "$OUT/bench_py_scheduler.log" 2>/dev/null | tee -a "$SUMMARY"
tail -20 "$OUT/bench_py_markov.log" 2>/dev/null | tee -a "$SUMMARY"
tail -40 "$OUT/bench_py_attention.log" 2>/dev/null | tee -a "$SUMMARY"
tail -16 "$OUT/bench_py_engine.log" 2>/dev/null | tee -a "$SUMMARY"
[ -f "$OUT/bench_cpp_table.txt" ] && head -70 "$OUT/bench_cpp_table.txt" | cut -c1-150
echo "(summary: $SUMMARY)"
