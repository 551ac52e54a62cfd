// Device discovery. With the CUDA runtime linked statically, the driver is
// loaded only here, on first use, so the module imports without one.
#include <cuda_runtime.h>

#include <string>

#include "dspark/ops.h"

namespace dspark {

int cuda_device_count(std::string* reason) {
  const std::string problem = cuda_driver_problem(cuda_driver_version(), CUDART_VERSION);
  if (!problem.empty()) {
    if (reason) *reason = problem;
    return 0;
  }
  int count = 0;
  const cudaError_t status = cudaGetDeviceCount(&count);
  if (status != cudaSuccess) {
    if (reason) *reason = std::string("the CUDA runtime reports: ") + cudaGetErrorString(status);
    cudaGetLastError();  // clear the sticky error state of this thread
    return 0;
  }
  if (count == 0 && reason) *reason = "no CUDA device is visible";
  return count;
}

}  // namespace dspark
