// markov_sample (bfloat16 weights, hidden states and base logits) on the CPU
// and, with CUDA and a GPU, on CUDA (event timing).
//
// Grid, vanilla head: requests {1, 16, 128, 512} x gamma {5, 7, 16} x
// vocabulary {49152, 129280, 151936} x rank {128, 256}; gated and rnn heads:
// requests {1, 16, 128, 512}, gamma 7, vocabulary 151936, rank 256, hidden
// size d 2560 (Qwen3-4B's); a draft vocabulary of 8192 ids against the whole
// vocabulary (/Vd=8192): requests {1, 16, 64}, gamma 7, vocabulary {49152,
// 151936}, rank {64, 256}; --dspark_grid=tiny: five shapes.
// Bytes that must move: gamma (V_d rank + R V_d) 2 (W2 once per position, the
// base logits once; V_d = V without a draft vocabulary) plus the outputs and
// the map (4 V_d); the gated and rnn heads add their weights
// once per position (rank (d + rank) or 3 rank (2 rank + d) elements) and the
// hidden states once (R gamma d). That is the floor the achieved bandwidth is
// measured against.
#include <benchmark/benchmark.h>

#include <chrono>
#include <cstdint>
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
using dspark::TensorView;

using dspark::markov::Head;

struct Shape {
  int64_t requests, gamma, vocab, rank;
  Head head = Head::kVanilla;
  int64_t d = 0;            // hidden size (gated, rnn)
  int64_t draft_vocab = 0;  // V_d (0: the whole vocabulary)
  int64_t columns() const { return draft_vocab ? draft_vocab : vocab; }
};

constexpr int64_t kDraftVocab = 8192;

// Rows and columns of the head's weight (gate_weight or joint_weight).
int64_t head_rows(const Shape& s) { return s.head == Head::kGated ? s.rank : s.head == Head::kRnn ? 3 * s.rank : 0; }
int64_t head_cols(const Shape& s) {
  return s.head == Head::kGated ? s.d + s.rank : s.head == Head::kRnn ? 2 * s.rank + s.d : 0;
}

struct Inputs {
  Shape s;
  std::vector<uint8_t> U, w1, w2, head_w, head_b, hidden;
  std::vector<int64_t> anchors;
  std::vector<int32_t> map;  // [V_d] target id of each column: c V / V_d
  explicit Inputs(Shape shape) : s(shape) {
    const int64_t C = s.columns();
    for (int64_t c = 0; c < s.draft_vocab; ++c) map.push_back(static_cast<int32_t>(c * s.vocab / s.draft_vocab));
    // base logits: a pool of 16 random rows tiled over (request, position)
    constexpr int64_t kPool = 16;
    const std::vector<uint8_t> pool = encode(normal_floats(static_cast<size_t>(kPool * C), 2.0f, 1), DType::kBFloat16);
    const size_t row_bytes = static_cast<size_t>(C) * 2;
    U.resize(static_cast<size_t>(s.requests * s.gamma) * row_bytes);
    for (int64_t i = 0; i < s.requests * s.gamma; ++i)
      std::memcpy(&U[static_cast<size_t>(i) * row_bytes], &pool[static_cast<size_t>(i % kPool) * row_bytes], row_bytes);
    w1 = encode(normal_floats(static_cast<size_t>(s.vocab * s.rank), 0.1f, 2), DType::kBFloat16);
    w2 = encode(normal_floats(static_cast<size_t>(C * s.rank), 0.1f, 3), DType::kBFloat16);
    anchors.resize(static_cast<size_t>(s.requests));
    for (int64_t r = 0; r < s.requests; ++r) anchors[static_cast<size_t>(r)] = (r * 7919) % s.vocab;
    if (s.head != Head::kVanilla) {
      head_w = encode(normal_floats(static_cast<size_t>(head_rows(s) * head_cols(s)), 0.05f, 4), DType::kBFloat16);
      head_b = encode(normal_floats(static_cast<size_t>(head_rows(s)), 0.05f, 5), DType::kBFloat16);
      hidden = encode(normal_floats(static_cast<size_t>(s.requests * s.gamma * s.d), 1.0f, 6), DType::kBFloat16);
    }
  }
  double bytes() const {
    return 2.0 * s.gamma * (s.columns() * s.rank + s.requests * s.columns() + head_rows(s) * head_cols(s)) +
           2.0 * s.requests * s.gamma * s.d + 16.0 * s.requests * s.gamma + 4.0 * s.draft_vocab;
  }
};

