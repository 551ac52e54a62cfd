// CUDA backend of markov_sample and confidence.
//
// markov_sample: gamma + 1 launches for the vanilla head, 2 gamma + 1 for the
// gated and rnn heads, all on the caller's stream, no allocation, no host
// synchronisation.
//
//   vanilla_rows_kernel (vanilla, position 0): a block per request gathers
//     its A row (W1[anchor]) and clears the per-position block counters.
//   hidden_part_kernel (gated, rnn): W_h h for every (request, position), the
//     part of the head that does not depend on sampled tokens: a tiled
//     product (below) over the R gamma hidden rows, and the counters cleared.
//   head_rows_kernel (gated, rnn; before each position's step): the A rows of
//     the position from the token sampled before it, a tiled product over the
//     batch's requests (gate, or rnn cell and state update).
//   markov_step_kernel (one launch per position k):
//     A block owns one 256-column chunk of the vocabulary and a tile of 16
//     requests. It computes B = A W2^T for the tile: with 16-bit weights on
//     tensor cores (WMMA 16x16x16, 16-bit in, float32 accumulate; each of the
//     8 warps owns 32 columns and reads its W2 rows once), else with a float32
//     shared-memory tile. The epilogue (a warp per request, 8 columns per lane)
//     adds U, scales, and reduces the chunk to a ChunkState: its maximum, the
//     fixed-point sum and the race winner (dspark/markov.h), written to the
//     workspace. The last block to finish a request tile (a device-scope
//     counter per position and tile) combines the tile's chunk states into
//     tokens, log-probabilities and log-sum-exps and, for the vanilla head,
//     gathers the tile's A rows for position k + 1 (W1 rows).
//   markov_truncate_kernel (with top-k / top-p / min-p, after each step): a
//     block of 1024 threads per truncated request. The step kernel wrote the
//     request's row z (4 V bytes) to the workspace instead of racing it; this
//     block finds the cut and the kept set's normaliser (radix selects,
//     truncation.cuh: up to 7 passes over the row, from L2), races the kept
//     columns (one Philox block per 4 columns), writes the token, its
//     log-probability and the lse, sets the corrected logits outside the kept
//     set to -inf and, for the vanilla head, gathers the next A row.
//   Bytes per position: W2 once from HBM per concurrent request tile (V rank b;
//   tiles of the same chunk run together and share it through L2), U once
//   (R V b), corrected logits when asked (4 R V); the floor over the block is
//   gamma (V rank + R V) b plus small terms.
//
// The tiled head products (hidden_part_kernel, head_rows_kernel) compute
// Y = X W^T for a tile of 16 rows of X and a slice of 32 rows of W: X is
// staged in shared memory kInputChunk columns at a time, each warp owns 4 W
// rows and its lanes walk their columns (coalesced loads), keeping 16 partial
// sums per W row, one per X row, which a 16-shuffle butterfly reduces. W is
// read once per tile of 16 X rows (the head's weights: rank x rank elements
// per tile for the gated head, 3 rank x 2 rank for the rnn head; d x the
// hidden width for the hidden part), instead of once per request.
//
// confidence: a block per request, a warp per position (a dot of length
// d + rank), then the cumulative product.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <cstdint>
#include <type_traits>

#include "../ops/markov_workspace.h"
#include "../ops/request_params.h"
#include "common.cuh"
#include "dspark/dtype_load.h"
#include "dspark/markov.h"
#include "dspark/ops.h"
#include "dspark/sampling.h"
#include "dspark/truncation.h"
#include "truncation.cuh"

