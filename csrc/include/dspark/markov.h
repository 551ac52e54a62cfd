// The sequential stage of the DSpark drafter (DSPARK.md, section 2), written
// once for both backends: the Markov heads, the per-position sampling rule and
// the canonical reduction of a corrected row.
//
// Position k (0-based) of request r samples from softmax((U_k + B_k) / T):
//   e = W1[x_{k-1}] (x_{-1} is the anchor), W1 [V, rank];
//   vanilla: a = e
//   gated:   a = sigmoid(Wg [h_k ; e] + bg) * e,       Wg [rank, d + rank]
//   rnn:     y = Wj [s_{k-1} ; e ; h_k] + bj,          Wj [3 rank, 2 rank + d]
//            gate, cand, out = y[0:rank], y[rank:2 rank], y[2 rank:3 rank]
//            s_k = sig(gate) s_{k-1} + (1 - sig(gate)) tanh(cand), s_{-1} = 0
//            a = tanh(out)
//   B_k[v] = sum_i a_i W2[v, i],  W2 [V, rank] (a linear layer's weight).
// The corrected logit c = U + B is a float32. At T > 0, z = sanitize(c log2(e)/T)
// (numerics.h) and the token is the winner of an exponential race over 2^z
// (random numbers: Purpose::kDraft, position k, column v). The row's log-sum-
// exp comes from a fixed-point sum, so it does not depend on summation order.
//
// The canonical reduction cuts a row into kMarkovChunk columns (the vocabulary
// tile of the CUDA kernel). Chunk c keeps its maximum m_c, S_c = sum
// fixed(2^(z - m_c)), and its race winner with key 2^(z - m_c) / E. Across
// chunks, M = max m_c, S = sum round(S_c 2^(m_c - M)), and the winner has the
// largest key * 2^(m_c - M) (ties: smallest column). Reported (natural log):
// lse = ln 2 (M + log2(S 2^-40)), logprob = ln 2 (z_x - M - log2(S 2^-40)).
// Greedy (T <= 0): the token is the first argmax of c, logprob = 0, lse = max c.
// A row whose maximum sits at a float limit reports that limit's infinity as
// its lse (row_lse): no logit above -FLT_MAX (every one -inf or NaN, or scaled
// below the float range) is a row without mass, sampled uniformly (logprob
// -ln V) with lse = -inf, the limit of lse as the logits fall together; a
// logit at +FLT_MAX (+inf) gives lse = +inf.
//
// Truncation (top-k / top-p / min-p of the request, dspark/truncation.h, over
// the V_d columns of z): the row is sampled from its kept set, with keys
// 2^(z - M) / E relative to the row maximum M (the winner: the largest key,
// ties to the smallest column), and lse / logprob from the kept set's
// normaliser S (relative to M): lse = ln 2 (M + log2(S 2^-40)). The corrected
// logits reported for a truncated row are -inf outside the kept set, so that
// rejection_sample given them as draft_logits sees the distribution the
// drafts were drawn from.
//
// Draft vocabulary (DESIGN.md, decision 10): U, W2 and the corrected rows have
// V_d columns, column c scoring target id draft_vocab[c]; the sampled column is
// reported as its target id, which also indexes W1 at the next position (W1
// keeps a row per target id: the anchor can be any token). Random numbers are
// addressed by column.
//
// When W2 is 16-bit, the A rows are rounded to W2's dtype before the product
// (round to nearest even), so both backends multiply the same 16-bit values
// with float32 accumulation ("bf16 in, fp32 accumulate").
// Matrix products are not part of the shared numerics: the CUDA backend uses
// tensor cores, the CPU backend FMA loops, so the two agree on tokens except
// where two race keys (or two greedy logits) are within rounding of each other.
#pragma once

#include <cstdint>

#include "dspark/macros.h"
#include "dspark/numerics.h"
#include "dspark/random.h"
#include "dspark/truncation.h"

