// Truncated sampling (DESIGN.md, decision 11): per-request top-k, top-p and
// min-p, written once for both backends and for every sampling op.
//
// The distribution of a sampled row (temperature T > 0) is the truncated,
// renormalised softmax of z = logits * log2(e) / T (base-2 logits, sanitized;
// numerics.h). With M = max_v z_v and the key of a value its orderable() image
// (a total order on floats, -0 normalised to +0 by sanitize_logit):
//   1. top-k (k in [1, V)): keep z_v >= t_k, the k-th largest value counted
//      with multiplicity; every value tied with it is kept (vLLM's rule: mask
//      logits strictly below the k-th largest).
//   2. min-p (min_p in (0, 1]): keep z_v >= M + log2(min_p) (float32 add of
//      the shared log2), i.e. p_v >= min_p * max_p.
//   3. top-p (top_p in (0, 1)): over the survivors K of 1 and 2, with masses
//      m_v = fixed(2^(z_v - M)) and W = sum_K m_v, keep the largest key t_p
//      such that the mass of {v in K : z_v >= t_p} is at least
//      ceil(W * q / 2^32), q = top_p * 2^32 truncated to an integer. This is
//      the smallest set of most probable tokens whose mass reaches top_p,
//      with the ties at the boundary kept whole (vLLM keeps the smallest
//      prefix of the sorted row whose mass reaches top_p and leaves ties to
//      the sort). top-p applies after top-k and min-p, as in vLLM's sampler
//      (min-p is applied first there; min-p and top-k commute).
// The kept set is {v : key(z_v) >= cut} for one key `cut`, the largest of the
// three thresholds, and the row's normaliser is S = sum_{kept} m_v, so
// p_v = 2^(z_v - M) / S on the kept set and 0 elsewhere. The maximum is always
// kept. Greedy rows (T <= 0) are never truncated: the argmax is kept by every
// rule. A parameter outside its active range switches its rule off: top_k <=
// 0 or >= V, top_p >= 1 or NaN, min_p <= 2^-100 or NaN (the ops refuse
// such values where they can see them; see the Python layer).
//
// Thresholds are found without sorting, by a radix select over the 32-bit
// keys: kRadixLevels passes over the row, each building a histogram of
// weights (1 per token for top-k, m_v for top-p) over the next bits of the
// key among the tokens that share the bits fixed so far, then walking the
// buckets from the top to the one where the running weight reaches what is
// needed. Weights are integers, so the result is exact and independent of the
// order a backend visits the row in.
#pragma once

#include <cstdint>

#include "dspark/macros.h"
#include "dspark/numerics.h"

namespace dspark::truncation {

// Bits of the key resolved by each level of the select, from the top.
constexpr int kRadixLevels = 3;
DSPARK_HD constexpr int radix_bits(int level) { return level < 2 ? 11 : 10; }        // 11, 11, 10
DSPARK_HD constexpr int radix_shift(int level) { return level == 0 ? 21 : level == 1 ? 10 : 0; }
constexpr int kRadixBins = 1 << 11;  // histogram size (the widest level)

// The parameters of one request.
struct Truncation {
  int32_t top_k;
  float top_p;
  float min_p;
};

// A call's parameters: scalars, or per-request arrays (null: the scalar).
struct Params {
  int32_t top_k = 0;
  const int32_t* top_ks = nullptr;
  float top_p = 1.0f;
  const float* top_ps = nullptr;
  float min_p = 0.0f;
  const float* min_ps = nullptr;

  DSPARK_HD DSPARK_INLINE Truncation of(int32_t r) const {
    Truncation t;
    t.top_k = top_ks ? top_ks[r] : top_k;
    t.top_p = top_ps ? top_ps[r] : top_p;
    t.min_p = min_ps ? min_ps[r] : min_p;
    return t;
  }

