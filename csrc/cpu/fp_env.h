// Denormal handling on the host. The shared numerics assume IEEE behaviour
// for subnormal inputs, as the CUDA backend has (it is built without
// flush-to-zero). A process may have switched the x86 DAZ / FTZ flags on
// (torch.set_flush_denormal(True) does, per thread); this guard switches them
// off for the duration of a CPU kernel and restores them afterwards.
#pragma once

#if defined(__SSE__) || defined(__x86_64__)
#include <xmmintrin.h>
#define DSPARK_HAVE_MXCSR 1
#endif

namespace dspark::cpu {

class IeeeDenormals {
 public:
  IeeeDenormals() {
#if defined(DSPARK_HAVE_MXCSR)
    saved_ = _mm_getcsr();
    const unsigned int ieee = saved_ & ~(kFlushToZero | kDenormalsAreZero);
    if (ieee != saved_) _mm_setcsr(ieee);
#endif
  }
  ~IeeeDenormals() {
#if defined(DSPARK_HAVE_MXCSR)
    if (_mm_getcsr() != saved_) _mm_setcsr(saved_);
#endif
  }
  IeeeDenormals(const IeeeDenormals&) = delete;
  IeeeDenormals& operator=(const IeeeDenormals&) = delete;

 private:
#if defined(DSPARK_HAVE_MXCSR)
  static constexpr unsigned int kFlushToZero = 1u << 15;
  static constexpr unsigned int kDenormalsAreZero = 1u << 6;
  unsigned int saved_ = 0;
#endif
};

}  // namespace dspark::cpu
