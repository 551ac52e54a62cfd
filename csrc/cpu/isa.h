// The CPU's instruction sets, and the hot loops of the CPU kernels compiled
// once for each of them (csrc/cpu/kernels.inc).
//
// Every loop is compiled for the baseline ISA, AVX2 (+FMA, F16C), AVX-512
// (F, BW, VL, DQ) and AVX-512 with BF16 dot products, and one set is picked at
// run time: the widest this CPU has, or DSPARK_CPU_ISA (baseline, avx2,
// avx512, avx512bf16), or dspark.set_cpu_isa(). The loops that decide sampled
// tokens evaluate the shared numerics (dspark/numerics.h) element by element
// with the same IEEE operations in every copy (no fused multiply-adds, no
// reassociated float sums: the sums are fixed-point integers), so they give
// bit-identical results on every ISA; tests run them under each ISA and
// compare bits. The matrix product (matmul_nt) is not part of the
// shared numerics: its summation order follows the vector width, as it does
// between the CPU and CUDA backends.
#pragma once

#include <cstdint>
#include <string>

#include "dspark/random.h"
#include "dspark/rejection.h"
#include "dspark/tensor.h"

namespace dspark::cpu {

enum class Isa : int32_t { kBaseline = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Bf16 = 3 };
constexpr int kNumIsa = 4;

const char* isa_name(Isa isa);
// Parses a name of isa_name(); false when unknown.
bool parse_isa(const std::string& name, Isa* out);
// Whether this CPU (and this build) can run the kernels compiled for `isa`.
bool isa_supported(Isa isa);
Isa best_isa();
// The ISA whose kernels run: DSPARK_CPU_ISA at first use if set (falling
// back to the best when the CPU lacks it), else the best.
Isa current_isa();
// Selects the kernels of `isa` for this process; ValueError if unsupported.
void set_isa(Isa isa);

// Keys per tile of paged_attention (attention_scores, attention_values), and
// the largest head dim whose products put the keys in the vector lanes (AVX-512;
// the tile's keys by dimension, kKeyTile x D floats, then stay in L1).
constexpr int64_t kKeyTile = 64;
constexpr int64_t kMaxLanesDim = 128;

// Keys [first, first + length) of a tile that lie in one page; `at` is the
// element offset of the first one's row in the k and v caches (same layout).
struct KeyRun {
  int64_t first, length, at;
};

// The hot loops, one table per ISA.
struct Kernels {
  // dst[i] = float(src[i]) for a float32 / float16 / bfloat16 source.
  void (*convert_to_float)(const void* src, DType dtype, int64_t n, float* dst);
  // shared-numerics loops over a chunk of a row (vec.h documents each)
  uint32_t (*scale_and_max)(float* z, int64_t n, float scale);
  uint32_t (*sanitized_max)(const float* z, int64_t n);
  uint64_t (*logit_sum)(const float* z, int64_t n, float chunk_max);
  uint64_t (*logit_weights)(const float* z, int64_t n, float chunk_max, float* w);
  void (*words_by_lane)(const RandomStream& s, Purpose purpose, uint32_t position, uint32_t g0, int64_t groups,
                        uint32_t* w0, uint32_t* w1, uint32_t* w2, uint32_t* w3);
  void (*race_keys)(const float* w, const uint32_t* bits, int64_t n, uint32_t* keys);
  void (*logit_race_keys)(const float* z, float chunk_max, const uint32_t* bits, int64_t n, uint32_t* keys);
  uint32_t (*max_u32)(const uint32_t* x, int64_t n);
  float (*max_f32)(const float* x, int64_t n);
  float (*exp2_sum)(float* x, int64_t n, float shift);
  uint32_t (*prob_max)(const float* q, int64_t n);
  uint64_t (*prob_sum)(const float* q, int64_t n);
  void (*logit_probs)(float* x, int64_t n, float scale, rejection::RowStats s);
  void (*given_probs)(float* x, int64_t n, rejection::RowStats s);
  void (*residual_weights)(const float* pt, float* pd, int64_t n);
  uint64_t (*soft_sum)(const float* pt, const float* pd, int64_t n);
  // C = A W^T (gemm.h)
  void (*matmul_nt)(const float* a, int64_t lda, int64_t m, const void* w, DType w_dtype, int64_t ldw, int64_t n,
                    int64_t k, float* c, int64_t ldc, bool a_exact16);
  // C += A B (gemm.h)
  void (*matmul_nn_acc)(const float* a, int64_t lda, int64_t m, const void* b, DType b_dtype, int64_t ldb, int64_t n,
                        int64_t k, float* c, int64_t ldc);
  // S = Q K^T and O += P V over one key tile of paged_attention (kernels.inc)
  void (*attention_scores)(const float* q, int64_t rows, int64_t D, const void* k_cache, DType dtype, int64_t stride,
                           const KeyRun* runs, int64_t num_runs, float* kt, float* s);
  void (*attention_values)(const float* p, int64_t rows, const void* v_cache, DType dtype, int64_t stride,
                           const KeyRun* runs, int64_t num_runs, int64_t D, float* o);
  // C = A W^T for bfloat16 A and W with float32 accumulation; null without
  // BF16 dot products
  void (*matmul_bf16)(const uint16_t* a, int64_t lda, int64_t m, const uint16_t* w, int64_t ldw, int64_t n,
                      int64_t k, float* c, int64_t ldc);
};

const Kernels& kernels();

}  // namespace dspark::cpu
