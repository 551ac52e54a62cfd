// CUDA backend of rejection_sample: four launches on the caller's stream (six
// with truncation: the row statistics, then one block per truncated target
// row, then the decisions), no allocation, no host synchronisation
// (graph-capturable). All state lives in
// the caller's workspace (ops/workspace.h). The numerics are those of
// dspark/rejection.h, shared with the CPU backend, so both agree bit for bit.
//
// Let V be the vocabulary, V_d the columns of a draft row (V, or the size of
// a draft vocabulary), R the requests, N the draft tokens, C = ceil(V / 2048)
// the chunks of a row, and b the bytes of a logit. Bytes that must move: the
// target logits once, (N + R) * V * b, plus the draft rows once, N * V_d * b
// (none for a one-hot drafter), plus one more target row (and its draft row)
// per request for the race, plus a second pass over the draft rows when soft
// acceptance is requested. Everything else is O((N + R) * C) words of
// workspace, and with a draft vocabulary its inverse map (4 V bytes, built by
// two small launches before the others).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "../ops/workspace.h"
#include "common.cuh"
#include "dspark/ops.h"
#include "dspark/rejection.h"
#include "truncation.cuh"

namespace dspark::cuda {
namespace {

using namespace rejection;

constexpr int kWarpsPerBlock = 8;
constexpr int kThreads = kWarpsPerBlock * kWarpSize;
constexpr int kPerLane = static_cast<int>(kChunk) / kWarpSize;  // 64 columns per lane per chunk
constexpr int kFinalizeThreads = 256;
constexpr int kTruncateThreads = 1024;  // one block per truncated row
constexpr const char* kOp = "rejection_sample";

static_assert(kChunk % (kWarpSize * 8) == 0, "a chunk must be a whole number of 16-byte warp loads");

// Largest r in [0, R) with key(r) <= i, for non-decreasing keys.
template <typename Key>
__device__ __forceinline__ int32_t find_request(int32_t R, int64_t i, Key key) {
  int32_t lo = 0, hi = R - 1;
  while (lo < hi) {
    const int32_t mid = lo + (hi - lo + 1) / 2;
    if (key(mid) <= i) lo = mid; else hi = mid - 1;
  }
  return lo;
}

__device__ __forceinline__ int32_t request_of_target_row(const Problem& p, int64_t i) {
  const bool bonus_rows = p.bonus_tokens == nullptr;
  return find_request(p.num_requests, i, [&](int32_t r) { return int64_t{p.cu_num_draft[r]} + (bonus_rows ? r : 0); });
}

// Target rows of request r: n + 1, or n when the caller draws the bonus tokens.
__device__ __forceinline__ int target_rows_of(const Problem& p, const Span& span) {
  return span.num_draft + (p.bonus_tokens ? 0 : 1);
}

__device__ __forceinline__ int32_t request_of_draft_row(const Problem& p, int64_t j) {
  return find_request(p.num_requests, j, [&](int32_t r) { return int64_t{p.cu_num_draft[r]}; });
}

// 16 bytes of a row as floats: 4 float32 or 8 float16 / bfloat16.
template <DType kType>
struct Vec;

template <>
struct Vec<DType::kFloat32> {
  static constexpr int kWidth = 4;
  __device__ __forceinline__ static void load(const void* p, float* out) {
    const float4 v = __ldg(static_cast<const float4*>(p));
    out[0] = v.x; out[1] = v.y; out[2] = v.z; out[3] = v.w;
  }
};

template <>
struct Vec<DType::kBFloat16> {
  static constexpr int kWidth = 8;
  __device__ __forceinline__ static void load(const void* p, float* out) {
    const uint4 v = __ldg(static_cast<const uint4*>(p));
    const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      out[2 * i] = num::bits_float(w[i] << 16);
      out[2 * i + 1] = num::bits_float(w[i] & 0xffff0000u);
    }
  }
};

template <>
struct Vec<DType::kFloat16> {
  static constexpr int kWidth = 8;
  __device__ __forceinline__ static void load(const void* p, float* out) {
    const uint4 v = __ldg(static_cast<const uint4*>(p));
    const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&w[i]));  // exact
      out[2 * i] = f.x;
      out[2 * i + 1] = f.y;
    }
  }
};