// head_w, head_b, hidden: the gated / rnn head's tensors on `dev` (null for vanilla).
dspark::MarkovSampleArgs make_args(const Inputs& in, Device dev, void* U, void* w1, void* w2, void* anchors,
                                   void* tokens, void* logprobs, void* lse, void* head_w = nullptr,
                                   void* head_b = nullptr, void* hidden = nullptr, void* map = nullptr) {
  const Shape& s = in.s;
  dspark::MarkovSampleArgs a;
  a.base_logits = TensorView::contiguous(U, DType::kBFloat16, dev, {s.requests, s.gamma, s.columns()});
  a.anchor_tokens = TensorView::contiguous(anchors, DType::kInt64, dev, {s.requests});
  a.w1 = TensorView::contiguous(w1, DType::kBFloat16, dev, {s.vocab, s.rank});
  a.w2 = TensorView::contiguous(w2, DType::kBFloat16, dev, {s.columns(), s.rank});
  if (s.draft_vocab) a.draft_vocab = TensorView::contiguous(map, DType::kInt32, dev, {s.draft_vocab});
  a.head = s.head;
  if (s.head != Head::kVanilla) {
    const TensorView w = TensorView::contiguous(head_w, DType::kBFloat16, dev, {head_rows(s), head_cols(s)});
    const TensorView b = TensorView::contiguous(head_b, DType::kBFloat16, dev, {head_rows(s)});
    if (s.head == Head::kGated) {
      a.gate_weight = w;
      a.gate_bias = b;
    } else {
      a.joint_weight = w;
      a.joint_bias = b;
    }
    a.hidden = TensorView::contiguous(hidden, DType::kBFloat16, dev, {s.requests, s.gamma, s.d});
  }
  a.temperature = 1.0f;
  a.seed = 7;
  a.draft_tokens = TensorView::contiguous(tokens, DType::kInt64, dev, {s.requests, s.gamma});
  a.logprobs = TensorView::contiguous(logprobs, DType::kFloat32, dev, {s.requests, s.gamma});
  a.lse = TensorView::contiguous(lse, DType::kFloat32, dev, {s.requests, s.gamma});
  return a;
}

void bench_cpu(benchmark::State& state, Shape shape) {
  Inputs in(shape);
  const size_t n = static_cast<size_t>(shape.requests * shape.gamma);
  std::vector<int64_t> tokens(n);
  std::vector<float> logprobs(n), lse(n);
  auto a = make_args(in, Device{}, in.U.data(), in.w1.data(), in.w2.data(), in.anchors.data(), tokens.data(),
                     logprobs.data(), lse.data(), in.head_w.data(), in.head_b.data(), in.hidden.data(),
                     const_cast<int32_t*>(in.map.data()));
  time_cpu(state, in.bytes(), [&](int64_t) { dspark::markov_sample(a); });
}

