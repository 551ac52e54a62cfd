// Argument validation and dispatch of schedule_prefix.
#include <cstdint>

#include "dspark/ops.h"
#include "dspark/schedule.h"

namespace dspark {
namespace {

constexpr const char* kOp = "schedule_prefix";

void check_vector(const char* name, const TensorView& t, const Device& device,
                  std::initializer_list<DType> dtypes, int64_t size, const char* what) {
  check::ndim(kOp, name, t, 1);
  check::dtype_in(kOp, name, t, dtypes);
  check::same_device(kOp, name, t, device);
  check::contiguous(kOp, name, t);
  if (size >= 0) check::dim_size(kOp, name, t, 0, size, what);
}

}  // namespace

void schedule_prefix(const SchedulePrefixArgs& a) {
  using schedule::Mode;
  check::defined(kOp, "conf", a.conf);
  const Device device = a.conf.device;
  check::ndim(kOp, "conf", a.conf, 2);
  check::dtype_in(kOp, "conf", a.conf, {DType::kFloat32});
  check::contiguous(kOp, "conf", a.conf);
  const int64_t R = a.conf.size(0), gamma = a.conf.size(1);
  DSPARK_CHECK_VALUE(gamma <= schedule::kMaxGamma, kOp, ": block size gamma = ", gamma,
                     " exceeds the limit ", schedule::kMaxGamma);
  DSPARK_CHECK_VALUE(R < schedule::kMaxRequests, kOp, ": ", R, " requests exceed the limit ",
                     schedule::kMaxRequests);
  if (a.cap.defined()) check_vector("cap", a.cap, device, {DType::kInt32}, R, "R");

  const bool needs_table = a.mode == Mode::kCausal || a.mode == Mode::kGlobal;
  DSPARK_CHECK_VALUE(!needs_table || a.sps.defined(), kOp,
                     ": argument 'sps' (the throughput table) is required in causal and global mode");
  if (a.sps.defined()) {
    check_vector("sps", a.sps, device, {DType::kFloat32}, -1, "");
    DSPARK_CHECK_VALUE(a.sps.size(0) >= 1, kOp, ": argument 'sps' must have B_max + 1 >= 1 entries");
  }
  if (a.mode == Mode::kBudget && a.budgets.defined())
    check_vector("budget", a.budgets, device, {DType::kInt32, DType::kInt64}, 1, "one element");
  if (a.mode == Mode::kThreshold)
    DSPARK_CHECK_VALUE(a.threshold == a.threshold, kOp, ": argument 'threshold' must not be NaN");

  check::defined(kOp, "lengths", a.lengths);
  check_vector("lengths", a.lengths, device, {DType::kInt32}, R, "R");
  check::defined(kOp, "throughput", a.throughput);
  check_vector("throughput", a.throughput, device, {DType::kFloat32}, 1, "one element");
  check::defined(kOp, "capacity", a.capacity);
  check_vector("capacity", a.capacity, device, {DType::kInt32}, 1, "one element");
  check::no_aliasing(kOp, {{"lengths", &a.lengths}, {"throughput", &a.throughput}, {"capacity", &a.capacity}},
                     {{"conf", &a.conf}, {"cap", &a.cap}, {"sps", &a.sps}, {"budget", &a.budgets}});

  if (device.type == DeviceType::kCPU) {
    if (a.sps.defined()) {
      const float* sps = a.sps.ptr<float>();
      for (int64_t b = 0; b < a.sps.size(0); ++b)
        DSPARK_CHECK_VALUE(sps[b] >= 0.0f && sps[b] <= num::kFloatMax, kOp,
                           ": argument 'sps' must be finite and >= 0, got ", sps[b], " at B = ", b);
    }
    cpu::schedule_prefix(a);
    return;
  }
#if defined(DSPARK_WITH_CUDA)
  DSPARK_CHECK_VALUE(R * gamma <= kScheduleMaxCandidatesCuda, kOp, ": R * gamma = ", R * gamma,
                     " candidates exceed the CUDA limit of ", kScheduleMaxCandidatesCuda,
                     " per launch");
  cuda::schedule_prefix(a);
#else
  DSPARK_CHECK_VALUE(false, kOp, ": tensors are on ", device_name(device),
                     " but this build of dspark has no CUDA backend");
#endif
}

}  // namespace dspark