// ---------------------------------------------------------------------------
// Kernel 1: chunk statistics.
// A warp owns one chunk (2048 columns) of one row; a block owns 8 chunks.
// Each lane reads 64 columns, 16 bytes at a time (coalesced: a warp reads
// 512 contiguous bytes per step), keeps them in registers, and makes two
// passes over the registers: the maximum (with its first column), then the
// fixed-point sum of 2^(z - m_c). Every logit is read exactly once; the warp
// writes 16 bytes of ChunkStats. Rows: target rows, then draft rows.
// ---------------------------------------------------------------------------
template <DType kTargetType, DType kDraftType>
__global__ void __launch_bounds__(kThreads)
chunk_stats_kernel(Problem p, int64_t chunks, int64_t draft_chunks, int64_t num_draft_rows, bool vector_ok_target,
                   bool vector_ok_draft, ChunkStats* __restrict__ out) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t job = int64_t{blockIdx.x} * kWarpsPerBlock + threadIdx.x / kWarpSize;
  const int64_t target_jobs = p.num_target_rows * chunks;
  if (job >= target_jobs + num_draft_rows * draft_chunks) return;
  const bool is_target = job < target_jobs;
  const int64_t local = is_target ? job / chunks : (job - target_jobs) / draft_chunks;
  const int64_t chunk = is_target ? job % chunks : (job - target_jobs) % draft_chunks;
  const int32_t r = is_target ? request_of_target_row(p, local) : request_of_draft_row(p, local);
  const float temperature = request_temperature(p, r);
  const float scale = logit_scale(temperature);
  const bool greedy_target = is_target && is_greedy(temperature);  // sum at scale log2(e)
  const bool probs = !is_target && p.mode == DraftMode::kProbs;
  const DType dtype = is_target ? p.target_dtype : p.draft_dtype;
  const size_t esize = dtype == DType::kFloat32 ? 4 : 2;
  const char* row_ptr = static_cast<const char*>(is_target ? p.target : p.draft) +
                        local * (is_target ? p.target_stride : p.draft_stride) * int64_t(esize);
  const int64_t begin = chunk * kChunk;
  const int64_t count = min(kChunk, (is_target ? p.vocab : p.draft_columns) - begin);

  float z[kPerLane];
  const bool full_vector = count == kChunk && (is_target ? vector_ok_target : vector_ok_draft);
  if (full_vector) {
    if (is_target) {
      constexpr int W = Vec<kTargetType>::kWidth;
#pragma unroll
      for (int it = 0; it < kPerLane / W; ++it)
        Vec<kTargetType>::load(row_ptr + (begin + (it * kWarpSize + lane) * W) * esize, &z[it * W]);
    } else {
      constexpr int W = Vec<kDraftType>::kWidth;
#pragma unroll
      for (int it = 0; it < kPerLane / W; ++it)
        Vec<kDraftType>::load(row_ptr + (begin + (it * kWarpSize + lane) * W) * esize, &z[it * W]);
    }
  } else {
    // Same column assignment as the vector path with W = 8; columns past the
    // end of the row are not read.
#pragma unroll
    for (int it = 0; it < kPerLane / 8; ++it)
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        const int64_t v = (it * kWarpSize + lane) * 8 + e;
        z[it * 8 + e] = v < count ? load_float(row_ptr, dtype, begin + v) : 0.0f;
      }
  }
  // Column of register i, for both layouts (the vector layout with W = 4
  // differs, so it is recomputed from W).
  const int width = full_vector ? (dtype == DType::kFloat32 ? 4 : 8) : 8;

  uint64_t best = 0;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const int64_t v = (int64_t{i / width} * kWarpSize + lane) * width + i % width;
    if (v < count) {
      z[i] = probs ? num::sanitize_prob(z[i]) : scaled_logit(z[i], scale);
      best = max(best, num::pack_arg(num::orderable(z[i]), static_cast<uint32_t>(begin + v)));
    }
  }
  best = warp_max_u64(best);
  const float m = num::from_orderable(num::packed_value(best));
  const float m_sum = greedy_target ? rescaled(m) : m;
  uint64_t sum = 0;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const int64_t v = (int64_t{i / width} * kWarpSize + lane) * width + i % width;
    if (v < count) sum += probs ? num::to_fixed(z[i]) : logit_term(greedy_target ? rescaled(z[i]) : z[i], m_sum);
  }
  sum = warp_sum_u64(sum);
  if (lane == 0) out[job] = ChunkStats{best, sum};
}

