// rejection_sample through the C++ API (what the benchmarks call): greedy
// decisions on a hand-made batch, and argument errors.
#include <cstdint>
#include <vector>

#include "dspark/ops.h"
#include "harness.h"

using namespace dspark;

namespace {

struct Batch {
  int64_t V = 5;
  std::vector<float> target;       // [N + R, V]
  std::vector<int64_t> tokens;     // [N]
  std::vector<int32_t> cu;         // [R + 1]
  std::vector<int32_t> out, accepted;
  int32_t max_draft = 0;

  RejectionSampleArgs args() {
    const int64_t R = static_cast<int64_t>(cu.size()) - 1;
    const int64_t N = static_cast<int64_t>(tokens.size());
    out.assign(static_cast<size_t>(R * (max_draft + 1)), 7);
    accepted.assign(static_cast<size_t>(R), 7);
    RejectionSampleArgs a;
    const Device cpu{};
    a.target_logits = TensorView::contiguous(target.data(), DType::kFloat32, cpu, {N + R, V});
    a.draft_tokens = TensorView::contiguous(tokens.data(), DType::kInt64, cpu, {N});
    a.cu_num_draft = TensorView::contiguous(cu.data(), DType::kInt32, cpu, {R + 1});
    a.temperature = 0.0f;
    a.max_num_draft = max_draft;
    a.output_tokens = TensorView::contiguous(out.data(), DType::kInt32, cpu, {R, max_draft + 1});
    a.num_accepted = TensorView::contiguous(accepted.data(), DType::kInt32, cpu, {R});
    return a;
  }
};

// Target rows whose argmax is `best[i]`.
std::vector<float> rows_with_argmax(const std::vector<int>& best, int64_t V) {
  std::vector<float> t(best.size() * static_cast<size_t>(V), 0.0f);
  for (size_t i = 0; i < best.size(); ++i) t[i * static_cast<size_t>(V) + static_cast<size_t>(best[i])] = 3.0f;
  return t;
}

}  // namespace

DSPARK_TEST(greedy_accepts_matching_prefix) {
  Batch b;
  // Request 0: drafts 1, 2, 3; target argmax 1, 2, 4, (bonus) 0 -> accepts 2, corrects to 4.
  // Request 1: no drafts; bonus argmax 3.
  // Request 2: draft 2; target argmax 2, bonus 1 -> accepts 1, bonus 1.
  b.tokens = {1, 2, 3, 2};
  b.cu = {0, 3, 3, 4};
  b.max_draft = 3;
  b.target = rows_with_argmax({1, 2, 4, 0, 3, 2, 1}, b.V);
  rejection_sample(b.args());
  const std::vector<int32_t> want = {1, 2, 4, -1, 3, -1, -1, -1, 2, 1, -1, -1};
  EXPECT(b.out == want);
  EXPECT((b.accepted == std::vector<int32_t>{2, 0, 1}));
}

DSPARK_TEST(greedy_ties_take_first_index) {
  Batch b;
  b.tokens = {};
  b.cu = {0, 0};
  b.target = {1.0f, 4.0f, 4.0f, -2.0f, 4.0f};
  rejection_sample(b.args());
  EXPECT(b.out[0] == 1);
}

DSPARK_TEST(argument_errors) {
  Batch b;
  b.tokens = {1};
  b.cu = {0, 1};
  b.max_draft = 1;
  b.target = rows_with_argmax({1, 2}, b.V);
  {
    RejectionSampleArgs a = b.args();
    a.target_logits.shape[0] = 3;  // wrong number of rows
    EXPECT_THROWS(ValueError, rejection_sample(a));
  }
  {
    RejectionSampleArgs a = b.args();
    a.draft_tokens.dtype = DType::kFloat32;
    EXPECT_THROWS(TypeError, rejection_sample(a));
  }
  {
    b.tokens = {5};  // out of the vocabulary
    EXPECT_THROWS(ValueError, rejection_sample(b.args()));
    b.tokens = {1};
  }
  {
    RejectionSampleArgs a = b.args();
    a.temperature = -1.0f;
    EXPECT_THROWS(ValueError, rejection_sample(a));
  }
  {
    RejectionSampleArgs a = b.args();
    a.max_num_draft = 0;  // request 0 has 1 draft
    a.output_tokens.shape[1] = 1;
    EXPECT_THROWS(ValueError, rejection_sample(a));
  }
}
