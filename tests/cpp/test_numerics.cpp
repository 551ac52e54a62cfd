// The shared numerics: Philox known answers, accuracy of exp2/log2/the
// exponential transform, fixed-point rounding and the packed arg-max order.
#include <cmath>
#include <cstdint>
#include <limits>

#include "dspark/numerics.h"
#include "dspark/philox.h"
#include "dspark/random.h"
#include "harness.h"

using namespace dspark;

// Known-answer vectors of Philox4x32-10 published with Random123 (kat_vectors).
DSPARK_TEST(philox_known_answers) {
  struct Kat {
    uint32_t ctr[4], key[2], out[4];
  };
  const Kat kats[] = {
      {{0, 0, 0, 0}, {0, 0}, {0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8}},
      {{0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff},
       {0xffffffff, 0xffffffff},
       {0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd}},
      {{0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344},
       {0xa4093822, 0x299f31d0},
       {0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1}},
  };
  for (const Kat& k : kats) {
    const Philox4x32 r = philox4x32_10(k.ctr[0], k.ctr[1], k.ctr[2], k.ctr[3], k.key[0], k.key[1]);
    for (int i = 0; i < 4; ++i) EXPECT(r.v[i] == k.out[i]);
  }
}

DSPARK_TEST(random_stream_addresses_words) {
  const RandomStream s = RandomStream::make(0x0123456789abcdefull, 7, 11);
  const Philox4x32 b = philox4x32_10(5 | (2u << 24), 3, 7, 11, 0x89abcdefu, 0x01234567u);
  for (uint32_t lane = 0; lane < 4; ++lane) EXPECT(s.bits(Purpose::kRace, 3, 20 + lane) == b.v[lane]);
}

DSPARK_TEST(exp2_accuracy) {
  double worst = 0;
  for (int i = 0; i <= 2000000; ++i) {
    const float x = -100.0f + 227.0f * static_cast<float>(i) / 2000000.0f;
    const double ref = std::exp2(static_cast<double>(x));
    const double got = num::exp2(x);
    worst = std::max(worst, std::fabs(got - ref) / ref);
  }
  EXPECT(worst < 2.5e-7);  // about 2 ulp
  EXPECT(num::exp2(0.0f) == 1.0f);
  EXPECT(num::exp2(-100.5f) == 0.0f);
  EXPECT(num::exp2(-std::numeric_limits<float>::infinity()) == 0.0f);
  EXPECT(num::exp2(std::nanf("")) == 0.0f);
  EXPECT(num::exp2(-99.9f) >= num::kMinWeight * 0.5f);
}

DSPARK_TEST(log2_accuracy) {
  double worst = 0;
  for (int i = 1; i <= 2000000; ++i) {
    const float x = std::ldexp(1.0f + static_cast<float>(i) / 2000000.0f, (i % 200) - 100);
    const double ref = std::log2(static_cast<double>(x));
    const double got = num::log2(x);
    worst = std::max(worst, std::fabs(got - ref) / std::max(1.0, std::fabs(ref)));
  }
  EXPECT(worst < 2.5e-7);
  EXPECT(num::log2(1.0f) == 0.0f);
  EXPECT(num::log2(8.0f) == 3.0f);
}

DSPARK_TEST(exponential_transform) {
  // -log2(1 - t) for t = bits 2^-32 + 2^-33 rounded to float (the rounding of
  // t is part of the definition): positive, finite, accurate.
  double worst = 0;
  for (uint64_t b = 0; b <= 0xffffffffull; b += 65537) {
    const uint32_t bits = static_cast<uint32_t>(b);
    const float t = std::min(static_cast<float>(bits) * 0x1p-32f + 0x1p-33f, num::kOneMinusUlp);
    const double ref = -std::log1p(-static_cast<double>(t)) / std::log(2.0);
    const double got = num::exponential(bits);
    EXPECT(got > 0 && std::isfinite(got));
    worst = std::max(worst, std::fabs(got - ref) / ref);
  }
  EXPECT(worst < 1e-6);
  EXPECT(num::exponential(0) > 0.0f);
  EXPECT(num::exponential(0) < 1e-9f);
  EXPECT(num::exponential(0xffffffffu) <= 24.0f);
}

DSPARK_TEST(uniform_range) {
  EXPECT(num::uniform(0) == 0.0f);
  EXPECT(num::uniform(0xffffffffu) < 1.0f);
  EXPECT(num::uniform(0x80000000u) == 0.5f);
}

DSPARK_TEST(fixed_point_rounds_to_nearest_even) {
  EXPECT(num::to_fixed(1.0f) == (uint64_t{1} << 40));
  EXPECT(num::to_fixed(0.0f) == 0);
  EXPECT(num::to_fixed(0x1p-41f) == 0);            // exactly half: ties to even
  EXPECT(num::to_fixed(0x1.8p-40f) == 2);          // 1.5 -> 2
  EXPECT(num::to_fixed(0x1.4p-40f) == 1);          // 1.25 -> 1
  EXPECT(num::rescale_fixed(uint64_t{3} << 40, 0.5f) == (uint64_t{3} << 39));
  EXPECT(num::from_fixed(uint64_t{5} << 39) == 2.5f);
}

DSPARK_TEST(packed_argmax_order) {
  const float values[] = {-num::kFloatMax, -1.0f, -0.0f, 0.0f, 1e-30f, 1.0f, num::kFloatMax};
  for (size_t i = 0; i + 1 < sizeof(values) / sizeof(values[0]); ++i) {
    EXPECT(num::orderable(values[i]) <= num::orderable(values[i + 1]));
    EXPECT(num::from_orderable(num::orderable(values[i])) == values[i]);
  }
  // Equal values: the smaller index wins.
  EXPECT(num::pack_arg(7, 3) > num::pack_arg(7, 9));
  EXPECT(num::packed_index(num::pack_arg(7, 3)) == 3);
  EXPECT(num::pack_arg(8, 9) > num::pack_arg(7, 3));
}

DSPARK_TEST(sanitize_rules) {
  const float inf = std::numeric_limits<float>::infinity();
  EXPECT(num::sanitize_logit(std::nanf("")) == -num::kFloatMax);
  EXPECT(num::sanitize_logit(-inf) == -num::kFloatMax);
  EXPECT(num::sanitize_logit(inf) == num::kFloatMax);
  EXPECT(num::sanitize_logit(3.5f) == 3.5f);
  EXPECT(num::sanitize_prob(std::nanf("")) == 0.0f);
  EXPECT(num::sanitize_prob(-0.5f) == 0.0f);
  EXPECT(num::sanitize_prob(inf) == 1.0f);
  EXPECT(num::sanitize_prob(0.25f) == 0.25f);
}