// ---------------------------------------------------------------------------
// Kernel 2: row statistics and decisions. A block owns one request; warp w
// combines the chunk statistics of the request's rows w, w + 8, ... (lanes
// over chunks: a max, then a sum of rescaled chunk sums), writing RowStats.
// Then thread 0 walks the drafts left to right (two logits and one Philox
// block per position) and writes the accepted tokens, the -1 padding, the
// greedy (or caller's bonus) token and, on request, their log-probabilities;
// other threads write direct soft-acceptance labels and clear the race and
// soft accumulators that kernel 3 adds into. With truncation the kernel runs
// twice (kRowsPhase, then kDecidePhase) around truncate_kernel.
// ---------------------------------------------------------------------------
constexpr int kRowsPhase = 1, kDecidePhase = 2;

__global__ void __launch_bounds__(kThreads)
decide_kernel(Problem p, int phases, int64_t chunks, int64_t draft_chunks, bool draft_rows,
              const ChunkStats* __restrict__ stats, RowStats* __restrict__ row_stats,
              Decision* __restrict__ decisions, unsigned long long* __restrict__ race_best,
              unsigned long long* __restrict__ soft_sums, int32_t* __restrict__ out_tokens, int64_t out_stride,
              int32_t* __restrict__ out_accepted, float* __restrict__ out_soft, float* __restrict__ out_logprobs,
              int64_t logprob_stride) {
  const int32_t r = blockIdx.x;
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const Span span = request_span(p, r);
  const RowStats* target_stats = row_stats;
  const RowStats* draft_stats = draft_rows ? row_stats + p.num_target_rows : nullptr;

  if ((phases & kRowsPhase) && span.valid) {
    const int n = span.num_draft;
    const int n_target = target_rows_of(p, span);
    const int rows = n_target + (draft_rows ? n : 0);
    const bool greedy = is_greedy(request_temperature(p, r));
    for (int i = warp; i < rows; i += kWarpsPerBlock) {
      const bool is_target = i < n_target;
      const int64_t global = is_target ? span.target_begin + i
                                       : p.num_target_rows + span.draft_begin + (i - n_target);
      const bool logits = is_target || p.mode == DraftMode::kLogits;
      const bool greedy_target = is_target && greedy;
      const int64_t count = is_target ? chunks : draft_chunks;
      const ChunkStats* c = is_target ? stats + global * chunks
                                      : stats + p.num_target_rows * chunks + (global - p.num_target_rows) * draft_chunks;
      uint64_t max_arg = 0;
      for (int64_t j = lane; j < count; j += kWarpSize) max_arg = max(max_arg, c[j].max_arg);
      max_arg = warp_max_u64(max_arg);
      const float row_max = num::from_orderable(num::packed_value(max_arg));
      const float row_max_rescaled = rescaled(row_max);
      uint64_t total = 0;
      for (int64_t j = lane; j < count; j += kWarpSize)
        total += greedy_target ? greedy_chunk_share(c[j], row_max_rescaled) : chunk_share(c[j], row_max, logits);
      total = warp_sum_u64(total);
      if (lane == 0) row_stats[global] = finish_row(max_arg, total, greedy_target);
    }
  }
  if (!(phases & kDecidePhase)) return;
  __syncthreads();

  if (threadIdx.x == 0) {
    race_best[2 * r] = 0;
    race_best[2 * r + 1] = 0;
    const Decision d = decide(p, r, target_stats, draft_stats);
    decisions[r] = d;
    int32_t* out = out_tokens + r * out_stride;
    float* lp = out_logprobs ? out_logprobs + r * logprob_stride : nullptr;
    for (int64_t i = 0; i <= p.max_num_draft; ++i) out[i] = -1;
    if (lp)
      for (int64_t i = 0; i <= p.max_num_draft; ++i) lp[i] = -num::kInf;
    if (span.valid) {
      for (int32_t k = 0; k < d.accepted; ++k) {
        out[k] = static_cast<int32_t>(load_index(p.tokens, p.token_dtype, span.draft_begin + k));
        if (lp) lp[k] = committed_logprob(p, r, k, out[k], target_stats);
      }
      if (d.kind == RaceKind::kNone) {
        out[d.accepted] = d.token;
        if (lp) lp[d.accepted] = committed_logprob(p, r, d.accepted, d.token, target_stats);
      }
    }
    out_accepted[r] = d.accepted;
  }
  if (out_soft && span.valid) {
    for (int k = threadIdx.x; k < span.num_draft; k += blockDim.x) {
      float value;
      if (soft_acceptance_direct(p, r, k, target_stats, draft_stats, value))
        out_soft[span.draft_begin + k] = value;
      else
        soft_sums[span.draft_begin + k] = 0;
    }
  }
}

