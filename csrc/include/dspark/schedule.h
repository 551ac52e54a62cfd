// The confidence scheduler (DSPARK.md, section 3), written once for both
// backends.
//
// Candidates. Request r, position j = 1..min(gamma, cap[r]) is a candidate
// when its prefix survival a[r][j] = c[r][1] * ... * c[r][j] (float products,
// left to right, c clamped to [0, 1] with NaN -> 0) is > 0. Candidates are
// ordered by a descending, then j ascending, then r ascending: a total order
// in which each request's candidates form a prefix (a is non-increasing in j).
// An unsigned 64-bit key encodes it (ascending key = that order).
//
// Modes, over that order, with theta_t = (R + a_1 + ... + a_t) * SPS(R + t):
//   causal:    the paper's Algorithm 1: admit while theta strictly increases,
//              stop at the first step that does not improve (or whose batch
//              R + t is past the table's end);
//   global:    the t in [0, T] with the largest theta (first on ties), no
//              early stop (the asynchronous variant's capacity search; not
//              lossless on its own);
//   budget:    the first min(K, T) candidates;
//   threshold: per request, the positions before the first c below a value;
//   fixed:     per request, min(gamma, cap).
// Sums of a are fixed-point integers (exact, so the block scan on the GPU and
// the sequential scan on the CPU agree), and theta is a double product.
#pragma once

#include <cstdint>

#include "dspark/macros.h"
#include "dspark/numerics.h"

namespace dspark::schedule {

enum class Mode : int32_t { kCausal = 0, kGlobal = 1, kBudget = 2, kThreshold = 3, kFixed = 4 };

constexpr int kPositionBits = 8;   // j < 256
constexpr int kRequestBits = 24;   // r < 2^24
constexpr int64_t kMaxGamma = (int64_t{1} << kPositionBits) - 1;
constexpr int64_t kMaxRequests = int64_t{1} << kRequestBits;
constexpr uint64_t kNoCandidate = ~uint64_t{0};  // sorts after every candidate
constexpr double kFixedToDouble = 0x1p-40;       // num::kFixedFracBits

DSPARK_HD DSPARK_INLINE float clamp_confidence(float c) {
  c = (c >= 0.0f) ? c : 0.0f;  // NaN fails the comparison
  return (c <= 1.0f) ? c : 1.0f;
}

DSPARK_HD DSPARK_INLINE uint64_t candidate_key(float a, int32_t j, int32_t r) {
  // a >= 0, so its bits order like its value; complementing them sorts a descending.
  return (static_cast<uint64_t>(~num::float_bits(a)) << 32) |
         (static_cast<uint64_t>(j) << kRequestBits) | static_cast<uint64_t>(r);
}

DSPARK_HD DSPARK_INLINE float key_survival(uint64_t key) {
  return num::bits_float(~static_cast<uint32_t>(key >> 32));
}
DSPARK_HD DSPARK_INLINE int32_t key_position(uint64_t key) {
  return static_cast<int32_t>((key >> kRequestBits) & ((1u << kPositionBits) - 1));
}
DSPARK_HD DSPARK_INLINE int32_t key_request(uint64_t key) {
  return static_cast<int32_t>(key & ((1u << kRequestBits) - 1));
}

// The number of positions request r may verify.
DSPARK_HD DSPARK_INLINE int32_t position_limit(int32_t gamma, const int32_t* cap, int32_t r) {
  if (!cap) return gamma;
  const int32_t c = cap[r];
  return c < 0 ? 0 : (c < gamma ? c : gamma);
}

DSPARK_HD DSPARK_INLINE double to_double(uint64_t x) {
#if defined(__CUDA_ARCH__)
  return __ull2double_rn(x);
#else
  return static_cast<double>(x);
#endif
}

// theta = (R + survival_sum * 2^-40) * SPS(B), with B = R + admitted; 0 when
// B is past the table's end (callers stop before using such a value).
DSPARK_HD DSPARK_INLINE double throughput(int64_t num_requests, uint64_t survival_sum,
                                          int64_t batch_tokens, const float* sps,
                                          int64_t table_size) {
  if (batch_tokens >= table_size) return 0.0;
#if defined(__CUDA_ARCH__)
  const double tokens = __dadd_rn(static_cast<double>(num_requests),
                                  __dmul_rn(to_double(survival_sum), kFixedToDouble));
  return __dmul_rn(tokens, static_cast<double>(sps[batch_tokens]));
#else
  const double tokens = static_cast<double>(num_requests) + to_double(survival_sum) * kFixedToDouble;
  return tokens * static_cast<double>(sps[batch_tokens]);
#endif
}

// The expected throughput as reported: a double narrowed to float without
// overflowing to inf (a finite table near the float limit stays finite).
DSPARK_HD DSPARK_INLINE float saturate_float(double x) {
  return x < static_cast<double>(num::kFloatMax) ? static_cast<float>(x) : num::kFloatMax;
}

// Threshold mode: positions before the first c < threshold, at most `limit`.
DSPARK_HD DSPARK_INLINE int32_t threshold_length(const float* conf_row, int32_t limit,
                                                 float threshold) {
  int32_t l = 0;
  while (l < limit && clamp_confidence(conf_row[l]) >= threshold) ++l;
  return l;
}

}  // namespace dspark::schedule
