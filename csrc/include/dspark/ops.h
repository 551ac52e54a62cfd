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
// reason when there are none.
int cuda_device_count(std::string* reason = nullptr);

// Worker threads of the CPU backend (DSPARK_NUM_THREADS, default: all cores).
int cpu_num_threads();
void set_cpu_num_threads(int n);

// -------------------------------------------------------- rejection_sample

struct RejectionSampleArgs {
  TensorView target_logits;  // [N_draft + R, V] float32 / float16 / bfloat16
  TensorView draft_tokens;   // [N_draft] int32 / int64
  TensorView cu_num_draft;   // [R + 1] int32
  TensorView draft_logits;   // optional [N_draft, V]
  TensorView draft_probs;    // optional [N_draft, V]
  float temperature = 1.0f;  // used when `temperatures` is absent
  TensorView temperatures;   // optional [R] float32
  uint64_t seed = 0;         // used when `seeds` is absent
  TensorView seeds;          // optional [1] or [R] int64
  uint64_t offset = 0;       // used when `offsets` is absent, below 2^32
  TensorView offsets;        // optional [1] or [R] int64
  int32_t max_num_draft = 0;
  // outputs
  TensorView output_tokens;    // [R, max_num_draft + 1] int32
  TensorView num_accepted;     // [R] int32
  TensorView soft_acceptance;  // optional [N_draft] float32
  TensorView workspace;        // uint8, rejection_sample_workspace_bytes (CUDA only)
  void* stream = nullptr;
};

size_t rejection_sample_workspace_bytes(int64_t num_requests, int64_t num_draft_rows,
                                        int64_t vocab, bool draft_rows, bool soft_acceptance);

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

namespace cpu {
void rejection_sample(const rejection::Problem& problem, const RejectionSampleArgs& args);
void schedule_prefix(const SchedulePrefixArgs& args);
}  // namespace cpu
namespace cuda {
void rejection_sample(const rejection::Problem& problem, const RejectionSampleArgs& args);
void schedule_prefix(const SchedulePrefixArgs& args);
}  // namespace cuda

}  // namespace dspark