// ---------------------------------------------------------------------------
// Kernel 2b (truncation only): a block of 1024 threads owns one target row of
// a sampled request with top-k / top-p / min-p and finds its cut and its
// normaliser over the kept tokens by radix selects (truncation.cuh: 3 passes
// for top-k, 3 for top-p or 1 sum pass, each reading the row, V b bytes, from
// L2 after the first); thread 0 writes RowStats.cut and inv_sum. Blocks of
// other rows return at once.
// ---------------------------------------------------------------------------
__global__ void __launch_bounds__(kTruncateThreads)
truncate_kernel(Problem p, RowStats* __restrict__ row_stats) {
  __shared__ TruncationShared shared;
  const int64_t row = blockIdx.x;
  const int32_t r = request_of_target_row(p, row);
  const Span span = request_span(p, r);
  if (!span.valid || row - span.target_begin >= target_rows_of(p, span)) return;
  const float temperature = request_temperature(p, r);
  const truncation::Truncation t = p.truncation.of(r);
  if (is_greedy(temperature) || !truncation::active(t, p.vocab)) return;
  const float scale = logit_scale(temperature);
  const RowStats s = row_stats[row];
  const auto z_of = [&](int64_t v) {
    return scaled_logit(load_float(p.target, p.target_dtype, row * p.target_stride + v), scale);
  };
  const truncation::Cut c = block_truncate(p.vocab, z_of, s.max, t, shared);
  if (threadIdx.x == 0) {
    row_stats[row].cut = c.cut;
    row_stats[row].inv_sum = c.total > 0 ? num::div(1.0f, num::from_fixed(c.total)) : 0.0f;
  }
}