  // Whether any request can be truncated (host side, from the call's shape).
  bool any() const {
    return top_ks || top_ps || min_ps || top_k > 0 || top_p < 1.0f || min_p > 0.0f;
  }
};

DSPARK_HD DSPARK_INLINE bool top_k_on(const Truncation& t, int64_t columns) {
  return t.top_k > 0 && t.top_k < columns;
}
DSPARK_HD DSPARK_INLINE bool top_p_on(const Truncation& t) { return t.top_p < 1.0f; }  // NaN: off
DSPARK_HD DSPARK_INLINE bool min_p_on(const Truncation& t) { return t.min_p > num::kMinWeight; }  // NaN: off

DSPARK_HD DSPARK_INLINE bool active(const Truncation& t, int64_t columns) {
  return top_k_on(t, columns) || top_p_on(t) || min_p_on(t);
}

// The key of a base-2 logit.
DSPARK_HD DSPARK_INLINE uint32_t key(float z) { return num::orderable(z); }

// min-p's cut: the key of M + log2(min_p) (min_p in (2^-100, 1]).
DSPARK_HD DSPARK_INLINE uint32_t min_p_cut(float row_max, float min_p) {
  const float p = min_p < 1.0f ? min_p : 1.0f;
  return key(num::add(row_max, num::log2(p)));
}

// A token's mass relative to the row maximum.
DSPARK_HD DSPARK_INLINE uint64_t mass(float z, float row_max) {
  return num::to_fixed(num::exp2(num::sub(z, row_max)));
}

// ceil(W * q / 2^32) with q = floor(top_p * 2^32), at least 1.
DSPARK_HD DSPARK_INLINE uint64_t top_p_need(uint64_t total, float top_p) {
  const float p = top_p > 0.0f ? top_p : 0.0f;
  const uint64_t q = static_cast<uint64_t>(num::mul(p, 0x1p32f));  // <= 2^32
#if defined(__CUDA_ARCH__)
  const uint64_t hi = __umul64hi(total, q), lo = total * q;
#else
  const unsigned __int128 prod = static_cast<unsigned __int128>(total) * q;
  const uint64_t hi = static_cast<uint64_t>(prod >> 64), lo = static_cast<uint64_t>(prod);
#endif
  uint64_t need = (hi << 32) | (lo >> 32);
  if (lo & 0xffffffffu) ++need;
  return need > 0 ? need : 1;
}

// The bucket of `k` at `level`, and whether `k` shares the bits fixed before
// `level` with `prefix`.
DSPARK_HD DSPARK_INLINE uint32_t bucket(uint32_t k, int level) {
  return (k >> radix_shift(level)) & ((1u << radix_bits(level)) - 1u);
}
DSPARK_HD DSPARK_INLINE bool in_prefix(uint32_t k, uint32_t prefix, int level) {
  if (level == 0) return true;
  const int shift = radix_shift(level - 1);
  return (k >> shift) == (prefix >> shift);
}

// One level's walk from the top bucket down: the bucket where the running
// weight reaches `need`; `need` becomes what is still needed inside it and
// `above` grows by the weight of the buckets above it. Returns -1 when the
// level's total is below need (only for inconsistent inputs).
DSPARK_HD inline int32_t walk_buckets(const uint64_t* hist, int level, uint64_t& need, uint64_t& above) {
  uint64_t acc = 0;
  for (int32_t b = (1 << radix_bits(level)) - 1; b >= 0; --b) {
    if (acc + hist[b] >= need) {
      need -= acc;
      above += acc;
      return b;
    }
    acc += hist[b];
  }
  return -1;
}

// The host-side select (the CPU backend): the largest key t with
// sum_{v : key_v >= t} weight(v) >= need, visiting v in [0, n) once per level;
// `weight(v, key_v)` is the weight of token v and `need_of(W)` the weight
// needed given the total W (the level-0 histogram's sum; W itself is what
// top-p needs). `mass_at_or_above` gets the weight of {key >= t}. Returns 0
// (keep everything) when the total weight is below what is needed.
template <typename KeyOf, typename WeightOf, typename NeedOf>
uint32_t select_host(int64_t n, const KeyOf& key_of, const WeightOf& weight, const NeedOf& need_of, uint64_t* hist,
                     uint64_t* mass_at_or_above = nullptr) {
  uint32_t prefix = 0;
  uint64_t above = 0, need = 0;
  for (int level = 0; level < kRadixLevels; ++level) {
    const int bins = 1 << radix_bits(level);
    for (int b = 0; b < bins; ++b) hist[b] = 0;
    for (int64_t v = 0; v < n; ++v) {
      const uint32_t k = key_of(v);
      if (in_prefix(k, prefix, level)) hist[bucket(k, level)] += weight(v, k);
    }
    if (level == 0) {
      uint64_t total = 0;
      for (int b = 0; b < bins; ++b) total += hist[b];
      need = need_of(total);
    }
    const int32_t b = walk_buckets(hist, level, need, above);
    if (b < 0) return 0;
    prefix |= static_cast<uint32_t>(b) << radix_shift(level);
    if (level == kRadixLevels - 1 && mass_at_or_above) *mass_at_or_above = above + hist[b];
  }
  return prefix;
}

// A row's truncation on the host: the cut key and the normaliser S (the mass
// of the kept tokens relative to row_max), for z_of(v) the base-2 logits of
// the row's n tokens. Uses kRadixBins words of `hist`.
struct Cut {
  uint32_t cut;
  uint64_t total;
};

template <typename ZOf>
Cut truncate_host(int64_t n, const ZOf& z_of, float row_max, const Truncation& t, uint64_t* hist) {
  const auto key_of = [&](int64_t v) { return key(z_of(v)); };
  uint32_t base = 0;
  if (top_k_on(t, n)) {
    const uint64_t k = static_cast<uint64_t>(t.top_k);
    base = select_host(n, key_of, [](int64_t, uint32_t) { return uint64_t{1}; },
                       [k](uint64_t) { return k; }, hist);
  }
  if (min_p_on(t)) {
    const uint32_t m = min_p_cut(row_max, t.min_p);
    base = m > base ? m : base;
  }
  Cut c{base, 0};
  const auto weight = [&](int64_t v, uint32_t k) { return k >= base ? mass(z_of(v), row_max) : uint64_t{0}; };
  if (top_p_on(t)) {
    const float p = t.top_p;
    c.cut = select_host(n, key_of, weight, [p](uint64_t total) { return top_p_need(total, p); }, hist, &c.total);
  } else {
    for (int64_t v = 0; v < n; ++v) c.total += weight(v, key_of(v));
  }
  return c;
}

}  // namespace dspark::truncation
