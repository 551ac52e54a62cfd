// The CPU backend's thread pool: coverage of every index, nesting, resizing
// between regions (a resized pool once woke stale workers), exceptions, late
// workers that must not run a finished region's tasks.
#include <atomic>
#include <chrono>
#include <cstdint>
#include <stdexcept>
#include <thread>
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

DSPARK_TEST(late_workers_never_run_a_stale_region_nor_lose_a_task) {
  // Many short regions back to back (the caller often finishes a region before
  // a worker wakes): each task checks that it belongs to the region running
  // now; a worker that wakes late must never run a task of an earlier region
  // (its std::function is gone) nor claim and drop one of the current region.
  dspark::cpu::set_num_threads(4);
  for (int region = 0; region < 2000; ++region) {
    const int64_t n = 1 + region % 13;
    std::vector<std::atomic<int>> hits(static_cast<size_t>(n));
    for (auto& h : hits) h.store(0);
    const int tag = region;
    parallel_for(n, 1, [&, tag](int64_t b, int64_t e) {
      EXPECT(tag == region);
      for (int64_t i = b; i < e; ++i) hits[static_cast<size_t>(i)].fetch_add(1);
    });
    for (auto& h : hits) EXPECT(h.load() == 1);
  }
}

DSPARK_TEST(regions_of_slow_tasks_complete_with_every_index_once) {
  // Tasks that sleep, so that workers and the caller claim concurrently.
  dspark::cpu::set_num_threads(2);
  std::atomic<int64_t> total{0};
  for (int round = 0; round < 50; ++round) {
    parallel_for(8, 1, [&](int64_t b, int64_t e) {
      std::this_thread::sleep_for(std::chrono::microseconds(20));
      total += e - b;
    });
  }
  EXPECT(total.load() == 50 * 8);
}