namespace dspark::markov {

enum class Head : int32_t { kVanilla = 0, kGated = 1, kRnn = 2 };

constexpr int64_t kMarkovChunk = 256;  // columns per chunk of the canonical reduction
constexpr float kLn2 = 0x1.62e430p-1f;

DSPARK_HD DSPARK_INLINE float sigmoid(float x) {
  // 1 / (1 + 2^(-x log2 e)), with the shared exp2 (no libm, same on both backends).
  const float t = num::exp2(num::mul(-x, num::kLog2e));
  return num::div(1.0f, num::add(1.0f, t));
}

// The confidence head's c = sigmoid(logit / t). A NaN logit gives a NaN
// confidence, as torch.sigmoid does (the scheduler reads NaN as 0), not the
// 1 that sigmoid's flushed exp2 of NaN would give.
DSPARK_HD DSPARK_INLINE float confidence_of(float scaled_logit) {
  return scaled_logit == scaled_logit ? sigmoid(scaled_logit) : scaled_logit;
}

DSPARK_HD DSPARK_INLINE float tanh_(float x) {
  // tanh(x) = 2 sigmoid(2x) - 1
  return num::sub(num::mul(2.0f, sigmoid(num::mul(2.0f, x))), 1.0f);
}

// Per-chunk state of a sampled row.
// Greedy rows keep only max (of the sanitized corrected logits) and best.
struct ChunkState {
  uint64_t sum;    // S_c
  float max;       // m_c
  float best_key;  // 2^(z - m_c) / E of the chunk's race winner
  float best_z;    // the winner's z
  int32_t best;    // the winner's column
};

DSPARK_HD DSPARK_INLINE float rescaled_key(const ChunkState& c, float row_max) {
  return num::mul(c.best_key, num::exp2(num::sub(c.max, row_max)));
}

DSPARK_HD DSPARK_INLINE bool better(float key, int32_t column, float best_key, int32_t best) {
  return key > best_key || (key == best_key && column < best);
}

struct RowResult {
  int32_t token;
  float logprob;
  float lse;
};

// The reported lse of a row from its maximum M (in the units of the row's z, or
// of c when greedy) and lse_finite, the value computed from finite M.
DSPARK_HD DSPARK_INLINE float row_lse(float row_max, float lse_finite) {
  if (row_max <= -num::kFloatMax) return -num::kInf;
  if (row_max >= num::kFloatMax) return num::kInf;
  return lse_finite;
}

// Combines a row's chunks. The operations (max, integer sum, `better`) do not
// depend on the visiting order, so a parallel combination gives the same.
DSPARK_HD inline RowResult combine_chunks(const ChunkState* chunks, int64_t count, bool greedy) {
  float row_max = -num::kFloatMax;
  for (int64_t c = 0; c < count; ++c) row_max = num::fmax(row_max, chunks[c].max);
  RowResult out{0, 0.0f, row_lse(row_max, row_max)};
  if (greedy) {  // the first chunk holding the maximum holds the first argmax
    for (int64_t c = 0; c < count; ++c)
      if (chunks[c].max == row_max) {
        out.token = chunks[c].best;
        break;
      }
    return out;
  }
  uint64_t sum = 0;
  float best_key = -1.0f, best_z = 0.0f;
  int32_t best = 0;
  for (int64_t c = 0; c < count; ++c) {
    sum += num::rescale_fixed(chunks[c].sum, num::exp2(num::sub(chunks[c].max, row_max)));
    const float key = rescaled_key(chunks[c], row_max);
    if (better(key, chunks[c].best, best_key, best)) {
      best_key = key;
      best = chunks[c].best;
      best_z = chunks[c].best_z;
    }
  }
  const float log2_sum = num::log2(num::from_fixed(sum));
  out.token = best;
  out.lse = row_lse(row_max, num::mul(kLn2, num::add(row_max, log2_sum)));
  out.logprob = num::mul(kLn2, num::sub(num::sub(best_z, row_max), log2_sum));
  return out;
}

// The race key of column z of a truncated row (0 outside the kept set).
DSPARK_HD DSPARK_INLINE float truncated_key(float z, float row_max, uint32_t cut, uint32_t bits) {
  return num::orderable(z) >= cut ? num::div(num::exp2(num::sub(z, row_max)), num::exponential(bits)) : 0.0f;
}

// The result of a truncated row from its winner and the kept set's normaliser.
DSPARK_HD DSPARK_INLINE RowResult truncated_result(int32_t token, float z_token, float row_max, uint64_t kept_sum) {
  const float log2_sum = num::log2(num::from_fixed(kept_sum));
  RowResult out;
  out.token = token;
  out.lse = row_lse(row_max, num::mul(kLn2, num::add(row_max, log2_sum)));
  out.logprob = num::mul(kLn2, num::sub(num::sub(z_token, row_max), log2_sum));
  return out;
}

}  // namespace dspark::markov
