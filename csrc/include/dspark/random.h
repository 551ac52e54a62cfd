// How random numbers are addressed. A number is a pure function of
// (seed, offset, request, position, purpose, column):
//
//   key     = (seed & 0xffffffff, seed >> 32)
//   counter = ((column >> 2) | purpose << 24,  position,  request,  offset)
//   value   = philox4x32_10(counter, key)[column & 3]
//
// `request` is the request's index in the batch when one seed serves the
// whole batch, and 0 when every request brings its own seed, so that a
// request's draws do not depend on where it sits in the batch. `position` is
// the request-relative row (draft position k, or the bonus row). Columns are
// vocabulary ids (below 2^26); column 0 serves draws that are not per token.
// dspark.reference.philox_uniform_bits implements the same map with tensors.
#pragma once

#include <cstdint>

#include "dspark/macros.h"
#include "dspark/philox.h"

namespace dspark {

enum class Purpose : uint32_t {
  kAccept = 1,  // the uniform of an acceptance test (column 0)
  kRace = 2,    // the exponentials of a residual or bonus race (column = token)
  kDraft = 3,   // the exponentials of a draft position's race (markov_sample)
};

constexpr int64_t kMaxColumns = int64_t{1} << 26;
constexpr int64_t kMaxOffset = int64_t{1} << 32;

struct RandomStream {
  uint32_t key0 = 0, key1 = 0;
  uint32_t request = 0;
  uint32_t offset = 0;

  DSPARK_HD DSPARK_INLINE static RandomStream make(uint64_t seed, uint32_t request,
                                                   uint32_t offset) {
    RandomStream s;
    s.key0 = static_cast<uint32_t>(seed);
    s.key1 = static_cast<uint32_t>(seed >> 32);
    s.request = request;
    s.offset = offset;
    return s;
  }

  // The four words of the block holding columns [4 * group, 4 * group + 4).
  DSPARK_HD DSPARK_INLINE Philox4x32 block(Purpose purpose, uint32_t position,
                                           uint32_t group) const {
    return philox4x32_10(group | (static_cast<uint32_t>(purpose) << 24), position, request,
                         offset, key0, key1);
  }

  DSPARK_HD DSPARK_INLINE uint32_t bits(Purpose purpose, uint32_t position,
                                        uint32_t column) const {
    return block(purpose, position, column >> 2).v[column & 3];
  }
};

}  // namespace dspark
