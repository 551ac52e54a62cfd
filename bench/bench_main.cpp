// dspark_bench: Google Benchmark programs for every op family.
//
//   dspark_bench [--dspark_grid=full|tiny] [--dspark_backends=cpu,cuda]
//                [--dspark_cpu_max_gbytes=2] [Google Benchmark flags]
//
// Each result reports the time, the bytes the op must move (every input read
// once, every output written once), the achieved bandwidth, and that
// bandwidth as a fraction of a large copy's bandwidth on the same device,
// measured in the same run (the practical ceiling).
#include <benchmark/benchmark.h>

#include <algorithm>
#include <random>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "bench_common.h"
#include "dspark/ops.h"

#if defined(DSPARK_BENCH_CUDA)
#include <cuda_runtime.h>
#endif

namespace dspark_bench {

void register_rejection_sample();
void register_schedule_prefix();
void register_markov_sample();
void register_attention();

Options& options() {
  static Options o;
  return o;
}

static uint16_t float_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
  return static_cast<uint16_t>(u >> 16);
}

static uint16_t float_to_fp16(float f) {
  // Normal range only (the generated values are small): round to nearest.
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const int32_t exponent = static_cast<int32_t>((u >> 23) & 0xff) - 127 + 15;
  if (exponent <= 0) return static_cast<uint16_t>(sign);
  if (exponent >= 31) return static_cast<uint16_t>(sign | 0x7c00u);
  uint32_t mantissa = (u & 0x7fffffu) + 0x1000u;
  uint32_t h = sign | (static_cast<uint32_t>(exponent) << 10);
  if (mantissa & 0x800000u) return static_cast<uint16_t>(h + 0x400u);
  return static_cast<uint16_t>(h | (mantissa >> 13));
}

// Approximately normal values (the sum of four uniforms, scaled to variance
// sigma^2) from splitmix64, filled by all cores: inputs of several GB are
// generated in about a second.
std::vector<float> normal_floats(size_t n, float sigma, uint64_t seed) {
  std::vector<float> out(n);
  const unsigned threads = std::max(1u, std::thread::hardware_concurrency());
  std::vector<std::thread> pool;
  for (unsigned t = 0; t < threads; ++t)
    pool.emplace_back([&, t] {
      const size_t lo = n / threads * t, hi = t + 1 == threads ? n : n / threads * (t + 1);
      uint64_t state = seed * 0x9E3779B97F4A7C15ull + lo;
      auto next = [&state] {
        uint64_t z = (state += 0x9E3779B97F4A7C15ull);
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        return z ^ (z >> 31);
      };
      const float scale = sigma * 1.7320508f / 65536.0f;  // sqrt(12 / 4): unit variance
      for (size_t i = lo; i < hi; ++i) {
        const uint64_t b = next();
        const float sum = static_cast<float>((b & 0xffff) + ((b >> 16) & 0xffff) + ((b >> 32) & 0xffff) + (b >> 48));
        out[i] = (sum - 2.0f * 65535.0f) * scale;
      }
    });
  for (auto& th : pool) th.join();
  return out;
}

std::vector<uint8_t> encode(const std::vector<float>& values, dspark::DType dtype) {
  const size_t es = dspark::dtype_size(dtype);
  std::vector<uint8_t> out(values.size() * es);
  for (size_t i = 0; i < values.size(); ++i) {
    if (dtype == dspark::DType::kFloat32) {
      std::memcpy(out.data() + i * 4, &values[i], 4);
    } else {
      const uint16_t h = dtype == dspark::DType::kBFloat16 ? float_to_bf16(values[i]) : float_to_fp16(values[i]);
      std::memcpy(out.data() + i * 2, &h, 2);
    }
  }
  return out;
}

double cpu_copy_bandwidth() {
  static double bw = [] {
    const size_t bytes = size_t{1} << 28;  // 256 MiB per buffer, beyond any cache
    std::vector<char> a(bytes, 1), b(bytes, 2);
    double best = 0;
    for (int rep = 0; rep < 3; ++rep) {
      const unsigned threads = std::max(1u, std::thread::hardware_concurrency());
      const auto t0 = std::chrono::steady_clock::now();
      std::vector<std::thread> pool;
      for (unsigned t = 0; t < threads; ++t)
        pool.emplace_back([&, t] {
          const size_t lo = bytes / threads * t, hi = t + 1 == threads ? bytes : bytes / threads * (t + 1);
          std::memcpy(b.data() + lo, a.data() + lo, hi - lo);
        });
      for (auto& th : pool) th.join();
      const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      best = std::max(best, 2.0 * static_cast<double>(bytes) / s);
    }
    return best;
  }();
  return bw;
}

#if defined(DSPARK_BENCH_CUDA)
bool cuda_available() {
  static bool ok = [] {
    int n = 0;
    return cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
  }();
  return ok;
}

