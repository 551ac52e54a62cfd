// CPU backend of linear: out = x W^T (+ bias), float32 accumulation.
//
// Work split: the output columns (W's rows) in contiguous ranges, one range
// per task (parallel.h; at least kMinColumns each, at most four tasks a
// thread); a task computes every x row against its W rows with matmul_nt
// (gemm.h), whose register blocks read each W row from memory once per call
// (the block's rows stay in L1 while every block of x rows passes). So W,
// the call's dominant traffic, is read once: N K element bytes, 2 bytes an
// element for a 16-bit weight (widened in registers), and x (M K, from the
// cache) and out (M N) are small at a decoding step's few rows. 16-bit x rows
// are widened to float32 once per call, before the tasks. A task writes float32
// results straight into a float32 out, or into its own buffer that is then
// rounded once (bias added first, in float32) into a 16-bit out.
//
// On AVX2 each element is its row's dot product in an order fixed by K
// (gemm.h: its lanes run along K in order, then the same horizontal sum), so
// a row's output does not depend on M, N, nor on the range it falls in: a
// verification round's rows equal one-token steps' bit for bit. The AVX-512
// blocks reduce differently by shape: there rows agree to float32 rounding.
#include <algorithm>
#include <cstdint>
#include <vector>

#include "dspark/dtype_load.h"
#include "dspark/numerics.h"
#include "dspark/ops.h"
#include "fp_env.h"
#include "gemm.h"
#include "parallel.h"
#include "vec.h"

namespace dspark::cpu {
namespace {

constexpr int64_t kMinColumns = 16;  // W rows per task at least: a task's fixed cost stays small against its rows

}  // namespace

void linear(const LinearArgs& a) {
  const IeeeDenormals ieee;
  const int64_t M = a.x.size(0), K = a.x.size(1), N = a.weight.size(0);
  if (M == 0 || N == 0) return;
  // x as float32 rows (lda apart): in place when it is float32, else widened once
  std::vector<float> widened;
  const float* x = nullptr;
  int64_t lda = K;
  if (a.x.dtype == DType::kFloat32) {
    x = a.x.ptr<float>();
    lda = M > 1 ? a.x.stride(0) : K;
  } else {
    widened.resize(static_cast<size_t>(M * K));
    const size_t size = dtype_size(a.x.dtype);
    for (int64_t r = 0; r < M; ++r)
      convert_to_float(static_cast<const char*>(a.x.data) + r * a.x.stride(0) * static_cast<int64_t>(size), a.x.dtype,
                       K, &widened[static_cast<size_t>(r * K)]);
    x = widened.data();
  }
  std::vector<float> bias;
  if (a.bias.defined()) {
    bias.resize(static_cast<size_t>(N));
    convert_to_float(a.bias.data, a.bias.dtype, N, bias.data());
  }
  const size_t w_size = dtype_size(a.weight.dtype);
  const bool direct = a.out.dtype == DType::kFloat32;
  parallel_for(N, kMinColumns, [&](int64_t begin, int64_t end) {
    const int64_t n = end - begin;
    std::vector<float> buffer(direct ? 0 : static_cast<size_t>(M * n));
    float* c = direct ? a.out.ptr<float>() + begin : buffer.data();
    const int64_t ldc = direct ? N : n;
    if (K == 0) {
      for (int64_t r = 0; r < M; ++r) std::fill(c + r * ldc, c + r * ldc + n, 0.0f);
    } else {
      matmul_nt(x, lda, M, static_cast<const char*>(a.weight.data) + begin * K * static_cast<int64_t>(w_size),
                a.weight.dtype, K, n, K, c, ldc);
    }
    for (int64_t r = 0; r < M; ++r) {
      float* row = c + r * ldc;
      if (!bias.empty())
        for (int64_t j = 0; j < n; ++j) row[j] = num::add(row[j], bias[static_cast<size_t>(begin + j)]);
      if (!direct)
        for (int64_t j = 0; j < n; ++j) store_float(a.out.data, a.out.dtype, r * N + begin + j, row[j]);
    }
  });
}

}  // namespace dspark::cpu
