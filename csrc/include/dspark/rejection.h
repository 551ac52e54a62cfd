// The accept/reject rule of a speculative decoding round, written once for
// both backends (DSPARK.md, section 1).
//
// Layout (flattened ragged batch): request r has n_r = cu_num_draft[r+1] -
// cu_num_draft[r] draft tokens at draft rows cu_num_draft[r] + k and n_r + 1
// target rows cu_num_draft[r] + r + k, k = 0..n_r. Target row k scores the
// token after draft k (row 0 scores draft 1 given the anchor).
//
// The canonical reduction. A row is cut into chunks of kChunk columns. For a
// logit row, chunk c contributes its maximum m_c (with the first index where
// it occurs) and S_c = sum_v fixed(2^(z_v - m_c)); the row maximum is
// M = max_c m_c and its normaliser S = sum_c round(S_c * 2^(m_c - M)). All of
// these are exact integer sums or maxima, so a backend may visit chunks and
// columns in any order. A probability row contributes S_c = sum_v fixed(q_v).
//
// Decisions, per request, left to right (all in DSPARK.md's terms):
//   greedy (temperature <= 0 or NaN): accept iff x_k == argmax of target row
//     k-1; the final token is that argmax (correction or bonus).
//   sampled: accept iff u * p_d(x_k) < p_t(x_k), u uniform in [0, 1). At the
//     first rejection, race over the residual max(0, p_t - p_d) (one-hot
//     drafter: p_t without x_k); if the residual has no mass, race over p_t.
//     After n_r acceptances, race over p_t of the last row (the bonus).
//   A race picks argmax_v w_v / E_v with E_v exponential (ties: smallest v).
// p_t is the target's distribution after the request's truncation (top-k,
// top-p, min-p; truncation.h): the rule is exact with respect to it. A
// truncated target row carries its cut in RowStats; p_t is 0 below it.
//
// Placeholder drafts. A draft token -1 means "no draft from here on" (the
// padded layouts of vLLM and FlashInfer): the request's drafts end there with
// a rejection, the final token is drawn from p_t of that row (greedy: its
// argmax), and whatever follows the -1 is not read. Other ids outside
// [0, V) read nothing: p_t = p_d = 0, so they are rejected (validation
// refuses them where it can see them).
//
// Bonus tokens given. With `bonus_tokens` (vLLM's layout), the target rows are
// the N draft rows only (row cu_num_draft[r] + k scores draft k + 1) and a
// request that accepts all its drafts ends with bonus_tokens[r], drawn by the
// caller.
//
// Log-probabilities. On request, the op reports log p_t of every committed
// token under the request's temperature and truncation; a greedy request's
// are those of the untruncated softmax at temperature 1 (its own
// distribution is a point mass). For this a greedy target row's statistics
// are kept at scale log2(e) (RowStats max and inv_sum), its argmax at scale 1.
//
// Draft vocabulary (DESIGN.md, decision 10). A drafter may score only V_d
// target ids: its rows have V_d columns and draft_vocab[c] is the target id of
// column c (distinct ids). Then p_d(v) is the draft row's probability at the
// column of v, and exactly 0 for an id outside the map: the residual there is
// p_t itself. Nothing of size [N, V] is built: the backends look columns up
// through the inverse map draft_index [V] (the column of each id, or -1).
// Draft row statistics and soft-acceptance sums run over the V_d draft
// columns; races run over the V target columns.
#pragma once

#include <cstdint>

#include "dspark/dtype_load.h"
#include "dspark/macros.h"
#include "dspark/numerics.h"
#include "dspark/random.h"
#include "dspark/sampling.h"
#include "dspark/tensor.h"
#include "dspark/truncation.h"

