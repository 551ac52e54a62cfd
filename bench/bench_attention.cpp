// paged_attention on the CPU (float32) and, with CUDA and a GPU, on CUDA
// (bfloat16), causal, pages of 16.
//
// Grid: the headline layer (H_q = 32, H_kv = 8, head dim 128): requests {1,
// 16, 64, 256} x queries per request {1, 4, 16} x context {1024, 8192, 32768}
// (R * context <= 2M keys). Gemma 4's layers (tagged in the name): the
// sliding-window layers (H_q = 32, H_kv = 16, head dim 256, window 1024) and
// the global layers (H_q = 32, H_kv = 4, head dim 512), requests {1, 16, 64}
// x queries {1, 8} x context {8192, 32768}. --dspark_grid=tiny: a few shapes.
// Bytes that must move: keys and values once per request and kv head, 2 R n
// H_kv D b with n = kv_len (or, under a window W, the W + q_len - 1 keys the
// queries can see), plus q and the output; the goal on an H200 is at least
// 70 % of HBM bandwidth.
#include <benchmark/benchmark.h>

#include <algorithm>
#include <cmath>
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

constexpr int64_t kPage = 16;

struct Layer {
  const char* tag;  // "" for the headline layer (its benchmark names carry no tag)
  int64_t Hq, Hkv, D, window;
};
constexpr Layer kHeadline{"", 32, 8, 128, 0};
constexpr Layer kGemma4Sliding{"gemma4-sliding/", 32, 16, 256, 1024};
constexpr Layer kGemma4Global{"gemma4-global/", 32, 4, 512, 0};

struct Shape {
  Layer layer;
  int64_t requests, q_len, context;
};

struct Inputs {
  Shape s;
  DType dtype;
  int64_t kv, pages_per, T;
  std::vector<uint8_t> q, k_cache, v_cache;
  std::vector<int32_t> table, kv_lens, cu;
  Inputs(Shape shape, DType t) : s(shape), dtype(t) {
    const Layer& l = s.layer;
    kv = s.context + s.q_len;
    pages_per = (kv + kPage - 1) / kPage;
    T = s.requests * s.q_len;
    const size_t cache = static_cast<size_t>(s.requests * pages_per * kPage * l.Hkv * l.D);
    k_cache = encode(normal_floats(cache, 1.0f, 1), dtype);
    v_cache = encode(normal_floats(cache, 1.0f, 2), dtype);
    q = encode(normal_floats(static_cast<size_t>(T * l.Hq * l.D), 1.0f, 3), dtype);
    table.resize(static_cast<size_t>(s.requests * pages_per));
    for (size_t i = 0; i < table.size(); ++i)  // pages out of order: a fixed odd stride
      table[i] = static_cast<int32_t>((i * 7919) % table.size());
    kv_lens.assign(static_cast<size_t>(s.requests), static_cast<int32_t>(kv));
    for (int64_t r = 0; r <= s.requests; ++r) cu.push_back(static_cast<int32_t>(r * s.q_len));
  }
  // keys each request's queries can see
  int64_t keys_read() const { return s.layer.window > 0 ? std::min(kv, s.layer.window + s.q_len - 1) : kv; }
  double bytes() const {
    const Layer& l = s.layer;
    const double b = static_cast<double>(dspark::dtype_size(dtype));
    return 2.0 * s.requests * keys_read() * l.Hkv * l.D * b + 2.0 * T * l.Hq * l.D * b;
  }
};

dspark::PagedAttentionArgs make_args(const Inputs& in, Device dev, void* q, void* k, void* v, void* table,
                                     void* kv_lens, void* cu, void* out) {
  const Layer& l = in.s.layer;
  dspark::PagedAttentionArgs a;
  const int64_t pages = in.s.requests * in.pages_per;
  a.q = TensorView::contiguous(q, in.dtype, dev, {in.T, l.Hq, l.D});
  a.k_cache = TensorView::contiguous(k, in.dtype, dev, {pages, kPage, l.Hkv, l.D});
  a.v_cache = TensorView::contiguous(v, in.dtype, dev, {pages, kPage, l.Hkv, l.D});
  a.block_table = TensorView::contiguous(table, DType::kInt32, dev, {in.s.requests, in.pages_per});
  a.kv_lens = TensorView::contiguous(kv_lens, DType::kInt32, dev, {in.s.requests});
  a.cu_q = TensorView::contiguous(cu, DType::kInt32, dev, {in.s.requests + 1});
  a.mask = dspark::AttentionMask::kCausal;
  a.scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(l.D)));
  a.window = l.window;
  a.out = TensorView::contiguous(out, in.dtype, dev, {in.T, l.Hq, l.D});
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
  const Layer& l = shape.layer;
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
  const size_t ws = dspark::paged_attention_workspace_bytes(in.T, shape.requests, l.Hq, l.Hkv, l.D, in.pages_per,
                                                            kPage, in.dtype, l.window,
                                                            dspark::AttentionMask::kCausal);
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
  return std::string("paged_attention/") + backend + "/" + s.layer.tag + "R=" + std::to_string(s.requests) +
         "/q=" + std::to_string(s.q_len) + "/ctx=" + std::to_string(s.context);
}

}  // namespace

void register_attention() {
  std::vector<Shape> shapes;
  if (options().tiny) {
    shapes = {{kHeadline, 1, 1, 1024}, {kHeadline, 4, 4, 512}, {kGemma4Sliding, 2, 4, 2048},
              {kGemma4Global, 2, 4, 512}};
  } else {
    for (int64_t ctx : {1024, 8192, 32768})
      for (int64_t q : {1, 4, 16})
        for (int64_t r : {1, 16, 64, 256})
          if (r * ctx <= 2 * 1024 * 1024) shapes.push_back({kHeadline, r, q, ctx});
    for (const Layer& layer : {kGemma4Sliding, kGemma4Global})
      for (int64_t ctx : {8192, 32768})
        for (int64_t q : {1, 8})
          for (int64_t r : {1, 16, 64})
            if (r * ctx <= 2 * 1024 * 1024) shapes.push_back({layer, r, q, ctx});
  }
  for (const Shape& s : shapes) {
    const Layer& l = s.layer;
    const int64_t seen = l.window > 0 ? std::min(s.context + s.q_len, l.window + s.q_len) : s.context + s.q_len;
    const double keys = static_cast<double>(s.requests) * seen * s.q_len;
    if (options().cpu && keys * l.Hq * l.D * 8 <= options().cpu_max_gbytes * 1e9)
      benchmark::RegisterBenchmark(name("cpu", s).c_str(), bench_cpu, s)->Unit(benchmark::kMillisecond)->UseRealTime();
#if defined(DSPARK_BENCH_CUDA)
    if (options().cuda && cuda_available())
      benchmark::RegisterBenchmark(name("cuda", s).c_str(), bench_cuda, s)->Unit(benchmark::kMicrosecond)->UseManualTime();
#endif
  }
}

}  // namespace dspark_bench
