// Vectorised loops over a chunk of a row, shared by the CPU kernels. Each is
// compiled for every instruction set of isa.h and runs the copy of the one
// selected; the per-element arithmetic is the shared numerics
// (dspark/numerics.h), so every copy gives identical results.
#pragma once

#include <cstdint>

#include "dspark/random.h"
#include "dspark/tensor.h"

namespace dspark::cpu {

// dst[i] = float(src[i]) for a float32 / float16 / bfloat16 source.
void convert_to_float(const void* src, DType dtype, int64_t n, float* dst);

// z[i] <- sanitize(z[i] * scale); returns the largest orderable(z).
uint32_t scale_and_max(float* z, int64_t n, float scale);

// The largest orderable(sanitize(z[i])), z unchanged (greedy rows).
uint32_t sanitized_max(const float* z, int64_t n);

// sum_i fixed(2^(z[i] - chunk_max)).
uint64_t logit_sum(const float* z, int64_t n, float chunk_max);

// w[i] = 2^(z[i] - chunk_max); returns sum_i fixed(w[i]) (logit_sum, keeping
// the weights for race_keys: logit_race_keys without its second exp2).
uint64_t logit_weights(const float* z, int64_t n, float chunk_max, float* w);

// The first i with orderable(z[i]) == ordered (0 if none), z sanitized.
int64_t first_index_of(const float* z, int64_t n, uint32_t ordered);

// The Philox words of columns [4 g0, 4 (g0 + groups)) of one (purpose,
// position), interleaved into bits[0 .. 4 groups).
void random_words(const RandomStream& s, Purpose purpose, uint32_t position, uint32_t g0,
                  int64_t groups, uint32_t* bits);

// keys[i] = bits of (w[i] / E(bits[i])): race keys of weights >= 0.
void race_keys(const float* w, const uint32_t* bits, int64_t n, uint32_t* keys);

// keys[i] = bits of (2^(z[i] - chunk_max) / E(bits[i])): race keys of a logit chunk.
void logit_race_keys(const float* z, float chunk_max, const uint32_t* bits, int64_t n, uint32_t* keys);

uint32_t max_u32(const uint32_t* x, int64_t n);

// The largest of x[0, n) (-inf for n = 0; NaN elements are passed over).
float max_f32(const float* x, int64_t n);

// x[i] <- 2^(x[i] - shift) for i < n; returns their sum. Shared exp2
// polynomial: results below 2^-100 (and -inf, NaN) are 0. The same bits on
// every ISA (16 partial sums in a fixed order).
float exp2_sum(float* x, int64_t n, float shift);

// (the largest key, its first index) as pack_arg(key, begin + index).
uint64_t best_key(const uint32_t* keys, int64_t n, int64_t begin);

}  // namespace dspark::cpu
