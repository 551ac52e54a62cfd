// CUDA backend of append_kv, rope and paged_attention.
//
// paged_attention (16-bit q / cache, head dim 64, 128, 256 or 512) is split-KV
// flash decoding over a paged cache, for both masks and an optional sliding
// window (dspark/ops.h):
//   tiles_kernel: the prefix of the query tiles per request (one block, a
//     block-wide scan).
//   attention_kernel: a block (Tile::kWarps warps of 16 rows) owns one (tile,
//     kv head, split). A tile is up to Tile::kRows query rows (64; 32 at head
//     dim 512): consecutive queries of one request times the G = H_q / H_kv
//     query heads that share the kv head, so every key and value loaded serves
//     all of them. The block walks its slice of the keys the tile can see,
//     Tile::kKeys keys at a time (64; 32 from head dim 256): keys and values
//     are gathered from the pages into shared memory with 16-byte loads, each
//     warp computes the scores of its 16 rows on tensor cores (WMMA 16x16x16,
//     float32 accumulate), runs the online softmax on them, and adds P V
//     (tensor cores again) into its float32 output rows; from head dim 256 the
//     P V product accumulates straight into the output rows in shared memory
//     (rescaled first), which is what lets 64 rows of 256 dims and 32 rows of
//     512 fit. With a sliding window W the slice starts at the tile's first
//     query position - W + 1: keys outside every row's window are never loaded.
//   merge_kernel (more than one split): the partial outputs are combined by
//     their log-sum-exps.
//   Bytes: keys and values are read once per (request, kv head, query tile):
//   for decode and verification (q_len * G <= rows per tile) that is once per
//   request and kv head, 2 n H_kv D b bytes per request with n = kv_len, or at
//   most W + q_len - 1 keys under a window, plus q and the output; the splits
//   add 4 (D + 1) H_q bytes per query and split of partials.
// Other dtypes and head dims (up to 512) use a float32 kernel with a warp per
// query row (correct, not tuned). append_kv and rope are elementwise.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <cub/block/block_scan.cuh>

#include <cstdint>

#include "../ops/attention_workspace.h"
#include "common.cuh"
#include "dspark/dtype_load.h"
#include "dspark/ops.h"

