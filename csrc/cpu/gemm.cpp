#include "gemm.h"

#include <cstring>
#include <vector>

#include "dspark/dtype_load.h"
#include "vec.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define DSPARK_GEMM_X86 1
#endif

namespace dspark::cpu {
namespace {

constexpr int kRows = 2;  // A rows per register block
constexpr int kCols = 4;  // W rows per register block

float load_w(const void* w, DType dtype, int64_t i) { return load_float(w, dtype, i); }

// Portable reference path (auto-vectorised by the compiler, no FMA).
void block_portable(const float* const* a, int rows, const void* const* w, int cols, DType dtype,
                    int64_t k, float* out /* [kRows][kCols] */) {
  for (int r = 0; r < rows; ++r)
    for (int c = 0; c < cols; ++c) {
      float s = 0.0f;
      if (dtype == DType::kFloat32) {
        const float* wr = static_cast<const float*>(w[c]);
        for (int64_t i = 0; i < k; ++i) s += a[r][i] * wr[i];
      } else {
        for (int64_t i = 0; i < k; ++i) s += a[r][i] * load_w(w[c], dtype, i);
      }
      out[r * kCols + c] = s;
    }
}

#if defined(DSPARK_GEMM_X86)
template <DType kType>
__attribute__((target("avx2,fma,f16c"))) inline __m256 load8(const void* w, int64_t i) {
  if constexpr (kType == DType::kFloat32) {
    return _mm256_loadu_ps(static_cast<const float*>(w) + i);
  } else if constexpr (kType == DType::kBFloat16) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(w) + i));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  } else {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(w) + i));
    return _mm256_cvtph_ps(h);
  }
}

__attribute__((target("avx2,fma"))) inline float hsum(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps(t, t, 1)));
}

// A full 2 x 4 block: 8 accumulators of 8 lanes along K.
template <DType kType>
__attribute__((target("avx2,fma,f16c"))) void block_avx2(const float* const* a, const void* const* w,
                                                          int64_t k, float* out) {
  __m256 acc[kRows][kCols];
  for (int r = 0; r < kRows; ++r)
    for (int c = 0; c < kCols; ++c) acc[r][c] = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= k; i += 8) {
    const __m256 x0 = _mm256_loadu_ps(a[0] + i);
    const __m256 x1 = _mm256_loadu_ps(a[1] + i);
    for (int c = 0; c < kCols; ++c) {
      const __m256 y = load8<kType>(w[c], i);
      acc[0][c] = _mm256_fmadd_ps(x0, y, acc[0][c]);
      acc[1][c] = _mm256_fmadd_ps(x1, y, acc[1][c]);
    }
  }
  for (int r = 0; r < kRows; ++r)
    for (int c = 0; c < kCols; ++c) {
      float s = hsum(acc[r][c]);
      for (int64_t j = i; j < k; ++j) s += a[r][j] * load_float(w[c], kType, j);
      out[r * kCols + c] = s;
    }
}

bool has_avx2_fma() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                         __builtin_cpu_supports("f16c");
  return ok;
}
#endif

}  // namespace

void matmul_nt(const float* a, int64_t lda, int64_t m, const void* w, DType w_dtype, int64_t ldw,
               int64_t n, int64_t k, float* c, int64_t ldc) {
  const size_t w_size = dtype_size(w_dtype);
  const char* wb = static_cast<const char*>(w);
  float out[kRows * kCols];
  // 16-bit weights: the block's W rows are widened once into this buffer and
  // reused by every pair of A rows (m > 2), instead of once per pair.
  std::vector<float> widened;
  const bool widen = w_dtype != DType::kFloat32 && m > kRows;
  if (widen) widened.resize(static_cast<size_t>(kCols * k));
  for (int64_t col = 0; col < n; col += kCols) {
    const int cols = static_cast<int>(n - col < kCols ? n - col : kCols);
    const void* wr[kCols];
    for (int j = 0; j < kCols; ++j)
      wr[j] = wb + static_cast<int64_t>((col + (j < cols ? j : 0)) * ldw * static_cast<int64_t>(w_size));
    DType block_dtype = w_dtype;
    if (widen) {
      for (int j = 0; j < kCols; ++j) {
        convert_to_float(wr[j], w_dtype, k, &widened[static_cast<size_t>(j * k)]);
        wr[j] = &widened[static_cast<size_t>(j * k)];
      }
      block_dtype = DType::kFloat32;
    }
    for (int64_t row = 0; row < m; row += kRows) {
      const int rows = static_cast<int>(m - row < kRows ? m - row : kRows);
      const float* ar[kRows] = {a + row * lda, a + (row + (rows > 1 ? 1 : 0)) * lda};
#if defined(DSPARK_GEMM_X86)
      if (has_avx2_fma()) {
        // Partial blocks repeat a valid row / column and drop the extra results.
        switch (block_dtype) {
          case DType::kFloat32: block_avx2<DType::kFloat32>(ar, wr, k, out); break;
          case DType::kBFloat16: block_avx2<DType::kBFloat16>(ar, wr, k, out); break;
          default: block_avx2<DType::kFloat16>(ar, wr, k, out); break;
        }
      } else {
        block_portable(ar, rows, wr, cols, block_dtype, k, out);
      }
#else
      block_portable(ar, rows, wr, cols, block_dtype, k, out);
#endif
      for (int r = 0; r < rows; ++r)
        for (int j = 0; j < cols; ++j) c[(row + r) * ldc + col + j] = out[r * kCols + j];
    }
  }
}

}  // namespace dspark::cpu
