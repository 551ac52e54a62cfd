// CUDA backend of schedule_prefix: one launch of one block, no workspace, no
// host synchronisation (graph-capturable).
//
// A block owns the whole batch: R * gamma <= 16384 candidates, kItems per
// thread. Reads conf once (4 R gamma bytes) and the SPS table at most once per
// candidate (L1-cached); writes lengths (4 R bytes) and two words.
//
//   1. Each thread walks whole requests (r = tid, tid + kThreads, ...),
//      multiplies the clamped confidences left to right and stages a 30-bit
//      key (0x3f800000 - bits(a), so larger a sorts first; 0xffffffff for
//      positions that are not candidates, 2^30) at slot (j - 1) * R + r.
//   2. A stable block radix sort over the 31 key bits, carrying the slot. As
//      slots are laid out by (j, r), ties in a come out ordered by j, then r:
//      the order of dspark/schedule.h, the same as the CPU backend's sort.
//   3. A block scan of the fixed-point survivals gives every prefix sum;
//      theta_t and theta_{t-1} are then local to each item, and a block
//      reduction finds the stopping point (causal: first step that does not
//      improve; global: the best step; budget: min(K, T)).
//   4. Admitted candidates add 1 to their request's length (global atomics);
//      the block then sums the chosen survivals for the expected throughput.
#include <cuda_runtime.h>

#include <cub/block/block_radix_sort.cuh>
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

#include <cstdint>

#include "common.cuh"
#include "dspark/ops.h"
#include "dspark/schedule.h"

namespace dspark::cuda {
namespace {

using namespace schedule;

constexpr const char* kOp = "schedule_prefix";
constexpr uint32_t kOneBits = 0x3f800000u;  // bits of 1.0f: keys are kOneBits - bits(a)
constexpr uint32_t kNoKey = 1u << 30;       // above every key: kOneBits - bits(a) < 2^30
constexpr int kKeyBits = 31;

struct Params {
  const float* conf;
  const int32_t* cap;
  const float* sps;
  int64_t table;
  int32_t R, gamma;
  Mode mode;
  int64_t budget;
  const void* budgets;
  bool budgets_int64;
  float threshold;
  int32_t* lengths;
  float* throughput;
  int32_t* capacity;
};

struct MinOp {
  __device__ int64_t operator()(int64_t a, int64_t b) const { return b < a ? b : a; }
};

// The best step of the global search: larger theta, then smaller t.
struct Best {
  double theta;
  int64_t t;
};
struct BestOp {
  __device__ Best operator()(const Best& a, const Best& b) const {
    if (a.theta != b.theta) return a.theta > b.theta ? a : b;
    return a.t <= b.t ? a : b;
  }
};

template <int kThreads, int kItems>
struct Kernel {
  using Sort = cub::BlockRadixSort<uint32_t, kThreads, kItems, int32_t>;
  using Scan = cub::BlockScan<uint64_t, kThreads>;
  using ReduceI = cub::BlockReduce<int64_t, kThreads>;
  using ReduceU = cub::BlockReduce<uint64_t, kThreads>;
  using ReduceB = cub::BlockReduce<Best, kThreads>;
  static constexpr int kSlots = kThreads * kItems;

  union Shared {
    typename Sort::TempStorage sort;
    typename Scan::TempStorage scan;
    typename ReduceI::TempStorage reduce_i;
    typename ReduceU::TempStorage reduce_u;
    typename ReduceB::TempStorage reduce_b;
    struct {
      uint32_t keys[kSlots];
      int32_t slots[kSlots];
    } staging;
  };
};

template <int kThreads, int kItems>
__global__ void __launch_bounds__(kThreads) schedule_kernel(Params p) {
  using K = Kernel<kThreads, kItems>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  auto& smem = *reinterpret_cast<typename K::Shared*>(smem_raw);
  __shared__ int64_t admitted_shared;
  const int tid = threadIdx.x;
  const int32_t R = p.R, gamma = p.gamma;

  if (p.mode == Mode::kFixed || p.mode == Mode::kThreshold) {
    for (int32_t r = tid; r < R; r += kThreads) {
      const int32_t limit = position_limit(gamma, p.cap, r);
      p.lengths[r] = p.mode == Mode::kFixed
                         ? limit
                         : threshold_length(p.conf + int64_t{r} * gamma, limit, p.threshold);
    }
  } else {
    // 1. keys, staged in (j, r) order
    for (int s = tid; s < K::kSlots; s += kThreads) smem.staging.keys[s] = kNoKey;
    __syncthreads();
    for (int32_t r = tid; r < R; r += kThreads) {
      p.lengths[r] = 0;
      const int32_t limit = position_limit(gamma, p.cap, r);
      float survival = 1.0f;
      for (int32_t j = 1; j <= limit; ++j) {
        survival = num::mul(survival, clamp_confidence(p.conf[int64_t{r} * gamma + j - 1]));
        if (!(survival > 0.0f)) break;
        smem.staging.keys[(j - 1) * R + r] = kOneBits - num::float_bits(survival);
      }
    }
    __syncthreads();
    uint32_t keys[kItems];
    int32_t slots[kItems];
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      keys[i] = smem.staging.keys[tid * kItems + i];
      slots[i] = tid * kItems + i;
    }
    __syncthreads();  // the sort reuses the staging memory

    // 2. stable sort by survival, descending
    typename K::Sort(smem.sort).Sort(keys, slots, 0, kKeyBits);
    __syncthreads();

    // 3. prefix sums of the fixed-point survivals; the stopping point
    uint64_t sums[kItems];
    int64_t candidates = 0;
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const bool is_candidate = keys[i] != kNoKey;
      sums[i] = is_candidate ? num::to_fixed(num::bits_float(kOneBits - keys[i])) : 0;
      candidates += is_candidate;
    }
    typename K::Scan(smem.scan).InclusiveSum(sums, sums);
    __syncthreads();
    const int64_t T = typename K::ReduceI(smem.reduce_i).Sum(candidates);
    __syncthreads();