namespace dspark::cuda {
namespace {

constexpr int kFrag = 16;
constexpr int kSimtWarps = 4;  // attention_simt_kernel: warps (query rows) per block
constexpr int kSimtThreads = kSimtWarps * kWarpSize;
constexpr int kMaxSimtDim = 512;
constexpr float kNegInf = -__builtin_huge_valf();
constexpr int kTileScanThreads = 512;  // tiles_kernel: one block scans the requests
constexpr int kTileScanItems = 8;

// The tensor-core kernel's block shape for a head dim; shared memory per
// block (bytes, 16-bit): 64: 64 KB, 128: 120 KB, 256: 141 KB, 512: 166 KB.
template <int kDim>
struct Tile {
  static constexpr int kRows = static_cast<int>(AttentionPlan::rows_per_block(kDim));  // query rows per block
  static constexpr int kKeys = kDim >= 256 ? 32 : 64;  // keys per step
  static constexpr int kWarps = kRows / kFrag;         // a warp owns 16 rows
  static constexpr int kThreads = kWarps * kWarpSize;
  // P V accumulates into the output rows (true) or goes through the warp's
  // work rows first (false: the layout the smaller head dims were tuned with).
  static constexpr bool kPvIntoOutput = kDim >= 256;
  static constexpr int kWorkCols = kPvIntoOutput ? kKeys : (kDim > kKeys ? kDim : kKeys);
  static_assert(kRows % kFrag == 0 && kKeys % kFrag == 0 && kDim % kFrag == 0, "WMMA tiles");
  static_assert(AttentionPlan::kKeyTile % kKeys == 0, "a split is a whole number of key steps");
};

struct AttentionParams {
  const void* q;
  int64_t q_stride0, q_stride1;
  const void* k_cache;
  const void* v_cache;
  DType dtype;
  const int32_t* block_table;
  const int32_t* kv_lens;
  const int32_t* cu_q;
  int32_t* cu_tiles;
  void* out;
  float* lse;
  float* partial_out;
  float* partial_lse;
  int32_t R, Hq, Hkv, G, D, page_size, max_pages;
  int64_t T;
  bool causal;
  float scale;
  int64_t window;  // 0: none
  int64_t tokens_per_tile, max_tiles, splits, keys_per_split;
};

__device__ __forceinline__ const char* cache_row(const void* cache, const AttentionParams& p, int32_t r, int64_t key,
                                                 int32_t h, int esize) {
  const int64_t page = p.block_table[int64_t{r} * p.max_pages + key / p.page_size];
  return static_cast<const char*>(cache) + (((page * p.page_size + key % p.page_size) * p.Hkv + h) * p.D) * esize;
}

// Largest r in [0, R) with values[r] <= x (values non-decreasing).
__device__ __forceinline__ int32_t search(const int32_t* values, int32_t R, int64_t x) {
  int32_t lo = 0, hi = R - 1;
  while (lo < hi) {
    const int32_t mid = lo + (hi - lo + 1) / 2;
    if (values[mid] <= x) lo = mid; else hi = mid - 1;
  }
  return lo;
}

// One block: cu_tiles[r] = sum over r' < r of ceil(q_len_r' / tokens_per_tile),
// a block-wide exclusive scan over kTileScanItems requests per thread per
// pass, carried across passes (one pass up to R = 4096). Reads cu_q once.
template <int kScanThreads, int kItems>
__global__ void __launch_bounds__(kScanThreads) tiles_kernel(AttentionParams p) {
  using Scan = cub::BlockScan<int32_t, kScanThreads>;
  __shared__ typename Scan::TempStorage scan;
  int32_t carry = 0;
  for (int64_t base = 0; base < p.R; base += int64_t{kScanThreads} * kItems) {
    int32_t tiles[kItems];
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const int64_t r = base + int64_t{threadIdx.x} * kItems + i;
      const int64_t q_len = r < p.R ? max(int64_t{p.cu_q[r + 1]} - p.cu_q[r], int64_t{0}) : 0;
      tiles[i] = static_cast<int32_t>((q_len + p.tokens_per_tile - 1) / p.tokens_per_tile);
    }
    int32_t pass_total;
    Scan(scan).ExclusiveSum(tiles, tiles, pass_total);  // the aggregate reaches every thread
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const int64_t r = base + int64_t{threadIdx.x} * kItems + i;
      if (r < p.R) p.cu_tiles[r] = carry + tiles[i];
    }
    carry += pass_total;
    __syncthreads();  // the next pass reuses the scan's storage
  }
  if (threadIdx.x == 0) p.cu_tiles[p.R] = carry;
}

// Where a block's work is; returns false when the block has none.
struct BlockWork {
  int32_t r, h, split;
  int64_t q0, q_len, i0, i1;  // the request's first query, its count, and this tile's [i0, i1)
  int64_t kv, key_begin, key_end;
  int rows;
};

__device__ bool block_work(const AttentionParams& p, BlockWork& w) {
  const int64_t job = blockIdx.x;
  w.split = static_cast<int32_t>(job % p.splits);
  const int64_t rest = job / p.splits;
  w.h = static_cast<int32_t>(rest % p.Hkv);
  const int64_t tile = rest / p.Hkv;
  if (tile >= p.cu_tiles[p.R]) return false;
  w.r = search(p.cu_tiles, p.R, tile);
  w.q0 = p.cu_q[w.r];
  w.q_len = p.cu_q[w.r + 1] - w.q0;
  w.i0 = (tile - p.cu_tiles[w.r]) * p.tokens_per_tile;
  w.i1 = min(w.q_len, w.i0 + p.tokens_per_tile);
  w.rows = static_cast<int>((w.i1 - w.i0) * p.G);
  w.kv = p.kv_lens[w.r];
  // The splits cover the keys from the first one the tile's first query sees
  // (its position - window + 1 under a window, else key 0).
  const int64_t lo = p.window > 0 ? max(w.kv - w.q_len + w.i0 - p.window + 1, int64_t{0}) : 0;
  w.key_begin = lo + int64_t{w.split} * p.keys_per_split;
  w.key_end = min(w.kv, w.key_begin + p.keys_per_split);
  if (p.causal) w.key_end = min(w.key_end, w.kv - w.q_len + w.i1);  // the tile's last query sees no further
  return true;
}

// Query i of the request is at position kv - q_len + i.
__device__ __forceinline__ int64_t last_visible(const AttentionParams& p, const BlockWork& w, int64_t i) {
  return p.causal ? w.kv - w.q_len + i : w.kv - 1;
}

