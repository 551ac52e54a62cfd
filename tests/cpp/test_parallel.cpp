// The CPU backend's thread pool: coverage of every index, nesting, resizing
// between regions (a resized pool once woke stale workers), exceptions.
#include <atomic>
#include <cstdint>
#include <stdexcept>
#include <vector>

#include "../../csrc/cpu/parallel.h"
#include "harness.h"

using dspark::cpu::parallel_for;

DSPARK_TEST(parallel_for_covers_each_index_once) {
  for (int64_t n : {0, 1, 7, 1000, 100003}) {
    std::vector<std::atomic<int>> hits(static_cast<size_t>(n));
    parallel_for(n, 3, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) hits[static_cast<size_t>(i)]++;
    });
    for (auto& h : hits) EXPECT(h.load() == 1);
  }
}

DSPARK_TEST(parallel_for_nests_serially) {
  std::atomic<int64_t> total{0};
  parallel_for(16, 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i)
      parallel_for(100, 1, [&](int64_t b2, int64_t e2) { total += e2 - b2; });
  });
  EXPECT(total.load() == 1600);
}

DSPARK_TEST(resizing_between_regions) {
  const int before = dspark::cpu::num_threads();
  for (int round = 0; round < 200; ++round) {
    dspark::cpu::set_num_threads(1 + round % 4);
    EXPECT(dspark::cpu::num_threads() == 1 + round % 4);
    std::atomic<int64_t> total{0};
    parallel_for(1000, 1, [&](int64_t b, int64_t e) { total += e - b; });
    EXPECT(total.load() == 1000);
  }
  dspark::cpu::set_num_threads(before);
}

DSPARK_TEST(exceptions_propagate_to_the_caller) {
  dspark::cpu::set_num_threads(3);
  EXPECT_THROWS(std::runtime_error, parallel_for(100, 1, [&](int64_t b, int64_t) {
    if (b >= 50) throw std::runtime_error("boom");
  }));
  std::atomic<int64_t> total{0};  // the pool still works afterwards
  parallel_for(100, 1, [&](int64_t b, int64_t e) { total += e - b; });
  EXPECT(total.load() == 100);
}