// ---------------------------------------------------------------------------
// Kernel 3: races and soft-acceptance sums. A warp owns one chunk of one
// request's race row (or of one draft row's soft sum). Lane l takes groups of
// 4 consecutive columns (one Philox block each): group = chunk * 512 + it * 32
// + l. Per column: the target probability (and the draft one), an
// exponential, two keys; the warp's best packed keys go to the request's
// accumulators with atomicMax, which is order-independent, so the result
// does not depend on how the chunks were scheduled. Reads the race rows once.
// ---------------------------------------------------------------------------
__global__ void __launch_bounds__(kThreads)
race_kernel(Problem p, int64_t chunks, int64_t draft_chunks, bool draft_rows, bool soft,
            const RowStats* __restrict__ row_stats, const Decision* __restrict__ decisions,
            unsigned long long* __restrict__ race_best, unsigned long long* __restrict__ soft_sums) {
  constexpr int kGroups = static_cast<int>(kChunk) / 4 / kWarpSize;  // Philox blocks per lane
  const int lane = threadIdx.x % kWarpSize;
  const int64_t job = int64_t{blockIdx.x} * kWarpsPerBlock + threadIdx.x / kWarpSize;
  const int64_t race_jobs = int64_t{p.num_requests} * chunks;
  const RowStats* target_stats = row_stats;
  const RowStats* draft_stats = draft_rows ? row_stats + p.num_target_rows : nullptr;

  if (job < race_jobs) {
    const int32_t r = static_cast<int32_t>(job / chunks);
    const int64_t chunk = job % chunks;
    const Decision d = decisions[r];
    if (d.kind == RaceKind::kNone) return;
    const RaceRow rr = race_row(p, r, d);
    const RowStats ts = target_stats[rr.target_row];
    const RowStats ds = rr.draft_row >= 0 && draft_stats ? draft_stats[rr.draft_row] : RowStats{};
    uint64_t best_residual = 0, best_target = 0;
    for (int it = 0; it < kGroups; ++it) {
      const int64_t group = chunk * (kChunk / 4) + it * kWarpSize + lane;
      if (group * 4 >= p.vocab) break;
      const Philox4x32 bits = rr.stream.block(Purpose::kRace, rr.position, static_cast<uint32_t>(group));
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int64_t v = group * 4 + e;
        if (v >= p.vocab) break;
        float w_residual, w_target;
        race_weights(p, rr, v, ts, ds, w_residual, w_target);
        const float x = num::exponential(bits.v[e]);
        const uint32_t idx = static_cast<uint32_t>(v);
        best_residual = max(best_residual, num::pack_arg(num::float_bits(num::div(w_residual, x)), idx));
        best_target = max(best_target, num::pack_arg(num::float_bits(num::div(w_target, x)), idx));
      }
    }
    best_residual = warp_max_u64(best_residual);
    best_target = warp_max_u64(best_target);
    if (lane == 0) {
      atomicMax(&race_best[2 * r], static_cast<unsigned long long>(best_residual));
      atomicMax(&race_best[2 * r + 1], static_cast<unsigned long long>(best_target));
    }
    return;
  }
  if (!soft) return;
  const int64_t soft_job = job - race_jobs;
  if (soft_job >= p.num_draft_rows * draft_chunks) return;
  const int64_t drow = soft_job / draft_chunks;
  const int64_t chunk = soft_job % draft_chunks;
  const int32_t r = request_of_draft_row(p, drow);
  const Span span = request_span(p, r);
  if (!draft_row_in_span(span, drow) || soft_is_direct(p, r, drow)) return;
  const int64_t trow = span.target_begin + (drow - span.draft_begin);
  const float scale = logit_scale(request_temperature(p, r));
  const RowStats ts = target_stats[trow];
  const RowStats ds = draft_stats[drow];
  uint64_t sum = 0;
  const int64_t begin = chunk * kChunk, end = min(p.draft_columns, begin + kChunk);
  for (int64_t c = begin + lane; c < end; c += kWarpSize) sum += soft_column_term(p, trow, drow, c, scale, ts, ds);
  sum = warp_sum_u64(sum);
  if (lane == 0 && sum) atomicAdd(&soft_sums[drow], static_cast<unsigned long long>(sum));
}

// ---------------------------------------------------------------------------
// Draft vocabulary (before kernel 1): the inverse map, -1 everywhere, then the
// column of each target id of the map (a thread per element, 4 V + 8 V_d bytes).
// ---------------------------------------------------------------------------
__global__ void fill_index_kernel(int32_t* __restrict__ index, int64_t V) {
  const int64_t i = int64_t{blockIdx.x} * blockDim.x + threadIdx.x;
  if (i < V) index[i] = -1;
}

__global__ void scatter_index_kernel(const int32_t* __restrict__ draft_vocab, int64_t Vd, int64_t V,
                                     int32_t* __restrict__ index) {
  const int64_t c = int64_t{blockIdx.x} * blockDim.x + threadIdx.x;
  if (c >= Vd) return;
  const int32_t v = draft_vocab[c];
  if (v >= 0 && v < V) index[v] = static_cast<int32_t>(c);  // out-of-range ids: rejected by validation
}

