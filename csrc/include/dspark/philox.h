// Philox4x32-10, the counter-based generator of Salmon, Moraes, Dror and Shaw,
// "Parallel Random Numbers: As Easy as 1, 2, 3" (SC11). A pure function of a
// 128-bit counter and a 64-bit key: the same inputs give the same four words
// on the host, on the device and in dspark.reference (which reimplements it
// with tensor ops). Checked against the published known-answer vectors in
// tests/cpp/test_numerics.cpp and tests/test_rng.py.
#pragma once

#include <cstdint>

#include "dspark/macros.h"

namespace dspark {

struct Philox4x32 {
  uint32_t v[4];
};

namespace philox_detail {

constexpr uint32_t kMul0 = 0xD2511F53u;   // multiplier of word 0
constexpr uint32_t kMul1 = 0xCD9E8D57u;   // multiplier of word 2
constexpr uint32_t kWeyl0 = 0x9E3779B9u;  // key bump of word 0 (golden ratio)
constexpr uint32_t kWeyl1 = 0xBB67AE85u;  // key bump of word 1 (sqrt(3) - 1)
constexpr int kRounds = 10;

DSPARK_HD DSPARK_INLINE void mulhilo(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
#if defined(__CUDA_ARCH__)
  lo = a * b;
  hi = __umulhi(a, b);
#else
  const uint64_t p = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  lo = static_cast<uint32_t>(p);
  hi = static_cast<uint32_t>(p >> 32);
#endif
}

}  // namespace philox_detail

// Ten rounds of the Philox S-box; the key is bumped between rounds.
DSPARK_HD DSPARK_INLINE Philox4x32 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2,
                                                 uint32_t c3, uint32_t k0, uint32_t k1) {
  using namespace philox_detail;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < kRounds; ++round) {
    if (round > 0) {
      k0 += kWeyl0;
      k1 += kWeyl1;
    }
    uint32_t hi0, lo0, hi1, lo1;
    mulhilo(kMul0, c0, hi0, lo0);
    mulhilo(kMul1, c2, hi1, lo1);
    const uint32_t n0 = hi1 ^ c1 ^ k0;
    const uint32_t n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
  }
  return Philox4x32{{c0, c1, c2, c3}};
}

}  // namespace dspark