__device__ __forceinline__ int64_t first_visible(const AttentionParams& p, const BlockWork& w, int64_t i) {
  return p.window > 0 ? w.kv - w.q_len + i - p.window + 1 : 0;
}

// Writes one finished row: to the output (one split) or to the partials.
__device__ __forceinline__ void write_row(const AttentionParams& p, const BlockWork& w, int row, const float* o,
                                          float m, float l, int lane_in_row, int lanes_per_row) {
  const int64_t i = w.i0 + row / p.G;
  const int64_t t = w.q0 + i;
  const int32_t head = w.h * p.G + row % p.G;
  const float inv = l > 0.0f ? 1.0f / l : 0.0f;
  const float lse = l > 0.0f ? m + logf(l) : kNegInf;
  if (p.splits == 1) {
    const int64_t at = (t * p.Hq + head) * p.D;
    for (int d = lane_in_row; d < p.D; d += lanes_per_row) store_float(p.out, p.dtype, at + d, o[d] * inv);
    if (lane_in_row == 0 && p.lse) p.lse[t * p.Hq + head] = lse;
  } else {
    const int64_t row_index = (int64_t{w.split} * p.T + t) * p.Hq + head;
    for (int d = lane_in_row; d < p.D; d += lanes_per_row) p.partial_out[row_index * p.D + d] = o[d] * inv;
    if (lane_in_row == 0) p.partial_lse[row_index] = lse;
  }
}

template <typename T, int kDim>
struct Smem {
  using C = Tile<kDim>;
  T q[C::kRows * kDim];
  T k[C::kKeys * kDim];
  T v[C::kKeys * kDim];
  T p[C::kRows * C::kKeys];
  float work[C::kRows * C::kWorkCols];  // per warp: scores [16][kKeys] (then P V [16][D] below head dim 256)
  float o[C::kRows * kDim];
  float m[C::kRows], l[C::kRows], alpha[C::kRows];
};

