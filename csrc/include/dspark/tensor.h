// A non-owning view of a tensor: data pointer, dtype, shape, strides and
// device. Python builds one from a torch.Tensor (the extension never links
// libtorch); C++ callers such as the benchmarks build one by hand. The
// library never frees or reallocates the memory behind a view.
#pragma once

#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <string>

#include "dspark/errors.h"

namespace dspark {

// The integer codes are part of the Python binding (python/dspark/_tensor.py).
enum class DType : int32_t {
  kFloat32 = 0,
  kFloat16 = 1,
  kBFloat16 = 2,
  kInt32 = 3,
  kInt64 = 4,
  kUInt8 = 5,
};

enum class DeviceType : int32_t { kCPU = 0, kCUDA = 1 };

struct Device {
  DeviceType type = DeviceType::kCPU;
  int32_t index = 0;
  bool operator==(const Device& o) const { return type == o.type && index == o.index; }
  bool operator!=(const Device& o) const { return !(*this == o); }
};

inline size_t dtype_size(DType t) {
  switch (t) {
    case DType::kFloat32: return 4;
    case DType::kFloat16: return 2;
    case DType::kBFloat16: return 2;
    case DType::kInt32: return 4;
    case DType::kInt64: return 8;
    case DType::kUInt8: return 1;
  }
  return 0;
}

inline const char* dtype_name(DType t) {
  switch (t) {
    case DType::kFloat32: return "float32";
    case DType::kFloat16: return "float16";
    case DType::kBFloat16: return "bfloat16";
    case DType::kInt32: return "int32";
    case DType::kInt64: return "int64";
    case DType::kUInt8: return "uint8";
  }
  return "unknown";
}

inline bool is_floating(DType t) {
  return t == DType::kFloat32 || t == DType::kFloat16 || t == DType::kBFloat16;
}

inline std::string device_name(const Device& d) {
  return d.type == DeviceType::kCPU ? std::string("cpu") : "cuda:" + std::to_string(d.index);
}

struct TensorView {
  static constexpr int kMaxDims = 6;

  void* data = nullptr;
  DType dtype = DType::kFloat32;
  Device device;
  int32_t ndim = 0;
  int64_t shape[kMaxDims] = {};
  int64_t strides[kMaxDims] = {};  // in elements
  bool present = false;            // false: an optional argument that was not given

  bool defined() const { return present; }

  int64_t size(int d) const { return shape[d < 0 ? d + ndim : d]; }
  int64_t stride(int d) const { return strides[d < 0 ? d + ndim : d]; }

  int64_t numel() const {
    int64_t n = 1;
    for (int i = 0; i < ndim; ++i) n *= shape[i];
    return n;
  }

  bool is_contiguous() const {
    if (numel() == 0) return true;
    int64_t expected = 1;
    for (int i = ndim - 1; i >= 0; --i) {
      if (shape[i] != 1 && strides[i] != expected) return false;
      expected *= shape[i];
    }
    return true;
  }

  std::string shape_str() const {
    std::string s = "[";
    for (int i = 0; i < ndim; ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
    return s + "]";
  }

  template <typename T>
  T* ptr() const { return static_cast<T*>(data); }

  // A contiguous view over existing memory (benchmarks and C++ tests).
  static TensorView contiguous(void* data, DType dtype, Device device,
                               std::initializer_list<int64_t> shape) {
    TensorView v;
    v.data = data;
    v.dtype = dtype;
    v.device = device;
    v.present = true;
    v.ndim = static_cast<int32_t>(shape.size());
    int i = 0;
    for (int64_t s : shape) v.shape[i++] = s;
    int64_t st = 1;
    for (int d = v.ndim - 1; d >= 0; --d) {
      v.strides[d] = st;
      st *= v.shape[d];
    }
    return v;
  }
};

// Argument checks shared by every op. `op` and `name` appear in the message
// so that the error names the call and the argument.
namespace check {

inline void defined(const char* op, const char* name, const TensorView& t) {
  DSPARK_CHECK_VALUE(t.defined(), op, ": argument '", name, "' is required");
}

inline void ndim(const char* op, const char* name, const TensorView& t, int n) {
  DSPARK_CHECK_VALUE(t.ndim == n, op, ": argument '", name, "' must have ", n,
                     " dimensions, got shape ", t.shape_str());
}

inline void dim_size(const char* op, const char* name, const TensorView& t, int d,
                     int64_t expected, const char* what) {
  DSPARK_CHECK_VALUE(t.size(d) == expected, op, ": argument '", name, "' must have ", what,
                     " = ", expected, " in dimension ", d, ", got shape ", t.shape_str());
}

inline void dtype_in(const char* op, const char* name, const TensorView& t,
                     std::initializer_list<DType> allowed) {
  for (DType a : allowed)
    if (t.dtype == a) return;
  std::string list;
  for (DType a : allowed) list += std::string(list.empty() ? "" : ", ") + dtype_name(a);
  DSPARK_CHECK_TYPE(false, op, ": argument '", name, "' must have dtype in {", list, "}, got ",
                    dtype_name(t.dtype));
}

inline void same_device(const char* op, const char* name, const TensorView& t, const Device& d) {
  DSPARK_CHECK_VALUE(t.device == d, op, ": argument '", name, "' must be on ", device_name(d),
                     ", got ", device_name(t.device));
}

inline void contiguous(const char* op, const char* name, const TensorView& t) {
  DSPARK_CHECK_VALUE(t.is_contiguous(), op, ": argument '", name, "' must be contiguous");
}

inline void inner_contiguous(const char* op, const char* name, const TensorView& t) {
  DSPARK_CHECK_VALUE(t.ndim == 0 || t.stride(-1) == 1 || t.size(-1) <= 1, op, ": argument '",
                     name, "' must have unit stride in its last dimension");
}

}  // namespace check
}  // namespace dspark
