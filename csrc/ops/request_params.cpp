#include "request_params.h"

#include <string>

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

void check_vector(const char* op, const char* name, const TensorView& t, const Device& device, int64_t R,
                  DType dtype) {
  check::ndim(op, name, t, 1);
  check::dtype_in(op, name, t, {dtype});
  check::same_device(op, name, t, device);
  check::contiguous(op, name, t);
  check::dim_size(op, name, t, 0, R, "R");
}

// " for request r", or nothing for a scalar (r < 0).
std::string for_request(int64_t r) { return r >= 0 ? " for request " + std::to_string(r) : std::string(); }

void check_top_k(const char* op, int64_t top_k, int64_t columns, int64_t r) {
  DSPARK_CHECK_VALUE(top_k >= 0 && top_k <= columns, op, ": argument 'top_k' must be in [0, ", columns,
                     "] (0: off), got ", top_k, for_request(r));
}

void check_top_p(const char* op, float top_p, int64_t r) {
  DSPARK_CHECK_VALUE(top_p > 0.0f && top_p <= 1.0f, op, ": argument 'top_p' must be in (0, 1] (1: off), got ",
                     top_p, for_request(r));
}

void check_min_p(const char* op, float min_p, int64_t r) {
  DSPARK_CHECK_VALUE(min_p >= 0.0f && min_p <= 1.0f, op, ": argument 'min_p' must be in [0, 1] (0: off), got ",
                     min_p, for_request(r));
}

}  // namespace

void check_truncation(const char* op, const Device& device, int64_t R, int64_t columns, int32_t top_k,
                      const TensorView& top_ks, float top_p, const TensorView& top_ps, float min_p,
                      const TensorView& min_ps) {
  if (top_ks.defined()) check_vector(op, "top_k", top_ks, device, R, DType::kInt32);
  else check_top_k(op, top_k, columns, -1);
  if (top_ps.defined()) check_vector(op, "top_p", top_ps, device, R, DType::kFloat32);
  else check_top_p(op, top_p, -1);
  if (min_ps.defined()) check_vector(op, "min_p", min_ps, device, R, DType::kFloat32);
  else check_min_p(op, min_p, -1);
}

void check_truncation_values_on_host(const char* op, int64_t R, int64_t columns, const TensorView& top_ks,
                                     const TensorView& top_ps, const TensorView& min_ps) {
  for (int64_t r = 0; r < R; ++r) {
    if (top_ks.defined()) check_top_k(op, top_ks.ptr<int32_t>()[r], columns, r);
    if (top_ps.defined()) check_top_p(op, top_ps.ptr<float>()[r], r);
    if (min_ps.defined()) check_min_p(op, min_ps.ptr<float>()[r], r);
  }
}

truncation::Params truncation_params(int32_t top_k, const TensorView& top_ks, float top_p, const TensorView& top_ps,
                                     float min_p, const TensorView& min_ps) {
  truncation::Params t;
  t.top_k = top_k;
  t.top_ks = top_ks.defined() ? top_ks.ptr<int32_t>() : nullptr;
  t.top_p = top_p;
  t.top_ps = top_ps.defined() ? top_ps.ptr<float>() : nullptr;
  t.min_p = min_p;
  t.min_ps = min_ps.defined() ? min_ps.ptr<float>() : nullptr;
  return t;
}

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