    if (tid == 0) admitted_shared = 0;
    int64_t admitted = 0;
    if (p.mode == Mode::kBudget) {
      const int64_t k = p.budgets ? (p.budgets_int64 ? static_cast<const int64_t*>(p.budgets)[0]
                                                     : static_cast<const int32_t*>(p.budgets)[0])
                                  : p.budget;
      admitted = min(max(k, int64_t{0}), T);
    } else if (R < p.table) {
      const double theta0 = throughput(R, 0, R, p.sps, p.table);
      if (p.mode == Mode::kCausal) {
        // first step t = position + 1 that does not improve on step t - 1
        int64_t first_stop = K::kSlots;
#pragma unroll
        for (int i = 0; i < kItems; ++i) {
          const int64_t t = int64_t{tid} * kItems + i + 1;
          const uint64_t before = sums[i] - (keys[i] != kNoKey ? num::to_fixed(num::bits_float(kOneBits - keys[i])) : 0);
          const bool valid = t <= T && R + t < p.table;
          const double theta = valid ? throughput(R, sums[i], R + t, p.sps, p.table) : 0.0;
          const double previous = t == 1 ? theta0 : throughput(R, before, R + t - 1, p.sps, p.table);
          if (!(valid && theta > previous)) first_stop = min(first_stop, t);
        }
        admitted = typename K::ReduceI(smem.reduce_i).Reduce(first_stop, MinOp()) - 1;
      } else {
        Best best{theta0, 0};
#pragma unroll
        for (int i = 0; i < kItems; ++i) {
          const int64_t t = int64_t{tid} * kItems + i + 1;
          if (t <= T && R + t < p.table) best = BestOp()(best, Best{throughput(R, sums[i], R + t, p.sps, p.table), t});
        }
        admitted = typename K::ReduceB(smem.reduce_b).Reduce(best, BestOp()).t;
      }
    }
    if (tid == 0 && p.mode != Mode::kBudget) admitted_shared = admitted;
    __syncthreads();
    if (p.mode != Mode::kBudget) admitted = admitted_shared;

    // 4. lengths
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const int64_t position = int64_t{tid} * kItems + i;
      if (position < admitted) atomicAdd(&p.lengths[slots[i] % R], 1);
    }
  }
  __syncthreads();

  // Expected throughput and total of the chosen lengths (all modes).
  uint64_t sum = 0;
  int64_t total = 0;
  for (int32_t r = tid; r < R; r += kThreads) {
    const int32_t l = __ldcg(&p.lengths[r]);
    float survival = 1.0f;
    for (int32_t j = 1; j <= l; ++j) {
      survival = num::mul(survival, clamp_confidence(p.conf[int64_t{r} * gamma + j - 1]));
      sum += num::to_fixed(survival);
    }
    total += l;
  }
  __syncthreads();
  sum = typename K::ReduceU(smem.reduce_u).Sum(sum);
  __syncthreads();
  total = typename K::ReduceI(smem.reduce_i).Sum(total);
  if (tid == 0) {
    p.capacity[0] = static_cast<int32_t>(total);
    p.throughput[0] = p.sps ? static_cast<float>(throughput(R, sum, R + total, p.sps, p.table)) : 0.0f;
  }
}

template <int kThreads, int kItems>
void launch(const Params& p, cudaStream_t stream) {
  // The opt-in is per device: set it on every launch (cheap, graph-safe).
  const size_t smem = sizeof(typename Kernel<kThreads, kItems>::Shared);
  check(cudaFuncSetAttribute(schedule_kernel<kThreads, kItems>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             static_cast<int>(smem)),
        kOp, "cudaFuncSetAttribute");
  schedule_kernel<kThreads, kItems><<<1, kThreads, smem, stream>>>(p);
}

}  // namespace

void schedule_prefix(const SchedulePrefixArgs& a) {
  DeviceGuard guard(a.conf.device.index, kOp);
  Params p{};
  p.conf = a.conf.ptr<float>();
  p.cap = a.cap.defined() ? a.cap.ptr<int32_t>() : nullptr;
  p.sps = a.sps.defined() ? a.sps.ptr<float>() : nullptr;
  p.table = a.sps.defined() ? a.sps.size(0) : 0;
  p.R = static_cast<int32_t>(a.conf.size(0));
  p.gamma = static_cast<int32_t>(a.conf.size(1));
  p.mode = a.mode;
  p.budget = a.budget;
  p.budgets = a.budgets.defined() ? a.budgets.data : nullptr;
  p.budgets_int64 = a.budgets.defined() && a.budgets.dtype == DType::kInt64;
  p.threshold = a.threshold;
  p.lengths = a.lengths.ptr<int32_t>();
  p.throughput = a.throughput.ptr<float>();
  p.capacity = a.capacity.ptr<int32_t>();
  const cudaStream_t stream = static_cast<cudaStream_t>(a.stream);
  const int64_t candidates = int64_t{p.R} * p.gamma;
  if (candidates <= 256 * 4) launch<256, 4>(p, stream);
  else if (candidates <= 512 * 8) launch<512, 8>(p, stream);
  else launch<1024, 16>(p, stream);
  check(cudaGetLastError(), kOp, "schedule_kernel launch");
}

}  // namespace dspark::cuda
