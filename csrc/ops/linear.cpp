// Argument validation and dispatch of linear (CPU only).
#include <cstdint>

#include "dspark/ops.h"

namespace dspark {

void linear(const LinearArgs& a) {
  constexpr const char* op = "linear";
  const std::initializer_list<DType> floats = {DType::kFloat32, DType::kFloat16, DType::kBFloat16};
  check::defined(op, "x", a.x);
  const Device device = a.x.device;
  DSPARK_CHECK_VALUE(device.type == DeviceType::kCPU, op, ": runs on the CPU only, argument 'x' is on ",
                     device_name(device), " (on CUDA the models use torch's linear)");
  check::ndim(op, "x", a.x, 2);
  check::dtype_in(op, "x", a.x, floats);
  check::inner_contiguous(op, "x", a.x);
  const int64_t M = a.x.size(0), K = a.x.size(1);
  DSPARK_CHECK_VALUE(M <= 1 || a.x.stride(0) >= K, op, ": argument 'x' must have rows at least K = ", K,
                     " elements apart, got row stride ", a.x.stride(0));

  check::defined(op, "weight", a.weight);
  check::ndim(op, "weight", a.weight, 2);
  check::dtype_in(op, "weight", a.weight, floats);
  check::same_device(op, "weight", a.weight, device);
  check::contiguous(op, "weight", a.weight);
  check::dim_size(op, "weight", a.weight, 1, K, "K (x's last dimension)");
  const int64_t N = a.weight.size(0);

  if (a.bias.defined()) {
    check::ndim(op, "bias", a.bias, 1);
    check::dtype_in(op, "bias", a.bias, floats);
    check::same_device(op, "bias", a.bias, device);
    check::contiguous(op, "bias", a.bias);
    check::dim_size(op, "bias", a.bias, 0, N, "N (weight's rows)");
  }

  check::defined(op, "out", a.out);
  check::ndim(op, "out", a.out, 2);
  DSPARK_CHECK_TYPE(a.out.dtype == a.x.dtype, op, ": argument 'out' must have x's dtype ", dtype_name(a.x.dtype),
                    ", got ", dtype_name(a.out.dtype));
  check::same_device(op, "out", a.out, device);
  check::contiguous(op, "out", a.out);
  check::dim_size(op, "out", a.out, 0, M, "M (x's rows)");
  check::dim_size(op, "out", a.out, 1, N, "N (weight's rows)");
  check::no_aliasing(op, {{"out", &a.out}}, {{"x", &a.x}, {"weight", &a.weight}, {"bias", &a.bias}});
  cpu::linear(a);
}

}  // namespace dspark