namespace dspark::cuda {
namespace {

using markov::ChunkState;
using markov::Head;
using markov::kMarkovChunk;

constexpr const char* kOp = "markov_sample";
constexpr int kRowTile = static_cast<int>(MarkovWorkspace::kRowTile);  // requests per block
constexpr int kWarps = 8;
constexpr int kThreads = kWarps * kWarpSize;
constexpr int kChunk = static_cast<int>(kMarkovChunk);  // columns per block
constexpr int kColsPerLane = kChunk / kWarpSize;        // 8 in the epilogue
constexpr int kWmma = 16;
constexpr int kSimtK = 16;  // K slice of the float32 shared-memory tile
constexpr int kHeadSlice = 32;                    // W rows per block of the tiled head products
constexpr int kRowsPerWarp = kHeadSlice / kWarps;  // 4
constexpr int kInputChunk = 256;                  // X columns staged at a time
constexpr int kTruncateThreads = 1024;            // markov_truncate_kernel: one block per request

static_assert(kChunk == kWarps * 2 * kWmma, "each warp owns two 16-column WMMA fragments");
static_assert(kRowTile == kWmma, "a request tile is one WMMA row block");
static_assert(kRowTile == 2 * kWarps, "the epilogue gives each warp two requests");
static_assert(kRowTile == 16, "warp_sum16 reduces 16 partial sums");
static_assert(kHeadSlice % kWarps == 0, "each warp owns whole W rows");

struct Params {
  // inputs
  const void* U;
  DType u_dtype;
  int64_t u_stride0, u_stride1;
  const void* anchors;
  DType anchor_dtype;
  const void* w1;
  DType w1_dtype;
  int64_t w1_stride;
  const void* w2;
  DType w2_dtype;
  int64_t w2_stride;
  const int32_t* draft_vocab;  // [V] target id of each column, or null (columns are target ids)
  Head head;
  const void* gate_weight;  // [rank, d + rank], rows gate_stride apart
  const void* gate_bias;
  DType gate_dtype, gate_bias_dtype;
  int64_t gate_stride;
  const void* joint_weight;  // [3 rank, 2 rank + d], rows joint_stride apart
  const void* joint_bias;
  DType joint_dtype, joint_bias_dtype;
  int64_t joint_stride;
  const void* hidden;
  DType hidden_dtype;
  int64_t hidden_stride0, hidden_stride1;
  RequestParams params;
  truncation::Params trunc;
  bool truncating;  // some request may be truncated: its rows go through z_rows
  int32_t R, gamma;
  int64_t V, rank, d;
  // outputs
  int64_t* tokens;
  float* logprobs;
  float* lse;
  float* corrected;
  // workspace
  float* a_rows;             // [R_pad, rank] float32, or 16-bit values in the first half (wmma)
  float* state;              // [2, R, rank]: the rnn state, written at k % 2, read at (k - 1) % 2
  float* hidden_part;        // [R, gamma, hidden_width]
  int64_t hidden_width;
  ChunkState* chunk_states;  // [R, chunks]
  float* z_rows;             // [R, V]: the rows of truncated requests at the current position
  unsigned int* counters;    // [gamma, tiles]
  int64_t chunks, tiles;
  bool wmma;                 // 16-bit weights on tensor cores
};

__device__ __forceinline__ float ld(const void* base, DType t, int64_t i) { return load_float(base, t, i); }

// Whether request r's sampled rows are truncated (raced by markov_truncate_kernel).
__device__ __forceinline__ bool truncated(const Params& p, int64_t r) {
  return p.truncating && !is_greedy(p.params.temperature_of(static_cast<int32_t>(r))) &&
         truncation::active(p.trunc.of(static_cast<int32_t>(r)), p.V);
}

// ------------------------------------------------------------ head rows

// Stores value v of A row r, column i: rounded to W2's dtype when the product
// takes 16-bit inputs (markov.h), in the layout the product reads.
__device__ __forceinline__ void store_a(const Params& p, int64_t r, int64_t i, float v) {
  v = round_to(v, p.w2_dtype);
  if (p.wmma && p.w2_dtype == DType::kBFloat16)
    reinterpret_cast<__nv_bfloat16*>(p.a_rows)[r * p.rank + i] = __float2bfloat16_rn(v);
  else if (p.wmma)
    reinterpret_cast<__half*>(p.a_rows)[r * p.rank + i] = __float2half_rn(v);
  else
    p.a_rows[r * p.rank + i] = v;
}

// Vanilla head: the A row of request r is W1[prev] (block-cooperative).
__device__ void vanilla_row(const Params& p, int64_t r, int64_t prev) {
  for (int64_t i = threadIdx.x; i < p.rank; i += blockDim.x) store_a(p, r, i, ld(p.w1, p.w1_dtype, prev * p.w1_stride + i));
}

// Clears the per-position block counters (block 0 of the first launch).
__device__ void clear_counters(const Params& p) {
  for (int64_t i = threadIdx.x; i < int64_t{p.gamma} * p.tiles; i += blockDim.x) p.counters[i] = 0;
}

// Vanilla head, position 0: a block per request; block 0 also clears the
// counters and the padding rows of the last tile (never used, but read by
// the WMMA loads).
__global__ void __launch_bounds__(kThreads) vanilla_rows_kernel(Params p) {
  const int64_t r = blockIdx.x;
  if (r == 0) {
    clear_counters(p);
    for (int64_t i = int64_t{p.R} * p.rank + threadIdx.x; i < p.tiles * kRowTile * p.rank; i += blockDim.x) {
      if (p.wmma) reinterpret_cast<uint16_t*>(p.a_rows)[i] = 0;
      else p.a_rows[i] = 0.0f;
    }
  }
  vanilla_row(p, r, load_index(p.anchors, p.anchor_dtype, r));
}

// Sums 16 per-lane values over the warp in 16 shuffles (a butterfly that
// halves the values kept at each step): lane l returns the sum of value l / 2.
__device__ __forceinline__ float warp_sum16(float (&v)[16], int lane) {
#pragma unroll
  for (int step = 0; step < 4; ++step) {
    const int half = 8 >> step, offset = 16 >> step;
    const bool upper = (lane & offset) != 0;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      if (i < half) {
        const float keep = upper ? v[half + i] : v[i];
        const float give = upper ? v[i] : v[half + i];
        v[i] = keep + __shfl_xor_sync(0xffffffffu, give, offset);
      }
    }
  }
  return v[0] + __shfl_xor_sync(0xffffffffu, v[0], 1);
}

// One weight operand of a tiled product: rows w_row0 + o (o < n) of a
// [*, *] matrix, columns col0 .. col0 + K - 1.
struct WeightSlice {
  const void* data;
  DType dtype;
  int64_t stride, row0, n, col0;
};

// y[q * y_stride + o] = sum_j X(q, j) W[row0 + o][col0 + j] for q < kRowTile and
// o < kHeadSlice (rows o >= n give 0). x_chunk holds kRowTile x kInputChunk
// floats of shared memory; load_x(q, j) returns X(q, j) (0 past the rows).
// Block-cooperative; ends with a barrier.
template <typename LoadX>
__device__ void tile_product(const WeightSlice& w, int64_t K, LoadX load_x, float* x_chunk, float* y,
                             int y_stride) {
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  float acc[kRowsPerWarp][kRowTile];
#pragma unroll
  for (int o = 0; o < kRowsPerWarp; ++o)
#pragma unroll
    for (int q = 0; q < kRowTile; ++q) acc[o][q] = 0.0f;
  for (int64_t j0 = 0; j0 < K; j0 += kInputChunk) {
    const int64_t width = min(int64_t{kInputChunk}, K - j0);
    for (int idx = threadIdx.x; idx < kRowTile * kInputChunk; idx += kThreads) {
      const int q = idx / kInputChunk, j = idx % kInputChunk;
      x_chunk[idx] = j < width ? load_x(q, j0 + j) : 0.0f;
    }
    __syncthreads();
#pragma unroll
    for (int o = 0; o < kRowsPerWarp; ++o) {
      const int64_t row = warp * kRowsPerWarp + o;
      if (row >= w.n) continue;  // warp-uniform
      const int64_t at = (w.row0 + row) * w.stride + w.col0 + j0;
      for (int j = lane; j < width; j += kWarpSize) {
        const float wv = ld(w.data, w.dtype, at + j);
#pragma unroll
        for (int q = 0; q < kRowTile; ++q) acc[o][q] = fmaf(wv, x_chunk[q * kInputChunk + j], acc[o][q]);
      }
    }
    __syncthreads();  // the next chunk overwrites x_chunk
  }
#pragma unroll
  for (int o = 0; o < kRowsPerWarp; ++o) {
    const float sum = warp_sum16(acc[o], lane);  // every lane takes part
    if (lane % 2 == 0) y[(lane / 2) * y_stride + warp * kRowsPerWarp + o] = sum;
  }
  __syncthreads();
}

// The shared memory of a tiled-product block: X chunk, then Y.
constexpr size_t kTileSharedFloats = kRowTile * kInputChunk + 3 * kRowTile * kHeadSlice;

// Gated / rnn heads: W_h h for every (request, position) into hidden_part
// (gated: W_g[:, :d]; rnn: W_j[:, 2 rank:]). A block owns a tile of 16 of the
// R gamma hidden rows and a slice of 32 outputs. Block 0 clears the counters.
__global__ void __launch_bounds__(kThreads) hidden_part_kernel(Params p) {
  __shared__ float shared[kTileSharedFloats];
  const int64_t slices = (p.hidden_width + kHeadSlice - 1) / kHeadSlice;
  const int64_t tile = blockIdx.x / slices, slice = blockIdx.x % slices;
  if (blockIdx.x == 0) clear_counters(p);
  const bool gated = p.head == Head::kGated;
  const int64_t rows = int64_t{p.R} * p.gamma, m0 = tile * kRowTile, o0 = slice * kHeadSlice;
  const WeightSlice w{gated ? p.gate_weight : p.joint_weight, gated ? p.gate_dtype : p.joint_dtype,
                      gated ? p.gate_stride : p.joint_stride, o0, min(int64_t{kHeadSlice}, p.hidden_width - o0),
                      gated ? 0 : 2 * p.rank};
  float* y = shared + kRowTile * kInputChunk;
  tile_product(
      w, p.d,
      [&](int q, int64_t j) {
        const int64_t m = m0 + q;
        if (m >= rows) return 0.0f;
        return ld(p.hidden, p.hidden_dtype, (m / p.gamma) * p.hidden_stride0 + (m % p.gamma) * p.hidden_stride1 + j);
      },
      shared, y, kHeadSlice);
  for (int idx = threadIdx.x; idx < kRowTile * kHeadSlice; idx += kThreads) {
    const int64_t m = m0 + idx / kHeadSlice, o = o0 + idx % kHeadSlice;
    if (m < rows && o < p.hidden_width) p.hidden_part[m * p.hidden_width + o] = y[idx];
  }
}

// Gated / rnn heads, position k: the A rows of a tile of 16 requests for a
// slice of 32 rank indices i. X is e = W1[x] (gated) or [s_{k-1} ; e] (rnn),
// with x the token sampled at position k - 1 (the anchor at k = 0); the
// products are W_g[i, d:] e (gated) and W_j[part rank + i, :2 rank] [s ; e] for
// the gate, candidate and output parts (rnn). Then the hidden part and the
// bias are added, the gate or the rnn cell applied (the state written to the
// other buffer), and the row stored. Padding rows of the last tile get 0.
__global__ void __launch_bounds__(kThreads) head_rows_kernel(Params p, int32_t k) {
  __shared__ float shared[kTileSharedFloats];
  __shared__ int64_t prev[kRowTile];
  const int64_t slices = (p.rank + kHeadSlice - 1) / kHeadSlice;
  const int64_t tile = blockIdx.x / slices, slice = blockIdx.x % slices;
  const int64_t row0 = tile * kRowTile, i0 = slice * kHeadSlice;
  const int64_t rank = p.rank;
  const bool rnn = p.head == Head::kRnn;
  const float* state_in = p.state + ((k + 1) % 2) * int64_t{p.R} * rank;  // s_{k-1} (unused at k = 0)
  float* state_out = p.state + (k % 2) * int64_t{p.R} * rank;
  if (threadIdx.x < kRowTile) {
    const int64_t r = row0 + threadIdx.x;
    prev[threadIdx.x] = r >= p.R ? 0 : k == 0 ? load_index(p.anchors, p.anchor_dtype, r) : p.tokens[r * p.gamma + k - 1];
  }
  __syncthreads();
  auto load_x = [&](int q, int64_t j) {
    const int64_t r = row0 + q;
    if (r >= p.R) return 0.0f;
    if (rnn && j < rank) return k == 0 ? 0.0f : state_in[r * rank + j];
    return ld(p.w1, p.w1_dtype, prev[q] * p.w1_stride + (rnn ? j - rank : j));
  };
  float* y = shared + kRowTile * kInputChunk;  // [kRowTile][3 kHeadSlice]
  constexpr int kYStride = 3 * kHeadSlice;
  const int64_t n = min(int64_t{kHeadSlice}, rank - i0);
  if (rnn) {
    for (int part = 0; part < 3; ++part)
      tile_product(WeightSlice{p.joint_weight, p.joint_dtype, p.joint_stride, part * rank + i0, n, 0}, 2 * rank,
                   load_x, shared, y + part * kHeadSlice, kYStride);
  } else {
    tile_product(WeightSlice{p.gate_weight, p.gate_dtype, p.gate_stride, i0, n, p.d}, rank, load_x, shared, y,
                 kYStride);
  }
  for (int idx = threadIdx.x; idx < kRowTile * kHeadSlice; idx += kThreads) {
    const int q = idx / kHeadSlice, il = idx % kHeadSlice;
    const int64_t r = row0 + q, i = i0 + il;
    if (i >= rank) continue;
    float a = 0.0f;
    if (r < p.R) {
      const float* part = p.hidden_part + (r * p.gamma + k) * p.hidden_width;
      const float e = ld(p.w1, p.w1_dtype, prev[q] * p.w1_stride + i);
      if (!rnn) {
        const float s = num::add(num::add(part[i], y[q * kYStride + il]), ld(p.gate_bias, p.gate_bias_dtype, i));
        a = num::mul(markov::sigmoid(s), e);
      } else {
        float z[3];
#pragma unroll
        for (int c = 0; c < 3; ++c)
          z[c] = num::add(num::add(part[c * rank + i], y[q * kYStride + c * kHeadSlice + il]),
                          ld(p.joint_bias, p.joint_bias_dtype, c * rank + i));
        const float g = markov::sigmoid(z[0]);
        const float s_prev = k == 0 ? 0.0f : state_in[r * rank + i];
        state_out[r * rank + i] = num::add(num::mul(g, s_prev), num::mul(num::sub(1.0f, g), markov::tanh_(z[1])));
        a = markov::tanh_(z[2]);
      }
    }
    store_a(p, r, i, a);
  }
}

// ------------------------------------------------------------- the step

struct Candidate {  // a race winner: larger key, then smaller column
  float key, z;
  int32_t column;
};

__device__ __forceinline__ Candidate warp_best(Candidate c) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) {
    Candidate o;
    o.key = __shfl_xor_sync(0xffffffffu, c.key, offset);
    o.z = __shfl_xor_sync(0xffffffffu, c.z, offset);
    o.column = __shfl_xor_sync(0xffffffffu, c.column, offset);
    if (markov::better(o.key, o.column, c.key, c.column)) c = o;
  }
  return c;
}

