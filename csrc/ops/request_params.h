// Validation and packing of the per-request sampling arguments shared by the
// sampling ops: temperature(s), seed(s), offset(s).
#pragma once

#include <cstdint>

#include "dspark/random.h"
#include "dspark/sampling.h"
#include "dspark/tensor.h"
#include "dspark/truncation.h"

namespace dspark {

// Shapes, dtypes, devices; the scalar values. Tensor values are checked by
// check_request_values_on_host (CPU tensors) or by the Python layer (CUDA).
void check_request_params(const char* op, const Device& device, int64_t R, float temperature,
                          const TensorView& temperatures, const TensorView& seeds,
                          uint64_t offset, const TensorView& offsets);

void check_request_values_on_host(const char* op, int64_t R, const TensorView& temperatures,
                                  const TensorView& offsets);

RequestParams request_params(float temperature, const TensorView& temperatures, uint64_t seed,
                             const TensorView& seeds, uint64_t offset, const TensorView& offsets);

// Truncation (top_k / top_p / min_p: scalars, or [R] tensors replacing them):
// shapes, dtypes, devices and the scalar values; `columns` is the size of the
// truncated rows. Tensor values: check_truncation_values_on_host (CPU) or the
// Python layer (CUDA).
void check_truncation(const char* op, const Device& device, int64_t R, int64_t columns, int32_t top_k,
                      const TensorView& top_ks, float top_p, const TensorView& top_ps, float min_p,
                      const TensorView& min_ps);

void check_truncation_values_on_host(const char* op, int64_t R, int64_t columns, const TensorView& top_ks,
                                     const TensorView& top_ps, const TensorView& min_ps);

truncation::Params truncation_params(int32_t top_k, const TensorView& top_ks, float top_p, const TensorView& top_ps,
                                     float min_p, const TensorView& min_ps);

}  // namespace dspark
