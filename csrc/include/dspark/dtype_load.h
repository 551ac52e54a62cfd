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

// Round to nearest even, to bfloat16 and to float16 (as __float2bfloat16_rn and
// __float2half_rn do), returned widened back to float.
DSPARK_HD DSPARK_INLINE float round_to_bf16(float f) {
  uint32_t u = num::float_bits(f);
  if ((u & 0x7f800000u) == 0x7f800000u) return f;  // inf, NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return num::bits_float(u & 0xffff0000u);
}

DSPARK_HD DSPARK_INLINE float round_to_fp16(float f) {
  const uint32_t u = num::float_bits(f);
  const uint32_t sign = u & 0x80000000u;
  const float a = num::bits_float(u & 0x7fffffffu);
  if (!(a < 65520.0f)) {  // overflow to inf (NaN stays NaN)
    return a != a ? f : num::bits_float(sign | 0x7f800000u);
  }
  if (a < 0x1p-14f) {  // fp16 subnormals: multiples of 2^-24
    const float q = num::sub(num::add(a, 0x1p-1f), 0x1p-1f);  // the ulp of 1/2 is 2^-24
    return num::bits_float(sign | num::float_bits(q));
  }
  uint32_t m = u & 0x7fffffffu;
  m += 0xfffu + ((m >> 13) & 1u);  // round the 23-bit mantissa to 10 bits
  return num::bits_float(sign | (m & 0xffffe000u));
}

DSPARK_HD DSPARK_INLINE float round_to(float f, DType dtype) {
  return dtype == DType::kBFloat16 ? round_to_bf16(f) : dtype == DType::kFloat16 ? round_to_fp16(f) : f;
}

// Stores f (rounded to nearest even) as element `index` of a float tensor.
DSPARK_HD DSPARK_INLINE void store_float(void* base, DType dtype, int64_t index, float f) {
  if (dtype == DType::kFloat32) {
    static_cast<float*>(base)[index] = f;
    return;
  }
  const float r = round_to(f, dtype);
  const uint32_t u = num::float_bits(r);
  uint16_t h;
  if (dtype == DType::kBFloat16) {
    h = static_cast<uint16_t>(u >> 16);
  } else {  // float16 from a float that round_to made representable
    const uint32_t sign = (u >> 16) & 0x8000u;
    const uint32_t exponent = (u >> 23) & 0xffu;
    const uint32_t mantissa = u & 0x7fffffu;
    if (exponent == 0xffu) {
      h = static_cast<uint16_t>(sign | 0x7c00u | (mantissa ? 0x200u : 0u));
    } else if (exponent < 113) {  // zero or float16 subnormal: multiple of 2^-24
      const float a = num::bits_float(u & 0x7fffffffu);
      h = static_cast<uint16_t>(sign | static_cast<uint32_t>(num::mul(a, 0x1p24f)));
    } else {
      h = static_cast<uint16_t>(sign | ((exponent - 112u) << 10) | (mantissa >> 13));
    }
  }
  static_cast<uint16_t*>(base)[index] = h;
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
