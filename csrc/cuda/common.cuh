// Helpers shared by the CUDA kernels.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "dspark/errors.h"

namespace dspark::cuda {

constexpr int kWarpSize = 32;

// Throws CudaError("<op>: <what>: <CUDA message>") on failure.
inline void check(cudaError_t status, const char* op, const char* what) {
  if (status != cudaSuccess)
    throw CudaError(std::string(op) + ": " + what + ": " + cudaGetErrorString(status));
}

// Makes `device` current for the scope of a call and restores the caller's.
class DeviceGuard {
 public:
  DeviceGuard(int device, const char* op) {
    check(cudaGetDevice(&previous_), op, "cudaGetDevice");
    if (previous_ != device) check(cudaSetDevice(device), op, "cudaSetDevice");
  }
  ~DeviceGuard() {
    int current = previous_;
    if (cudaGetDevice(&current) == cudaSuccess && current != previous_) cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
};

__device__ __forceinline__ uint64_t warp_max_u64(uint64_t v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) {
    const uint64_t other = __shfl_xor_sync(0xffffffffu, v, offset);
    v = other > v ? other : v;
  }
  return v;
}

__device__ __forceinline__ uint64_t warp_sum_u64(uint64_t v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// A 1-D grid of `blocks` blocks, or ValueError when the problem is too large.
inline unsigned grid_size(int64_t blocks, const char* op) {
  if (blocks > 0x7fffffff)
    throw ValueError(std::string(op) + ": problem too large for one launch (" +
                     std::to_string(blocks) + " blocks)");
  return static_cast<unsigned>(blocks);
}

}  // namespace dspark::cuda