namespace dspark::rejection {

constexpr int64_t kChunk = 2048;  // columns per chunk of the canonical reduction
// A row's fixed-point normaliser is below vocab * 2^kFixedFracBits, which must
// stay below 2^64.
constexpr int64_t kMaxVocab = (int64_t{1} << (64 - num::kFixedFracBits)) - 1;

enum class DraftMode : int32_t { kOneHot = 0, kLogits = 1, kProbs = 2 };
enum class RaceKind : int32_t { kNone = 0, kResidual = 1, kBonus = 2 };

struct ChunkStats {
  uint64_t max_arg;  // pack_arg(orderable(max), first argmax)
  uint64_t sum;      // fixed-point sum relative to the chunk maximum (probs: absolute)
};

struct RowStats {
  float max;       // M, the row maximum of z (logit rows; a greedy target row's at scale log2(e))
  float inv_sum;   // 1 / normaliser (0 for a probability row without mass)
  int32_t argmax;  // first column of the maximum
  uint32_t cut;    // truncation: p = 0 for key(z) < cut (0: nothing is cut)
};

struct Decision {
  int32_t accepted;  // draft tokens accepted
  int32_t position;  // request-relative target row of the race, or of the greedy token
  RaceKind kind;
  int32_t token;  // the final token when kind == kNone, else -1
};

// Everything a backend needs to know about one call, as plain pointers.
struct Problem {
  const void* target;  // [num_target_rows, vocab], rows target_stride apart
  DType target_dtype;
  int64_t target_stride;
  const void* draft;  // [num_draft_rows, draft_columns] logits or probabilities, or null
  DType draft_dtype;
  int64_t draft_stride;
  DraftMode mode;
  int64_t draft_columns;        // columns of a draft row: V_d with a draft vocabulary, else vocab
  const int32_t* draft_vocab;   // [draft_columns] target id of each draft column, or null (identity)
  const int32_t* draft_index;   // [vocab] draft column of each target id, -1 outside the map; null: identity
  const void* tokens;  // [num_draft_rows] int32 or int64
  DType token_dtype;
  const void* bonus_tokens;     // [num_requests] int32 / int64 drawn by the caller, or null (bonus rows given)
  DType bonus_dtype;
  const int32_t* cu_num_draft;  // [num_requests + 1]
  int32_t num_requests;
  int32_t max_num_draft;
  int64_t vocab;
  int64_t num_target_rows;
  int64_t num_draft_rows;
  RequestParams params;  // temperatures and random streams
  truncation::Params truncation;
};

// ------------------------------------------------------------- per request

struct Span {
  int64_t draft_begin;   // first draft row
  int64_t target_begin;  // first target row
  int32_t num_draft;     // n_r after clamping to max_num_draft
  bool valid;            // false if cu_num_draft points outside the tensors
};

DSPARK_HD DSPARK_INLINE Span request_span(const Problem& p, int32_t r) {
  Span s;
  const int64_t begin = p.cu_num_draft[r];
  int64_t n = static_cast<int64_t>(p.cu_num_draft[r + 1]) - begin;
  n = n < 0 ? 0 : (n > p.max_num_draft ? p.max_num_draft : n);
  s.draft_begin = begin;
  s.target_begin = p.bonus_tokens ? begin : begin + r;
  s.num_draft = static_cast<int32_t>(n);
  s.valid = begin >= 0 && begin + n <= p.num_draft_rows &&
            s.target_begin + n - (p.bonus_tokens ? 1 : 0) < p.num_target_rows;
  return s;
}

// The scale of a target row's statistics: the request's, or log2(e) for a
// greedy request (its argmax is taken at scale 1; see Log-probabilities).
DSPARK_HD DSPARK_INLINE float stats_scale(float temperature) {
  return is_greedy(temperature) ? num::kLog2e : logit_scale(temperature);
}

DSPARK_HD DSPARK_INLINE float request_temperature(const Problem& p, int32_t r) {
  return p.params.temperature_of(r);
}

DSPARK_HD DSPARK_INLINE RandomStream request_stream(const Problem& p, int32_t r) {
  return p.params.stream_of(r);
}

// ----------------------------------------------------------- per element

DSPARK_HD DSPARK_INLINE float logit_prob(float z, const RowStats& s) {
  const float p = num::flush_weight(num::mul(num::exp2(num::sub(z, s.max)), s.inv_sum));
  return num::orderable(z) >= s.cut ? p : 0.0f;
}

// log p (natural) of a kept value z of a logit row: (z - M + log2(1 / S)) ln 2.
DSPARK_HD DSPARK_INLINE float logit_logprob(float z, const RowStats& s) {
  return num::mul(num::add(num::sub(z, s.max), num::log2(s.inv_sum)), num::kLn2);
}

DSPARK_HD DSPARK_INLINE float given_prob(float q, const RowStats& s) {
  return num::flush_weight(num::mul(num::sanitize_prob(q), s.inv_sum));
}

// ------------------------------------------------------------- per chunk

// Chunk statistics are accumulated with these three operations (any order).
DSPARK_HD DSPARK_INLINE uint64_t logit_term(float z, float chunk_max) {
  return num::to_fixed(num::exp2(num::sub(z, chunk_max)));
}

DSPARK_HD DSPARK_INLINE uint64_t prob_term(float q) { return num::to_fixed(num::sanitize_prob(q)); }

DSPARK_HD DSPARK_INLINE float chunk_max(const ChunkStats& c) {
  return num::from_orderable(num::packed_value(c.max_arg));
}

// A chunk's share of its row's normaliser, once the row maximum is known.
DSPARK_HD DSPARK_INLINE uint64_t chunk_share(const ChunkStats& c, float row_max, bool logits) {
  return logits ? num::rescale_fixed(c.sum, num::exp2(num::sub(chunk_max(c), row_max))) : c.sum;
}

// A greedy target row's chunks: max_arg at scale 1 (its argmax), the sum at
// scale log2(e) relative to the chunk maximum at that scale, which is
// rescaled(max) since scaling is monotone.
DSPARK_HD DSPARK_INLINE float rescaled(float z) { return scaled_logit(z, num::kLog2e); }

DSPARK_HD DSPARK_INLINE uint64_t greedy_chunk_share(const ChunkStats& c, float row_max_rescaled) {
  return num::rescale_fixed(c.sum, num::exp2(num::sub(rescaled(chunk_max(c)), row_max_rescaled)));
}

// Row statistics from the maximum of the chunks' max_arg and the sum of
// their shares (a greedy target row: `greedy`, its shares greedy_chunk_share).
DSPARK_HD DSPARK_INLINE RowStats finish_row(uint64_t max_arg, uint64_t total, bool greedy = false) {
  RowStats s;
  s.max = num::from_orderable(num::packed_value(max_arg));
  if (greedy) s.max = rescaled(s.max);
  s.argmax = static_cast<int32_t>(num::packed_index(max_arg));
  s.inv_sum = total > 0 ? num::div(1.0f, num::from_fixed(total)) : 0.0f;
  s.cut = 0;
  return s;
}

// ------------------------------------------------------------- decisions

DSPARK_HD DSPARK_INLINE float target_prob(const Problem& p, int64_t row, int64_t v, float scale,
                                          const RowStats& s) {
  return logit_prob(scaled_logit(load_float(p.target, p.target_dtype, row * p.target_stride + v),
                                 scale),
                    s);
}

// The draft column of target id v (-1 outside the draft vocabulary).
DSPARK_HD DSPARK_INLINE int64_t draft_column(const Problem& p, int64_t v) {
  return p.draft_index ? p.draft_index[v] : v;
}

// The target id of draft column c.
DSPARK_HD DSPARK_INLINE int64_t draft_token_of(const Problem& p, int64_t c) {
  return p.draft_vocab ? p.draft_vocab[c] : c;
}

// p_d of draft column c of draft row `row`.
DSPARK_HD DSPARK_INLINE float draft_column_prob(const Problem& p, int64_t row, int64_t c, float scale,
                                                const RowStats& s) {
  const float x = load_float(p.draft, p.draft_dtype, row * p.draft_stride + c);
  return p.mode == DraftMode::kLogits ? logit_prob(scaled_logit(x, scale), s) : given_prob(x, s);
}

// p_d(v) of draft row `row` for target id v (1 for a one-hot drafter: only its
// own token is asked; 0 outside the draft vocabulary).
DSPARK_HD DSPARK_INLINE float draft_prob(const Problem& p, int64_t row, int64_t v, float scale,
                                         const RowStats& s) {
  if (p.mode == DraftMode::kOneHot) return 1.0f;
  const int64_t c = draft_column(p, v);
  return c < 0 ? 0.0f : draft_column_prob(p, row, c, scale, s);
}

DSPARK_HD DSPARK_INLINE bool valid_token(const Problem& p, int64_t x) {
  return x >= 0 && x < p.vocab;
}

constexpr int64_t kPlaceholder = -1;  // "no draft from here on"

// The caller's bonus token of request r (bonus_tokens given).
DSPARK_HD DSPARK_INLINE int32_t bonus_token(const Problem& p, int32_t r) {
  return static_cast<int32_t>(load_index(p.bonus_tokens, p.bonus_dtype, r));
}

// Walks request r's drafts left to right. target_stats / draft_stats are
// indexed by global row.
DSPARK_HD inline Decision decide(const Problem& p, int32_t r, const RowStats* target_stats,
                                 const RowStats* draft_stats) {
  const Span span = request_span(p, r);
  Decision d;
  d.token = -1;
  if (!span.valid) {
    d.accepted = 0;
    d.position = 0;
    d.kind = RaceKind::kNone;
    return d;
  }
  const float temperature = request_temperature(p, r);
  const bool greedy = is_greedy(temperature);
  const float scale = logit_scale(temperature);
  const RandomStream stream = request_stream(p, r);
  for (int32_t k = 0; k < span.num_draft; ++k) {
    const int64_t trow = span.target_begin + k;
    const int64_t drow = span.draft_begin + k;
    const int64_t x = load_index(p.tokens, p.token_dtype, drow);
    if (x == kPlaceholder) {  // no draft from here on: the final token comes from p_t of this row
      d.accepted = k;
      d.position = k;
      d.kind = greedy ? RaceKind::kNone : RaceKind::kBonus;
      d.token = greedy ? target_stats[trow].argmax : -1;
      return d;
    }
    const bool valid = valid_token(p, x);
    bool accept;
    if (greedy) {
      accept = valid && x == target_stats[trow].argmax;
    } else {
      const float pt = valid ? target_prob(p, trow, x, scale, target_stats[trow]) : 0.0f;
      const float pd = valid ? draft_prob(p, drow, x, scale, draft_stats ? draft_stats[drow]
                                                                         : RowStats{})
                             : 0.0f;
      const float u = num::uniform(stream.bits(Purpose::kAccept, static_cast<uint32_t>(k), 0));
      accept = num::mul(u, pd) < pt;
    }
    if (!accept) {
      d.accepted = k;
      d.position = k;
      d.kind = greedy ? RaceKind::kNone : RaceKind::kResidual;
      d.token = greedy ? target_stats[trow].argmax : -1;
      return d;
    }
  }
  d.accepted = span.num_draft;
  d.position = span.num_draft;
  if (p.bonus_tokens) {
    d.kind = RaceKind::kNone;
    d.token = bonus_token(p, r);
    return d;
  }
  d.kind = greedy ? RaceKind::kNone : RaceKind::kBonus;
  d.token = greedy ? target_stats[span.target_begin + span.num_draft].argmax : -1;
  return d;
}

// log p_t of the committed token at output position j of request r (j <=
// d.accepted), or 0 for a bonus token the caller drew (bonus_tokens given:
// there is no row for it), and -inf for a token outside [0, V).
DSPARK_HD inline float committed_logprob(const Problem& p, int32_t r, int32_t j, int64_t token,
                                         const RowStats* target_stats) {
  const Span span = request_span(p, r);
  if (p.bonus_tokens && j == span.num_draft) return 0.0f;
  if (!valid_token(p, token)) return -num::kInf;
  const int64_t row = span.target_begin + j;
  const RowStats& s = target_stats[row];
  const float z = scaled_logit(load_float(p.target, p.target_dtype, row * p.target_stride + token),
                               stats_scale(request_temperature(p, r)));
  return num::orderable(z) >= s.cut ? logit_logprob(z, s) : -num::kInf;
}

// ----------------------------------------------------------------- races

// Everything fixed for one race row.
struct RaceRow {
  int64_t target_row;
  int64_t draft_row;  // -1 for a bonus race
  int64_t rejected;   // the rejected draft token (one-hot residual), else -1
  float scale;
  RaceKind kind;
  RandomStream stream;
  uint32_t position;
};

DSPARK_HD DSPARK_INLINE RaceRow race_row(const Problem& p, int32_t r, const Decision& d) {
  const Span span = request_span(p, r);
  RaceRow rr;
  rr.kind = d.kind;
  rr.position = static_cast<uint32_t>(d.position);
  rr.target_row = span.target_begin + d.position;
  rr.draft_row = d.kind == RaceKind::kResidual ? span.draft_begin + d.position : -1;
  rr.rejected = d.kind == RaceKind::kResidual
                    ? load_index(p.tokens, p.token_dtype, span.draft_begin + d.position)
                    : -1;
  rr.scale = logit_scale(request_temperature(p, r));
  rr.stream = request_stream(p, r);
  return rr;
}

// The residual weight and the target probability of column v; the two race
// keys divide them by the same exponential.
DSPARK_HD DSPARK_INLINE void race_weights(const Problem& p, const RaceRow& rr, int64_t v,
                                          const RowStats& ts, const RowStats& ds,
                                          float& residual, float& target) {
  const float pt = target_prob(p, rr.target_row, v, rr.scale, ts);
  float w = 0.0f;
  if (rr.kind == RaceKind::kResidual) {
    if (p.mode == DraftMode::kOneHot) {
      w = v == rr.rejected ? 0.0f : pt;
    } else {
      const float pd = draft_prob(p, rr.draft_row, v, rr.scale, ds);
      w = pt > pd ? num::flush_weight(num::sub(pt, pd)) : 0.0f;
    }
  }
  residual = w;
  target = pt;
}

// The race winner: the residual's if it has mass, else the target's.
DSPARK_HD DSPARK_INLINE int32_t race_winner(uint64_t best_residual, uint64_t best_target) {
  return static_cast<int32_t>(num::packed_value(best_residual) != 0
                                  ? num::packed_index(best_residual)
                                  : num::packed_index(best_target));
}

// ------------------------------------------------------- soft acceptance

// soft = sum_v min(p_t(v), p_d(v)) = 1 - TV(p_t, p_d). Returns true and sets
// `value` when the label needs no pass over the vocabulary (greedy requests,
// one-hot drafters); otherwise the backend sums soft_term over the row.
DSPARK_HD inline bool soft_acceptance_direct(const Problem& p, int32_t r, int32_t k,
                                             const RowStats* target_stats,
                                             const RowStats* draft_stats, float& value) {
  const Span span = request_span(p, r);
  const int64_t trow = span.target_begin + k;
  const int64_t drow = span.draft_begin + k;
  const float temperature = request_temperature(p, r);
  const int64_t x = load_index(p.tokens, p.token_dtype, drow);
  if (x == kPlaceholder) {  // no draft: nothing to agree with
    value = 0.0f;
    return true;
  }
  if (is_greedy(temperature)) {
    const int32_t best = target_stats[trow].argmax;
    if (p.mode == DraftMode::kOneHot) {
      value = x == best ? 1.0f : 0.0f;
    } else if (p.mode == DraftMode::kLogits) {
      value = draft_token_of(p, draft_stats[drow].argmax) == best ? 1.0f : 0.0f;
    } else {
      value = draft_prob(p, drow, best, 1.0f, draft_stats[drow]);
    }
    return true;
  }
  if (p.mode == DraftMode::kOneHot) {
    value = valid_token(p, x) ? target_prob(p, trow, x, logit_scale(temperature),
                                            target_stats[trow])
                              : 0.0f;
    return true;
  }
  return false;
}

// Whether draft row j is one of request r's first span.num_draft drafts
// (the rows that get a soft acceptance label; any other row gets 0, which
// only happens for layouts that validation rejects).
DSPARK_HD DSPARK_INLINE bool draft_row_in_span(const Span& span, int64_t j) {
  return span.valid && j >= span.draft_begin && j - span.draft_begin < span.num_draft;
}

// Whether request r's soft acceptance labels need a pass over the vocabulary.
DSPARK_HD DSPARK_INLINE bool soft_needs_pass(const Problem& p, int32_t r) {
  return p.mode != DraftMode::kOneHot && !is_greedy(request_temperature(p, r));
}

// Whether draft row j of request r gets its label from soft_acceptance_direct
// (no pass: a greedy request, a one-hot drafter, or a placeholder draft).
DSPARK_HD DSPARK_INLINE bool soft_is_direct(const Problem& p, int32_t r, int64_t j) {
  return !soft_needs_pass(p, r) || load_index(p.tokens, p.token_dtype, j) == kPlaceholder;
}

DSPARK_HD DSPARK_INLINE uint64_t soft_term(float pt, float pd) {
  return num::to_fixed(num::fmin(pt, pd));
}

// The soft-acceptance term of draft column c (min(p_t, p_d) is 0 at every
// target id outside the draft vocabulary, so the sum runs over draft columns).
DSPARK_HD DSPARK_INLINE uint64_t soft_column_term(const Problem& p, int64_t trow, int64_t drow, int64_t c,
                                                  float scale, const RowStats& ts, const RowStats& ds) {
  return soft_term(target_prob(p, trow, draft_token_of(p, c), scale, ts), draft_column_prob(p, drow, c, scale, ds));
}

DSPARK_HD DSPARK_INLINE float soft_from_fixed(uint64_t total) {
  return num::fmin(num::from_fixed(total), 1.0f);
}

}  // namespace dspark::rejection
