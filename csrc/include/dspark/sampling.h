// Conventions shared by every sampling op: temperatures, where a request's
// random numbers come from, and scaled logits.
#pragma once

#include <cstdint>

#include "dspark/macros.h"
#include "dspark/numerics.h"
#include "dspark/random.h"

namespace dspark {

// T <= 0 (and NaN) means greedy.
DSPARK_HD DSPARK_INLINE bool is_greedy(float temperature) { return !(temperature > 0.0f); }

// The factor that turns a logit into a base-2 logit at this temperature.
// Greedy rows use 1 so that their argmax is the argmax of the raw logits.
DSPARK_HD DSPARK_INLINE float logit_scale(float temperature) {
  return is_greedy(temperature) ? 1.0f : num::div(num::kLog2e, temperature);
}

DSPARK_HD DSPARK_INLINE float scaled_logit(float logit, float scale) {
  return num::sanitize_logit(num::mul(logit, scale));
}

// A call's temperatures and random streams: scalars, or per-request arrays.
struct RequestParams {
  float temperature;          // used when temperatures is null
  const float* temperatures;  // [R] or null
  uint64_t seed;              // used when seeds is null
  const int64_t* seeds;       // [1] (one stream, requests by index) or [R] (one per request)
  int64_t num_seeds;
  uint64_t offset;
  const int64_t* offsets;  // [1] or [R], or null
  int64_t num_offsets;

  DSPARK_HD DSPARK_INLINE float temperature_of(int32_t r) const {
    return temperatures ? temperatures[r] : temperature;
  }

  // With per-request seeds the request index in the counter is 0, so a
  // request's numbers do not depend on its place in the batch.
  DSPARK_HD DSPARK_INLINE RandomStream stream_of(int32_t r) const {
    const bool per_request = seeds != nullptr && num_seeds > 1;
    const uint64_t s = seeds ? static_cast<uint64_t>(seeds[num_seeds > 1 ? r : 0]) : seed;
    const uint64_t o = offsets ? static_cast<uint64_t>(offsets[num_offsets > 1 ? r : 0]) : offset;
    return RandomStream::make(s, per_request ? 0u : static_cast<uint32_t>(r), static_cast<uint32_t>(o));
  }
};

}  // namespace dspark
