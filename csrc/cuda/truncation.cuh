// Truncation of one row by one thread block (dspark/truncation.h): the radix
// selects of top-k and top-p and the normaliser of what is kept, shared by the
// sampling kernels that truncate (rejection_sample's target rows,
// markov_sample's draft rows).
//
// A block owns a row of n columns; thread t visits columns t, t + blockDim,
// ... once per pass (z_of(v) reads and scales the logit: the row stays in L2
// between passes). A pass adds each column's weight into a shared histogram
// of kRadixBins uint64 words (16 KB) with shared-memory atomics (integer
// adds: the order does not matter); warp 0 then walks the buckets from the
// top: each lane sums its slice of bins, a shuffle scan gives the weight above
// each slice, and the one lane whose slice holds the crossing walks its bins.
// Passes: 3 for top-k, 3 for top-p (or 1 sum pass without top-p). Bytes: the
// row (n b) per pass, from L2 after the first.
#pragma once

#include <cstdint>

#include "common.cuh"
#include "dspark/truncation.h"

namespace dspark::cuda {

// Shared state of a block's truncation (in the caller's __shared__ memory).
struct TruncationShared {
  unsigned long long hist[truncation::kRadixBins];
  unsigned long long need;   // weight still needed inside the current prefix
  unsigned long long above;  // weight of the keys above the current prefix
  unsigned long long kept;   // after a select: the weight of {key >= t}; after a sum pass: the sum
  uint32_t prefix;
  int32_t ok;
};

// The largest key t with sum_{key_v >= t} weight(v) >= need_of(W) (W: the
// total weight), as truncation::select_host, and s.kept = the weight of
// {key >= t}. Every thread of the block calls it; the result is the same in
// all of them. Returns 0 (keep everything) if the total is below the need.
template <typename ZOf, typename WeightOf, typename NeedOf>
__device__ uint32_t block_select(int64_t n, const ZOf& z_of, const WeightOf& weight, const NeedOf& need_of,
                                 TruncationShared& s) {
  using namespace truncation;
  if (threadIdx.x == 0) {
    s.prefix = 0;
    s.above = 0;
    s.kept = 0;
    s.ok = 1;
  }
  for (int level = 0; level < kRadixLevels; ++level) {
    const int bins = 1 << radix_bits(level);
    for (int b = threadIdx.x; b < bins; b += blockDim.x) s.hist[b] = 0;
    __syncthreads();
    const uint32_t prefix = s.prefix;
    for (int64_t v = threadIdx.x; v < n; v += blockDim.x) {
      const float z = z_of(v);
      const uint32_t k = key(z);
      if (!in_prefix(k, prefix, level)) continue;
      const uint64_t w = weight(z, k);
      if (w) atomicAdd(&s.hist[bucket(k, level)], static_cast<unsigned long long>(w));
    }
    __syncthreads();
    if (threadIdx.x < kWarpSize) {
      const int lane = threadIdx.x;
      const int per_lane = bins / kWarpSize;
      const int lo = lane * per_lane;
      uint64_t mine = 0;
      for (int b = lo; b < lo + per_lane; ++b) mine += s.hist[b];
      // inclusive suffix sums over lanes: the weight of slices lane..31
      uint64_t suffix = mine;
#pragma unroll
      for (int offset = 1; offset < kWarpSize; offset <<= 1) {
        const uint64_t other = __shfl_down_sync(0xffffffffu, suffix, offset);
        if (lane + offset < kWarpSize) suffix += other;
      }
      const uint64_t total = __shfl_sync(0xffffffffu, suffix, 0);
      const uint64_t need = level == 0 ? need_of(total) : s.need;
      const uint64_t above_slice = suffix - mine;
      if (lane == 0 && total < need) s.ok = 0;
      if (above_slice < need && need <= suffix) {  // exactly one lane: the crossing is in its slice
        uint64_t acc = above_slice;
        for (int b = lo + per_lane - 1; b >= lo; --b) {
          if (acc + s.hist[b] >= need) {
            s.need = need - acc;
            s.above += acc;
            s.prefix |= static_cast<uint32_t>(b) << radix_shift(level);
            if (level == kRadixLevels - 1) s.kept = s.above + s.hist[b];
            break;
          }
          acc += s.hist[b];
        }
      }
    }
    __syncthreads();
    if (!s.ok) return 0;
  }
  return s.prefix;
}

// The block's truncation of a row: the cut key and the normaliser S (mass of
// the kept tokens relative to row_max), as truncation::truncate_host; the
// same in every thread after the call.
template <typename ZOf>
__device__ truncation::Cut block_truncate(int64_t n, const ZOf& z_of, float row_max, const truncation::Truncation& t,
                                          TruncationShared& s) {
  using namespace truncation;
  uint32_t base = 0;
  if (top_k_on(t, n)) {
    const uint64_t k = static_cast<uint64_t>(t.top_k);
    base = block_select(n, z_of, [](float, uint32_t) { return uint64_t{1}; },
                        [k](uint64_t) { return k; }, s);
  }
  if (min_p_on(t)) {
    const uint32_t m = min_p_cut(row_max, t.min_p);
    base = m > base ? m : base;
  }
  const auto weight = [base, row_max](float z, uint32_t k) {
    return k >= base ? mass(z, row_max) : uint64_t{0};
  };
  Cut c{base, 0};
  if (top_p_on(t)) {
    const float p = t.top_p;
    c.cut = block_select(n, z_of, weight, [p](uint64_t total) { return top_p_need(total, p); }, s);
    c.total = s.ok ? s.kept : 0;
    __syncthreads();  // s may be reused by the caller
    return c;
  }
  if (threadIdx.x == 0) s.kept = 0;
  __syncthreads();
  uint64_t mine = 0;
  for (int64_t v = threadIdx.x; v < n; v += blockDim.x) {
    const float z = z_of(v);
    mine += weight(z, key(z));
  }
  mine = warp_sum_u64(mine);
  if (threadIdx.x % kWarpSize == 0 && mine) atomicAdd(&s.kept, static_cast<unsigned long long>(mine));
  __syncthreads();
  c.total = s.kept;
  __syncthreads();
  return c;
}

}  // namespace dspark::cuda