double cuda_copy_bandwidth() {
  static double bw = [] {
    const size_t bytes = size_t{1} << 30;
    void *a = nullptr, *b = nullptr;
    if (cudaMalloc(&a, bytes) != cudaSuccess || cudaMalloc(&b, bytes) != cudaSuccess) return 0.0;
    cudaMemset(a, 1, bytes);
    cudaEvent_t start, stop;
    cudaEventCreate(&start);
    cudaEventCreate(&stop);
    float best_ms = 1e30f;
    for (int rep = 0; rep < 5; ++rep) {
      cudaEventRecord(start);
      cudaMemcpy(b, a, bytes, cudaMemcpyDeviceToDevice);
      cudaEventRecord(stop);
      cudaEventSynchronize(stop);
      float ms = 0;
      cudaEventElapsedTime(&ms, start, stop);
      best_ms = std::min(best_ms, ms);
    }
    cudaEventDestroy(start);
    cudaEventDestroy(stop);
    cudaFree(a);
    cudaFree(b);
    return 2.0 * static_cast<double>(bytes) / (best_ms * 1e-3);
  }();
  return bw;
}

double cuda_theoretical_bandwidth() {
  int device = 0, clock_khz = 0, bus_bits = 0;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&clock_khz, cudaDevAttrMemoryClockRate, device);
  cudaDeviceGetAttribute(&bus_bits, cudaDevAttrGlobalMemoryBusWidth, device);
  return 2.0 * clock_khz * 1e3 * bus_bits / 8.0;
}
#endif

void report(benchmark::State& state, double bytes, double seconds, double ceiling) {
  const double rate = seconds > 0 ? bytes * static_cast<double>(state.iterations()) / seconds : 0.0;
  state.counters["MB"] = bytes * 1e-6;
  state.counters["GB_per_s"] = rate * 1e-9;
  state.counters["frac_of_copy"] = ceiling > 0 ? rate / ceiling : 0.0;
}

void time_cpu(benchmark::State& state, double bytes, const std::function<void(int64_t)>& run) {
  double seconds = 0;
  for (auto _ : state) {
    const auto t0 = std::chrono::steady_clock::now();
    run(static_cast<int64_t>(state.iterations()));
    seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  }
  report(state, bytes, seconds, cpu_copy_bandwidth());
}

#if defined(DSPARK_BENCH_CUDA)
void cuda_check(cudaError_t status) {
  if (status != cudaSuccess) throw std::runtime_error(cudaGetErrorString(status));
}

void* cuda_upload(const void* host, size_t bytes) {
  void* p = nullptr;
  cuda_check(cudaMalloc(&p, std::max<size_t>(bytes, 1)));
  if (bytes) cuda_check(cudaMemcpy(p, host, bytes, cudaMemcpyHostToDevice));
  return p;
}

void time_cuda(benchmark::State& state, double bytes, const std::function<void(cudaStream_t, int64_t)>& run) {
  cudaStream_t stream;
  cudaEvent_t start, stop;
  cuda_check(cudaStreamCreate(&stream));
  cuda_check(cudaEventCreate(&start));
  cuda_check(cudaEventCreate(&stop));
  for (int i = 0; i < 3; ++i) run(stream, -1);
  double seconds = 0;
  for (auto _ : state) {
    cuda_check(cudaEventRecord(start, stream));
    run(stream, static_cast<int64_t>(state.iterations()));
    cuda_check(cudaEventRecord(stop, stream));
    cuda_check(cudaEventSynchronize(stop));
    float ms = 0;
    cuda_check(cudaEventElapsedTime(&ms, start, stop));
    state.SetIterationTime(ms * 1e-3);
    seconds += ms * 1e-3;
  }
  report(state, bytes, seconds, cuda_copy_bandwidth());
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  cudaStreamDestroy(stream);
}
#endif

}  // namespace dspark_bench

int main(int argc, char** argv) {
  using dspark_bench::options;
  std::vector<char*> rest;
  for (int i = 0; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--dspark_grid=tiny") options().tiny = true;
    else if (a == "--dspark_grid=full") options().tiny = false;
    else if (a.rfind("--dspark_backends=", 0) == 0) {
      const std::string v = a.substr(18);
      options().cpu = v.find("cpu") != std::string::npos;
      options().cuda = v.find("cuda") != std::string::npos;
    } else if (a.rfind("--dspark_cpu_max_gbytes=", 0) == 0) {
      options().cpu_max_gbytes = std::atof(a.c_str() + 24);
    } else rest.push_back(argv[i]);
  }
  int rest_argc = static_cast<int>(rest.size());
  std::printf("dspark_bench: grid=%s, CPU kernels %s (DSPARK_CPU_ISA; this CPU runs", options().tiny ? "tiny" : "full",
              dspark::cpu_isa().c_str());
  for (const std::string& isa : dspark::cpu_isas_supported()) std::printf(" %s", isa.c_str());
  std::printf("), CPU copy bandwidth %.1f GB/s", dspark_bench::cpu_copy_bandwidth() * 1e-9);
#if defined(DSPARK_BENCH_CUDA)
  if (dspark_bench::cuda_available())
    std::printf(", CUDA copy bandwidth %.1f GB/s (theoretical %.1f GB/s)",
                dspark_bench::cuda_copy_bandwidth() * 1e-9, dspark_bench::cuda_theoretical_bandwidth() * 1e-9);
  else
    std::printf(", no CUDA device: CUDA benchmarks skipped");
#endif
  std::printf("\n");
  dspark_bench::register_rejection_sample();
  dspark_bench::register_schedule_prefix();
  dspark_bench::register_markov_sample();
  dspark_bench::register_attention();
  benchmark::Initialize(&rest_argc, rest.data());
  if (benchmark::ReportUnrecognizedArguments(rest_argc, rest.data())) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
