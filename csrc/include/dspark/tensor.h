// A non-owning view of a tensor: data pointer, dtype, shape, strides and
// device. Python builds one from a torch.Tensor (the extension never links
// libtorch); C++ callers such as the benchmarks build one by hand. The
// library never frees or reallocates the memory behind a view.
#pragma once

#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <string>
#include <utility>

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

  std::string strides_str() const {
    std::string s = "[";
    for (int i = 0; i < ndim; ++i) s += (i ? ", " : "") + std::to_string(strides[i]);
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

// An empty tensor has no element to address, so any strides are accepted.
inline void inner_contiguous(const char* op, const char* name, const TensorView& t) {
  DSPARK_CHECK_VALUE(t.ndim == 0 || t.numel() == 0 || t.stride(-1) == 1 || t.size(-1) <= 1, op,
                     ": argument '", name, "' must have unit stride in its last dimension");
}

// Whether two different indices of `t` can address the same element. The
// dimensions of size > 1 sorted by |stride| must each step over everything the
// smaller ones span; that is exact for every layout PyTorch produces (dense,
// sliced, transposed, expanded), and a layout it rejects that does not overlap
// would need hand-made interleaved strides.
inline bool has_internal_overlap(const TensorView& t) {
  if (t.numel() <= 1) return false;
  int64_t strides[TensorView::kMaxDims], sizes[TensorView::kMaxDims];
  int n = 0;
  for (int d = 0; d < t.ndim; ++d) {
    if (t.shape[d] <= 1) continue;
    const int64_t s = t.strides[d] < 0 ? -t.strides[d] : t.strides[d];
    int i = n++;
    for (; i > 0 && strides[i - 1] > s; --i) {
      strides[i] = strides[i - 1];
      sizes[i] = sizes[i - 1];
    }
    strides[i] = s;
    sizes[i] = t.shape[d];
  }
  int64_t span = 0;  // the largest offset the smaller dimensions reach
  for (int i = 0; i < n; ++i) {
    if (strides[i] <= span) return true;
    span += strides[i] * (sizes[i] - 1);
  }
  return false;
}

// A tensor the op writes must not address one element twice (an expanded or
// stride-0 view): the writes would race or repeat, as PyTorch's in-place ops
// refuse too.
inline void no_internal_overlap(const char* op, const char* name, const TensorView& t) {
  DSPARK_CHECK_VALUE(!has_internal_overlap(t), op, ": argument '", name,
                     "' is written by the op and must not address an element twice (an expanded or ",
                     "stride-0 view), got shape ", t.shape_str(), " and strides ", t.strides_str());
}

// Whether two tensors share memory, as far as it can be told from their views:
// the same first element, or overlapping address ranges of two contiguous
// tensors (each fills its range). Other layouts are not flagged: two
// interleaved views of one buffer (q and k sliced from a fused projection)
// share no element.
inline bool may_share_memory(const TensorView& a, const TensorView& b) {
  if (!a.defined() || !b.defined() || a.numel() == 0 || b.numel() == 0) return false;
  if (a.device != b.device) return false;
  const auto range = [](const TensorView& t, uintptr_t& lo, uintptr_t& hi) {
    int64_t low = 0, high = 0;
    for (int d = 0; d < t.ndim; ++d) {
      const int64_t reach = t.strides[d] * (t.shape[d] - 1);
      (reach < 0 ? low : high) += reach;
    }
    const auto size = static_cast<int64_t>(dtype_size(t.dtype));
    lo = reinterpret_cast<uintptr_t>(t.data) + static_cast<uintptr_t>(low * size);
    hi = reinterpret_cast<uintptr_t>(t.data) + static_cast<uintptr_t>((high + 1) * size);
  };
  if (a.data == b.data) return true;
  if (!a.is_contiguous() || !b.is_contiguous()) return false;
  uintptr_t a_lo, a_hi, b_lo, b_hi;
  range(a, a_lo, a_hi);
  range(b, b_lo, b_hi);
  return a_lo < b_hi && b_lo < a_hi;
}

inline void no_shared_memory(const char* op, const char* name, const TensorView& t,
                             const char* other_name, const TensorView& other) {
  DSPARK_CHECK_VALUE(!may_share_memory(t, other), op, ": argument '", name,
                     "' is written by the op and must not share memory with '", other_name, "'");
}

using NamedView = std::pair<const char*, const TensorView*>;

// The tensors an op writes must not share memory with one another nor with
// the tensors it reads (undefined optional arguments are skipped).
inline void no_aliasing(const char* op, std::initializer_list<NamedView> written,
                        std::initializer_list<NamedView> read) {
  for (auto w = written.begin(); w != written.end(); ++w) {
    for (auto o = w + 1; o != written.end(); ++o)
      no_shared_memory(op, w->first, *w->second, o->first, *o->second);
    for (const NamedView& r : read) no_shared_memory(op, w->first, *w->second, r.first, *r.second);
  }
}

}  // namespace check
}  // namespace dspark
