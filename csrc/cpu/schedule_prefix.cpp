// CPU backend of schedule_prefix: the same candidate order, fixed-point
// scan and stopping rule as the CUDA backend (dspark/schedule.h), with a
// sort instead of a block radix sort.
#include <algorithm>
#include <cstdint>
#include <vector>

#include "dspark/ops.h"
#include "dspark/schedule.h"
#include "fp_env.h"

namespace dspark::cpu {

using namespace schedule;

void schedule_prefix(const SchedulePrefixArgs& a) {
  const IeeeDenormals ieee;
  const int32_t R = static_cast<int32_t>(a.conf.size(0));
  const int32_t gamma = static_cast<int32_t>(a.conf.size(1));
  const float* conf = a.conf.ptr<float>();
  const int32_t* cap = a.cap.defined() ? a.cap.ptr<int32_t>() : nullptr;
  const float* sps = a.sps.defined() ? a.sps.ptr<float>() : nullptr;
  const int64_t table = a.sps.defined() ? a.sps.size(0) : 0;
  int32_t* lengths = a.lengths.ptr<int32_t>();

  if (a.mode == Mode::kFixed || a.mode == Mode::kThreshold) {
    for (int32_t r = 0; r < R; ++r) {
      const int32_t limit = position_limit(gamma, cap, r);
      lengths[r] = a.mode == Mode::kFixed ? limit
                                          : threshold_length(conf + int64_t{r} * gamma, limit, a.threshold);
    }
  } else {
    std::vector<uint64_t> keys;
    keys.reserve(static_cast<size_t>(R) * static_cast<size_t>(gamma));
    for (int32_t r = 0; r < R; ++r) {
      const int32_t limit = position_limit(gamma, cap, r);
      float survival = 1.0f;
      for (int32_t j = 1; j <= limit; ++j) {
        survival = num::mul(survival, clamp_confidence(conf[int64_t{r} * gamma + j - 1]));
        if (!(survival > 0.0f)) break;
        keys.push_back(candidate_key(survival, j, r));
      }
    }
    std::sort(keys.begin(), keys.end());
    const int64_t T = static_cast<int64_t>(keys.size());
    int64_t admitted = 0;
    if (a.mode == Mode::kBudget) {
      const int64_t k = a.budgets.defined()
                            ? (a.budgets.dtype == DType::kInt64 ? a.budgets.ptr<int64_t>()[0]
                                                                : a.budgets.ptr<int32_t>()[0])
                            : a.budget;
      admitted = std::min(std::max<int64_t>(k, 0), T);
    } else if (R < table) {
      double best = throughput(R, 0, R, sps, table);
      uint64_t sum = 0;
      for (int64_t t = 1; t <= T && R + t < table; ++t) {
        sum += num::to_fixed(key_survival(keys[static_cast<size_t>(t - 1)]));
        const double theta = throughput(R, sum, R + t, sps, table);
        if (theta > best) {
          best = theta;
          admitted = t;
        } else if (a.mode == Mode::kCausal) {
          break;  // early stop: required for losslessness
        }
      }
    }
    std::fill(lengths, lengths + R, 0);
    for (int64_t t = 0; t < admitted; ++t) ++lengths[key_request(keys[static_cast<size_t>(t)])];
  }

  // The expected throughput of the chosen lengths, and their total.
  int64_t total = 0;
  uint64_t sum = 0;
  for (int32_t r = 0; r < R; ++r) {
    float survival = 1.0f;
    for (int32_t j = 1; j <= lengths[r]; ++j) {
      survival = num::mul(survival, clamp_confidence(conf[int64_t{r} * gamma + j - 1]));
      sum += num::to_fixed(survival);
    }
    total += lengths[r];
  }
  a.capacity.ptr<int32_t>()[0] = static_cast<int32_t>(total);
  a.throughput.ptr<float>()[0] =
      sps ? saturate_float(throughput(R, sum, R + total, sps, table)) : 0.0f;
}

}  // namespace dspark::cpu
