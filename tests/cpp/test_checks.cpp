// The argument checks shared by every op (csrc/include/dspark/tensor.h):
// which layouts overlap themselves or each other, and that a hostile output
// width is an error, not an overflow.
#include <cstdint>
#include <limits>
#include <vector>

#include "dspark/ops.h"
#include "harness.h"

using namespace dspark;

namespace {

TensorView strided(void* data, std::initializer_list<int64_t> shape, std::initializer_list<int64_t> strides,
                   DType dtype = DType::kFloat32) {
  TensorView v = TensorView::contiguous(data, dtype, Device{}, shape);
  int i = 0;
  for (int64_t s : strides) v.strides[i++] = s;
  return v;
}

}  // namespace

DSPARK_TEST(internal_overlap_of_layouts) {
  float buffer[64] = {};
  EXPECT(!check::has_internal_overlap(strided(buffer, {4, 8}, {8, 1})));        // contiguous
  EXPECT(!check::has_internal_overlap(strided(buffer, {8, 4}, {1, 8})));        // transposed
  EXPECT(!check::has_internal_overlap(strided(buffer, {4, 4}, {16, 2})));       // sliced
  EXPECT(!check::has_internal_overlap(strided(buffer, {2, 3, 4}, {24, 4, 1}))); // heads of a fused projection
  EXPECT(!check::has_internal_overlap(strided(buffer, {1, 8}, {0, 1})));        // stride 0 on a size-1 dim
  EXPECT(!check::has_internal_overlap(strided(buffer, {0, 8}, {0, 0})));        // empty
  EXPECT(!check::has_internal_overlap(strided(buffer + 63, {8}, {-1})));        // reversed
  EXPECT(check::has_internal_overlap(strided(buffer, {3, 8}, {0, 1})));         // expanded rows
  EXPECT(check::has_internal_overlap(strided(buffer, {3, 2, 8}, {8, 0, 1})));   // expanded heads
  EXPECT(check::has_internal_overlap(strided(buffer, {4, 8}, {4, 1})));         // rows overlapping by half
}

DSPARK_TEST(shared_memory_of_pairs) {
  float buffer[64] = {};
  const TensorView whole = strided(buffer, {8, 8}, {8, 1});
  EXPECT(check::may_share_memory(whole, strided(buffer, {8}, {1})));
  EXPECT(check::may_share_memory(whole, strided(buffer + 60, {4}, {1})));
  EXPECT(!check::may_share_memory(strided(buffer, {32}, {1}), strided(buffer + 32, {32}, {1})));
  // interleaved halves of one buffer share no element and are not flagged
  EXPECT(!check::may_share_memory(strided(buffer, {8, 4}, {8, 1}), strided(buffer + 4, {8, 4}, {8, 1})));
  TensorView absent;
  EXPECT(!check::may_share_memory(whole, absent));
}

DSPARK_TEST(rejection_output_width_does_not_overflow) {
  // max_num_draft = INT32_MAX: the expected width INT32_MAX + 1 is computed in
  // 64 bits, so the shape check fails cleanly instead of overflowing.
  std::vector<float> target(5, 0.0f);
  std::vector<int64_t> tokens;
  std::vector<int32_t> cu = {0}, out(1), accepted(1);
  RejectionSampleArgs a;
  const Device cpu{};
  a.target_logits = TensorView::contiguous(target.data(), DType::kFloat32, cpu, {0, 5});
  a.draft_tokens = TensorView::contiguous(tokens.data(), DType::kInt64, cpu, {0});
  a.cu_num_draft = TensorView::contiguous(cu.data(), DType::kInt32, cpu, {1});
  a.max_num_draft = std::numeric_limits<int32_t>::max();
  a.output_tokens = TensorView::contiguous(out.data(), DType::kInt32, cpu, {0, 1});
  a.num_accepted = TensorView::contiguous(accepted.data(), DType::kInt32, cpu, {0});
  EXPECT_THROWS(ValueError, rejection_sample(a));
}

DSPARK_TEST(rope_refuses_an_expanded_q) {
  std::vector<float> q(16, 1.0f), inv_freq(4, 1.0f);
  std::vector<int64_t> positions = {0, 1, 2};
  RopeArgs a;
  const Device cpu{};
  a.q = strided(q.data(), {3, 2, 8}, {0, 8, 1});
  a.positions = TensorView::contiguous(positions.data(), DType::kInt64, cpu, {3});
  a.inv_freq = TensorView::contiguous(inv_freq.data(), DType::kFloat32, cpu, {4});
  EXPECT_THROWS(ValueError, rope(a));
  a.q = strided(q.data(), {1, 2, 8}, {16, 8, 1});
  a.positions.shape[0] = 1;
  rope(a);  // a valid layout still runs
}