// ---------------------------------------------------------------------------
// Kernel 4: one thread per request writes the race winner after the accepted
// drafts; one thread per draft row turns its soft sum into a float.
// ---------------------------------------------------------------------------
__global__ void __launch_bounds__(kFinalizeThreads)
finalize_kernel(Problem p, bool soft, const Decision* __restrict__ decisions,
                const unsigned long long* __restrict__ race_best,
                const unsigned long long* __restrict__ soft_sums, const RowStats* __restrict__ row_stats,
                int32_t* __restrict__ out_tokens, int64_t out_stride, float* __restrict__ out_soft,
                float* __restrict__ out_logprobs, int64_t logprob_stride) {
  const int64_t i = int64_t{blockIdx.x} * blockDim.x + threadIdx.x;
  if (i < p.num_requests) {
    const Decision d = decisions[i];
    if (d.kind != RaceKind::kNone) {
      const int32_t token = race_winner(race_best[2 * i], race_best[2 * i + 1]);
      out_tokens[i * out_stride + d.accepted] = token;
      if (out_logprobs)
        out_logprobs[i * logprob_stride + d.accepted] =
            committed_logprob(p, static_cast<int32_t>(i), d.accepted, token, row_stats);
    }
  }
  if (soft && i < p.num_draft_rows) {
    const int32_t r = request_of_draft_row(p, i);
    const Span span = request_span(p, r);
    if (!draft_row_in_span(span, i))
      out_soft[i] = 0.0f;
    else if (!soft_is_direct(p, r, i))
      out_soft[i] = soft_from_fixed(soft_sums[i]);  // direct labels were written by kernel 2
  }
}

bool rows_vector_aligned(const void* base, DType dtype, int64_t stride) {
  const int64_t row_bytes = stride * static_cast<int64_t>(dtype_size(dtype));
  return reinterpret_cast<uintptr_t>(base) % 16 == 0 && row_bytes % 16 == 0;
}

template <DType kTarget, DType kDraft>
void launch_chunk_stats(const Problem& p, int64_t chunks, int64_t draft_chunks, int64_t draft_rows, bool vt,
                        bool vd, ChunkStats* out, cudaStream_t stream) {
  const int64_t blocks = ceil_div(p.num_target_rows * chunks + draft_rows * draft_chunks, kWarpsPerBlock);
  chunk_stats_kernel<kTarget, kDraft><<<grid_size(blocks, kOp), kThreads, 0, stream>>>(
      p, chunks, draft_chunks, draft_rows, vt, vd, out);
}

template <DType kTarget>
void dispatch_draft(const Problem& p, int64_t chunks, int64_t draft_chunks, int64_t draft_rows, bool vt, bool vd,
                    ChunkStats* out, cudaStream_t stream) {
  switch (p.mode == DraftMode::kOneHot ? kTarget : p.draft_dtype) {
    case DType::kFloat32:
      return launch_chunk_stats<kTarget, DType::kFloat32>(p, chunks, draft_chunks, draft_rows, vt, vd, out, stream);
    case DType::kFloat16:
      return launch_chunk_stats<kTarget, DType::kFloat16>(p, chunks, draft_chunks, draft_rows, vt, vd, out, stream);
    default:
      return launch_chunk_stats<kTarget, DType::kBFloat16>(p, chunks, draft_chunks, draft_rows, vt, vd, out, stream);
  }
}

}  // namespace