template <typename T, int kDim>
// (Shared memory holds a block or two per SM: the launch bounds leave ptxas the
// registers it wants, which keeps every instantiation free of spills.)
__global__ void __launch_bounds__(Tile<kDim>::kThreads, 1) attention_kernel(AttentionParams p) {
  using namespace nvcuda;
  using C = Tile<kDim>;
  constexpr int kRows = C::kRows, kKeys = C::kKeys, kWarps = C::kWarps, kThreads = C::kThreads;
  constexpr int kWork = C::kWorkCols;
  constexpr int kKeysPerLane = kKeys / 2;  // the softmax runs two lanes per row
  extern __shared__ __align__(128) unsigned char raw[];
  Smem<T, kDim>& s = *reinterpret_cast<Smem<T, kDim>*>(raw);
  BlockWork w;
  if (!block_work(p, w)) return;
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  constexpr int kVec = 16 / sizeof(T);  // elements per 16-byte load
  constexpr int kVecPerRow = kDim / kVec;

  // Q rows (zero past the tile), output accumulators, softmax state.
  for (int idx = threadIdx.x; idx < kRows * kVecPerRow; idx += kThreads) {
    const int row = idx / kVecPerRow, c = idx % kVecPerRow;
    uint4 value = make_uint4(0, 0, 0, 0);
    if (row < w.rows) {
      const int64_t t = w.q0 + w.i0 + row / p.G;
      const int32_t head = w.h * p.G + row % p.G;
      value = *reinterpret_cast<const uint4*>(static_cast<const T*>(p.q) + t * p.q_stride0 + head * p.q_stride1 + c * kVec);
    }
    *reinterpret_cast<uint4*>(&s.q[row * kDim + c * kVec]) = value;
  }
  for (int idx = threadIdx.x; idx < kRows * kDim; idx += kThreads) s.o[idx] = 0.0f;
  for (int idx = threadIdx.x; idx < kRows; idx += kThreads) {
    s.m[idx] = kNegInf;
    s.l[idx] = 0.0f;
  }
  __syncthreads();

  float* work = s.work + warp * kFrag * kWork;
  T* pw = s.p + warp * kFrag * kKeys;
  const int row0 = warp * kFrag;
  const bool has_rows = row0 < w.rows;  // warp-uniform
  // The softmax runs two lanes per row: this lane's row sees the keys
  // [key_begin + seen_begin, key_begin + seen_end) of the slice (offsets fit
  // in int32: kv_lens are int32).
  const int softmax_row = row0 + lane / 2;
  const int64_t softmax_i = w.i0 + softmax_row / p.G;
  const int32_t span = static_cast<int32_t>(w.key_end - w.key_begin);
  const int32_t seen_end =
      softmax_row < w.rows ? static_cast<int32_t>(min(last_visible(p, w, softmax_i) + 1, w.key_end) - w.key_begin) : 0;
  const int32_t seen_begin = static_cast<int32_t>(max(first_visible(p, w, softmax_i) - w.key_begin, int64_t{0}));
  for (int32_t offset = 0; offset < span; offset += kKeys) {
    const int64_t j0 = w.key_begin + offset;
    // Keys and values of this step, zero past the slice.
    for (int idx = threadIdx.x; idx < kKeys * kVecPerRow; idx += kThreads) {
      const int j = idx / kVecPerRow, c = idx % kVecPerRow;
      uint4 kv4 = make_uint4(0, 0, 0, 0), vv4 = make_uint4(0, 0, 0, 0);
      if (j0 + j < w.key_end) {
        kv4 = reinterpret_cast<const uint4*>(cache_row(p.k_cache, p, w.r, j0 + j, w.h, sizeof(T)))[c];
        vv4 = reinterpret_cast<const uint4*>(cache_row(p.v_cache, p, w.r, j0 + j, w.h, sizeof(T)))[c];
      }
      *reinterpret_cast<uint4*>(&s.k[j * kDim + c * kVec]) = kv4;
      *reinterpret_cast<uint4*>(&s.v[j * kDim + c * kVec]) = vv4;
    }
    __syncthreads();
    if (has_rows) {
      // S = Q K^T for the warp's 16 rows and the step's keys.
#pragma unroll
      for (int n = 0; n < kKeys / kFrag; ++n) {
        wmma::fragment<wmma::accumulator, kFrag, kFrag, kFrag, float> acc;
        wmma::fill_fragment(acc, 0.0f);
#pragma unroll 8  // all of head dims 64 and 128; bounded register use at 256 and 512
        for (int kk = 0; kk < kDim; kk += kFrag) {
          wmma::fragment<wmma::matrix_a, kFrag, kFrag, kFrag, T, wmma::row_major> a;
          wmma::fragment<wmma::matrix_b, kFrag, kFrag, kFrag, T, wmma::col_major> b;
          wmma::load_matrix_sync(a, &s.q[row0 * kDim + kk], kDim);
          wmma::load_matrix_sync(b, &s.k[n * kFrag * kDim + kk], kDim);
          wmma::mma_sync(acc, a, b, acc);
        }
        wmma::store_matrix_sync(work + n * kFrag, acc, kKeys, wmma::mem_row_major);
      }
      __syncwarp();
      // Online softmax: two lanes per row, half of the keys each; this step's
      // visible columns are [c_begin, c_end) (the window's start, the mask's end).
      const int row = lane / 2, half = lane % 2;
      const int grow = softmax_row;
      const int c_end = max(min(seen_end - offset, kKeys), 0);
      const int c_begin = min(max(seen_begin - offset, 0), kKeys);
      float tile_max = kNegInf;
      for (int c = half * kKeysPerLane; c < (half + 1) * kKeysPerLane; ++c) {
        const float v = (c >= c_begin && c < c_end) ? work[row * kKeys + c] * p.scale : kNegInf;
        work[row * kKeys + c] = v;
        tile_max = fmaxf(tile_max, v);
      }
      tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
      const float m_old = s.m[grow];
      const float m_new = fmaxf(m_old, tile_max);
      const bool empty = m_new == kNegInf;  // no visible key yet
      const float alpha = empty ? 1.0f : __expf(m_old - m_new);
      float sum = 0.0f;
      for (int c = half * kKeysPerLane; c < (half + 1) * kKeysPerLane; ++c) {
        const float e = empty ? 0.0f : __expf(work[row * kKeys + c] - m_new);
        sum += e;
        pw[row * kKeys + c] = static_cast<T>(e);
      }
      sum += __shfl_xor_sync(0xffffffffu, sum, 1);
      __syncwarp();
      if (half == 0) {
        s.alpha[grow] = alpha;
        s.l[grow] = s.l[grow] * alpha + sum;
        s.m[grow] = m_new;
      }
      __syncwarp();
      if constexpr (C::kPvIntoOutput) {
        // O = alpha O, then O += P V with the accumulator loaded from O.
        for (int idx = lane; idx < kFrag * kDim; idx += kWarpSize) s.o[row0 * kDim + idx] *= s.alpha[row0 + idx / kDim];
        __syncwarp();
#pragma unroll 4
        for (int n = 0; n < kDim / kFrag; ++n) {
          wmma::fragment<wmma::accumulator, kFrag, kFrag, kFrag, float> acc;
          wmma::load_matrix_sync(acc, &s.o[row0 * kDim + n * kFrag], kDim, wmma::mem_row_major);
#pragma unroll
          for (int kk = 0; kk < kKeys; kk += kFrag) {
            wmma::fragment<wmma::matrix_a, kFrag, kFrag, kFrag, T, wmma::row_major> a;
            wmma::fragment<wmma::matrix_b, kFrag, kFrag, kFrag, T, wmma::row_major> b;
            wmma::load_matrix_sync(a, pw + kk, kKeys);
            wmma::load_matrix_sync(b, &s.v[kk * kDim + n * kFrag], kDim);
            wmma::mma_sync(acc, a, b, acc);
          }
          wmma::store_matrix_sync(&s.o[row0 * kDim + n * kFrag], acc, kDim, wmma::mem_row_major);
        }
      } else {
        // P V into the work rows, then O = alpha O + P V.
#pragma unroll
        for (int n = 0; n < kDim / kFrag; ++n) {
          wmma::fragment<wmma::accumulator, kFrag, kFrag, kFrag, float> acc;
          wmma::fill_fragment(acc, 0.0f);
#pragma unroll
          for (int kk = 0; kk < kKeys; kk += kFrag) {
            wmma::fragment<wmma::matrix_a, kFrag, kFrag, kFrag, T, wmma::row_major> a;
            wmma::fragment<wmma::matrix_b, kFrag, kFrag, kFrag, T, wmma::row_major> b;
            wmma::load_matrix_sync(a, pw + kk, kKeys);
            wmma::load_matrix_sync(b, &s.v[kk * kDim + n * kFrag], kDim);
            wmma::mma_sync(acc, a, b, acc);
          }
          wmma::store_matrix_sync(work + n * kFrag, acc, kDim, wmma::mem_row_major);
        }
        __syncwarp();
        for (int idx = lane; idx < kFrag * kDim; idx += kWarpSize) {
          const int rr = idx / kDim;
          float* o = &s.o[(row0 + rr) * kDim + idx % kDim];
          *o = s.alpha[row0 + rr] * *o + work[idx];
        }
      }
    }
    __syncthreads();  // the next step overwrites k and v
  }

  // Finished rows: 8 lanes per row, 4 rows per warp at a time.
  for (int row = warp * 4 + lane / 8; row < w.rows; row += kWarps * 4)
    write_row(p, w, row, &s.o[row * kDim], s.m[row], s.l[row], lane % 8, 8);
}

