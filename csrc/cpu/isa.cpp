// The CPU kernels compiled for each instruction set (kernels.inc, included
// once per ISA with its target attribute), and the choice among them.
#include "isa.h"

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <vector>

#include "dspark/dtype_load.h"
#include "dspark/errors.h"
#include "dspark/numerics.h"
#include "dspark/philox.h"
#include "dspark/rejection.h"
#include "dspark/sampling.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define DSPARK_X86_DISPATCH 1
#endif

// GCC 12's AVX-512 intrinsic headers trip its own uninitialised-variable
// warnings (_mm512_undefined_*); the kernels below initialise all they use.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace dspark::cpu {

#define DSPARK_ISA_NS isa_baseline
#define DSPARK_TARGET
#define DSPARK_ISA_LEVEL 0
#include "kernels.inc"
#undef DSPARK_ISA_NS
#undef DSPARK_TARGET
#undef DSPARK_ISA_LEVEL

#if defined(DSPARK_X86_DISPATCH)
#define DSPARK_ISA_NS isa_avx2
#define DSPARK_TARGET __attribute__((target("avx2,fma,f16c")))
#define DSPARK_ISA_LEVEL 1
#include "kernels.inc"
#undef DSPARK_ISA_NS
#undef DSPARK_TARGET
#undef DSPARK_ISA_LEVEL

#define DSPARK_ISA_NS isa_avx512
#define DSPARK_TARGET \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,prefer-vector-width=512")))
#define DSPARK_ISA_LEVEL 2
#include "kernels.inc"
#undef DSPARK_ISA_NS
#undef DSPARK_TARGET
#undef DSPARK_ISA_LEVEL

#define DSPARK_ISA_NS isa_avx512bf16
#define DSPARK_TARGET \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c,prefer-vector-width=512")))
#define DSPARK_ISA_LEVEL 3
#include "kernels.inc"
#undef DSPARK_ISA_NS
#undef DSPARK_TARGET
#undef DSPARK_ISA_LEVEL
#endif

namespace {

const char* const kNames[kNumIsa] = {"baseline", "avx2", "avx512", "avx512bf16"};

const Kernels* table_of(Isa isa) {
  switch (isa) {
#if defined(DSPARK_X86_DISPATCH)
    case Isa::kAvx2: return &isa_avx2::kTable;
    case Isa::kAvx512: return &isa_avx512::kTable;
    case Isa::kAvx512Bf16: return &isa_avx512bf16::kTable;
#endif
    default: return &isa_baseline::kTable;
  }
}

std::atomic<const Kernels*> g_kernels{nullptr};
std::atomic<int32_t> g_isa{-1};
std::once_flag g_init;

void init_from_environment() {
  Isa isa = best_isa();
  if (const char* env = std::getenv("DSPARK_CPU_ISA")) {
    Isa wanted;
    if (parse_isa(env, &wanted) && isa_supported(wanted)) isa = wanted;
  }
  g_isa.store(static_cast<int32_t>(isa));
  g_kernels.store(table_of(isa));
}

}  // namespace

const char* isa_name(Isa isa) {
  const int i = static_cast<int>(isa);
  return i >= 0 && i < kNumIsa ? kNames[i] : "unknown";
}

bool parse_isa(const std::string& name, Isa* out) {
  for (int i = 0; i < kNumIsa; ++i)
    if (name == kNames[i]) {
      *out = static_cast<Isa>(i);
      return true;
    }
  return false;
}

bool isa_supported(Isa isa) {
  switch (isa) {
    case Isa::kBaseline: return true;
#if defined(DSPARK_X86_DISPATCH)
    case Isa::kAvx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    case Isa::kAvx512:
      return isa_supported(Isa::kAvx2) && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
    case Isa::kAvx512Bf16:
      return isa_supported(Isa::kAvx512) && __builtin_cpu_supports("avx512bf16");
#endif
    default: return false;
  }
}

Isa best_isa() {
  for (int i = kNumIsa - 1; i > 0; --i)
    if (isa_supported(static_cast<Isa>(i))) return static_cast<Isa>(i);
  return Isa::kBaseline;
}

Isa current_isa() {
  std::call_once(g_init, init_from_environment);
  return static_cast<Isa>(g_isa.load());
}

void set_isa(Isa isa) {
  std::call_once(g_init, init_from_environment);
  if (!isa_supported(isa))
    throw ValueError(std::string("set_cpu_isa: this CPU cannot run the '") + isa_name(isa) + "' kernels");
  g_isa.store(static_cast<int32_t>(isa));
  g_kernels.store(table_of(isa));
}

const Kernels& kernels() {
  const Kernels* k = g_kernels.load(std::memory_order_acquire);
  if (k) return *k;
  std::call_once(g_init, init_from_environment);
  return *g_kernels.load(std::memory_order_acquire);
}

}  // namespace dspark::cpu
