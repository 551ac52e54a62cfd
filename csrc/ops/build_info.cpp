#include <string>

#include "../cpu/parallel.h"
#include "dspark/ops.h"

#if defined(DSPARK_WITH_CUDA)
#include <cuda_runtime_api.h>
#endif

#ifndef DSPARK_CUDA_ARCHS
#define DSPARK_CUDA_ARCHS ""
#endif

namespace dspark {

BuildInfo build_info() {
  BuildInfo info;
#if defined(DSPARK_WITH_CUDA)
  info.cuda_compiled = true;
  info.cuda_archs = DSPARK_CUDA_ARCHS;
  info.cuda_runtime_version = CUDART_VERSION;
#else
  info.cuda_compiled = false;
  info.cuda_archs = "";
  info.cuda_runtime_version = 0;
#endif
#if defined(__clang__)
  info.compiler = std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  info.compiler = std::string("gcc ") + __VERSION__;
#else
  info.compiler = "unknown";
#endif
  return info;
}

#if !defined(DSPARK_WITH_CUDA)
int cuda_device_count(std::string* reason) {
  if (reason) *reason = "dspark was built without CUDA";
  return 0;
}
#endif

int cpu_num_threads() { return cpu::num_threads(); }
void set_cpu_num_threads(int n) { cpu::set_num_threads(n); }

}  // namespace dspark
