// rejection_sample on the CPU and, when built with CUDA and a GPU is present,
// on CUDA (timed with events, manual time).
//
// Grid (--dspark_grid=full): requests {1, 8, 64, 256, 512} x drafts per
// request {1, 5, 7, 16} x vocabulary {32000, 129280, 151936}, bfloat16 logits,
// draft_logits mode (the drafter's rows are read too); and the same with a
// draft vocabulary of 8192 ids (/Vd=8192: draft rows of 8192 columns, ids
// spread over the vocabulary). --dspark_grid=tiny runs a handful of small
// shapes in all three draft modes, with and without a draft vocabulary (CI
// smoke test). Truncation rows (/topk=50/topp=0.9) time the op with top-k and
// top-p on every request (the cut found inside the op: radix selects over each
// target row), against the same shapes without.
//
// Bytes that must move: target logits (N + R) V b, draft rows N C b (logits and
// probs modes; C = V_d with a draft vocabulary, else V), the map 4 V_d, draft
// tokens 8 N, cu_num_draft 4 (R + 1), outputs 4 R (n + 2).
#include <benchmark/benchmark.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
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
using dspark::DeviceType;
using dspark::TensorView;

constexpr int64_t kDraftVocab = 8192;

enum Mode { kOneHot = 0, kLogits = 1, kProbs = 2 };
const char* mode_name(int m) { return m == kOneHot ? "onehot" : m == kLogits ? "logits" : "probs"; }

struct Shape {
  int64_t requests, drafts, vocab;
  DType dtype;
  Mode mode;
  int64_t draft_vocab = 0;  // V_d (0: the drafter scores the whole vocabulary)
  bool truncated = false;   // top-k 50 and top-p 0.9 on every request (/topk=50/topp=0.9)
  int64_t columns() const { return draft_vocab ? draft_vocab : vocab; }
};

// Host-side inputs of one shape: target = N(0, 3); draft = target + N(0, 1).
struct Inputs {
  Shape s;
  int64_t n_draft;
  std::vector<uint8_t> target, draft;
  std::vector<int64_t> tokens;
  std::vector<int32_t> cu;
  std::vector<int32_t> map;  // [V_d] target id of each draft column: c V / V_d

  explicit Inputs(const Shape& shape) : s(shape) {
    // A pool of kPool random (target, draft) row pairs, tiled over the batch:
    // the kernels' speed does not depend on rows repeating, and several GB
    // of inputs are built in seconds.
    constexpr int64_t kPool = 64;
    n_draft = s.requests * s.drafts;
    const size_t V = static_cast<size_t>(s.vocab), C = static_cast<size_t>(s.columns());
    for (int64_t c = 0; c < s.draft_vocab; ++c) map.push_back(static_cast<int32_t>(c * s.vocab / s.draft_vocab));
    const std::vector<float> pool_t = normal_floats(kPool * V, 3.0f, 1);
    std::vector<float> pool_d = normal_floats(kPool * C, 1.0f, 2);  // draft column c scores id(c)
    for (size_t j = 0; j < static_cast<size_t>(kPool); ++j)
      for (size_t c = 0; c < C; ++c) pool_d[j * C + c] += pool_t[j * V + (map.empty() ? c : static_cast<size_t>(map[c]))];
    if (s.mode == kProbs) {  // softmax rows
      for (int64_t j = 0; j < kPool; ++j) {
        float* row = &pool_d[j * C];
        float m = row[0], z = 0;
        for (size_t v = 0; v < C; ++v) m = std::max(m, row[v]);
        for (size_t v = 0; v < C; ++v) z += (row[v] = std::exp(row[v] - m));
        for (size_t v = 0; v < C; ++v) row[v] /= z;
      }
    }
    std::vector<int64_t> pool_token(kPool);  // the draft row's argmax: accepted often, not always
    for (int64_t j = 0; j < kPool; ++j) {
      const int64_t c = std::max_element(&pool_d[j * C], &pool_d[j * C] + C) - &pool_d[j * C];
      pool_token[j] = map.empty() ? c : map[static_cast<size_t>(c)];
    }
    const std::vector<uint8_t> enc_t = encode(pool_t, s.dtype);
    const DType draft_dtype = s.mode == kProbs ? DType::kFloat32 : s.dtype;
    const std::vector<uint8_t> enc_d = encode(pool_d, draft_dtype);
    const size_t tb = V * dspark::dtype_size(s.dtype), db = C * dspark::dtype_size(draft_dtype);
    target.resize(static_cast<size_t>(n_draft + s.requests) * tb);
    if (s.mode != kOneHot) draft.resize(static_cast<size_t>(n_draft) * db);
    tokens.resize(static_cast<size_t>(n_draft));
    // draft row j of request r pairs with target row j + r: both use pool row j % kPool
    for (int64_t r = 0, j = 0; r < s.requests; ++r) {
      for (int64_t k = 0; k <= s.drafts; ++k) {
        const int64_t row = j + r + k, pool = (j + k) % kPool;
        std::memcpy(&target[static_cast<size_t>(row) * tb], &enc_t[static_cast<size_t>(pool) * tb], tb);
      }
      for (int64_t k = 0; k < s.drafts; ++k, ++j) {
        if (s.mode != kOneHot)
          std::memcpy(&draft[static_cast<size_t>(j) * db], &enc_d[static_cast<size_t>(j % kPool) * db], db);
        tokens[static_cast<size_t>(j)] = pool_token[j % kPool];
      }
    }
    cu.resize(static_cast<size_t>(s.requests + 1));
    for (int64_t r = 0; r <= s.requests; ++r) cu[static_cast<size_t>(r)] = static_cast<int32_t>(r * s.drafts);
  }

