// Validation and packing of the per-request sampling arguments shared by the
// sampling ops: temperature(s), seed(s), offset(s).
#pragma once

#include <cstdint>

#include "dspark/random.h"
#include "dspark/sampling.h"
#include "dspark/tensor.h"

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

}  // namespace dspark
