// Floating-point conventions shared by every backend.
//
// Every quantity that decides a sampled token (probabilities, normalisers,
// race keys, acceptance ratios) is computed by the functions in this file, on
// the host and on the device alike, so the CPU and CUDA backends produce
// bit-identical results for identical inputs:
//   * only correctly rounded IEEE operations (add, sub, mul, div, conversions)
//     appear, through wrappers the compiler may not fuse into FMAs (device
//     code uses the __f*_rn intrinsics; host code is compiled with
//     -ffp-contract=off);
//   * exp2 and log2 are evaluated by polynomials written here, never by the
//     platform's libm or SFU, whose last bits differ between CPU and GPU;
//   * sums over the vocabulary are fixed-point integer sums, which are exact
//     and therefore independent of summation order, thread layout and of how
//     many blocks split a row. This is also what makes a request's result
//     independent of the rest of the batch on the GPU.
//
// Softmax is evaluated in base 2: a logit l at temperature T becomes
// z = l * (log2(e) / T), and softmax(l / T)_v = 2^(z_v - M) / sum_u 2^(z_u - M).
#pragma once

#include <cstdint>
#include <cstring>

#include "dspark/macros.h"

namespace dspark::num {

// ---------------------------------------------------------------- constants

constexpr float kLog2e = 0x1.715476p+0f;        // log2(e)
constexpr float kLn2 = 0x1.62e430p-1f;          // ln(2)
constexpr float kTwoLog2e = 0x1.715476p+1f;     // 2 * log2(e)
constexpr float kSqrt2 = 0x1.6a09e6p+0f;
constexpr float kFloatMax = 0x1.fffffep+127f;
constexpr float kInf = __builtin_inff();
constexpr float kOneMinusUlp = 0x1.fffffep-1f;  // largest float below 1

// 2^x below 2^kExp2Min is flushed to zero, and so is every probability,
// residual weight or race weight below kMinWeight. No denormal is ever
// produced, so results do not depend on a CPU's flush-to-zero mode.
constexpr float kExp2Min = -100.0f;
constexpr float kMinWeight = 0x1p-100f;

// Fixed-point sums carry kFixedFracBits fractional bits. A term in [0, 1]
// loses at most 2^-41 to rounding; a chunk of up to 2^11 terms sums below 2^51
// and a row of up to 2^24 terms below 2^64.
constexpr int kFixedFracBits = 40;
constexpr float kFixedScale = 0x1p40f;
constexpr float kFixedInvScale = 0x1p-40f;

// ------------------------------------------------------ unfused arithmetic

DSPARK_HD DSPARK_INLINE float add(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

DSPARK_HD DSPARK_INLINE float sub(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}

DSPARK_HD DSPARK_INLINE float mul(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

DSPARK_HD DSPARK_INLINE float div(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

DSPARK_HD DSPARK_INLINE float fmin(float a, float b) { return b < a ? b : a; }
DSPARK_HD DSPARK_INLINE float fmax(float a, float b) { return a < b ? b : a; }

DSPARK_HD DSPARK_INLINE uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
#endif
}

DSPARK_HD DSPARK_INLINE float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
#endif
}

DSPARK_HD DSPARK_INLINE float u32_to_float(uint32_t x) {
#if defined(__CUDA_ARCH__)
  return __uint2float_rn(x);
#else
  return static_cast<float>(x);
#endif
}

DSPARK_HD DSPARK_INLINE float u64_to_float(uint64_t x) {
#if defined(__CUDA_ARCH__)
  return __ull2float_rn(x);
#else
  return static_cast<float>(x);
#endif
}

// --------------------------------------------------------- input cleaning

// A logit after temperature scaling. NaN and -inf become -FLT_MAX (zero
// probability, unless every entry of the row is, which makes the row
// uniform); +inf becomes FLT_MAX (the +inf entries share the mass equally);
// -0 becomes +0, so that equal values have equal keys (orderable()) and the
// first of tied maxima wins, as in torch.argmax.
DSPARK_HD DSPARK_INLINE float sanitize_logit(float z) {
  // The comparisons are written so that NaN fails the first one.
  z = (z >= -kFloatMax) ? z : -kFloatMax;
  z = (z <= kFloatMax) ? z : kFloatMax;
  return add(z, 0.0f);  // -0 + 0 = +0 (round to nearest)
}

// A draft probability as given: NaN and negative values become 0, values
// above 1 (including +inf) become 1, values below kMinWeight become 0.
DSPARK_HD DSPARK_INLINE float sanitize_prob(float q) {
  q = (q >= kMinWeight) ? q : 0.0f;
  return (q <= 1.0f) ? q : 1.0f;
}

DSPARK_HD DSPARK_INLINE float flush_weight(float w) { return (w >= kMinWeight) ? w : 0.0f; }

// ------------------------------------------------------------ exp2 / log2

// 2^x, within 2 ulp, for x <= 127; 0 below kExp2Min (and for NaN).
// x = n + f with n = round(x), |f| <= 1/2; 2^f by a degree-6 minimax
// polynomial; 2^n added to the exponent field.
DSPARK_HD DSPARK_INLINE float exp2(float x) {
  constexpr float kRoundMagic = 0x1.8p+23f;  // adding it rounds |x| < 2^22 to an integer
  constexpr float c1 = 0x1.62e430p-1f, c2 = 0x1.ebfbdap-3f, c3 = 0x1.c6aed4p-5f,
                  c4 = 0x1.3b2dbcp-7f, c5 = 0x1.5f455ep-10f, c6 = 0x1.41d318p-13f;
  const bool underflow = !(x >= kExp2Min);
  x = underflow ? 0.0f : fmin(x, 127.0f);
  const float n = sub(add(x, kRoundMagic), kRoundMagic);
  const float f = sub(x, n);  // exact
  float p = c6;
  p = add(mul(p, f), c5);
  p = add(mul(p, f), c4);
  p = add(mul(p, f), c3);
  p = add(mul(p, f), c2);
  p = add(mul(p, f), c1);
  p = add(mul(p, f), 1.0f);
  const int32_t ni = static_cast<int32_t>(n);
  const float r = bits_float(float_bits(p) + static_cast<uint32_t>(ni * (1 << 23)));
  return underflow ? 0.0f : r;
}

// log2(x) for a positive normal float x, within 2 ulp of the exact value.
// x = 2^e * m with m in [sqrt(1/2), sqrt(2)); ln(m) = 2 atanh(t),
// t = (m - 1) / (m + 1), |t| < 0.172, by its odd series to t^9.
DSPARK_HD DSPARK_INLINE float log2(float x) {
  constexpr float c3 = 0x1.555556p-2f, c5 = 0x1.99999ap-3f, c7 = 0x1.24924ap-3f,
                  c9 = 0x1.c71c72p-4f;
  const uint32_t bits = float_bits(x);
  int32_t e = static_cast<int32_t>((bits >> 23) & 0xffu) - 127;
  float m = bits_float((bits & 0x7fffffu) | 0x3f800000u);  // [1, 2)
  if (m > kSqrt2) {
    m = mul(m, 0.5f);
    e += 1;
  }
  const float t = div(sub(m, 1.0f), add(m, 1.0f));
  const float t2 = mul(t, t);
  float q = c9;
  q = add(mul(q, t2), c7);
  q = add(mul(q, t2), c5);
  q = add(mul(q, t2), c3);
  q = add(mul(q, t2), 1.0f);
  return add(static_cast<float>(e), mul(mul(kTwoLog2e, t), q));
}

// ---------------------------------------------------- random number shapes

// A uniform in [0, 1) with 24 bits, for acceptance tests (accept iff u < ratio).
DSPARK_HD DSPARK_INLINE float uniform(uint32_t bits) {
  return mul(static_cast<float>(bits >> 8), 0x1p-24f);
}

// An exponential variate divided by ln 2 (the race only compares ratios, so
// the constant factor does not matter): -log2(u) for u = 1 - t, where
// t = (bits + 1/2) / 2^32 keeps full relative precision near 0, so small
// variates (the ones that decide a race) are resolved to 2^-33 and never 0.
DSPARK_HD DSPARK_INLINE float exponential(uint32_t bits) {
  constexpr float c3 = 0x1.555556p-2f, c5 = 0x1.99999ap-3f, c7 = 0x1.24924ap-3f,
                  c9 = 0x1.c71c72p-4f;
  const float t = fmin(add(mul(u32_to_float(bits), 0x1p-32f), 0x1p-33f), kOneMinusUlp);
  if (t < 0.25f) {
    // -log2(1 - t) = 2 log2(e) atanh(s), s = t / (2 - t) <= 1/7.
    const float s = div(t, sub(2.0f, t));
    const float s2 = mul(s, s);
    float q = c9;
    q = add(mul(q, s2), c7);
    q = add(mul(q, s2), c5);
    q = add(mul(q, s2), c3);
    q = add(mul(q, s2), 1.0f);
    return mul(mul(kTwoLog2e, s), q);
  }
  return -log2(sub(1.0f, t));
}

// ------------------------------------------------------------- fixed point

DSPARK_HD DSPARK_INLINE uint64_t round_to_u64(double d) {  // d in [0, 2^52)
#if defined(__CUDA_ARCH__)
  return __double2ull_rn(d);
#else
  // Adding 2^52 rounds to an integer (nearest, ties to even), which then
  // sits in the low mantissa bits. Written this way so that it vectorises.
  constexpr double kMagic = 0x1p52;
  const double r = d + kMagic;
  uint64_t u;
  std::memcpy(&u, &r, sizeof(u));
  return u - 0x4330000000000000ull;
#endif
}

// A weight in [0, 1] as a fixed-point integer (round to nearest even).
DSPARK_HD DSPARK_INLINE uint64_t to_fixed(float w) {
#if defined(__CUDA_ARCH__)
  return __float2ull_rn(__fmul_rn(w, kFixedScale));
#else
  return round_to_u64(static_cast<double>(w * kFixedScale));
#endif
}

// A chunk's fixed-point sum (below 2^51) rescaled by a factor in [0, 1].
DSPARK_HD DSPARK_INLINE uint64_t rescale_fixed(uint64_t sum, float factor) {
#if defined(__CUDA_ARCH__)
  return __double2ull_rn(__dmul_rn(__ull2double_rn(sum), static_cast<double>(factor)));
#else
  return round_to_u64(static_cast<double>(sum) * static_cast<double>(factor));
#endif
}

DSPARK_HD DSPARK_INLINE float from_fixed(uint64_t s) { return mul(u64_to_float(s), kFixedInvScale); }

// ------------------------------------------------------ packed arg-maxima

// A monotone map of floats to unsigned integers (for -FLT_MAX..FLT_MAX).
DSPARK_HD DSPARK_INLINE uint32_t orderable(float f) {
  const uint32_t b = float_bits(f);
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

DSPARK_HD DSPARK_INLINE float from_orderable(uint32_t o) {
  return bits_float((o & 0x80000000u) ? (o & 0x7fffffffu) : ~o);
}

// (value, index) packed so that the unsigned maximum of packed values is the
// largest value and, among equal values, the smallest index. The maximum is
// associative and commutative, so it can be taken with atomicMax in any order.
DSPARK_HD DSPARK_INLINE uint64_t pack_arg(uint32_t ordered_value, uint32_t index) {
  return (static_cast<uint64_t>(ordered_value) << 32) | static_cast<uint64_t>(0xffffffffu - index);
}

DSPARK_HD DSPARK_INLINE uint32_t packed_index(uint64_t packed) {
  return 0xffffffffu - static_cast<uint32_t>(packed & 0xffffffffu);
}

DSPARK_HD DSPARK_INLINE uint32_t packed_value(uint64_t packed) {
  return static_cast<uint32_t>(packed >> 32);
}

}  // namespace dspark::num