__device__ __forceinline__ float warp_max_f(float v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) v = num::fmax(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

__device__ __forceinline__ int32_t warp_min_i(int32_t v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) v = min(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

// B = A W2^T for a 16 x 256 tile on tensor cores, into c_tile [16][256].
template <typename T>
__device__ void tile_product_wmma(const Params& p, int64_t row0, int64_t v0, float* c_tile) {
  using namespace nvcuda;
  const int warp = threadIdx.x / kWarpSize;
  const T* a = reinterpret_cast<const T*>(p.a_rows) + row0 * p.rank;
  const T* w = static_cast<const T*>(p.w2);
  wmma::fragment<wmma::accumulator, kWmma, kWmma, kWmma, float> acc[2];
  wmma::fill_fragment(acc[0], 0.0f);
  wmma::fill_fragment(acc[1], 0.0f);
  for (int64_t kk = 0; kk < p.rank; kk += kWmma) {
    wmma::fragment<wmma::matrix_a, kWmma, kWmma, kWmma, T, wmma::row_major> fa;
    wmma::load_matrix_sync(fa, a + kk, static_cast<unsigned>(p.rank));
#pragma unroll
    for (int f = 0; f < 2; ++f) {
      const int64_t v = v0 + warp * 2 * kWmma + f * kWmma;
      wmma::fragment<wmma::matrix_b, kWmma, kWmma, kWmma, T, wmma::col_major> fb;
      wmma::load_matrix_sync(fb, w + v * p.w2_stride + kk, static_cast<unsigned>(p.w2_stride));
      wmma::mma_sync(acc[f], fa, fb, acc[f]);
    }
  }
#pragma unroll
  for (int f = 0; f < 2; ++f)
    wmma::store_matrix_sync(c_tile + warp * 2 * kWmma + f * kWmma, acc[f], kChunk, wmma::mem_row_major);
}

// The same product in float32 through shared memory (float32 weights, ranks
// that are not a multiple of 16, the vocabulary's last chunk). Thread t owns
// column t for the 16 requests; K advances in slices of kSimtK.
__device__ void tile_product_simt(const Params& p, int64_t row0, int64_t v0, float* c_tile, float* w_tile,
                                  float* a_tile) {
  const int t = threadIdx.x;
  float acc[kRowTile];
#pragma unroll
  for (int i = 0; i < kRowTile; ++i) acc[i] = 0.0f;
  const bool a16 = p.wmma;  // A rows stored as 16-bit values
  for (int64_t k0 = 0; k0 < p.rank; k0 += kSimtK) {
    const int64_t kn = min(int64_t{kSimtK}, p.rank - k0);
    // W2 slice [256 columns][kSimtK], row-padded against bank conflicts
    for (int idx = t; idx < kChunk * kSimtK; idx += kThreads) {
      const int c = idx / kSimtK, j = idx % kSimtK;
      const int64_t v = v0 + c;
      w_tile[c * (kSimtK + 1) + j] = (v < p.V && j < kn) ? ld(p.w2, p.w2_dtype, v * p.w2_stride + k0 + j) : 0.0f;
    }
    for (int idx = t; idx < kRowTile * kSimtK; idx += kThreads) {
      const int i = idx / kSimtK, j = idx % kSimtK;
      const int64_t r = row0 + i;
      float v = 0.0f;
      if (r < p.R && j < kn) {
        const int64_t at = r * p.rank + k0 + j;
        v = !a16 ? p.a_rows[at]
                 : (p.w2_dtype == DType::kBFloat16 ? __bfloat162float(reinterpret_cast<const __nv_bfloat16*>(p.a_rows)[at])
                                                   : __half2float(reinterpret_cast<const __half*>(p.a_rows)[at]));
      }
      a_tile[i * kSimtK + j] = v;
    }
    __syncthreads();
    for (int j = 0; j < kn; ++j) {
      const float wv = w_tile[t * (kSimtK + 1) + j];
#pragma unroll
      for (int i = 0; i < kRowTile; ++i) acc[i] = fmaf(a_tile[i * kSimtK + j], wv, acc[i]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < kRowTile; ++i) c_tile[i * kChunk + t] = acc[i];
}

template <typename T>
__global__ void __launch_bounds__(kThreads) markov_step_kernel(Params p, int32_t k) {
  // 16 KB product tile, then 17 KB of W2 slice (float32 path).
  __shared__ __align__(32) float smem[kRowTile * kChunk + kChunk * (kSimtK + 1)];
  __shared__ float a_tile[kRowTile * kSimtK];
  float* c_tile = smem;
  float* w_tile = smem + kRowTile * kChunk;
  __shared__ int64_t next_tokens[kRowTile];
  __shared__ bool last;
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  // Request tiles vary fastest, so the blocks resident together share a W2
  // chunk through L2.
  const int64_t tile = blockIdx.x % p.tiles, chunk = blockIdx.x / p.tiles;
  const int64_t v0 = chunk * kChunk, row0 = tile * kRowTile;
  const int64_t width = min(int64_t{kChunk}, p.V - v0);

  if constexpr (!std::is_same<T, float>::value) {
    if (p.wmma && width == kChunk) tile_product_wmma<T>(p, row0, v0, c_tile);
    else tile_product_simt(p, row0, v0, c_tile, w_tile, a_tile);
  } else {
    tile_product_simt(p, row0, v0, c_tile, w_tile, a_tile);
  }
  __syncthreads();

  // Epilogue: warp w reduces requests row0 + 2w and row0 + 2w + 1.
  for (int i = 2 * warp; i < 2 * warp + 2; ++i) {
    const int64_t r = row0 + i;
    if (r >= p.R) continue;  // warp-uniform
    const float temperature = p.params.temperature_of(static_cast<int32_t>(r));
    const bool greedy = is_greedy(temperature);
    const float scale = logit_scale(temperature);
    const bool keep_row = truncated(p, r);
    float z[kColsPerLane];
    float m = -num::kFloatMax;
    uint64_t best_arg = 0;
#pragma unroll
    for (int e = 0; e < kColsPerLane; ++e) {
      const int64_t col = lane * kColsPerLane + e;
      const int64_t v = v0 + col;
      if (col < width) {
        const float c = num::add(ld(p.U, p.u_dtype, r * p.u_stride0 + k * p.u_stride1 + v), c_tile[i * kChunk + col]);
        if (p.corrected) p.corrected[(r * p.gamma + k) * p.V + v] = c;
        z[e] = greedy ? num::sanitize_logit(c) : scaled_logit(c, scale);
        if (keep_row) p.z_rows[r * p.V + v] = z[e];
        m = num::fmax(m, z[e]);
        if (greedy) best_arg = max(best_arg, num::pack_arg(num::orderable(z[e]), static_cast<uint32_t>(v)));
      } else {
        z[e] = -num::kFloatMax;
      }
    }
    ChunkState cs;
    if (keep_row) {  // raced by markov_truncate_kernel: only the maximum is kept
      cs.max = warp_max_f(m);
      cs.sum = 0;
      cs.best_key = 0.0f;
      cs.best_z = cs.max;
      cs.best = 0;
    } else if (greedy) {
      best_arg = warp_max_u64(best_arg);
      cs.max = num::from_orderable(num::packed_value(best_arg));
      cs.best = static_cast<int32_t>(num::packed_index(best_arg));
      cs.sum = 0;
      cs.best_key = 0.0f;
      cs.best_z = cs.max;
    } else {
      m = warp_max_f(m);
      const RandomStream stream = p.params.stream_of(static_cast<int32_t>(r));
      uint64_t sum = 0;
      Candidate best{-1.0f, 0.0f, 0x7fffffff};
#pragma unroll
      for (int g = 0; g < kColsPerLane / 4; ++g) {
        const int64_t col0 = lane * kColsPerLane + g * 4;
        const Philox4x32 bits =
            stream.block(Purpose::kDraft, static_cast<uint32_t>(k), static_cast<uint32_t>((v0 + col0) / 4));
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          if (col0 + e >= width) continue;
          const float zz = z[g * 4 + e];
          const float weight = num::exp2(num::sub(zz, m));
          sum += num::to_fixed(weight);
          const float key = num::div(weight, num::exponential(bits.v[e]));
          const int32_t column = static_cast<int32_t>(v0 + col0 + e);
          if (markov::better(key, column, best.key, best.column)) best = Candidate{key, zz, column};
        }
      }
      sum = warp_sum_u64(sum);
      best = warp_best(best);
      cs.max = m;
      cs.sum = sum;
      cs.best_key = best.key;
      cs.best_z = best.z;
      cs.best = best.column;
    }
    if (lane == 0) p.chunk_states[r * p.chunks + chunk] = cs;
  }
  __threadfence();  // every writer publishes its chunk state before the count
  __syncthreads();
  if (threadIdx.x == 0)
    last = atomicAdd(&p.counters[int64_t{k} * p.tiles + tile], 1u) == static_cast<unsigned>(p.chunks - 1);
  __syncthreads();
  if (!last) return;  // block-uniform
  __threadfence();

  // The last block of this request tile: combine the chunks of each request
  // (truncated requests: markov_truncate_kernel).
  for (int i = 2 * warp; i < 2 * warp + 2; ++i) {
    const int64_t r = row0 + i;
    if (r >= p.R) continue;
    if (truncated(p, r)) {
      if (lane == 0) next_tokens[i] = -1;
      continue;
    }
    const ChunkState* cs = p.chunk_states + r * p.chunks;
    const bool greedy = is_greedy(p.params.temperature_of(static_cast<int32_t>(r)));
    float row_max = -num::kFloatMax;
    for (int64_t c = lane; c < p.chunks; c += kWarpSize) row_max = num::fmax(row_max, __ldcg(&cs[c].max));
    row_max = warp_max_f(row_max);
    int32_t token;
    float logprob = 0.0f, lse = markov::row_lse(row_max, row_max);
    if (greedy) {
      int32_t first = 0x7fffffff;
      for (int64_t c = lane; c < p.chunks; c += kWarpSize)
        if (__ldcg(&cs[c].max) == row_max) first = min(first, static_cast<int32_t>(c));
      first = warp_min_i(first);
      token = __ldcg(&cs[first].best);
    } else {
      uint64_t sum = 0;
      Candidate best{-1.0f, 0.0f, 0x7fffffff};
      for (int64_t c = lane; c < p.chunks; c += kWarpSize) {
        ChunkState s;
        s.max = __ldcg(&cs[c].max);
        s.sum = __ldcg(reinterpret_cast<const unsigned long long*>(&cs[c].sum));
        s.best_key = __ldcg(&cs[c].best_key);
        s.best_z = __ldcg(&cs[c].best_z);
        s.best = __ldcg(&cs[c].best);
        sum += num::rescale_fixed(s.sum, num::exp2(num::sub(s.max, row_max)));
        const float key = markov::rescaled_key(s, row_max);
        if (markov::better(key, s.best, best.key, best.column)) best = Candidate{key, s.best_z, s.best};
      }
      sum = warp_sum_u64(sum);
      best = warp_best(best);
      const float log2_sum = num::log2(num::from_fixed(sum));
      token = best.column;
      lse = markov::row_lse(row_max, num::mul(markov::kLn2, num::add(row_max, log2_sum)));
      logprob = num::mul(markov::kLn2, num::sub(num::sub(best.z, row_max), log2_sum));
    }
    if (p.draft_vocab) token = p.draft_vocab[token];  // the column's target id
    if (lane == 0) {
      p.tokens[r * p.gamma + k] = token;
      p.logprobs[r * p.gamma + k] = logprob;
      p.lse[r * p.gamma + k] = lse;
      next_tokens[i] = token;
    }
  }
  __syncthreads();
  if (k + 1 >= p.gamma || p.head != Head::kVanilla) return;  // gated / rnn: head_rows_kernel
  // Vanilla A rows of position k + 1 for this tile: W1 rows of the tokens.
  for (int i = 0; i < kRowTile && row0 + i < p.R; ++i)
    if (next_tokens[i] >= 0) vanilla_row(p, row0 + i, next_tokens[i]);
}

// ----------------------------------------------------------- truncation
// One block per request; blocks of requests that are not truncated return.
__global__ void __launch_bounds__(kTruncateThreads) markov_truncate_kernel(Params p, int32_t k) {
  __shared__ TruncationShared shared;
  __shared__ unsigned long long best_shared;
  const int64_t r = blockIdx.x;
  if (!truncated(p, r)) return;  // block-uniform
  const ChunkState* cs = p.chunk_states + r * p.chunks;
  float m = -num::kFloatMax;
  for (int64_t c = threadIdx.x; c < p.chunks; c += blockDim.x) m = num::fmax(m, cs[c].max);
  m = warp_max_f(m);
  // The row maximum: warp maxima combined through their orderable keys.
  __shared__ unsigned int max_key;
  if (threadIdx.x == 0) {
    max_key = 0;
    best_shared = 0;
  }
  __syncthreads();
  if (threadIdx.x % kWarpSize == 0) atomicMax(&max_key, num::orderable(m));
  __syncthreads();
  const float row_max = num::from_orderable(max_key);
  const float* z = p.z_rows + r * p.V;
  const truncation::Truncation t = p.trunc.of(static_cast<int32_t>(r));
  const truncation::Cut cut = block_truncate(p.V, [z](int64_t v) { return z[v]; }, row_max, t, shared);

  const RandomStream stream = p.params.stream_of(static_cast<int32_t>(r));
  uint64_t best = 0;
  for (int64_t g = threadIdx.x; g * 4 < p.V; g += blockDim.x) {
    const Philox4x32 bits = stream.block(Purpose::kDraft, static_cast<uint32_t>(k), static_cast<uint32_t>(g));
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int64_t v = g * 4 + e;
      if (v >= p.V) break;
      const float key = markov::truncated_key(z[v], row_max, cut.cut, bits.v[e]);
      best = max(best, num::pack_arg(num::float_bits(key), static_cast<uint32_t>(v)));
    }
  }
  best = warp_max_u64(best);
  if (threadIdx.x % kWarpSize == 0) atomicMax(&best_shared, static_cast<unsigned long long>(best));
  if (p.corrected) {
    float* corrected = p.corrected + (r * p.gamma + k) * p.V;
    for (int64_t v = threadIdx.x; v < p.V; v += blockDim.x)
      if (num::orderable(z[v]) < cut.cut) corrected[v] = -num::kInf;
  }
  __syncthreads();
  const int32_t column = static_cast<int32_t>(num::packed_index(best_shared));
  const int64_t token = p.draft_vocab ? p.draft_vocab[column] : column;  // the column's target id
  if (threadIdx.x == 0) {
    const markov::RowResult res = markov::truncated_result(column, z[column], row_max, cut.total);
    p.tokens[r * p.gamma + k] = token;
    p.logprobs[r * p.gamma + k] = res.logprob;
    p.lse[r * p.gamma + k] = res.lse;
  }
  if (k + 1 < p.gamma && p.head == Head::kVanilla) vanilla_row(p, r, token);
}

// ------------------------------------------------------------ confidence

struct ConfidenceParams {
  const void* hidden;
  DType hidden_dtype;
  int64_t hidden_stride0, hidden_stride1;
  const void* w1;
  DType w1_dtype;
  int64_t w1_stride;
  const void* anchors;
  DType anchor_dtype;
  const void* drafts;
  DType draft_dtype;
  int64_t draft_stride0, draft_stride1;
  const void* weight;
  DType weight_dtype;
  const void* bias_ptr;
  DType bias_dtype;
  const float* temperatures;
  int32_t R, gamma;
  int64_t d, rank;
  float *logits, *conf, *survival;
};

// A block per request; warp w takes positions w, w + 8, ...
__global__ void __launch_bounds__(kThreads) confidence_kernel(ConfidenceParams p) {
  const int32_t r = blockIdx.x;
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const float bias = ld(p.bias_ptr, p.bias_dtype, 0);
  for (int32_t k = warp; k < p.gamma; k += kWarps) {
    const int64_t prev = k == 0 ? load_index(p.anchors, p.anchor_dtype, r)
                                : load_index(p.drafts, p.draft_dtype, r * p.draft_stride0 + (k - 1) * p.draft_stride1);
    float s = 0.0f;
    for (int64_t j = lane; j < p.d; j += kWarpSize)
      s = fmaf(ld(p.hidden, p.hidden_dtype, r * p.hidden_stride0 + k * p.hidden_stride1 + j),
               ld(p.weight, p.weight_dtype, j), s);
    for (int64_t j = lane; j < p.rank; j += kWarpSize)
      s = fmaf(ld(p.w1, p.w1_dtype, prev * p.w1_stride + j), ld(p.weight, p.weight_dtype, p.d + j), s);
#pragma unroll
    for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) s += __shfl_xor_sync(0xffffffffu, s, offset);
    if (lane == 0) {
      const float logit = num::add(s, bias);
      const float t = p.temperatures ? p.temperatures[k] : 1.0f;
      p.logits[int64_t{r} * p.gamma + k] = logit;
      p.conf[int64_t{r} * p.gamma + k] = markov::confidence_of(num::div(logit, t));
    }
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    float a = 1.0f;
    for (int32_t k = 0; k < p.gamma; ++k) {
      a = num::mul(a, p.conf[int64_t{r} * p.gamma + k]);
      p.survival[int64_t{r} * p.gamma + k] = a;
    }
  }
}

bool aligned(const void* p, size_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

}  // namespace

void markov_sample(const MarkovSampleArgs& a) {
  const int64_t R = a.base_logits.size(0), gamma = a.base_logits.size(1), V = a.base_logits.size(2);
  if (R == 0 || gamma == 0) return;
  DeviceGuard guard(a.base_logits.device.index, kOp);
  const cudaStream_t stream = static_cast<cudaStream_t>(a.stream);
  const int64_t rank = a.w1.size(1);
  const int64_t d = a.head != Head::kVanilla ? a.hidden.size(2) : 0;
  const truncation::Params trunc = truncation_params(a.top_k, a.top_ks, a.top_p, a.top_ps, a.min_p, a.min_ps);
  const MarkovWorkspace w = MarkovWorkspace::layout(R, gamma, V, rank, d, a.head, trunc.any());
  char* ws = a.workspace.ptr<char>();

  Params p{};
  p.U = a.base_logits.data;
  p.u_dtype = a.base_logits.dtype;
  p.u_stride0 = a.base_logits.stride(0);
  p.u_stride1 = a.base_logits.stride(1);
  p.anchors = a.anchor_tokens.data;
  p.anchor_dtype = a.anchor_tokens.dtype;
  p.w1 = a.w1.data;
  p.w1_dtype = a.w1.dtype;
  p.w1_stride = a.w1.stride(0);
  p.w2 = a.w2.data;
  p.w2_dtype = a.w2.dtype;
  p.w2_stride = a.w2.stride(0);
  p.draft_vocab = a.draft_vocab.defined() ? a.draft_vocab.ptr<int32_t>() : nullptr;
  p.head = a.head;
  if (a.head == Head::kGated) {
    p.gate_weight = a.gate_weight.data;
    p.gate_dtype = a.gate_weight.dtype;
    p.gate_stride = a.gate_weight.stride(0);
    p.gate_bias = a.gate_bias.data;
    p.gate_bias_dtype = a.gate_bias.dtype;
  } else if (a.head == Head::kRnn) {
    p.joint_weight = a.joint_weight.data;
    p.joint_dtype = a.joint_weight.dtype;
    p.joint_stride = a.joint_weight.stride(0);
    p.joint_bias = a.joint_bias.data;
    p.joint_bias_dtype = a.joint_bias.dtype;
  }
  if (a.head != Head::kVanilla) {
    p.hidden = a.hidden.data;
    p.hidden_dtype = a.hidden.dtype;
    p.hidden_stride0 = a.hidden.stride(0);
    p.hidden_stride1 = a.hidden.stride(1);
  }
  p.params = RequestParams{a.temperature, a.temperatures.defined() ? a.temperatures.ptr<float>() : nullptr, a.seed,
                           a.seeds.defined() ? a.seeds.ptr<int64_t>() : nullptr,
                           a.seeds.defined() ? a.seeds.size(0) : 0, a.offset,
                           a.offsets.defined() ? a.offsets.ptr<int64_t>() : nullptr,
                           a.offsets.defined() ? a.offsets.size(0) : 0};
  p.trunc = trunc;
  p.truncating = trunc.any();
  p.R = static_cast<int32_t>(R);
  p.gamma = static_cast<int32_t>(gamma);
  p.V = V;
  p.rank = rank;
  p.d = d;
  p.tokens = a.draft_tokens.ptr<int64_t>();
  p.logprobs = a.logprobs.ptr<float>();
  p.lse = a.lse.ptr<float>();
  p.corrected = a.corrected.defined() ? a.corrected.ptr<float>() : nullptr;
  p.a_rows = reinterpret_cast<float*>(ws + w.a_rows);
  p.state = reinterpret_cast<float*>(ws + w.state);
  p.hidden_part = reinterpret_cast<float*>(ws + w.hidden_part);
  p.hidden_width = a.head == Head::kGated ? rank : a.head == Head::kRnn ? 3 * rank : 0;
  p.chunk_states = reinterpret_cast<ChunkState*>(ws + w.chunk_states);
  p.counters = reinterpret_cast<unsigned int*>(ws + w.counters);
  p.z_rows = p.truncating ? reinterpret_cast<float*>(ws + w.z_rows) : nullptr;
  p.chunks = (V + kChunk - 1) / kChunk;
  p.tiles = (R + kRowTile - 1) / kRowTile;
  // Tensor cores: 16-bit weights, rank a multiple of 16, 32-byte aligned fragments.
  p.wmma = a.w2.dtype != DType::kFloat32 && rank % kWmma == 0 && p.w2_stride % kWmma == 0 && aligned(p.w2, 32);

  // Grid sizes checked before the first launch (nothing is queued on error).
  const bool vanilla = a.head == Head::kVanilla;
  const unsigned grid = grid_size(p.chunks * p.tiles, kOp);
  const int64_t rank_slices = (rank + kHeadSlice - 1) / kHeadSlice;
  const int64_t part_tiles = (R * gamma + kRowTile - 1) / kRowTile;
  const unsigned rows_grid = grid_size(vanilla ? R : p.tiles * rank_slices, kOp);
  const unsigned part_grid = grid_size(vanilla ? 1 : part_tiles * ((p.hidden_width + kHeadSlice - 1) / kHeadSlice), kOp);
  if (vanilla) {
    vanilla_rows_kernel<<<rows_grid, kThreads, 0, stream>>>(p);
    check(cudaGetLastError(), kOp, "vanilla_rows_kernel launch");
  } else {
    hidden_part_kernel<<<part_grid, kThreads, 0, stream>>>(p);
    check(cudaGetLastError(), kOp, "hidden_part_kernel launch");
  }
  for (int32_t k = 0; k < gamma; ++k) {
    if (!vanilla) {
      head_rows_kernel<<<rows_grid, kThreads, 0, stream>>>(p, k);
      check(cudaGetLastError(), kOp, "head_rows_kernel launch");
    }
    switch (a.w2.dtype) {
      case DType::kBFloat16: markov_step_kernel<__nv_bfloat16><<<grid, kThreads, 0, stream>>>(p, k); break;
      case DType::kFloat16: markov_step_kernel<__half><<<grid, kThreads, 0, stream>>>(p, k); break;
      default: markov_step_kernel<float><<<grid, kThreads, 0, stream>>>(p, k); break;
    }
    check(cudaGetLastError(), kOp, "markov_step_kernel launch");
    if (p.truncating) {
      markov_truncate_kernel<<<static_cast<unsigned>(R), kTruncateThreads, 0, stream>>>(p, k);
      check(cudaGetLastError(), kOp, "markov_truncate_kernel launch");
    }
  }
}

void confidence(const ConfidenceArgs& a) {
  const int64_t R = a.hidden.size(0), gamma = a.hidden.size(1);
  if (R == 0 || gamma == 0) return;
  DeviceGuard guard(a.hidden.device.index, "confidence");
  ConfidenceParams p{};
  p.hidden = a.hidden.data;
  p.hidden_dtype = a.hidden.dtype;
  p.hidden_stride0 = a.hidden.stride(0);
  p.hidden_stride1 = a.hidden.stride(1);
  p.w1 = a.w1.data;
  p.w1_dtype = a.w1.dtype;
  p.w1_stride = a.w1.stride(0);
  p.anchors = a.anchor_tokens.data;
  p.anchor_dtype = a.anchor_tokens.dtype;
  p.drafts = a.draft_tokens.data;
  p.draft_dtype = a.draft_tokens.dtype;
  p.draft_stride0 = a.draft_tokens.stride(0);
  p.draft_stride1 = a.draft_tokens.stride(1);
  p.weight = a.weight.data;
  p.weight_dtype = a.weight.dtype;
  p.bias_ptr = a.bias.data;
  p.bias_dtype = a.bias.dtype;
  p.temperatures = a.temperatures.defined() ? a.temperatures.ptr<float>() : nullptr;
  p.R = static_cast<int32_t>(R);
  p.gamma = static_cast<int32_t>(gamma);
  p.d = a.hidden.size(2);
  p.rank = a.w1.size(1);
  p.logits = a.logits.ptr<float>();
  p.conf = a.conf.ptr<float>();
  p.survival = a.survival.ptr<float>();
  confidence_kernel<<<grid_size(R, "confidence"), kThreads, 0, static_cast<cudaStream_t>(a.stream)>>>(p);
  check(cudaGetLastError(), "confidence", "confidence_kernel launch");
}

}  // namespace dspark::cuda
