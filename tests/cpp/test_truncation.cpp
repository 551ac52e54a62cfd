// The radix select of dspark/truncation.h against sorting: the k-th largest
// key and the top-p threshold by weight, on rows with many ties, every level
// of the select exercised (values spread over many exponents and mantissas).
#include <algorithm>
#include <cstdint>
#include <functional>
#include <random>
#include <vector>

#include "dspark/numerics.h"
#include "dspark/truncation.h"
#include "harness.h"

using namespace dspark;

namespace {

std::vector<float> random_row(size_t n, uint32_t seed, bool coarse) {
  std::mt19937 g(seed);
  std::normal_distribution<float> normal(0.0f, 4.0f);
  std::vector<float> z(n);
  for (float& v : z) {
    v = normal(g);
    if (coarse) v = std::round(v * 4.0f) / 4.0f;  // many ties
    v = num::sanitize_logit(v);
  }
  return z;
}

}  // namespace

DSPARK_TEST(top_k_select_is_the_kth_largest_key) {
  std::vector<uint64_t> hist(truncation::kRadixBins);
  for (uint32_t seed = 0; seed < 20; ++seed) {
    const bool coarse = seed % 2 == 1;
    const std::vector<float> z = random_row(3000 + seed * 17, seed, coarse);
    std::vector<uint32_t> keys(z.size());
    for (size_t i = 0; i < z.size(); ++i) keys[i] = truncation::key(z[i]);
    std::vector<uint32_t> sorted = keys;
    std::sort(sorted.begin(), sorted.end(), std::greater<uint32_t>());
    for (uint64_t k : {uint64_t{1}, uint64_t{2}, uint64_t{50}, uint64_t{999}, uint64_t{z.size() - 1}}) {
      const uint32_t t = truncation::select_host(
          static_cast<int64_t>(z.size()), [&](int64_t v) { return keys[v]; },
          [](int64_t, uint32_t) { return uint64_t{1}; }, [k](uint64_t) { return k; }, hist.data());
      EXPECT(t == sorted[k - 1]);
    }
  }
}

DSPARK_TEST(top_p_select_is_the_smallest_prefix_reaching_the_mass) {
  std::vector<uint64_t> hist(truncation::kRadixBins);
  for (uint32_t seed = 0; seed < 20; ++seed) {
    const std::vector<float> z = random_row(2500, 100 + seed, seed % 2 == 1);
    const float row_max = *std::max_element(z.begin(), z.end());
    std::vector<std::pair<uint32_t, uint64_t>> items;
    for (float v : z) items.push_back({truncation::key(v), truncation::mass(v, row_max)});
    std::sort(items.begin(), items.end(), [](const auto& a, const auto& b) { return a.first > b.first; });
    uint64_t total = 0;
    for (const auto& it : items) total += it.second;
    for (float p : {0.01f, 0.3f, 0.5f, 0.9f, 0.999f}) {
      const uint64_t need = truncation::top_p_need(total, p);
      uint64_t kept = 0;
      const uint32_t t = truncation::select_host(
          static_cast<int64_t>(z.size()), [&](int64_t v) { return truncation::key(z[v]); },
          [&](int64_t v, uint32_t) { return truncation::mass(z[v], row_max); },
          [p](uint64_t w) { return truncation::top_p_need(w, p); }, hist.data(), &kept);
      // by sorting: walk whole tie groups until the mass reaches need
      uint64_t acc = 0;
      uint32_t want = 0;
      for (size_t i = 0; i < items.size();) {
        size_t j = i;
        while (j < items.size() && items[j].first == items[i].first) acc += items[j++].second;
        if (acc >= need) {
          want = items[i].first;
          break;
        }
        i = j;
      }
      EXPECT(t == want);
      EXPECT(kept == acc);
    }
  }
}

DSPARK_TEST(top_p_need_rounds_up_and_is_at_least_one) {
  EXPECT(truncation::top_p_need(100, 0.5f) == 50);
  EXPECT(truncation::top_p_need(101, 0.5f) == 51);
  EXPECT(truncation::top_p_need(1, 1e-9f) == 1);
  EXPECT(truncation::top_p_need(uint64_t{1} << 60, 1.0f) == uint64_t{1} << 60);
  EXPECT(truncation::min_p_cut(0.0f, 0.5f) == truncation::key(-1.0f));
  EXPECT(truncation::min_p_cut(3.0f, 1.0f) == truncation::key(3.0f));
}
