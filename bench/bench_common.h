// Shared pieces of the C++ microbenchmarks: the grid, input generation, the
// bandwidth ceilings each result is compared with, and CUDA event timing.
#pragma once

#include <benchmark/benchmark.h>

#include <cstdint>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "dspark/tensor.h"

#if defined(DSPARK_BENCH_CUDA)
#include <cuda_runtime.h>
#endif

namespace dspark_bench {

struct Options {
  bool tiny = false;               // --dspark_grid=tiny: a smoke-test grid
  double cpu_max_gbytes = 2.0;     // CPU configurations moving more than this are skipped
  bool cpu = true, cuda = true;    // --dspark_backends=cpu,cuda
};
Options& options();

// Bytes per second of a large copy (read + write), measured once per backend:
// the practical ceiling that "fraction of peak" refers to.
double cpu_copy_bandwidth();
#if defined(DSPARK_BENCH_CUDA)
bool cuda_available();
double cuda_copy_bandwidth();
double cuda_theoretical_bandwidth();
#endif

// Deterministic normal(0, sigma) values.
std::vector<float> normal_floats(size_t n, float sigma, uint64_t seed);
// The values stored as `dtype` (round to nearest even).
std::vector<uint8_t> encode(const std::vector<float>& values, dspark::DType dtype);

// Sets the counters of a finished benchmark: bytes per iteration, GB/s, and
// the fraction of `ceiling` (bytes/s) reached; `seconds` is the total time of
// the timed iterations.
void report(benchmark::State& state, double bytes, double seconds, double ceiling);

// The timed loop on the CPU: run(iteration) per benchmark iteration.
void time_cpu(benchmark::State& state, double bytes, const std::function<void(int64_t)>& run);

#if defined(DSPARK_BENCH_CUDA)
void cuda_check(cudaError_t status);
void* cuda_upload(const void* host, size_t bytes);
template <typename T>
void* cuda_upload(const std::vector<T>& host) {
  return cuda_upload(host.data(), host.size() * sizeof(T));
}
// Three warm-up calls, then run(stream, iteration) timed with events on a
// stream of its own, as the benchmark's manual time.
void time_cuda(benchmark::State& state, double bytes, const std::function<void(cudaStream_t, int64_t)>& run);
#endif

}  // namespace dspark_bench