// float32 path (and other head dims): a warp per query row and head, keys one
// at a time (from the first in the row's window), no splits; a lane holds kPer
// dimensions of q and of the output (head dims up to 32 kPer).
template <int kPer>
__global__ void __launch_bounds__(kSimtThreads) attention_simt_kernel(AttentionParams p) {
  const int64_t row_id = int64_t{blockIdx.x} * kSimtWarps + threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  if (row_id >= p.T * p.Hq) return;
  const int64_t t = row_id / p.Hq;
  const int32_t head = static_cast<int32_t>(row_id % p.Hq);
  const int32_t r = search(p.cu_q, p.R, t);
  BlockWork w;
  w.r = r;
  w.h = head / p.G;
  w.split = 0;
  w.q0 = p.cu_q[r];
  w.q_len = p.cu_q[r + 1] - w.q0;
  w.i0 = t - w.q0;
  w.kv = p.kv_lens[r];
  const int64_t last = min(last_visible(p, w, w.i0), w.kv - 1);
  const int64_t first = max(first_visible(p, w, w.i0), int64_t{0});
  float q[kPer], o[kPer];
#pragma unroll
  for (int e = 0; e < kPer; ++e) {
    const int d = lane + e * kWarpSize;
    q[e] = d < p.D ? load_float(p.q, p.dtype, t * p.q_stride0 + head * p.q_stride1 + d) : 0.0f;
    o[e] = 0.0f;
  }
  const int esize = p.dtype == DType::kFloat32 ? 4 : 2;
  float m = kNegInf, l = 0.0f;
  for (int64_t j = first; j <= last; ++j) {
    const char* krow = cache_row(p.k_cache, p, r, j, w.h, esize);
    float dot = 0.0f;
#pragma unroll
    for (int e = 0; e < kPer; ++e) {
      const int d = lane + e * kWarpSize;
      if (d < p.D) dot = fmaf(q[e], load_float(krow, p.dtype, d), dot);
    }
#pragma unroll
    for (int off = kWarpSize / 2; off > 0; off >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, off);
    const float score = dot * p.scale;
    const float m_new = fmaxf(m, score);
    const float alpha = __expf(m - m_new), e_j = __expf(score - m_new);
    l = l * alpha + e_j;
    m = m_new;
    const char* vrow = cache_row(p.v_cache, p, r, j, w.h, esize);
#pragma unroll
    for (int e = 0; e < kPer; ++e) {
      const int d = lane + e * kWarpSize;
      o[e] = o[e] * alpha + (d < p.D ? e_j * load_float(vrow, p.dtype, d) : 0.0f);
    }
  }
  const float inv = l > 0.0f ? 1.0f / l : 0.0f;
#pragma unroll
  for (int e = 0; e < kPer; ++e) {
    const int d = lane + e * kWarpSize;
    if (d < p.D) store_float(p.out, p.dtype, (t * p.Hq + head) * p.D + d, o[e] * inv);
  }
  if (lane == 0 && p.lse) p.lse[t * p.Hq + head] = l > 0.0f ? m + logf(l) : kNegInf;
}

