// schedule_prefix (causal mode) on the CPU and, with CUDA and a GPU, on CUDA
// (one block, event timing). Grid: requests {1, 64, 256, 1024} x gamma
// {5, 7, 16}; --dspark_grid=tiny: three shapes.
//
// Bytes that must move: conf 4 R gamma, the SPS table 4 (B_max + 1), lengths
// 4 R. The op is latency-bound; the goal on an H200 is < 10 us at R = 256,
// gamma = 7.
#include <benchmark/benchmark.h>

#include <chrono>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "bench_common.h"
#include "dspark/ops.h"

#if defined(DSPARK_BENCH_CUDA)
#include <cuda_runtime.h>
#endif

namespace dspark_bench {
namespace {

using dspark::DType;
using dspark::Device;
using dspark::TensorView;

struct Shape {
  int64_t requests, gamma;
};

struct Inputs {
  Shape s;
  std::vector<float> conf, sps;
  explicit Inputs(Shape shape) : s(shape) {
    const std::vector<float> noise = normal_floats(static_cast<size_t>(s.requests * s.gamma), 1.0f, 3);
    conf.resize(noise.size());
    for (size_t i = 0; i < noise.size(); ++i) conf[i] = 1.0f / (1.0f + std::exp(-(1.5f + noise[i])));
    const int64_t table = s.requests * (s.gamma + 1) + 1;
    sps.resize(static_cast<size_t>(table));
    for (int64_t b = 0; b < table; ++b)  // a jagged curve: a cliff every 64 tokens
      sps[static_cast<size_t>(b)] = 1.0f / (1.0f + 0.002f * b + 0.05f * static_cast<float>(b / 64));
  }
  double bytes() const { return 4.0 * (conf.size() + sps.size() + s.requests); }
};

dspark::SchedulePrefixArgs make_args(const Inputs& in, Device dev, void* conf, void* sps, void* lengths,
                                     void* throughput, void* capacity) {
  dspark::SchedulePrefixArgs a;
  a.conf = TensorView::contiguous(conf, DType::kFloat32, dev, {in.s.requests, in.s.gamma});
  a.sps = TensorView::contiguous(sps, DType::kFloat32, dev, {static_cast<int64_t>(in.sps.size())});
  a.mode = dspark::schedule::Mode::kCausal;
  a.lengths = TensorView::contiguous(lengths, DType::kInt32, dev, {in.s.requests});
  a.throughput = TensorView::contiguous(throughput, DType::kFloat32, dev, {1});
  a.capacity = TensorView::contiguous(capacity, DType::kInt32, dev, {1});
  return a;
}

void bench_cpu(benchmark::State& state, Shape shape) {
  Inputs in(shape);
  std::vector<int32_t> lengths(static_cast<size_t>(shape.requests));
  float throughput = 0;
  int32_t capacity = 0;
  auto a = make_args(in, Device{}, in.conf.data(), in.sps.data(), lengths.data(), &throughput, &capacity);
  time_cpu(state, in.bytes(), [&](int64_t) { dspark::schedule_prefix(a); });
  state.counters["admitted"] = capacity;
}

#if defined(DSPARK_BENCH_CUDA)
void bench_cuda(benchmark::State& state, Shape shape) {
  Inputs in(shape);
  int device = 0;
  cuda_check(cudaGetDevice(&device));
  void* conf = cuda_upload(in.conf);
  void* sps = cuda_upload(in.sps);
  void *lengths, *throughput, *capacity;
  cuda_check(cudaMalloc(&lengths, static_cast<size_t>(shape.requests) * 4 + 4));
  cuda_check(cudaMalloc(&throughput, 4));
  cuda_check(cudaMalloc(&capacity, 4));
  auto a = make_args(in, Device{dspark::DeviceType::kCUDA, device}, conf, sps, lengths, throughput, capacity);
  time_cuda(state, in.bytes(), [&](cudaStream_t stream, int64_t) {
    a.stream = stream;
    dspark::schedule_prefix(a);
  });
  int32_t admitted = 0;
  cuda_check(cudaMemcpy(&admitted, capacity, 4, cudaMemcpyDeviceToHost));
  state.counters["admitted"] = admitted;
  for (void* p : {conf, sps, lengths, throughput, capacity}) cudaFree(p);
}
#endif

std::string name(const char* backend, const Shape& s) {
  return std::string("schedule_prefix/") + backend + "/causal/R=" + std::to_string(s.requests) +
         "/gamma=" + std::to_string(s.gamma);
}

}  // namespace

void register_schedule_prefix() {
  std::vector<Shape> shapes;
  if (options().tiny) {
    shapes = {{1, 5}, {64, 7}, {256, 7}};
  } else {
    for (int64_t g : {5, 7, 16})
      for (int64_t r : {1, 64, 256, 1024}) shapes.push_back({r, g});
  }
  for (const Shape& s : shapes) {
    if (options().cpu)
      benchmark::RegisterBenchmark(name("cpu", s).c_str(), bench_cpu, s)->Unit(benchmark::kMicrosecond)->UseRealTime();
#if defined(DSPARK_BENCH_CUDA)
    if (options().cuda && cuda_available())
      benchmark::RegisterBenchmark(name("cuda", s).c_str(), bench_cuda, s)->Unit(benchmark::kMicrosecond)->UseManualTime();
#endif
  }
}

}  // namespace dspark_bench
