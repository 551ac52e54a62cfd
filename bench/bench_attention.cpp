// paged_attention (causal, H_q = 32, H_kv = 8, head dim 128, pages of 16) on
// the CPU (float32) and, with CUDA and a GPU, on CUDA (bfloat16).
//
// Grid: requests {1, 16, 64, 256} x queries per request {1, 4, 16} x context
// {1024, 8192, 32768} (R * context <= 2M keys); --dspark_grid=tiny: two
// shapes. Bytes that must move: keys and values once per request and kv head,
// 2 R kv H_kv D b, plus q and the output; the goal on an H200 is at least 70 %
// of HBM bandwidth.
#include <benchmark/benchmark.h>

#include <cstdint>
#include <string>
#include <vector>

#include "bench_common.h"
#include "dspark/ops.h"

namespace dspark_bench {
namespace {

using dspark::DType;
using dspark::Device;
using dspark::TensorView;

constexpr int64_t kHq = 32, kHkv = 8, kDim = 128, kPage = 16;

struct Shape {
  int64_t requests, q_len, context;
};

struct Inputs {
  Shape s;
  DType dtype;
  int64_t kv, pages_per, T;
  std::vector<uint8_t> q, k_cache, v_cache;
  std::vector<int32_t> table, kv_lens, cu;
  Inputs(Shape shape, DType t) : s(shape), dtype(t) {
    kv = s.context + s.q_len;
    pages_per = (kv + kPage - 1) / kPage;
    T = s.requests * s.q_len;
    const size_t cache = static_cast<size_t>(s.requests * pages_per * kPage * kHkv * kDim);
    k_cache = encode(normal_floats(cache, 1.0f, 1), dtype);
    v_cache = encode(normal_floats(cache, 1.0f, 2), dtype);
    q = encode(normal_floats(static_cast<size_t>(T * kHq * kDim), 1.0f, 3), dtype);
    table.resize(static_cast<size_t>(s.requests * pages_per));
    for (size_t i = 0; i < table.size(); ++i)  // pages out of order: a fixed odd stride
      table[i] = static_cast<int32_t>((i * 7919) % table.size());
    kv_lens.assign(static_cast<size_t>(s.requests), static_cast<int32_t>(kv));
    for (int64_t r = 0; r <= s.requests; ++r) cu.push_back(static_cast<int32_t>(r * s.q_len));
  }
  double bytes() const {
    const double b = static_cast<double>(dspark::dtype_size(dtype));
    return 2.0 * s.requests * kv * kHkv * kDim * b + 2.0 * T * kHq * kDim * b;
  }
};

dspark::PagedAttentionArgs make_args(const Inputs& in, Device dev, void* q, void* k, void* v, void* table,
                                     void* kv_lens, void* cu, void* out) {
  dspark::PagedAttentionArgs a;
  const int64_t pages = in.s.requests * in.pages_per;
  a.q = TensorView::contiguous(q, in.dtype, dev, {in.T, kHq, kDim});
  a.k_cache = TensorView::contiguous(k, in.dtype, dev, {pages, kPage, kHkv, kDim});
  a.v_cache = TensorView::contiguous(v, in.dtype, dev, {pages, kPage, kHkv, kDim});
  a.block_table = TensorView::contiguous(table, DType::kInt32, dev, {in.s.requests, in.pages_per});
  a.kv_lens = TensorView::contiguous(kv_lens, DType::kInt32, dev, {in.s.requests});
  a.cu_q = TensorView::contiguous(cu, DType::kInt32, dev, {in.s.requests + 1});
  a.mask = dspark::AttentionMask::kCausal;
  a.scale = 0.08838834764831845f;  // 1 / sqrt(128)
  a.out = TensorView::contiguous(out, in.dtype, dev, {in.T, kHq, kDim});
  return a;
}

void bench_cpu(benchmark::State& state, Shape shape) {
  Inputs in(shape, DType::kFloat32);
  std::vector<uint8_t> out(in.q.size());
  auto a = make_args(in, Device{}, in.q.data(), in.k_cache.data(), in.v_cache.data(), in.table.data(),
                     in.kv_lens.data(), in.cu.data(), out.data());
  time_cpu(state, in.bytes(), [&](int64_t) { dspark::paged_attention(a); });
}

#if defined(DSPARK_BENCH_CUDA)
void bench_cuda(benchmark::State& state, Shape shape) {
  Inputs in(shape, DType::kBFloat16);
  int device = 0;
  cuda_check(cudaGetDevice(&device));
  const Device dev{dspark::DeviceType::kCUDA, device};
  void* q = cuda_upload(in.q);
  void* k = cuda_upload(in.k_cache);
  void* v = cuda_upload(in.v_cache);
  void* table = cuda_upload(in.table);
  void* kv_lens = cuda_upload(in.kv_lens);
  void* cu = cuda_upload(in.cu);
  void *out = nullptr, *workspace = nullptr;
  cuda_check(cudaMalloc(&out, in.q.size()));
  const size_t ws = dspark::paged_attention_workspace_bytes(in.T, shape.requests, kHq, kHkv, kDim, in.pages_per, kPage,
                                                            in.dtype);
  cuda_check(cudaMalloc(&workspace, std::max<size_t>(ws, 256)));
  auto a = make_args(in, dev, q, k, v, table, kv_lens, cu, out);
  a.workspace = TensorView::contiguous(workspace, DType::kUInt8, dev, {static_cast<int64_t>(std::max<size_t>(ws, 256))});
  time_cuda(state, in.bytes(), [&](cudaStream_t stream, int64_t) {
    a.stream = stream;
    dspark::paged_attention(a);
  });
  for (void* p : {q, k, v, table, kv_lens, cu, out, workspace}) cudaFree(p);
}
#endif

std::string name(const char* backend, const Shape& s) {
  return std::string("paged_attention/") + backend + "/R=" + std::to_string(s.requests) + "/q=" +
         std::to_string(s.q_len) + "/ctx=" + std::to_string(s.context);
}

}  // namespace

void register_attention() {
  std::vector<Shape> shapes;
  if (options().tiny) {
    shapes = {{1, 1, 1024}, {4, 4, 512}};
  } else {
    for (int64_t ctx : {1024, 8192, 32768})
      for (int64_t q : {1, 4, 16})
        for (int64_t r : {1, 16, 64, 256})
          if (r * ctx <= 2 * 1024 * 1024) shapes.push_back({r, q, ctx});
  }
  for (const Shape& s : shapes) {
    const double keys = static_cast<double>(s.requests) * (s.context + s.q_len) * s.q_len;
    if (options().cpu && keys * kHq * kDim * 8 <= options().cpu_max_gbytes * 1e9)
      benchmark::RegisterBenchmark(name("cpu", s).c_str(), bench_cpu, s)->Unit(benchmark::kMillisecond)->UseRealTime();
#if defined(DSPARK_BENCH_CUDA)
    if (options().cuda && cuda_available())
      benchmark::RegisterBenchmark(name("cuda", s).c_str(), bench_cuda, s)->Unit(benchmark::kMicrosecond)->UseManualTime();
#endif
  }
}

}  // namespace dspark_bench