// A block per (query, head) row: combines the splits' partial outputs.
__global__ void merge_kernel(AttentionParams p) {
  const int64_t row = blockIdx.x;  // t * Hq + head
  float m = kNegInf;
  for (int64_t s = 0; s < p.splits; ++s) m = fmaxf(m, p.partial_lse[s * p.T * p.Hq + row]);
  float total = 0.0f;
  for (int64_t s = 0; s < p.splits; ++s) {
    const float lse = p.partial_lse[s * p.T * p.Hq + row];
    total += m == kNegInf ? 0.0f : __expf(lse - m);
  }
  for (int d = threadIdx.x; d < p.D; d += blockDim.x) {
    float acc = 0.0f;
    if (total > 0.0f)
      for (int64_t s = 0; s < p.splits; ++s) {
        const float lse = p.partial_lse[s * p.T * p.Hq + row];
        if (lse != kNegInf) acc += __expf(lse - m) * p.partial_out[(s * p.T * p.Hq + row) * p.D + d];
      }
    store_float(p.out, p.dtype, row * p.D + d, total > 0.0f ? acc / total : 0.0f);
  }
  if (threadIdx.x == 0 && p.lse) p.lse[row] = total > 0.0f ? m + logf(total) : kNegInf;
}

template <typename T, int kDim>
void launch_attention(const AttentionParams& p, unsigned blocks, cudaStream_t stream) {
  // The opt-in is per device: set it on every launch (cheap, graph-safe).
  const size_t smem = sizeof(Smem<T, kDim>);
  check(cudaFuncSetAttribute(attention_kernel<T, kDim>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             static_cast<int>(smem)),
        "paged_attention", "cudaFuncSetAttribute");
  attention_kernel<T, kDim><<<blocks, Tile<kDim>::kThreads, smem, stream>>>(p);
}

template <typename T>
void launch_attention(const AttentionParams& p, unsigned blocks, cudaStream_t stream) {
  switch (p.D) {
    case 64: launch_attention<T, 64>(p, blocks, stream); break;
    case 128: launch_attention<T, 128>(p, blocks, stream); break;
    case 256: launch_attention<T, 256>(p, blocks, stream); break;
    default: launch_attention<T, 512>(p, blocks, stream); break;
  }
}

// Shared memory the tensor-core kernel needs at a head dim (0: no such kernel).
size_t tensor_core_smem(int64_t D) {
  switch (D) {
    case 64: return sizeof(Smem<__half, 64>);
    case 128: return sizeof(Smem<__half, 128>);
    case 256: return sizeof(Smem<__half, 256>);
    case 512: return sizeof(Smem<__half, 512>);
    default: return 0;
  }
}

// ------------------------------------------------------------- elementwise

struct AppendParams {
  const void* k;
  const void* v;
  DType src_dtype;
  int64_t k_stride0, k_stride1, v_stride0, v_stride1;
  void* k_cache;
  void* v_cache;
  DType dst_dtype;
  const int64_t* slots;
  int64_t T, H, D, page_size, capacity;
};

