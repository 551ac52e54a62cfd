// The public C++ API of the kernel library. Every op validates its arguments
// (throwing ValueError / TypeError naming the argument) and dispatches on the
// device of its tensors. CUDA ops launch on `stream` (a cudaStream_t, or null
// for the legacy default stream) and never allocate or synchronise; the caller
// provides the workspace whose size *_workspace_bytes returns.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "dspark/markov.h"
#include "dspark/rejection.h"
#include "dspark/schedule.h"
#include "dspark/tensor.h"

namespace dspark {

// ------------------------------------------------------ build information

struct BuildInfo {
  bool cuda_compiled;
  std::string cuda_archs;        // e.g. "80,90", empty without CUDA
  int cuda_runtime_version;      // CUDART_VERSION at build time, 0 without CUDA
  std::string compiler;
};
BuildInfo build_info();

// Number of usable CUDA devices (0 without a driver or without CUDA), and the
// reason when there are none: no driver, a driver older than this build's CUDA
// runtime, the runtime's own error, or no visible device.
int cuda_device_count(std::string* reason = nullptr);

// The CUDA version the installed driver supports (e.g. 13000 for 13.0), read
// from libcuda without initialising it; 0 when no driver library is found.
int cuda_driver_version();

// Why a build whose CUDA runtime is `runtime_version` cannot use a driver that
// supports `driver_version` (0: no driver), or "" when it can. A runtime of
// major version M runs on any driver for CUDA M.0 or newer (minor-version
// compatibility).
std::string cuda_driver_problem(int driver_version, int runtime_version);

// Worker threads of the CPU backend (DSPARK_NUM_THREADS, default: all cores).
int cpu_num_threads();
void set_cpu_num_threads(int n);

// The instruction set whose CPU kernels run ("baseline", "avx2", "avx512",
// "avx512bf16"; DSPARK_CPU_ISA, default: the widest this CPU has), those this
// CPU can run, and a switch (ValueError for one it cannot run).
std::string cpu_isa();
std::vector<std::string> cpu_isas_supported();
void set_cpu_isa(const std::string& name);

// -------------------------------------------------------- rejection_sample

struct RejectionSampleArgs {
  TensorView target_logits;  // [N_draft + R, V] (with bonus_tokens: [N_draft, V]) float32 / float16 / bfloat16
  TensorView draft_tokens;   // [N_draft] int32 / int64 in [0, V), or -1: no draft from here on
  TensorView cu_num_draft;   // [R + 1] int32
  TensorView draft_logits;   // optional [N_draft, V] (or [N_draft, V_d] with draft_vocab)
  TensorView draft_probs;    // optional [N_draft, V] (or [N_draft, V_d] with draft_vocab)
  TensorView draft_vocab;    // optional [V_d] int32: target id of each draft column (distinct)
  float temperature = 1.0f;  // used when `temperatures` is absent
  TensorView temperatures;   // optional [R] float32
  uint64_t seed = 0;         // used when `seeds` is absent
  TensorView seeds;          // optional [1] or [R] int64
  uint64_t offset = 0;       // used when `offsets` is absent, below 2^32
  TensorView offsets;        // optional [1] or [R] int64
  int32_t max_num_draft = 0;
  TensorView bonus_tokens;   // optional [R] int32 / int64: bonus tokens drawn by the caller (no bonus rows)
  // truncation of the target distribution (dspark/truncation.h); a tensor replaces its scalar
  int32_t top_k = 0;         // 0: off
  TensorView top_ks;         // optional [R] int32
  float top_p = 1.0f;        // 1: off
  TensorView top_ps;         // optional [R] float32
  float min_p = 0.0f;        // 0: off
  TensorView min_ps;         // optional [R] float32
  // outputs
  TensorView output_tokens;    // [R, max_num_draft + 1] int32
  TensorView num_accepted;     // [R] int32
  TensorView soft_acceptance;  // optional [N_draft] float32
  TensorView output_logprobs;  // optional [R, max_num_draft + 1] float32: log p_t of each committed token
  TensorView workspace;        // uint8, rejection_sample_workspace_bytes (CUDA only)
  void* stream = nullptr;
};

// draft_columns: columns of a draft row (V_d with a draft vocabulary, else vocab).
size_t rejection_sample_workspace_bytes(int64_t num_requests, int64_t num_draft_rows,
                                        int64_t vocab, bool draft_rows, bool soft_acceptance,
                                        int64_t draft_columns, bool draft_vocab);

// Validates shapes, dtypes and devices and, for CPU tensors, the values of
// cu_num_draft, the draft tokens and the temperatures.
void rejection_sample(const RejectionSampleArgs& args);

// --------------------------------------------------------- schedule_prefix

struct SchedulePrefixArgs {
  TensorView conf;  // [R, gamma] float32, conditional confidences (calibrated, not multiplied)
  TensorView cap;   // optional [R] int32: most positions each request may verify
  schedule::Mode mode = schedule::Mode::kCausal;
  TensorView sps;       // [B_max + 1] float32: forward steps per second at B batch tokens
  int64_t budget = 0;   // budget mode, when `budgets` is absent
  TensorView budgets;   // optional [1] int32 / int64 (a value computed on the device)
  float threshold = 0;  // threshold mode
  // outputs
  TensorView lengths;     // [R] int32
  TensorView throughput;  // [1] float32: expected tokens per second of the lengths (0 without sps)
  TensorView capacity;    // [1] int32: draft tokens admitted in total
  void* stream = nullptr;
};

// The most candidates (R * gamma) one CUDA launch handles.
constexpr int64_t kScheduleMaxCandidatesCuda = 16384;

void schedule_prefix(const SchedulePrefixArgs& args);

// ----------------------------------------------------------- markov_sample

struct MarkovSampleArgs {
  TensorView base_logits;    // [R, gamma, V_d] float32 / float16 / bfloat16 (V_d = V without draft_vocab)
  TensorView anchor_tokens;  // [R] int32 / int64 target ids
  TensorView w1;             // [V, rank] embedding table, indexed by target id
  TensorView w2;             // [V_d, rank] projection (a linear layer's weight)
  TensorView draft_vocab;    // optional [V_d] int32: the target id of each column (distinct)
  markov::Head head = markov::Head::kVanilla;
  TensorView gate_weight, gate_bias;    // gated: [rank, d + rank], [rank]
  TensorView joint_weight, joint_bias;  // rnn: [3 rank, 2 rank + d], [3 rank]
  TensorView hidden;                    // [R, gamma, d] (gated, rnn)
  float temperature = 1.0f;
  TensorView temperatures;  // optional [R] float32
  uint64_t seed = 0;
  TensorView seeds;  // optional [1] or [R] int64
  uint64_t offset = 0;
  TensorView offsets;  // optional [1] or [R] int64
  // truncation of each sampled row over its V_d columns (dspark/truncation.h); a tensor replaces its scalar
  int32_t top_k = 0;
  TensorView top_ks;  // optional [R] int32
  float top_p = 1.0f;
  TensorView top_ps;  // optional [R] float32
  float min_p = 0.0f;
  TensorView min_ps;  // optional [R] float32
  // outputs
  TensorView draft_tokens;  // [R, gamma] int64
  TensorView logprobs;      // [R, gamma] float32: log p_d of each sampled token
  TensorView lse;           // [R, gamma] float32: log-sum-exp of (U + B) / T
  TensorView corrected;     // optional [R, gamma, V_d] float32: U + B (-inf outside a truncated row's kept set)
  TensorView workspace;     // uint8, markov_sample_workspace_bytes (CUDA only)
  void* stream = nullptr;
};

// truncation: whether the call may truncate (the CUDA backend then keeps the
// rows it truncates, [R, V_d] float32).
size_t markov_sample_workspace_bytes(int64_t num_requests, int64_t gamma, int64_t vocab, int64_t rank,
                                     int64_t hidden_size, markov::Head head, bool truncation = false);
void markov_sample(const MarkovSampleArgs& args);

// -------------------------------------------------------------- confidence

struct ConfidenceArgs {
  TensorView hidden;         // [R, gamma, d]
  TensorView w1;             // [V, rank]
  TensorView anchor_tokens;  // [R]
  TensorView draft_tokens;   // [R, gamma]: position k uses the token before it
  TensorView weight;         // [1, d + rank]
  TensorView bias;           // [1]
  TensorView temperatures;   // optional [gamma] STS temperatures
  // outputs
  TensorView logits;    // [R, gamma] float32, raw (before STS)
  TensorView conf;      // [R, gamma] float32, conditional confidences
  TensorView survival;  // [R, gamma] float32, cumulative products
  void* stream = nullptr;
};

void confidence(const ConfidenceArgs& args);

// --------------------------------------------------------------- attention

enum class AttentionMask : int32_t {
  kCausal = 0,  // query i of request r sees keys [0, kv_len - q_len + i]
  kBlock = 1,   // every query of request r sees all kv_len keys
};
// A sliding window W > 0 (either mask) also hides the keys more than W - 1
// positions before the query: query i, at position p = kv_len - q_len + i,
// sees only keys j > p - W (W keys, itself included, under the causal mask;
// Gemma's and Mistral's sliding-window layers).

struct AppendKvArgs {
  TensorView k, v;                // [T, H_kv, D]
  TensorView k_cache, v_cache;    // [num_pages, page_size, H_kv, D]
  TensorView slot_mapping;        // [T] int64: page * page_size + offset; < 0 skips
  void* stream = nullptr;
};
void append_kv(const AppendKvArgs& args);

struct PagedAttentionArgs {
  TensorView q;                   // [T, H_q, D]
  TensorView k_cache, v_cache;    // [num_pages, page_size, H_kv, D]
  TensorView block_table;         // [R, max_pages] int32
  TensorView kv_lens;             // [R] int32
  TensorView cu_q;                // [R + 1] int32
  AttentionMask mask = AttentionMask::kCausal;
  float scale = 0.0f;
  int64_t window = 0;             // 0: no window; else the sliding window (see AttentionMask)
  // outputs
  TensorView out;                 // [T, H_q, D], q's dtype
  TensorView lse;                 // optional [T, H_q] float32 (natural log; -inf when no key is visible)
  TensorView workspace;           // CUDA: paged_attention_workspace_bytes
  void* stream = nullptr;
};
size_t paged_attention_workspace_bytes(int64_t num_tokens, int64_t num_requests, int64_t q_heads, int64_t kv_heads,
                                       int64_t head_dim, int64_t max_pages, int64_t page_size, DType dtype,
                                       int64_t window = 0, AttentionMask mask = AttentionMask::kCausal);
void paged_attention(const PagedAttentionArgs& args);

struct RopeArgs {
  TensorView q, k;        // [T, H, D], rotated in place (k optional)
  TensorView positions;   // [T] int32 / int64
  TensorView inv_freq;    // [rotary_dim / 2] float32
  void* stream = nullptr;
};
void rope(const RopeArgs& args);

// ------------------------------------------------------------------ linear

// out = x W^T (+ bias) on the CPU, accumulated in float32 and rounded once to
// out's dtype. x [M, K] float32 / float16 / bfloat16 (unit stride along K,
// any row stride); weight [N, K] float32 / float16 / bfloat16, contiguous (it
// may be 16-bit under a float32 x: read as stored, widened in registers);
// bias [N] (optional, any float dtype); out [M, N] of x's dtype, contiguous.
// On AVX2 each output is its row's dot product in an order fixed by K
// (csrc/cpu/gemm.h), not by M or N: a row's output has the same bits whichever
// rows share the call (elsewhere the same to float32 rounding). The models' CPU linears (python/dspark/models)
// call it where it is measured faster than oneDNN and BLAS; on CUDA the models
// use torch's linear, and this op refuses CUDA tensors.
struct LinearArgs {
  TensorView x, weight, bias, out;
};
void linear(const LinearArgs& args);

namespace cpu {
void append_kv(const AppendKvArgs& args);
void paged_attention(const PagedAttentionArgs& args);
void rope(const RopeArgs& args);
void rejection_sample(const rejection::Problem& problem, const RejectionSampleArgs& args);
void schedule_prefix(const SchedulePrefixArgs& args);
void markov_sample(const MarkovSampleArgs& args);
void confidence(const ConfidenceArgs& args);
void linear(const LinearArgs& args);
}  // namespace cpu
namespace cuda {
void append_kv(const AppendKvArgs& args);
void paged_attention(const PagedAttentionArgs& args);
void rope(const RopeArgs& args);
void rejection_sample(const rejection::Problem& problem, const RejectionSampleArgs& args);
void schedule_prefix(const SchedulePrefixArgs& args);
void markov_sample(const MarkovSampleArgs& args);
void confidence(const ConfidenceArgs& args);
}  // namespace cuda

}  // namespace dspark
