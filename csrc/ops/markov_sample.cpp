// Argument validation and dispatch of markov_sample and confidence.
#include <cstdint>
#include <vector>

#include "dspark/markov.h"
#include "dspark/ops.h"
#include "dspark/rejection.h"
#include "markov_workspace.h"
#include "request_params.h"

namespace dspark {
namespace {

void check_weight(const char* op, const char* name, const TensorView& t, const Device& device,
                  int64_t rows, int64_t cols) {
  check::defined(op, name, t);
  check::ndim(op, name, t, 2);
  check::dtype_in(op, name, t, {DType::kFloat32, DType::kFloat16, DType::kBFloat16});
  check::same_device(op, name, t, device);
  check::inner_contiguous(op, name, t);
  DSPARK_CHECK_VALUE(t.size(0) == rows && t.size(1) == cols, op, ": argument '", name,
                     "' must have shape [", rows, ", ", cols, "], got ", t.shape_str());
}

void check_vector(const char* op, const char* name, const TensorView& t, const Device& device,
                  int64_t size, std::initializer_list<DType> dtypes) {
  check::defined(op, name, t);
  check::ndim(op, name, t, 1);
  check::dtype_in(op, name, t, dtypes);
  check::same_device(op, name, t, device);
  check::contiguous(op, name, t);
  check::dim_size(op, name, t, 0, size, "size");
}

void check_output(const char* op, const char* name, const TensorView& t, const Device& device,
                  std::initializer_list<int64_t> shape, DType dtype) {
  check::defined(op, name, t);
  check::dtype_in(op, name, t, {dtype});
  check::same_device(op, name, t, device);
  check::contiguous(op, name, t);
  DSPARK_CHECK_VALUE(t.ndim == static_cast<int32_t>(shape.size()), op, ": argument '", name,
                     "' has shape ", t.shape_str());
  int i = 0;
  for (int64_t s : shape) {
    DSPARK_CHECK_VALUE(t.shape[i] == s, op, ": argument '", name, "' has shape ", t.shape_str(),
                       ", expected dimension ", i, " = ", s);
    ++i;
  }
}

void check_tokens_on_host(const char* op, const char* name, const TensorView& t, int64_t vocab) {
  const int64_t n = t.numel();
  for (int64_t i = 0; i < n; ++i) {
    const int64_t x = load_index(t.data, t.dtype, i);
    DSPARK_CHECK_VALUE(x >= 0 && x < vocab, op, ": argument '", name, "' holds token id ", x,
                       " at index ", i, ", outside the vocabulary [0, ", vocab, ")");
  }
}

}  // namespace

size_t markov_sample_workspace_bytes(int64_t R, int64_t gamma, int64_t vocab, int64_t rank,
                                     int64_t hidden_size, markov::Head head, bool truncation) {
  return MarkovWorkspace::layout(R, gamma, vocab, rank, hidden_size, head, truncation).bytes;
}

void markov_sample(const MarkovSampleArgs& a) {
  constexpr const char* op = "markov_sample";
  using markov::Head;
  check::defined(op, "base_logits", a.base_logits);
  const Device device = a.base_logits.device;
  check::ndim(op, "base_logits", a.base_logits, 3);
  check::dtype_in(op, "base_logits", a.base_logits, {DType::kFloat32, DType::kFloat16, DType::kBFloat16});
  check::inner_contiguous(op, "base_logits", a.base_logits);
  // Vd: the columns sampled (the draft vocabulary); V: the target vocabulary (W1's rows).
  const int64_t R = a.base_logits.size(0), gamma = a.base_logits.size(1), Vd = a.base_logits.size(2);
  DSPARK_CHECK_VALUE(Vd >= 1 && Vd <= rejection::kMaxVocab, op, ": vocabulary size ", Vd,
                     " must be in [1, ", rejection::kMaxVocab, "]");
  DSPARK_CHECK_VALUE(gamma <= 255, op, ": block size gamma = ", gamma, " exceeds 255");
  check::defined(op, "w1", a.w1);
  check::ndim(op, "w1", a.w1, 2);
  const int64_t rank = a.w1.size(1);
  DSPARK_CHECK_VALUE(rank >= 1, op, ": the Markov rank (w1's second dimension) must be >= 1");
  int64_t V = Vd;
  if (a.draft_vocab.defined()) {
    check_vector(op, "draft_vocab", a.draft_vocab, device, Vd, {DType::kInt32});
    V = a.w1.size(0);
    DSPARK_CHECK_VALUE(V >= Vd && V <= rejection::kMaxVocab, op, ": argument 'w1' must have a row per target id, ",
                       "at least V_d = ", Vd, ", got shape ", a.w1.shape_str());
  }
  check_weight(op, "w1", a.w1, device, V, rank);
  check_weight(op, "w2", a.w2, device, Vd, rank);
  check_vector(op, "anchor_tokens", a.anchor_tokens, device, R, {DType::kInt32, DType::kInt64});

  int64_t d = 0;
  if (a.head != Head::kVanilla) {
    const char* head = a.head == Head::kGated ? "gated" : "rnn";
    DSPARK_CHECK_VALUE(a.hidden.defined(), op, ": head '", head, "' needs argument 'hidden' [R, gamma, d]");
    check::ndim(op, "hidden", a.hidden, 3);
    check::dtype_in(op, "hidden", a.hidden, {DType::kFloat32, DType::kFloat16, DType::kBFloat16});
    check::same_device(op, "hidden", a.hidden, device);
    check::inner_contiguous(op, "hidden", a.hidden);
    DSPARK_CHECK_VALUE(a.hidden.size(0) == R && a.hidden.size(1) == gamma, op,
                       ": argument 'hidden' must have shape [R, gamma, d] = [", R, ", ", gamma,
                       ", d], got ", a.hidden.shape_str());
    d = a.hidden.size(2);
    if (a.head == Head::kGated) {
      DSPARK_CHECK_VALUE(a.gate_weight.defined() && a.gate_bias.defined(), op,
                         ": head 'gated' needs 'gate_weight' [rank, d + rank] and 'gate_bias' [rank]");
      check_weight(op, "gate_weight", a.gate_weight, device, rank, d + rank);
      check_vector(op, "gate_bias", a.gate_bias, device, rank, {DType::kFloat32, DType::kFloat16, DType::kBFloat16});
    } else {
      DSPARK_CHECK_VALUE(a.joint_weight.defined() && a.joint_bias.defined(), op,
                         ": head 'rnn' needs 'joint_weight' [3 rank, 2 rank + d] and 'joint_bias' [3 rank]");
      check_weight(op, "joint_weight", a.joint_weight, device, 3 * rank, 2 * rank + d);
      check_vector(op, "joint_bias", a.joint_bias, device, 3 * rank, {DType::kFloat32, DType::kFloat16, DType::kBFloat16});
    }
  }
  check_request_params(op, device, R, a.temperature, a.temperatures, a.seeds, a.offset, a.offsets);
  check_truncation(op, device, R, Vd, a.top_k, a.top_ks, a.top_p, a.top_ps, a.min_p, a.min_ps);
  const bool truncation = truncation_params(a.top_k, a.top_ks, a.top_p, a.top_ps, a.min_p, a.min_ps).any();
  (void)truncation;  // sizes the CUDA workspace
  check_output(op, "draft_tokens", a.draft_tokens, device, {R, gamma}, DType::kInt64);
  check_output(op, "logprobs", a.logprobs, device, {R, gamma}, DType::kFloat32);
  check_output(op, "lse", a.lse, device, {R, gamma}, DType::kFloat32);
  if (a.corrected.defined()) check_output(op, "corrected_logits", a.corrected, device, {R, gamma, Vd}, DType::kFloat32);
  check::no_aliasing(op,
                     {{"draft_tokens", &a.draft_tokens}, {"logprobs", &a.logprobs}, {"lse", &a.lse},
                      {"corrected_logits", &a.corrected}},
                     {{"base_logits", &a.base_logits}, {"anchor_tokens", &a.anchor_tokens}, {"w1", &a.w1},
                      {"w2", &a.w2}, {"gate_weight", &a.gate_weight}, {"gate_bias", &a.gate_bias},
                      {"joint_weight", &a.joint_weight}, {"joint_bias", &a.joint_bias}, {"hidden", &a.hidden},
                      {"temperature", &a.temperatures}, {"seed", &a.seeds}, {"offset", &a.offsets},
                      {"draft_vocab", &a.draft_vocab}});

  if (device.type == DeviceType::kCPU) {
    check_tokens_on_host(op, "anchor_tokens", a.anchor_tokens, V);
    if (a.draft_vocab.defined()) {
      check_tokens_on_host(op, "draft_vocab", a.draft_vocab, V);
      std::vector<uint8_t> seen(static_cast<size_t>(V), 0);
      const int32_t* ids = a.draft_vocab.ptr<int32_t>();
      for (int64_t c = 0; c < Vd; ++c) {
        DSPARK_CHECK_VALUE(!seen[static_cast<size_t>(ids[c])], op, ": argument 'draft_vocab' holds token id ", ids[c],
                           " twice");
        seen[static_cast<size_t>(ids[c])] = 1;
      }
    }
    check_request_values_on_host(op, R, a.temperatures, a.offsets);
    check_truncation_values_on_host(op, R, Vd, a.top_ks, a.top_ps, a.min_ps);
    cpu::markov_sample(a);
    return;
  }
#if defined(DSPARK_WITH_CUDA)
  const size_t need = markov_sample_workspace_bytes(R, gamma, Vd, rank, d, a.head, truncation);
  check::defined(op, "workspace", a.workspace);
  check::same_device(op, "workspace", a.workspace, device);
  DSPARK_CHECK_VALUE(static_cast<size_t>(a.workspace.numel()) >= need &&
                         reinterpret_cast<uintptr_t>(a.workspace.data) % 256 == 0,
                     op, ": argument 'workspace' must hold ", need, " bytes, 256-byte aligned");
  cuda::markov_sample(a);
#else
  DSPARK_CHECK_VALUE(false, op, ": tensors are on ", device_name(device),
                     " but this build of dspark has no CUDA backend");
#endif
}

void confidence(const ConfidenceArgs& a) {
  constexpr const char* op = "confidence";
  check::defined(op, "hidden", a.hidden);
  const Device device = a.hidden.device;
  check::ndim(op, "hidden", a.hidden, 3);
  check::dtype_in(op, "hidden", a.hidden, {DType::kFloat32, DType::kFloat16, DType::kBFloat16});
  check::inner_contiguous(op, "hidden", a.hidden);
  const int64_t R = a.hidden.size(0), gamma = a.hidden.size(1), d = a.hidden.size(2);
  check::defined(op, "w1", a.w1);
  check::ndim(op, "w1", a.w1, 2);
  const int64_t V = a.w1.size(0), rank = a.w1.size(1);
  check_weight(op, "w1", a.w1, device, V, rank);
  check_vector(op, "anchor_tokens", a.anchor_tokens, device, R, {DType::kInt32, DType::kInt64});
  check::defined(op, "draft_tokens", a.draft_tokens);
  check::ndim(op, "draft_tokens", a.draft_tokens, 2);
  check::dtype_in(op, "draft_tokens", a.draft_tokens, {DType::kInt32, DType::kInt64});
  check::same_device(op, "draft_tokens", a.draft_tokens, device);
  DSPARK_CHECK_VALUE(a.draft_tokens.size(0) == R && a.draft_tokens.size(1) == gamma, op,
                     ": argument 'draft_tokens' must have shape [R, gamma] = [", R, ", ", gamma, "], got ",
                     a.draft_tokens.shape_str());
  check_weight(op, "weight", a.weight, device, 1, d + rank);
  DSPARK_CHECK_VALUE(a.weight.is_contiguous(), op, ": argument 'weight' must be contiguous");
  check_vector(op, "bias", a.bias, device, 1, {DType::kFloat32, DType::kFloat16, DType::kBFloat16});
  if (a.temperatures.defined())
    check_vector(op, "temperatures", a.temperatures, device, gamma, {DType::kFloat32});
  check_output(op, "logits", a.logits, device, {R, gamma}, DType::kFloat32);
  check_output(op, "conf", a.conf, device, {R, gamma}, DType::kFloat32);
  check_output(op, "survival", a.survival, device, {R, gamma}, DType::kFloat32);
  check::no_aliasing(op, {{"logits", &a.logits}, {"conf", &a.conf}, {"survival", &a.survival}},
                     {{"hidden", &a.hidden}, {"w1", &a.w1}, {"anchor_tokens", &a.anchor_tokens},
                      {"draft_tokens", &a.draft_tokens}, {"weight", &a.weight}, {"bias", &a.bias},
                      {"temperatures", &a.temperatures}});
  if (device.type == DeviceType::kCPU) {
    check_tokens_on_host(op, "anchor_tokens", a.anchor_tokens, V);
    check_tokens_on_host(op, "draft_tokens", a.draft_tokens, V);
    if (a.temperatures.defined()) {
      const float* t = a.temperatures.ptr<float>();
      for (int64_t k = 0; k < gamma; ++k)
        DSPARK_CHECK_VALUE(t[k] > 0.0f, op, ": STS temperatures must be > 0, got ", t[k], " at position ", k);
    }
    cpu::confidence(a);
    return;
  }
#if defined(DSPARK_WITH_CUDA)
  cuda::confidence(a);
#else
  DSPARK_CHECK_VALUE(false, op, ": tensors are on ", device_name(device),
                     " but this build of dspark has no CUDA backend");
#endif
}

}  // namespace dspark
