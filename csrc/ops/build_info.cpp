#include <string>

#if defined(__linux__)
#include <dlfcn.h>
#endif

#include "../cpu/isa.h"
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

namespace {

std::string version_string(int v) { return std::to_string(v / 1000) + "." + std::to_string(v % 1000 / 10); }

// The oldest Linux driver of each CUDA major version (NVIDIA's release notes).
const char* minimum_linux_driver(int major) {
  switch (major) {
    case 11: return "450.80.02";
    case 12: return "525.60.13";
    case 13: return "580.65.06";
    default: return nullptr;
  }
}

}  // namespace

int cuda_driver_version() {
#if defined(__linux__)
  // The runtime loads this library itself on first use; opening it here only
  // reads its version (cuDriverGetVersion needs no cuInit).
  void* lib = dlopen("libcuda.so.1", RTLD_LAZY | RTLD_LOCAL);
  if (!lib) return 0;
  using GetVersion = int (*)(int*);
  const auto get = reinterpret_cast<GetVersion>(dlsym(lib, "cuDriverGetVersion"));
  int version = 0;
  if (!get || get(&version) != 0) version = 0;
  return version;  // the handle stays open: the runtime uses the same library
#else
  return 0;
#endif
}

std::string cuda_driver_problem(int driver_version, int runtime_version) {
  const int major = runtime_version / 1000;
  const char* needed = minimum_linux_driver(major);
  const std::string need = "a CUDA " + std::to_string(major) + " build needs a driver for CUDA " +
                           std::to_string(major) + ".0 or newer" +
                           (needed ? std::string(" (Linux driver >= ") + needed + ")" : std::string());
  if (driver_version <= 0)
    return "no NVIDIA driver: libcuda.so.1 was not found; " + need;
  if (driver_version / 1000 < major)
    return "the NVIDIA driver supports CUDA " + version_string(driver_version) + ", older than this build's CUDA " +
           version_string(runtime_version) + " runtime: " + need;
  return "";
}

#if !defined(DSPARK_WITH_CUDA)
int cuda_device_count(std::string* reason) {
  if (reason) *reason = "dspark was built without CUDA";
  return 0;
}
#endif

int cpu_num_threads() { return cpu::num_threads(); }
void set_cpu_num_threads(int n) { cpu::set_num_threads(n); }

std::string cpu_isa() { return cpu::isa_name(cpu::current_isa()); }

std::vector<std::string> cpu_isas_supported() {
  std::vector<std::string> out;
  for (int i = 0; i < cpu::kNumIsa; ++i)
    if (cpu::isa_supported(static_cast<cpu::Isa>(i))) out.emplace_back(cpu::isa_name(static_cast<cpu::Isa>(i)));
  return out;
}

void set_cpu_isa(const std::string& name) {
  cpu::Isa isa;
  if (!cpu::parse_isa(name, &isa))
    throw ValueError("set_cpu_isa: argument 'name' must be one of baseline, avx2, avx512, avx512bf16, got '" + name +
                     "'");
  cpu::set_isa(isa);
}

}  // namespace dspark