// A block per (token, head) row pair of k and v; threads over D.
__global__ void append_kv_kernel(AppendParams p) {
  const int64_t t = blockIdx.x / p.H, h = blockIdx.x % p.H;
  const int64_t slot = p.slots[t];
  if (slot < 0 || slot >= p.capacity) return;  // padding (or a slot validation would reject)
  const int64_t to = (slot * p.H + h) * p.D;
  for (int64_t d = threadIdx.x; d < p.D; d += blockDim.x) {
    store_float(p.k_cache, p.dst_dtype, to + d, load_float(p.k, p.src_dtype, t * p.k_stride0 + h * p.k_stride1 + d));
    store_float(p.v_cache, p.dst_dtype, to + d, load_float(p.v, p.src_dtype, t * p.v_stride0 + h * p.v_stride1 + d));
  }
}

struct RopeParams {
  void* x;
  DType dtype;
  int64_t stride0, stride1, heads;
  const void* positions;
  DType position_dtype;
  const float* inv_freq;
  int64_t half;
};

// A block per (token, head); threads over the rotated pairs.
__global__ void rope_kernel(RopeParams p) {
  const int64_t t = blockIdx.x / p.heads, h = blockIdx.x % p.heads;
  const float pos = static_cast<float>(load_index(p.positions, p.position_dtype, t));
  const int64_t base = t * p.stride0 + h * p.stride1;
  for (int64_t i = threadIdx.x; i < p.half; i += blockDim.x) {
    float s, c;
    sincosf(pos * p.inv_freq[i], &s, &c);
    const float x1 = load_float(p.x, p.dtype, base + i), x2 = load_float(p.x, p.dtype, base + i + p.half);
    store_float(p.x, p.dtype, base + i, x1 * c - x2 * s);
    store_float(p.x, p.dtype, base + i + p.half, x2 * c + x1 * s);
  }
}

constexpr int kElementwiseThreads = 128;

}  // namespace

void append_kv(const AppendKvArgs& a) {
  const int64_t T = a.k.size(0), H = a.k.size(1);
  if (T == 0 || H == 0) return;
  DeviceGuard guard(a.k.device.index, "append_kv");
  AppendParams p{a.k.data, a.v.data, a.k.dtype, a.k.stride(0), a.k.stride(1), a.v.stride(0), a.v.stride(1),
                 a.k_cache.data, a.v_cache.data, a.k_cache.dtype, a.slot_mapping.ptr<int64_t>(), T, H,
                 a.k.size(2), a.k_cache.size(1), a.k_cache.size(0) * a.k_cache.size(1)};
  append_kv_kernel<<<grid_size(T * H, "append_kv"), kElementwiseThreads, 0, static_cast<cudaStream_t>(a.stream)>>>(p);
  check(cudaGetLastError(), "append_kv", "append_kv_kernel launch");
}

void rope(const RopeArgs& a) {
  const int64_t T = a.q.size(0);
  if (T == 0) return;
  DeviceGuard guard(a.q.device.index, "rope");
  for (const TensorView* x : {&a.q, &a.k}) {
    if (!x->defined() || x->size(1) == 0) continue;
    RopeParams p{x->data, x->dtype, x->stride(0), x->stride(1), x->size(1), a.positions.data, a.positions.dtype,
                 a.inv_freq.ptr<float>(), a.inv_freq.size(0)};
    rope_kernel<<<grid_size(T * x->size(1), "rope"), kElementwiseThreads, 0, static_cast<cudaStream_t>(a.stream)>>>(p);
    check(cudaGetLastError(), "rope", "rope_kernel launch");
  }
}