  double bytes() const {
    const double b = static_cast<double>(dspark::dtype_size(s.dtype));
    double total = static_cast<double>((n_draft + s.requests) * s.vocab) * b;
    if (s.mode == kLogits) total += static_cast<double>(n_draft * s.columns()) * b;
    if (s.mode == kProbs) total += static_cast<double>(n_draft * s.columns()) * 4.0;
    total += 4.0 * static_cast<double>(s.draft_vocab) + 8.0 * n_draft + 4.0 * (s.requests + 1) + 4.0 * s.requests * (s.drafts + 2);
    return total;
  }
};

// Views of the inputs at the given addresses (host or device copies).
dspark::RejectionSampleArgs make_args(const Inputs& in, Device dev, void* target, void* draft,
                                      void* tokens, void* cu, void* out, void* accepted, void* map) {
  const Shape& s = in.s;
  dspark::RejectionSampleArgs a;
  a.target_logits = TensorView::contiguous(target, s.dtype, dev, {in.n_draft + s.requests, s.vocab});
  if (s.mode == kLogits) a.draft_logits = TensorView::contiguous(draft, s.dtype, dev, {in.n_draft, s.columns()});
  if (s.mode == kProbs) a.draft_probs = TensorView::contiguous(draft, DType::kFloat32, dev, {in.n_draft, s.columns()});
  if (s.draft_vocab) a.draft_vocab = TensorView::contiguous(map, DType::kInt32, dev, {s.draft_vocab});
  a.draft_tokens = TensorView::contiguous(tokens, DType::kInt64, dev, {in.n_draft});
  a.cu_num_draft = TensorView::contiguous(cu, DType::kInt32, dev, {s.requests + 1});
  a.temperature = 1.0f;
  a.seed = 1234;
  if (s.truncated) {
    a.top_k = 50;
    a.top_p = 0.9f;
  }
  a.max_num_draft = static_cast<int32_t>(s.drafts);
  a.output_tokens = TensorView::contiguous(out, DType::kInt32, dev, {s.requests, s.drafts + 1});
  a.num_accepted = TensorView::contiguous(accepted, DType::kInt32, dev, {s.requests});
  return a;
}

void bench_cpu(benchmark::State& state, Shape shape) {
  Inputs in(shape);
  std::vector<int32_t> out(static_cast<size_t>(shape.requests * (shape.drafts + 1))), accepted(static_cast<size_t>(shape.requests));
  dspark::RejectionSampleArgs a = make_args(in, Device{}, in.target.data(), in.draft.data(), in.tokens.data(),
                                            in.cu.data(), out.data(), accepted.data(),
                                            const_cast<int32_t*>(in.map.data()));
  time_cpu(state, in.bytes(), [&](int64_t iteration) {
    a.offset = static_cast<uint64_t>(iteration) & 0xffffffffu;
    dspark::rejection_sample(a);
  });
}

