// Exact conversions of stored element types to float, shared by both backends.
#pragma once

#include <cstdint>

#include "dspark/macros.h"
#include "dspark/numerics.h"
#include "dspark/tensor.h"

namespace dspark {

DSPARK_HD DSPARK_INLINE float bf16_bits_to_float(uint16_t h) {
  return num::bits_float(static_cast<uint32_t>(h) << 16);
}

DSPARK_HD DSPARK_INLINE float fp16_bits_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1fu;
  const uint32_t mantissa = h & 0x3ffu;
  if (exponent == 0) {  // zero or subnormal: mantissa * 2^-24, exact in float
    const float magnitude = num::mul(num::u32_to_float(mantissa), 0x1p-24f);
    return num::bits_float(num::float_bits(magnitude) | sign);
  }
  if (exponent == 0x1fu) return num::bits_float(sign | 0x7f800000u | (mantissa << 13));
  return num::bits_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

// Element `index` of a float tensor of the given dtype.
DSPARK_HD DSPARK_INLINE float load_float(const void* base, DType dtype, int64_t index) {
  switch (dtype) {
    case DType::kFloat16:
      return fp16_bits_to_float(static_cast<const uint16_t*>(base)[index]);
    case DType::kBFloat16:
      return bf16_bits_to_float(static_cast<const uint16_t*>(base)[index]);
    default:
      return static_cast<const float*>(base)[index];
  }
}

// Element `index` of an int32 or int64 tensor.
DSPARK_HD DSPARK_INLINE int64_t load_index(const void* base, DType dtype, int64_t index) {
  return dtype == DType::kInt64 ? static_cast<const int64_t*>(base)[index]
                                : static_cast<int64_t>(static_cast<const int32_t*>(base)[index]);
}

}  // namespace dspark