void paged_attention(const PagedAttentionArgs& a) {
  constexpr const char* op = "paged_attention";
  const int64_t T = a.q.size(0), Hq = a.q.size(1), D = a.q.size(2);
  const int64_t page_size = a.k_cache.size(1), Hkv = a.k_cache.size(2);
  const int64_t R = a.block_table.size(0), max_pages = a.block_table.size(1);
  if (T == 0 || Hq == 0) return;
  DeviceGuard guard(a.q.device.index, op);
  int smem_optin = 0;
  check(cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, a.q.device.index), op,
        "cudaDeviceGetAttribute");
  const size_t smem_needed = tensor_core_smem(D);
  const bool shapes_ok = AttentionPlan::tensor_core_shapes(a.q.dtype != DType::kFloat32, Hq, Hkv, D);
  const bool tensor_cores = shapes_ok && static_cast<size_t>(smem_optin) >= smem_needed &&
                            a.q.stride(1) % 8 == 0 && a.q.stride(0) % 8 == 0 &&
                            reinterpret_cast<uintptr_t>(a.q.data) % 16 == 0 &&
                            reinterpret_cast<uintptr_t>(a.k_cache.data) % 16 == 0 &&
                            reinterpret_cast<uintptr_t>(a.v_cache.data) % 16 == 0;
  if (!tensor_cores && D > kMaxSimtDim)
    throw ValueError(std::string(op) + ": head dim " + std::to_string(D) + " needs 16-bit q/cache with head dim 64, "
                     "128, 256 or 512 on CUDA, or at most " + std::to_string(kMaxSimtDim));
  const cudaStream_t stream = static_cast<cudaStream_t>(a.stream);
  const bool causal = a.mask == AttentionMask::kCausal;
  const AttentionPlan plan = AttentionPlan::make(T, R, Hq, Hkv, D, max_pages, page_size, a.window, causal);
  // Laid out as the caller sized it (by shapes), whichever kernel runs.
  const AttentionWorkspace layout =
      AttentionWorkspace::layout(T, R, Hq, Hkv, D, max_pages, page_size, shapes_ok, a.window, causal);
  char* ws = a.workspace.ptr<char>();

  AttentionParams p{};
  p.q = a.q.data;
  p.q_stride0 = a.q.stride(0);
  p.q_stride1 = a.q.stride(1);
  p.k_cache = a.k_cache.data;
  p.v_cache = a.v_cache.data;
  p.dtype = a.q.dtype;
  p.block_table = a.block_table.ptr<int32_t>();
  p.kv_lens = a.kv_lens.ptr<int32_t>();
  p.cu_q = a.cu_q.ptr<int32_t>();
  p.cu_tiles = reinterpret_cast<int32_t*>(ws + layout.cu_tiles);
  p.out = a.out.data;
  p.lse = a.lse.defined() ? a.lse.ptr<float>() : nullptr;
  p.partial_out = reinterpret_cast<float*>(ws + layout.partial_out);
  p.partial_lse = reinterpret_cast<float*>(ws + layout.partial_lse);
  p.R = static_cast<int32_t>(R);
  p.Hq = static_cast<int32_t>(Hq);
  p.Hkv = static_cast<int32_t>(Hkv);
  p.G = static_cast<int32_t>(Hq / Hkv);
  p.D = static_cast<int32_t>(D);
  p.page_size = static_cast<int32_t>(page_size);
  p.max_pages = static_cast<int32_t>(max_pages);
  p.T = T;
  p.causal = causal;
  p.scale = a.scale;
  p.window = a.window;
  p.tokens_per_tile = plan.tokens_per_tile;
  p.max_tiles = plan.max_tiles;
  p.splits = plan.splits;
  p.keys_per_split = plan.keys_per_split;

  if (!tensor_cores || R == 0) {
    if (R == 0) return;
    const unsigned blocks = grid_size((T * Hq + kSimtWarps - 1) / kSimtWarps, op);
    if (D <= 256) attention_simt_kernel<256 / kWarpSize><<<blocks, kSimtThreads, 0, stream>>>(p);
    else attention_simt_kernel<kMaxSimtDim / kWarpSize><<<blocks, kSimtThreads, 0, stream>>>(p);
    check(cudaGetLastError(), op, "attention_simt_kernel launch");
    return;
  }
  tiles_kernel<kTileScanThreads, kTileScanItems><<<1, kTileScanThreads, 0, stream>>>(p);
  check(cudaGetLastError(), op, "tiles_kernel launch");
  const unsigned blocks = grid_size(plan.max_tiles * Hkv * plan.splits, op);
  if (a.q.dtype == DType::kBFloat16) launch_attention<__nv_bfloat16>(p, blocks, stream);
  else launch_attention<__half>(p, blocks, stream);
  check(cudaGetLastError(), op, "attention_kernel launch");
  if (plan.splits > 1) {
    merge_kernel<<<grid_size(T * Hq, op), kElementwiseThreads, 0, stream>>>(p);
    check(cudaGetLastError(), op, "merge_kernel launch");
  }
}

}  // namespace dspark::cuda