#if defined(DSPARK_BENCH_CUDA)
void bench_cuda(benchmark::State& state, Shape shape) {
  Inputs in(shape);
  int device = 0;
  cuda_check(cudaGetDevice(&device));
  const Device dev{DeviceType::kCUDA, device};
  void* target = cuda_upload(in.target);
  void* draft = cuda_upload(in.draft);
  void* tokens = cuda_upload(in.tokens);
  void* cu = cuda_upload(in.cu);
  void* map = cuda_upload(in.map);
  void *out = nullptr, *accepted = nullptr, *workspace = nullptr;
  cuda_check(cudaMalloc(&out, static_cast<size_t>(shape.requests * (shape.drafts + 1)) * 4));
  cuda_check(cudaMalloc(&accepted, static_cast<size_t>(shape.requests) * 4));
  const size_t ws = dspark::rejection_sample_workspace_bytes(shape.requests, in.n_draft, shape.vocab,
                                                             shape.mode != kOneHot, false, shape.columns(),
                                                             shape.draft_vocab != 0);
  cuda_check(cudaMalloc(&workspace, ws));
  dspark::RejectionSampleArgs a = make_args(in, dev, target, draft, tokens, cu, out, accepted, map);
  a.workspace = TensorView::contiguous(workspace, DType::kUInt8, dev, {static_cast<int64_t>(ws)});
  time_cuda(state, in.bytes(), [&](cudaStream_t stream, int64_t iteration) {
    a.stream = stream;
    a.offset = static_cast<uint64_t>(iteration < 0 ? 0 : iteration) & 0xffffffffu;
    dspark::rejection_sample(a);
  });
  for (void* p : {target, draft, tokens, cu, map, out, accepted, workspace}) cudaFree(p);
}
#endif

std::string name(const char* backend, const Shape& s) {
  return std::string("rejection_sample/") + backend + "/" + mode_name(s.mode) + "/" + dspark::dtype_name(s.dtype) +
         "/R=" + std::to_string(s.requests) + "/n=" + std::to_string(s.drafts) + "/V=" + std::to_string(s.vocab) +
         (s.draft_vocab ? "/Vd=" + std::to_string(s.draft_vocab) : "") + (s.truncated ? "/topk=50/topp=0.9" : "");
}

std::vector<Shape> grid() {
  std::vector<Shape> shapes;
  if (options().tiny) {
    for (int m : {kOneHot, kLogits, kProbs})
      for (DType t : {DType::kFloat32, DType::kBFloat16}) {
        shapes.push_back({4, 3, 4099, t, static_cast<Mode>(m)});
        if (m != kOneHot) shapes.push_back({4, 3, 4099, t, static_cast<Mode>(m), 1000});
      }
    shapes.push_back({8, 5, 32000, DType::kBFloat16, kLogits});
    shapes.push_back({8, 5, 32000, DType::kBFloat16, kLogits, 0, true});
    return shapes;
  }
  for (int64_t v : {32000, 129280, 151936})
    for (int64_t n : {1, 5, 7, 16})
      for (int64_t r : {1, 8, 64, 256, 512}) shapes.push_back({r, n, v, DType::kBFloat16, kLogits});
  for (int64_t v : {49152, 151936})
    for (int64_t r : {1, 16, 64})
      for (int64_t d : {int64_t{0}, kDraftVocab}) shapes.push_back({r, 7, v, DType::kBFloat16, kLogits, d});
  for (int64_t v : {32000, 151936})
    for (int64_t r : {1, 8, 64, 256}) shapes.push_back({r, 7, v, DType::kBFloat16, kLogits, 0, true});
  return shapes;
}

}  // namespace

void register_rejection_sample() {
  for (const Shape& s : grid()) {
    if (options().cpu) {
      const double b = static_cast<double>(dspark::dtype_size(s.dtype)) *
                       static_cast<double>(s.requests * s.drafts * (s.vocab + s.columns()) + s.requests * s.vocab);
      if (b <= options().cpu_max_gbytes * 1e9)
        benchmark::RegisterBenchmark(name("cpu", s).c_str(), bench_cpu, s)->Unit(benchmark::kMillisecond)->UseRealTime();
    }
#if defined(DSPARK_BENCH_CUDA)
    if (options().cuda && cuda_available())
      benchmark::RegisterBenchmark(name("cuda", s).c_str(), bench_cuda, s)
          ->Unit(benchmark::kMicrosecond)
          ->UseManualTime();
#endif
  }
}

}  // namespace dspark_bench
