// CUDA backend of schedule_prefix: one launch of one block, no workspace, no
// host synchronisation (graph-capturable).
//
// A block owns the whole batch: R * gamma <= 16384 candidates, kItems per
// thread. Reads conf once (4 R gamma bytes) and the SPS table at most once per
// candidate (L1-cached); writes lengths (4 R bytes) and two words.
//
//   1. Each thread walks whole requests (r = tid, tid + kThreads, ...),
//      multiplies the clamped confidences left to right and stages a 30-bit
//      key (0x3f800000 - bits(a), so larger a sorts first; 2^30 for slots that
//      are not candidates) at slot (j - 1) * R + r. The candidate count T is
//      summed in shared memory, so every thread reads it after the barrier.
//   2. A block radix sort of the keys alone (no values: that is what keeps
//      the 1024 x 16 configuration within its 64 registers). Thread `tid`
//      then holds ranks tid * kItems .. tid * kItems + kItems - 1.
//   3. A block exclusive scan of each thread's total of fixed-point survivals
//      gives the sum before its first item; the thread walks its items with a
//      running sum, so theta_t and theta_{t-1} are local to each item. A block
//      reduction finds the stopping point (causal: first step that does not
//      improve; global: the best step; budget: min(K, T)); thread 0
//      broadcasts it through shared memory.
//   4. The admitted set is every candidate whose key is below the last
//      admitted key k*, plus the first m candidates equal to k* in the order
//      of dspark/schedule.h (ties: smaller j, then smaller r), which is the
//      slot order of step 1: the keys are staged again in that order (the
//      sorted ones are no longer needed) and a block scan ranks the ties.
//      Each admitted candidate adds 1 to its request's length (global
//      atomics); the block then sums the chosen survivals for the expected
//      throughput.
// Shared memory: one array of kSlots keys (the staging, the sort's storage,
// the sorted keys) and the small scan / reduction storage: 71 KB at
// 1024 x 16, within every CUDA GPU's opt-in limit since sm_80.
#include <cuda_runtime.h>

#include <cub/block/block_radix_sort.cuh>
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

#include <cstdint>
#include <string>

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
constexpr int kRadixBits = 4;

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

// The fixed-point survival a sorted key stands for (0 for a slot that is not a candidate).
__device__ __forceinline__ uint64_t key_term(uint32_t key) {
  return key != kNoKey ? num::to_fixed(num::bits_float(kOneBits - key)) : 0;
}

template <int kThreads, int kItems>
struct Kernel {
  // Keys only, without memoising the outer scan: both save registers.
  using Sort = cub::BlockRadixSort<uint32_t, kThreads, kItems, cub::NullType, kRadixBits, false>;
  using ScanU = cub::BlockScan<uint64_t, kThreads>;
  using ScanI = cub::BlockScan<int32_t, kThreads>;
  using ReduceI = cub::BlockReduce<int64_t, kThreads>;
  using ReduceU = cub::BlockReduce<uint64_t, kThreads>;
  using ReduceB = cub::BlockReduce<Best, kThreads>;
  static constexpr int kSlots = kThreads * kItems;

  struct Shared {
    union {
      uint32_t staged[kSlots];  // keys in (j, r) slot order (steps 1 and 4)
      typename Sort::TempStorage sort;
      uint32_t sorted[kSlots];  // the sorted keys, blocked by thread (step 3)
    } keys;
    union {
      typename ScanU::TempStorage scan_u;
      typename ScanI::TempStorage scan_i;
      typename ReduceI::TempStorage reduce_i;
      typename ReduceU::TempStorage reduce_u;
      typename ReduceB::TempStorage reduce_b;
    } temp;
  };
};