#if defined(DSPARK_BENCH_CUDA)
void bench_cuda(benchmark::State& state, Shape shape) {
  Inputs in(shape);
  int device = 0;
  cuda_check(cudaGetDevice(&device));
  const Device dev{dspark::DeviceType::kCUDA, device};
  void* U = cuda_upload(in.U);
  void* w1 = cuda_upload(in.w1);
  void* w2 = cuda_upload(in.w2);
  void* anchors = cuda_upload(in.anchors);
  const bool head = shape.head != Head::kVanilla;
  void* head_w = head ? cuda_upload(in.head_w) : nullptr;
  void* head_b = head ? cuda_upload(in.head_b) : nullptr;
  void* hidden = head ? cuda_upload(in.hidden) : nullptr;
  void* map = shape.draft_vocab ? cuda_upload(in.map) : nullptr;
  const size_t n = static_cast<size_t>(shape.requests * shape.gamma);
  void *tokens, *logprobs, *lse, *workspace;
  cuda_check(cudaMalloc(&tokens, n * 8));
  cuda_check(cudaMalloc(&logprobs, n * 4));
  cuda_check(cudaMalloc(&lse, n * 4));
  const size_t ws = dspark::markov_sample_workspace_bytes(shape.requests, shape.gamma, shape.columns(), shape.rank,
                                                          shape.d, shape.head);
  cuda_check(cudaMalloc(&workspace, ws));
  auto a = make_args(in, dev, U, w1, w2, anchors, tokens, logprobs, lse, head_w, head_b, hidden, map);
  a.workspace = TensorView::contiguous(workspace, DType::kUInt8, dev, {static_cast<int64_t>(ws)});
  time_cuda(state, in.bytes(), [&](cudaStream_t stream, int64_t) {
    a.stream = stream;
    dspark::markov_sample(a);
  });
  for (void* p : {U, w1, w2, anchors, tokens, logprobs, lse, workspace, head_w, head_b, hidden, map})
    if (p) cudaFree(p);
}
#endif

std::string name(const char* backend, const Shape& s) {
  const std::string head = s.head == Head::kGated ? "gated/" : s.head == Head::kRnn ? "rnn/" : "";
  return std::string("markov_sample/") + backend + "/" + head + "R=" + std::to_string(s.requests) + "/gamma=" +
         std::to_string(s.gamma) + "/V=" + std::to_string(s.vocab) + "/r=" + std::to_string(s.rank) +
         (s.d ? "/d=" + std::to_string(s.d) : "") + (s.draft_vocab ? "/Vd=" + std::to_string(s.draft_vocab) : "");
}

}  // namespace

void register_markov_sample() {
  std::vector<Shape> shapes;
  if (options().tiny) {
    shapes = {{4, 3, 4099, 32}, {16, 7, 49152, 256}, {16, 7, 49152, 256, Head::kGated, 576},
              {16, 7, 49152, 256, Head::kRnn, 576}, {16, 7, 49152, 64, Head::kVanilla, 0, kDraftVocab}};
  } else {
    for (int64_t v : {49152, 129280, 151936})
      for (int64_t r : {128, 256})
        for (int64_t g : {5, 7, 16})
          for (int64_t n : {1, 16, 128, 512}) shapes.push_back({n, g, v, r});
    for (Head h : {Head::kGated, Head::kRnn})
      for (int64_t n : {1, 16, 128, 512}) shapes.push_back({n, 7, 151936, 256, h, 2560});
    for (int64_t v : {49152, 151936})
      for (int64_t r : {64, 256})
        for (int64_t n : {1, 16, 64})
          for (int64_t d : {int64_t{0}, kDraftVocab}) shapes.push_back({n, 7, v, r, Head::kVanilla, 0, d});
  }
  for (const Shape& s : shapes) {
    // The CPU is compute-bound here: keep its grid to what runs in seconds.
    const double macs = static_cast<double>(s.requests) * s.gamma * s.columns() * s.rank;
    if (options().cpu && macs <= options().cpu_max_gbytes * 1e9)
      benchmark::RegisterBenchmark(name("cpu", s).c_str(), bench_cpu, s)->Unit(benchmark::kMillisecond)->UseRealTime();
#if defined(DSPARK_BENCH_CUDA)
    if (options().cuda && cuda_available())
      benchmark::RegisterBenchmark(name("cuda", s).c_str(), bench_cuda, s)->Unit(benchmark::kMicrosecond)->UseManualTime();
#endif
  }
}

}  // namespace dspark_bench
