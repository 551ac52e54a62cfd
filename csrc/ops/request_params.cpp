#include "request_params.h"

#include "dspark/errors.h"

namespace dspark {
namespace {

void check_int64_vector(const char* op, const char* name, const TensorView& t, const Device& device,
                        int64_t R) {
  check::ndim(op, name, t, 1);
  check::dtype_in(op, name, t, {DType::kInt64});
  check::same_device(op, name, t, device);
  check::contiguous(op, name, t);
  DSPARK_CHECK_VALUE(t.size(0) == 1 || t.size(0) == R, op, ": argument '", name,
                     "' must have 1 or R = ", R, " elements, got shape ", t.shape_str());
}

}  // namespace

void check_request_params(const char* op, const Device& device, int64_t R, float temperature,
                          const TensorView& temperatures, const TensorView& seeds,
                          uint64_t offset, const TensorView& offsets) {
  if (temperatures.defined()) {
    check::ndim(op, "temperature", temperatures, 1);
    check::dtype_in(op, "temperature", temperatures, {DType::kFloat32});
    check::same_device(op, "temperature", temperatures, device);
    check::contiguous(op, "temperature", temperatures);
    check::dim_size(op, "temperature", temperatures, 0, R, "R");
  } else {
    DSPARK_CHECK_VALUE(temperature >= 0.0f, op, ": argument 'temperature' must be >= 0, got ",
                       temperature);
  }
  if (seeds.defined()) check_int64_vector(op, "seed", seeds, device, R);
  if (offsets.defined()) {
    check_int64_vector(op, "offset", offsets, device, R);
  } else {
    DSPARK_CHECK_VALUE(offset < static_cast<uint64_t>(kMaxOffset), op,
                       ": argument 'offset' must be in [0, 2^32), got ", offset);
  }
}

void check_request_values_on_host(const char* op, int64_t R, const TensorView& temperatures,
                                  const TensorView& offsets) {
  if (temperatures.defined()) {
    const float* t = temperatures.ptr<float>();
    for (int64_t r = 0; r < R; ++r)
      DSPARK_CHECK_VALUE(t[r] >= 0.0f, op, ": argument 'temperature' must be >= 0, got ", t[r],
                         " for request ", r);
  }
  if (offsets.defined()) {
    const int64_t* o = offsets.ptr<int64_t>();
    for (int64_t i = 0; i < offsets.size(0); ++i)
      DSPARK_CHECK_VALUE(o[i] >= 0 && o[i] < kMaxOffset, op,
                         ": argument 'offset' must be in [0, 2^32), got ", o[i]);
  }
}

RequestParams request_params(float temperature, const TensorView& temperatures, uint64_t seed,
                             const TensorView& seeds, uint64_t offset, const TensorView& offsets) {
  RequestParams p{};
  p.temperature = temperature;
  p.temperatures = temperatures.defined() ? temperatures.ptr<float>() : nullptr;
  p.seed = seed;
  p.seeds = seeds.defined() ? seeds.ptr<int64_t>() : nullptr;
  p.num_seeds = seeds.defined() ? seeds.size(0) : 0;
  p.offset = offset;
  p.offsets = offsets.defined() ? offsets.ptr<int64_t>() : nullptr;
  p.num_offsets = offsets.defined() ? offsets.size(0) : 0;
  return p;
}

}  // namespace dspark
