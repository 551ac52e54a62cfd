// C = A W^T and C += A B: forward to the copy compiled for the selected
// instruction set (isa.h, kernels.inc).
#include "gemm.h"

#include "isa.h"

namespace dspark::cpu {

void matmul_nt(const float* a, int64_t lda, int64_t m, const void* w, DType w_dtype, int64_t ldw,
               int64_t n, int64_t k, float* c, int64_t ldc, bool a_exact16) {
  kernels().matmul_nt(a, lda, m, w, w_dtype, ldw, n, k, c, ldc, a_exact16);
}

void matmul_nn_acc(const float* a, int64_t lda, int64_t m, const void* b, DType b_dtype, int64_t ldb,
                   int64_t n, int64_t k, float* c, int64_t ldc) {
  kernels().matmul_nn_acc(a, lda, m, b, b_dtype, ldb, n, k, c, ldc);
}

}  // namespace dspark::cpu