void rejection_sample(const Problem& problem, const RejectionSampleArgs& args) {
  if (problem.num_requests == 0) return;
  DeviceGuard guard(args.target_logits.device.index, kOp);
  const cudaStream_t stream = static_cast<cudaStream_t>(args.stream);
  Problem p = problem;
  const bool draft_rows = p.mode != DraftMode::kOneHot;
  const bool soft = args.soft_acceptance.defined();
  const int64_t chunks = ceil_div(p.vocab, kChunk);
  const int64_t draft_chunks = ceil_div(p.draft_columns, kChunk);
  const RejectionWorkspace w = RejectionWorkspace::layout(p.num_requests, p.num_draft_rows, p.vocab, draft_rows,
                                                          soft, p.draft_columns, p.draft_vocab != nullptr);
  char* ws = args.workspace.ptr<char>();
  if (p.draft_vocab) {
    auto* index = reinterpret_cast<int32_t*>(ws + w.draft_index);
    fill_index_kernel<<<grid_size(ceil_div(p.vocab, kFinalizeThreads), kOp), kFinalizeThreads, 0, stream>>>(
        index, p.vocab);
    scatter_index_kernel<<<grid_size(ceil_div(p.draft_columns, kFinalizeThreads), kOp), kFinalizeThreads, 0,
                           stream>>>(p.draft_vocab, p.draft_columns, p.vocab, index);
    check(cudaGetLastError(), kOp, "draft index launches");
    p.draft_index = index;
  }
  auto* stats = reinterpret_cast<ChunkStats*>(ws + w.chunk_stats);
  auto* row_stats = reinterpret_cast<RowStats*>(ws + w.row_stats);
  auto* decisions = reinterpret_cast<Decision*>(ws + w.decisions);
  auto* race_best = reinterpret_cast<unsigned long long*>(ws + w.race_best);
  auto* soft_sums = reinterpret_cast<unsigned long long*>(ws + w.soft_sums);
  int32_t* out_tokens = args.output_tokens.ptr<int32_t>();
  const int64_t out_stride = args.output_tokens.stride(0);
  float* out_soft = soft ? args.soft_acceptance.ptr<float>() : nullptr;
  float* out_logprobs = args.output_logprobs.defined() ? args.output_logprobs.ptr<float>() : nullptr;
  const int64_t logprob_stride = out_logprobs ? args.output_logprobs.stride(0) : 0;

  const bool vt = rows_vector_aligned(p.target, p.target_dtype, p.target_stride);
  const bool vd = draft_rows && rows_vector_aligned(p.draft, p.draft_dtype, p.draft_stride);
  const int64_t n_draft_rows = draft_rows ? p.num_draft_rows : 0;
  switch (p.target_dtype) {
    case DType::kFloat32: dispatch_draft<DType::kFloat32>(p, chunks, draft_chunks, n_draft_rows, vt, vd, stats, stream); break;
    case DType::kFloat16: dispatch_draft<DType::kFloat16>(p, chunks, draft_chunks, n_draft_rows, vt, vd, stats, stream); break;
    default: dispatch_draft<DType::kBFloat16>(p, chunks, draft_chunks, n_draft_rows, vt, vd, stats, stream); break;
  }
  check(cudaGetLastError(), kOp, "chunk_stats_kernel launch");

  int32_t* out_accepted = args.num_accepted.ptr<int32_t>();
  if (p.truncation.any()) {
    decide_kernel<<<static_cast<unsigned>(p.num_requests), kThreads, 0, stream>>>(
        p, kRowsPhase, chunks, draft_chunks, draft_rows, stats, row_stats, decisions, race_best, soft_sums,
        out_tokens, out_stride, out_accepted, out_soft, out_logprobs, logprob_stride);
    check(cudaGetLastError(), kOp, "decide_kernel (rows) launch");
    truncate_kernel<<<grid_size(p.num_target_rows, kOp), kTruncateThreads, 0, stream>>>(p, row_stats);
    check(cudaGetLastError(), kOp, "truncate_kernel launch");
    decide_kernel<<<static_cast<unsigned>(p.num_requests), kThreads, 0, stream>>>(
        p, kDecidePhase, chunks, draft_chunks, draft_rows, stats, row_stats, decisions, race_best, soft_sums,
        out_tokens, out_stride, out_accepted, out_soft, out_logprobs, logprob_stride);
    check(cudaGetLastError(), kOp, "decide_kernel launch");
  } else {
    decide_kernel<<<static_cast<unsigned>(p.num_requests), kThreads, 0, stream>>>(
        p, kRowsPhase | kDecidePhase, chunks, draft_chunks, draft_rows, stats, row_stats, decisions, race_best,
        soft_sums, out_tokens, out_stride, out_accepted, out_soft, out_logprobs, logprob_stride);
    check(cudaGetLastError(), kOp, "decide_kernel launch");
  }

  const int64_t race_jobs = int64_t{p.num_requests} * chunks + (soft ? p.num_draft_rows * draft_chunks : 0);
  race_kernel<<<grid_size(ceil_div(race_jobs, kWarpsPerBlock), kOp), kThreads, 0, stream>>>(
      p, chunks, draft_chunks, draft_rows, soft, row_stats, decisions, race_best, soft_sums);
  check(cudaGetLastError(), kOp, "race_kernel launch");

  const int64_t finalize_items = std::max<int64_t>(p.num_requests, soft ? p.num_draft_rows : 0);
  finalize_kernel<<<grid_size(ceil_div(finalize_items, kFinalizeThreads), kOp),
                    kFinalizeThreads, 0, stream>>>(p, soft, decisions, race_best, soft_sums, row_stats,
                                                   out_tokens, out_stride, out_soft, out_logprobs, logprob_stride);
  check(cudaGetLastError(), kOp, "finalize_kernel launch");
}

}  // namespace dspark::cuda
