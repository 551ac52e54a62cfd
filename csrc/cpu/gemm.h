// C = A W^T for the CPU kernels: A [M, K] float32 (rows lda apart), W [N, K]
// float32 / float16 / bfloat16 (rows ldw apart, e.g. a linear layer's
// weight), C [M, N] float32 (rows ldc apart). Every element is a dot product
// along K, so W is read in its stored layout, row by row; a 2 x 4 register
// block reads each W row once per pair of A rows. On x86 with AVX2 + FMA the
// kernel uses 8-wide FMAs; elsewhere a portable loop.
#pragma once

#include <cstdint>

#include "dspark/tensor.h"

namespace dspark::cpu {

void matmul_nt(const float* a, int64_t lda, int64_t m, const void* w, DType w_dtype, int64_t ldw,
               int64_t n, int64_t k, float* c, int64_t ldc);

}  // namespace dspark::cpu
