// Argument validation and dispatch of rejection_sample.
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "dspark/ops.h"
#include "dspark/rejection.h"
#include "request_params.h"
#include "workspace.h"

namespace dspark {
namespace {

constexpr const char* kOp = "rejection_sample";

void check_float_matrix(const char* name, const TensorView& t, const Device& device) {
  check::ndim(kOp, name, t, 2);
  check::dtype_in(kOp, name, t, {DType::kFloat32, DType::kFloat16, DType::kBFloat16});
  check::same_device(kOp, name, t, device);
  check::inner_contiguous(kOp, name, t);
}

// Value checks that need the data; done here for CPU tensors (for CUDA
// tensors the Python layer does them, since they need a host synchronisation).
void check_values_on_host(const RejectionSampleArgs& a, int64_t R, int64_t n_draft, int64_t V) {
  const int32_t* cu = a.cu_num_draft.ptr<int32_t>();
  DSPARK_CHECK_VALUE(cu[0] == 0, kOp, ": argument 'cu_num_draft' must start at 0, got ", cu[0]);
  for (int64_t r = 0; r < R; ++r) {
    const int64_t n = static_cast<int64_t>(cu[r + 1]) - cu[r];
    DSPARK_CHECK_VALUE(n >= 0, kOp, ": argument 'cu_num_draft' must be non-decreasing, got ",
                       cu[r], " then ", cu[r + 1], " at request ", r);
    DSPARK_CHECK_VALUE(n <= a.max_num_draft, kOp, ": request ", r, " has ", n,
                       " draft tokens, more than max_num_draft = ", a.max_num_draft);
  }
  DSPARK_CHECK_VALUE(cu[R] == n_draft, kOp, ": argument 'cu_num_draft' must end at the number of ",
                     "draft tokens ", n_draft, ", got ", cu[R]);
  for (int64_t j = 0; j < n_draft; ++j) {
    const int64_t x = load_index(a.draft_tokens.data, a.draft_tokens.dtype, j);
    DSPARK_CHECK_VALUE(x >= rejection::kPlaceholder && x < V, kOp, ": argument 'draft_tokens' holds token id ", x,
                       " at index ", j, ", outside the vocabulary [0, ", V, ") (-1 marks a missing draft)");
  }
  if (a.bonus_tokens.defined()) {
    for (int64_t r = 0; r < R; ++r) {
      const int64_t x = load_index(a.bonus_tokens.data, a.bonus_tokens.dtype, r);
      DSPARK_CHECK_VALUE(x >= 0 && x < V, kOp, ": argument 'bonus_tokens' holds token id ", x, " for request ", r,
                         ", outside the vocabulary [0, ", V, ")");
    }
  }
  check_request_values_on_host(kOp, R, a.temperatures, a.offsets);
  check_truncation_values_on_host(kOp, R, V, a.top_ks, a.top_ps, a.min_ps);
}

// The inverse of a draft vocabulary: the column of each target id, or -1;
// ids outside [0, V) or repeated are errors.
std::vector<int32_t> draft_index_on_host(const int32_t* draft_vocab, int64_t Vd, int64_t V) {
  std::vector<int32_t> index(static_cast<size_t>(V), -1);
  for (int64_t c = 0; c < Vd; ++c) {
    const int32_t v = draft_vocab[c];
    DSPARK_CHECK_VALUE(v >= 0 && v < V, kOp, ": argument 'draft_vocab' holds token id ", v, " at column ", c,
                       ", outside the vocabulary [0, ", V, ")");
    DSPARK_CHECK_VALUE(index[static_cast<size_t>(v)] < 0, kOp, ": argument 'draft_vocab' holds token id ", v,
                       " twice (columns ", index[static_cast<size_t>(v)], " and ", c, ")");
    index[static_cast<size_t>(v)] = static_cast<int32_t>(c);
  }
  return index;
}

}  // namespace

size_t rejection_sample_workspace_bytes(int64_t num_requests, int64_t num_draft_rows,
                                        int64_t vocab, bool draft_rows, bool soft_acceptance,
                                        int64_t draft_columns, bool draft_vocab) {
  return RejectionWorkspace::layout(num_requests, num_draft_rows, vocab, draft_rows,
                                    soft_acceptance, draft_columns, draft_vocab)
      .bytes;
}

void rejection_sample(const RejectionSampleArgs& a) {
  check::defined(kOp, "target_logits", a.target_logits);
  const Device device = a.target_logits.device;
  check_float_matrix("target_logits", a.target_logits, device);
  const int64_t V = a.target_logits.size(1);
  DSPARK_CHECK_VALUE(V >= 1, kOp, ": argument 'target_logits' must have a vocabulary of at least ",
                     "1 column, got shape ", a.target_logits.shape_str());
  DSPARK_CHECK_VALUE(V <= rejection::kMaxVocab, kOp, ": vocabulary size ", V,
                     " exceeds the limit ", rejection::kMaxVocab);

  check::defined(kOp, "draft_tokens", a.draft_tokens);
  check::ndim(kOp, "draft_tokens", a.draft_tokens, 1);
  check::dtype_in(kOp, "draft_tokens", a.draft_tokens, {DType::kInt32, DType::kInt64});
  check::same_device(kOp, "draft_tokens", a.draft_tokens, device);
  check::contiguous(kOp, "draft_tokens", a.draft_tokens);
  const int64_t n_draft = a.draft_tokens.size(0);

  check::defined(kOp, "cu_num_draft", a.cu_num_draft);
  check::ndim(kOp, "cu_num_draft", a.cu_num_draft, 1);
  check::dtype_in(kOp, "cu_num_draft", a.cu_num_draft, {DType::kInt32});
  check::same_device(kOp, "cu_num_draft", a.cu_num_draft, device);
  check::contiguous(kOp, "cu_num_draft", a.cu_num_draft);
  DSPARK_CHECK_VALUE(a.cu_num_draft.size(0) >= 1, kOp,
                     ": argument 'cu_num_draft' must have R + 1 >= 1 elements, got shape ",
                     a.cu_num_draft.shape_str());
  const int64_t R = a.cu_num_draft.size(0) - 1;
  DSPARK_CHECK_VALUE(n_draft < std::numeric_limits<int32_t>::max() &&
                         R < std::numeric_limits<int32_t>::max(),
                     kOp, ": too many draft tokens or requests for int32 offsets");
  const bool bonus_given = a.bonus_tokens.defined();
  if (bonus_given) {
    check::ndim(kOp, "bonus_tokens", a.bonus_tokens, 1);
    check::dtype_in(kOp, "bonus_tokens", a.bonus_tokens, {DType::kInt32, DType::kInt64});
    check::same_device(kOp, "bonus_tokens", a.bonus_tokens, device);
    check::contiguous(kOp, "bonus_tokens", a.bonus_tokens);
    check::dim_size(kOp, "bonus_tokens", a.bonus_tokens, 0, R, "R");
    DSPARK_CHECK_VALUE(a.target_logits.size(0) == n_draft, kOp, ": argument 'target_logits' must have N_draft = ",
                       n_draft, " rows when 'bonus_tokens' is given (one per draft token, no bonus rows), got shape ",
                       a.target_logits.shape_str());
  } else {
    DSPARK_CHECK_VALUE(a.target_logits.size(0) == n_draft + R, kOp,
                       ": argument 'target_logits' must have N_draft + R = ", n_draft, " + ", R,
                       " = ", n_draft + R, " rows (one per draft token and one bonus row per ",
                       "request), got shape ", a.target_logits.shape_str());
  }
  DSPARK_CHECK_VALUE(a.max_num_draft >= 0, kOp, ": argument 'max_num_draft' must be >= 0, got ",
                     a.max_num_draft);

  DSPARK_CHECK_VALUE(!(a.draft_logits.defined() && a.draft_probs.defined()), kOp,
                     ": give at most one of 'draft_logits' and 'draft_probs'");
  rejection::DraftMode mode = rejection::DraftMode::kOneHot;
  const TensorView* draft = nullptr;
  if (a.draft_logits.defined()) {
    mode = rejection::DraftMode::kLogits;
    draft = &a.draft_logits;
    check_float_matrix("draft_logits", a.draft_logits, device);
  } else if (a.draft_probs.defined()) {
    mode = rejection::DraftMode::kProbs;
    draft = &a.draft_probs;
    check_float_matrix("draft_probs", a.draft_probs, device);
  }
  int64_t Vd = V;
  if (a.draft_vocab.defined()) {
    DSPARK_CHECK_VALUE(draft != nullptr, kOp, ": argument 'draft_vocab' needs 'draft_logits' or 'draft_probs'");
    check::ndim(kOp, "draft_vocab", a.draft_vocab, 1);
    check::dtype_in(kOp, "draft_vocab", a.draft_vocab, {DType::kInt32});
    check::same_device(kOp, "draft_vocab", a.draft_vocab, device);
    check::contiguous(kOp, "draft_vocab", a.draft_vocab);
    Vd = a.draft_vocab.size(0);
    DSPARK_CHECK_VALUE(Vd >= 1 && Vd <= V, kOp, ": argument 'draft_vocab' must hold 1 to V = ", V,
                       " target ids, got shape ", a.draft_vocab.shape_str());
  }
  if (draft) {
    const char* name = mode == rejection::DraftMode::kLogits ? "draft_logits" : "draft_probs";
    DSPARK_CHECK_VALUE(draft->size(0) == n_draft && draft->size(1) == Vd, kOp, ": argument '", name,
                       "' must have shape [N_draft, ", a.draft_vocab.defined() ? "V_d" : "V", "] = [", n_draft,
                       ", ", Vd, "], got ", draft->shape_str());
  }

  check_request_params(kOp, device, R, a.temperature, a.temperatures, a.seeds, a.offset, a.offsets);
  check_truncation(kOp, device, R, V, a.top_k, a.top_ks, a.top_p, a.top_ps, a.min_p, a.min_ps);

  check::defined(kOp, "output_tokens", a.output_tokens);
  check::ndim(kOp, "output_tokens", a.output_tokens, 2);
  check::dtype_in(kOp, "output_tokens", a.output_tokens, {DType::kInt32});
  check::same_device(kOp, "output_tokens", a.output_tokens, device);
  check::inner_contiguous(kOp, "output_tokens", a.output_tokens);
  const int64_t width = static_cast<int64_t>(a.max_num_draft) + 1;
  DSPARK_CHECK_VALUE(a.output_tokens.size(0) == R && a.output_tokens.size(1) == width, kOp,
                     ": argument 'output_tokens' must have shape [R, max_num_draft + 1] = [", R, ", ",
                     width, "], got ", a.output_tokens.shape_str());
  check::defined(kOp, "num_accepted", a.num_accepted);
  check::ndim(kOp, "num_accepted", a.num_accepted, 1);
  check::dtype_in(kOp, "num_accepted", a.num_accepted, {DType::kInt32});
  check::same_device(kOp, "num_accepted", a.num_accepted, device);
  check::contiguous(kOp, "num_accepted", a.num_accepted);
  check::dim_size(kOp, "num_accepted", a.num_accepted, 0, R, "R");
  if (a.soft_acceptance.defined()) {
    check::ndim(kOp, "soft_acceptance", a.soft_acceptance, 1);
    check::dtype_in(kOp, "soft_acceptance", a.soft_acceptance, {DType::kFloat32});
    check::same_device(kOp, "soft_acceptance", a.soft_acceptance, device);
    check::contiguous(kOp, "soft_acceptance", a.soft_acceptance);
    check::dim_size(kOp, "soft_acceptance", a.soft_acceptance, 0, n_draft, "N_draft");
  }
  if (a.output_logprobs.defined()) {
    check::ndim(kOp, "output_logprobs", a.output_logprobs, 2);
    check::dtype_in(kOp, "output_logprobs", a.output_logprobs, {DType::kFloat32});
    check::same_device(kOp, "output_logprobs", a.output_logprobs, device);
    check::inner_contiguous(kOp, "output_logprobs", a.output_logprobs);
    DSPARK_CHECK_VALUE(a.output_logprobs.size(0) == R && a.output_logprobs.size(1) == width, kOp,
                       ": argument 'output_logprobs' must have shape [R, max_num_draft + 1] = [", R, ", ", width,
                       "], got ", a.output_logprobs.shape_str());
    check::no_internal_overlap(kOp, "output_logprobs", a.output_logprobs);
  }
  check::no_internal_overlap(kOp, "output_tokens", a.output_tokens);
  check::no_aliasing(kOp,
                     {{"output_tokens", &a.output_tokens}, {"num_accepted", &a.num_accepted},
                      {"soft_acceptance", &a.soft_acceptance}, {"output_logprobs", &a.output_logprobs}},
                     {{"target_logits", &a.target_logits}, {"draft_tokens", &a.draft_tokens},
                      {"cu_num_draft", &a.cu_num_draft}, {"draft_logits", &a.draft_logits},
                      {"draft_probs", &a.draft_probs}, {"draft_vocab", &a.draft_vocab},
                      {"temperature", &a.temperatures}, {"seed", &a.seeds}, {"offset", &a.offsets},
                      {"bonus_tokens", &a.bonus_tokens}, {"top_k", &a.top_ks}, {"top_p", &a.top_ps},
                      {"min_p", &a.min_ps}});

  rejection::Problem p{};
  p.target = a.target_logits.data;
  p.target_dtype = a.target_logits.dtype;
  p.target_stride = a.target_logits.stride(0);
  p.draft = draft ? draft->data : nullptr;
  p.draft_dtype = draft ? draft->dtype : DType::kFloat32;
  p.draft_stride = draft ? draft->stride(0) : 0;
  p.mode = mode;
  p.draft_columns = Vd;
  p.draft_vocab = a.draft_vocab.defined() ? a.draft_vocab.ptr<int32_t>() : nullptr;
  p.draft_index = nullptr;
  p.tokens = a.draft_tokens.data;
  p.token_dtype = a.draft_tokens.dtype;
  p.bonus_tokens = bonus_given ? a.bonus_tokens.data : nullptr;
  p.bonus_dtype = bonus_given ? a.bonus_tokens.dtype : DType::kInt64;
  p.cu_num_draft = a.cu_num_draft.ptr<int32_t>();
  p.num_requests = static_cast<int32_t>(R);
  p.max_num_draft = a.max_num_draft;
  p.vocab = V;
  p.num_target_rows = bonus_given ? n_draft : n_draft + R;
  p.num_draft_rows = n_draft;
  p.params = request_params(a.temperature, a.temperatures, a.seed, a.seeds, a.offset, a.offsets);
  p.truncation = truncation_params(a.top_k, a.top_ks, a.top_p, a.top_ps, a.min_p, a.min_ps);

  if (device.type == DeviceType::kCPU) {
    check_values_on_host(a, R, n_draft, V);
    std::vector<int32_t> index;
    if (p.draft_vocab) {
      index = draft_index_on_host(p.draft_vocab, Vd, V);
      p.draft_index = index.data();
    }
    cpu::rejection_sample(p, a);
    return;
  }
#if defined(DSPARK_WITH_CUDA)
  const size_t need = rejection_sample_workspace_bytes(R, n_draft, V, draft != nullptr,
                                                       a.soft_acceptance.defined(), Vd, p.draft_vocab != nullptr);
  check::defined(kOp, "workspace", a.workspace);
  check::dtype_in(kOp, "workspace", a.workspace, {DType::kUInt8});
  check::same_device(kOp, "workspace", a.workspace, device);
  DSPARK_CHECK_VALUE(reinterpret_cast<uintptr_t>(a.workspace.data) % RejectionWorkspace::kAlign == 0,
                     kOp, ": argument 'workspace' must be ", RejectionWorkspace::kAlign,
                     "-byte aligned");
  DSPARK_CHECK_VALUE(static_cast<size_t>(a.workspace.numel()) >= need, kOp,
                     ": argument 'workspace' must hold at least ", need, " bytes, got ",
                     a.workspace.numel());
  cuda::rejection_sample(p, a);
#else
  DSPARK_CHECK_VALUE(false, kOp, ": tensors are on ", device_name(device),
                     " but this build of dspark has no CUDA backend (rebuild with nvcc available "
                     "or DSPARK_CUDA=on)");
#endif
}

}  // namespace dspark
