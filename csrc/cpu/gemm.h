// C = A W^T for the CPU kernels: A [M, K] float32 (rows lda apart), W [N, K]
// float32 / float16 / bfloat16 (rows ldw apart, e.g. a linear layer's
// weight), C [M, N] float32 (rows ldc apart). Every element is a dot product
// along K, so W is read in its stored layout, row by row; a register block
// of A rows x W rows reads each W row once per block of A rows. The copy of
// the selected instruction set runs (isa.h): AVX-512 16-wide FMAs in 4 x 4,
// 2 x 8 and 1 x 8 blocks, AVX2 8-wide FMAs in 4 x 3, 2 x 4 and 1 x 4 blocks
// (AVX-512 prefetches the next block's W rows at its start; AVX2 does so for
// strided W and streams contiguous W, ldw == k, into L2 16 KB ahead from
// inside the loop), or a portable loop. On AVX2
// an element's sum does not depend on the block it falls in (its lanes run
// along K in order, then the same horizontal sum), so its bits are the same
// whatever M and N are and wherever it sits (tests/cpp/test_gemm.cpp). With
// `a_exact16` the caller guarantees that A's values are bfloat16 values
// (rounded already, as the Markov head's inputs are): with bfloat16 W and
// AVX-512 BF16 the products then take 16-bit inputs directly.
#pragma once

#include <cstdint>

#include "dspark/tensor.h"

namespace dspark::cpu {

void matmul_nt(const float* a, int64_t lda, int64_t m, const void* w, DType w_dtype, int64_t ldw,
               int64_t n, int64_t k, float* c, int64_t ldc, bool a_exact16 = false);

// C += A B: A [M, N] float32 (rows lda apart), B [N, K] float32 / float16 /
// bfloat16 (rows ldb apart, e.g. attention's V rows in a paged cache), C [M, K]
// float32 (rows ldc apart). Each B row is read once per block of 4 A rows.
void matmul_nn_acc(const float* a, int64_t lda, int64_t m, const void* b, DType b_dtype, int64_t ldb,
                   int64_t n, int64_t k, float* c, int64_t ldc);

}  // namespace dspark::cpu
