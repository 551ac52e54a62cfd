#include "vec.h"

#include <cstring>

#include "dspark/dtype_load.h"
#include "dspark/numerics.h"
#include "dspark/philox.h"
#include "dspark/sampling.h"

namespace dspark::cpu {

DSPARK_CPU_CLONES void convert_to_float(const void* src, DType dtype, int64_t n, float* dst) {
  if (dtype == DType::kFloat32) {
    std::memcpy(dst, src, static_cast<size_t>(n) * sizeof(float));
  } else if (dtype == DType::kBFloat16) {
    const uint16_t* s = static_cast<const uint16_t*>(src);
    for (int64_t i = 0; i < n; ++i) dst[i] = bf16_bits_to_float(s[i]);
  } else {
    const uint16_t* s = static_cast<const uint16_t*>(src);
    for (int64_t i = 0; i < n; ++i) dst[i] = fp16_bits_to_float(s[i]);
  }
}

DSPARK_CPU_CLONES uint32_t scale_and_max(float* z, int64_t n, float scale) {
  uint32_t best = 0;
  for (int64_t i = 0; i < n; ++i) {
    const float v = scaled_logit(z[i], scale);
    z[i] = v;
    const uint32_t o = num::orderable(v);
    best = o > best ? o : best;
  }
  return best;
}

DSPARK_CPU_CLONES uint32_t sanitized_max(const float* z, int64_t n) {
  uint32_t best = 0;
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t o = num::orderable(num::sanitize_logit(z[i]));
    best = o > best ? o : best;
  }
  return best;
}

DSPARK_CPU_CLONES uint64_t logit_sum(const float* z, int64_t n, float chunk_max) {
  uint64_t s = 0;
  for (int64_t i = 0; i < n; ++i) s += num::to_fixed(num::exp2(num::sub(z[i], chunk_max)));
  return s;
}

int64_t first_index_of(const float* z, int64_t n, uint32_t ordered) {
  const uint32_t bits = num::float_bits(num::from_orderable(ordered));
  for (int64_t i = 0; i < n; ++i)
    if (num::float_bits(z[i]) == bits) return i;
  return 0;
}

DSPARK_CPU_CLONES static void words_by_lane(RandomStream s, Purpose purpose, uint32_t position,
                                            uint32_t g0, int64_t groups,
                                            uint32_t* DSPARK_RESTRICT w0, uint32_t* DSPARK_RESTRICT w1,
                                            uint32_t* DSPARK_RESTRICT w2, uint32_t* DSPARK_RESTRICT w3) {
  for (int64_t g = 0; g < groups; ++g) {
    const Philox4x32 b = s.block(purpose, position, g0 + static_cast<uint32_t>(g));
    w0[g] = b.v[0];
    w1[g] = b.v[1];
    w2[g] = b.v[2];
    w3[g] = b.v[3];
  }
}

void random_words(const RandomStream& s, Purpose purpose, uint32_t position, uint32_t g0,
                  int64_t groups, uint32_t* bits) {
  constexpr int64_t kGroups = 512;  // blocks per pass (2048 columns)
  alignas(64) uint32_t lane[4][kGroups];
  for (int64_t done = 0; done < groups; done += kGroups) {
    const int64_t count = groups - done < kGroups ? groups - done : kGroups;
    words_by_lane(s, purpose, position, g0 + static_cast<uint32_t>(done), count, lane[0], lane[1],
                  lane[2], lane[3]);
    uint32_t* out = bits + 4 * done;
    for (int64_t i = 0; i < 4 * count; ++i) out[i] = lane[i & 3][i >> 2];
  }
}

DSPARK_CPU_CLONES void race_keys(const float* w, const uint32_t* bits, int64_t n, uint32_t* keys) {
  for (int64_t i = 0; i < n; ++i) keys[i] = num::float_bits(num::div(w[i], num::exponential(bits[i])));
}

DSPARK_CPU_CLONES void logit_race_keys(const float* z, float chunk_max, const uint32_t* bits,
                                       int64_t n, uint32_t* keys) {
  for (int64_t i = 0; i < n; ++i)
    keys[i] = num::float_bits(
        num::div(num::exp2(num::sub(z[i], chunk_max)), num::exponential(bits[i])));
}

DSPARK_CPU_CLONES uint32_t max_u32(const uint32_t* x, int64_t n) {
  uint32_t best = 0;
  for (int64_t i = 0; i < n; ++i) best = x[i] > best ? x[i] : best;
  return best;
}

DSPARK_CPU_CLONES float exp_shifted(float* x, int64_t visible, int64_t n, float shift) {
  float sum = 0.0f;
  for (int64_t i = 0; i < n; ++i) {
    const float e = i < visible ? num::exp2(num::mul(num::sub(x[i], shift), num::kLog2e)) : 0.0f;
    x[i] = e;
    sum += e;
  }
  return sum;
}

uint64_t best_key(const uint32_t* keys, int64_t n, int64_t begin) {
  const uint32_t best = max_u32(keys, n);
  int64_t i = 0;
  while (keys[i] != best) ++i;
  return num::pack_arg(best, static_cast<uint32_t>(begin + i));
}

}  // namespace dspark::cpu
