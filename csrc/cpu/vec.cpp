// The vectorised loops of vec.h: each forwards to the copy compiled for the
// selected instruction set (isa.h, kernels.inc).
#include "vec.h"

#if defined(__SSE2__)
#include <xmmintrin.h>
#endif

#include "dspark/numerics.h"
#include "isa.h"

namespace dspark::cpu {

void convert_to_float(const void* src, DType dtype, int64_t n, float* dst) {
  kernels().convert_to_float(src, dtype, n, dst);
}

uint32_t scale_and_max(float* z, int64_t n, float scale) { return kernels().scale_and_max(z, n, scale); }

uint32_t sanitized_max(const float* z, int64_t n) { return kernels().sanitized_max(z, n); }

uint64_t logit_sum(const float* z, int64_t n, float chunk_max) { return kernels().logit_sum(z, n, chunk_max); }

int64_t first_index_of(const float* z, int64_t n, uint32_t ordered) {
  const uint32_t bits = num::float_bits(num::from_orderable(ordered));
  for (int64_t i = 0; i < n; ++i)
    if (num::float_bits(z[i]) == bits) return i;
  return 0;
}

void random_words(const RandomStream& s, Purpose purpose, uint32_t position, uint32_t g0,
                  int64_t groups, uint32_t* bits) {
  constexpr int64_t kGroups = 512;  // blocks per pass (2048 columns)
  alignas(64) uint32_t lane[4][kGroups];
  const Kernels& k = kernels();
  for (int64_t done = 0; done < groups; done += kGroups) {
    const int64_t count = groups - done < kGroups ? groups - done : kGroups;
    k.words_by_lane(s, purpose, position, g0 + static_cast<uint32_t>(done), count, lane[0], lane[1], lane[2],
                    lane[3]);
    uint32_t* out = bits + 4 * done;
    int64_t g = 0;
#if defined(__SSE2__)
    for (; g + 4 <= count; g += 4) {  // 4 x 4 transposes: group g's four words side by side
      __m128 r0 = _mm_load_ps(reinterpret_cast<const float*>(&lane[0][g]));
      __m128 r1 = _mm_load_ps(reinterpret_cast<const float*>(&lane[1][g]));
      __m128 r2 = _mm_load_ps(reinterpret_cast<const float*>(&lane[2][g]));
      __m128 r3 = _mm_load_ps(reinterpret_cast<const float*>(&lane[3][g]));
      _MM_TRANSPOSE4_PS(r0, r1, r2, r3);
      _mm_storeu_ps(reinterpret_cast<float*>(out + 4 * g), r0);
      _mm_storeu_ps(reinterpret_cast<float*>(out + 4 * g + 4), r1);
      _mm_storeu_ps(reinterpret_cast<float*>(out + 4 * g + 8), r2);
      _mm_storeu_ps(reinterpret_cast<float*>(out + 4 * g + 12), r3);
    }
#endif
    for (int64_t i = 4 * g; i < 4 * count; ++i) out[i] = lane[i & 3][i >> 2];
  }
}

uint64_t logit_weights(const float* z, int64_t n, float chunk_max, float* w) {
  return kernels().logit_weights(z, n, chunk_max, w);
}

void race_keys(const float* w, const uint32_t* bits, int64_t n, uint32_t* keys) {
  kernels().race_keys(w, bits, n, keys);
}

void logit_race_keys(const float* z, float chunk_max, const uint32_t* bits, int64_t n, uint32_t* keys) {
  kernels().logit_race_keys(z, chunk_max, bits, n, keys);
}

uint32_t max_u32(const uint32_t* x, int64_t n) { return kernels().max_u32(x, n); }

float max_f32(const float* x, int64_t n) { return kernels().max_f32(x, n); }

float exp2_sum(float* x, int64_t n, float shift) { return kernels().exp2_sum(x, n, shift); }

uint64_t best_key(const uint32_t* keys, int64_t n, int64_t begin) {
  const uint32_t best = max_u32(keys, n);
  int64_t i = 0;
  while (keys[i] != best) ++i;
  return num::pack_arg(best, static_cast<uint32_t>(begin + i));
}

}  // namespace dspark::cpu