// Stages every slot's key in (j, r) order: kNoKey, then each thread's
// requests (r = tid, tid + kThreads, ...); returns the thread's candidates.
// Block-cooperative: starts and ends with a barrier around the writes.
template <int kThreads, int kItems>
__device__ int32_t stage_keys(const Params& p, uint32_t* staged) {
  for (int s = threadIdx.x; s < kThreads * kItems; s += kThreads) staged[s] = kNoKey;
  __syncthreads();
  int32_t mine = 0;
  for (int32_t r = threadIdx.x; r < p.R; r += kThreads) {
    const int32_t limit = position_limit(p.gamma, p.cap, r);
    float survival = 1.0f;
    for (int32_t j = 1; j <= limit; ++j) {
      survival = num::mul(survival, clamp_confidence(p.conf[int64_t{r} * p.gamma + j - 1]));
      if (!(survival > 0.0f)) break;
      staged[(j - 1) * p.R + r] = kOneBits - num::float_bits(survival);
      ++mine;
    }
  }
  __syncthreads();
  return mine;
}

template <int kThreads, int kItems>
__global__ void __launch_bounds__(kThreads) schedule_kernel(Params p) {
  using K = Kernel<kThreads, kItems>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  auto& smem = *reinterpret_cast<typename K::Shared*>(smem_raw);
  __shared__ int32_t candidates_shared;  // T
  __shared__ int64_t admitted_shared;    // the stopping point, from thread 0
  __shared__ uint32_t last_key_shared;   // k*, the key of the last admitted candidate
  __shared__ int64_t below_shared;       // admitted candidates with a key below k*
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
    // 1. keys, staged in (j, r) order; T counted in shared memory
    if (tid == 0) candidates_shared = 0;
    for (int32_t r = tid; r < R; r += kThreads) p.lengths[r] = 0;
    const int32_t mine = stage_keys<kThreads, kItems>(p, smem.keys.staged);
    if (mine) atomicAdd(&candidates_shared, mine);
    __syncthreads();
    uint32_t keys[kItems];
#pragma unroll
    for (int i = 0; i < kItems; ++i) keys[i] = smem.keys.staged[tid * kItems + i];
    __syncthreads();  // the sort's storage is the staging array

    // 2. sort by survival, descending; the sorted keys go to shared memory
    //    (the sort's storage), which keeps the steps below within registers
    typename K::Sort(smem.keys.sort).Sort(keys, 0, kKeyBits);
    __syncthreads();
#pragma unroll
    for (int i = 0; i < kItems; ++i) smem.keys.sorted[tid * kItems + i] = keys[i];
    const uint32_t* sk = smem.keys.sorted + tid * kItems;
    const int64_t T = candidates_shared;  // read after the sort: no register held across it

    // 3. the survival sum before this thread's first item; the stopping point
    uint64_t running = 0;
#pragma unroll
    for (int i = 0; i < kItems; ++i) running += key_term(sk[i]);
    typename K::ScanU(smem.temp.scan_u).ExclusiveSum(running, running);
    __syncthreads();

    int64_t admitted = 0;
    if (p.mode == Mode::kBudget) {
      const int64_t k = p.budgets ? (p.budgets_int64 ? static_cast<const int64_t*>(p.budgets)[0]
                                                     : static_cast<const int32_t*>(p.budgets)[0])
                                  : p.budget;
      admitted = min(max(k, int64_t{0}), T);
    } else if (R < p.table) {
      const double theta0 = throughput(R, 0, R, p.sps, p.table);
      if (p.mode == Mode::kCausal) {
        // The first step t (1-based rank) that does not improve on step t - 1;
        // t = T + 1 (past the candidates) always stops, and the starting value
        // stands for "no stop among my items" (T = kSlots: every slot admitted).
        int64_t first_stop = int64_t{K::kSlots} + 1;
#pragma unroll
        for (int i = 0; i < kItems; ++i) {
          const int64_t t = int64_t{tid} * kItems + i + 1;
          const uint64_t before = running;
          running += key_term(sk[i]);
          const bool valid = t <= T && R + t < p.table;
          const double theta = valid ? throughput(R, running, R + t, p.sps, p.table) : 0.0;
          const double previous = t == 1 ? theta0 : throughput(R, before, R + t - 1, p.sps, p.table);
          if (!(valid && theta > previous)) first_stop = min(first_stop, t);
        }
        const int64_t stop = typename K::ReduceI(smem.temp.reduce_i).Reduce(first_stop, MinOp());
        if (tid == 0) admitted_shared = min(stop - 1, T);
      } else {
        Best best{theta0, 0};
#pragma unroll
        for (int i = 0; i < kItems; ++i) {
          const int64_t t = int64_t{tid} * kItems + i + 1;
          running += key_term(sk[i]);
          if (t <= T && R + t < p.table) best = BestOp()(best, Best{throughput(R, running, R + t, p.sps, p.table), t});
        }
        const Best found = typename K::ReduceB(smem.temp.reduce_b).Reduce(best, BestOp());
        if (tid == 0) admitted_shared = found.t;
      }
      __syncthreads();
      admitted = admitted_shared;
    }

    // 4. lengths: keys below k*, then the first m ties in slot order
    if (admitted > 0) {
#pragma unroll
      for (int i = 0; i < kItems; ++i)
        if (int64_t{tid} * kItems + i == admitted - 1) last_key_shared = sk[i];
      __syncthreads();
      const uint32_t last_key = last_key_shared;
      int64_t below = 0;
#pragma unroll
      for (int i = 0; i < kItems; ++i) below += sk[i] < last_key;
      below = typename K::ReduceI(smem.temp.reduce_i).Sum(below);
      if (tid == 0) below_shared = below;
      __syncthreads();
      const int64_t ties = admitted - below_shared;  // m >= 1
      stage_keys<kThreads, kItems>(p, smem.keys.staged);  // the sorted keys are done with
      int32_t tie_rank = 0;
#pragma unroll
      for (int i = 0; i < kItems; ++i) tie_rank += smem.keys.staged[tid * kItems + i] == last_key;
      typename K::ScanI(smem.temp.scan_i).ExclusiveSum(tie_rank, tie_rank);
#pragma unroll
      for (int i = 0; i < kItems; ++i) {
        const int slot = tid * kItems + i;
        const uint32_t key = smem.keys.staged[slot];
        bool admit = key < last_key;
        if (key == last_key) admit = tie_rank++ < ties;
        if (admit) atomicAdd(&p.lengths[slot % R], 1);
      }
    }
  }
  __syncthreads();

  // Expected throughput and total of the chosen lengths (all modes); the
  // block reductions' results are used by thread 0 only.
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
  sum = typename K::ReduceU(smem.temp.reduce_u).Sum(sum);
  __syncthreads();
  total = typename K::ReduceI(smem.temp.reduce_i).Sum(total);
  if (tid == 0) {
    p.capacity[0] = static_cast<int32_t>(total);
    p.throughput[0] = p.sps ? saturate_float(throughput(R, sum, R + total, p.sps, p.table)) : 0.0f;
  }
}

template <int kThreads, int kItems>
void launch(const Params& p, int device, cudaStream_t stream) {
  // The opt-in is per device: set it on every launch (cheap, graph-safe).
  const size_t smem = sizeof(typename Kernel<kThreads, kItems>::Shared);
  int optin = 0;
  check(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device), kOp, "cudaDeviceGetAttribute");
  if (smem > static_cast<size_t>(optin))
    throw ValueError(std::string(kOp) + ": R * gamma = " + std::to_string(int64_t{p.R} * p.gamma) + " candidates need " +
                     std::to_string(smem) + " bytes of shared memory per block, this GPU allows " +
                     std::to_string(optin));
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
  const int device = a.conf.device.index;
  if (candidates <= 256 * 4) launch<256, 4>(p, device, stream);
  else if (candidates <= 512 * 8) launch<512, 8>(p, device, stream);
  else launch<1024, 16>(p, device, stream);
  check(cudaGetLastError(), kOp, "schedule_kernel launch");
}

}  // namespace dspark::cuda
