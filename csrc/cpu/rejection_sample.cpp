// CPU backend of rejection_sample. Same phases as the CUDA backend and the
// same numerics (dspark/rejection.h), so the two agree bit for bit:
//   1. chunk statistics of every target row and every draft row (parallel
//      over row x chunk; each chunk is converted to float once and kept in a
//      stack buffer for its max pass and its sum pass);
//   2. row statistics (parallel over rows), the truncation of the target rows
//      of requests with top-k / top-p / min-p (parallel over rows: a radix
//      select over the row's keys, truncation.h), then the left-to-right
//      decisions of every request (parallel over requests);
//   3. the residual or bonus race of each request and, on request, the soft
//      acceptance sums (parallel over row x chunk);
//   4. the outputs (tokens, and on request the log-probabilities).
// The inner loops are written so that GCC vectorises them; the hot ones are
// compiled for every instruction set of isa.h and picked at run time.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "dspark/dtype_load.h"
#include "dspark/ops.h"
#include "dspark/rejection.h"
#include "fp_env.h"
#include "isa.h"
#include "parallel.h"
#include "vec.h"

namespace dspark::cpu {
namespace {

using namespace rejection;

constexpr int64_t kChunksPerTask = 4;  // grain of the row x chunk loops
// Grain of the per-row and per-request loops: a row's statistics combine its
// chunks' (tens of values), a request's decisions read a few entries per
// draft, well under a microsecond each, and a parallel region costs tens of
// microseconds (waking a worker) on the CPUs measured: these loops take the
// pool only for batches of this many.
constexpr int64_t kRequestsPerTask = 256;

// ------------------------------------------------------- vectorised loops
// (the copies of the selected instruction set: isa.h, kernels.inc)

uint32_t prob_max(const float* q, int64_t n) { return kernels().prob_max(q, n); }
uint64_t prob_sum(const float* q, int64_t n) { return kernels().prob_sum(q, n); }

int64_t first_prob_index_of(const float* q, int64_t n, uint32_t ordered) {
  for (int64_t i = 0; i < n; ++i)
    if (num::orderable(num::sanitize_prob(q[i])) == ordered) return i;
  return 0;
}

// ---------------------------------------------------------------- phases

struct Rows {
  // Per global row: its request (target rows first, then draft rows).
  std::vector<int32_t> target_request, draft_request;
};

Rows map_rows(const Problem& p) {
  Rows m;
  m.target_request.assign(static_cast<size_t>(p.num_target_rows), 0);
  m.draft_request.assign(static_cast<size_t>(p.num_draft_rows), 0);
  for (int32_t r = 0; r < p.num_requests; ++r) {
    const Span s = request_span(p, r);
    if (!s.valid) continue;
    const int64_t n_all = p.cu_num_draft[r + 1] - p.cu_num_draft[r];
    const int64_t n_target = n_all + (p.bonus_tokens ? 0 : 1);
    for (int64_t k = 0; k < n_target && s.target_begin + k < p.num_target_rows; ++k)
      m.target_request[static_cast<size_t>(s.target_begin + k)] = r;
    for (int64_t k = 0; k < n_all && s.draft_begin + k < p.num_draft_rows; ++k)
      m.draft_request[static_cast<size_t>(s.draft_begin + k)] = r;
  }
  return m;
}

// greedy: a greedy request's target row (argmax at scale 1, sum at scale
// log2(e): rejection.h, Log-probabilities). `sum`: whether the chunk's sum is
// read; a greedy request's decisions and tokens read its target rows' argmax
// only, so without log-probabilities its rows skip the rescaled exp pass
// (their sum stays 0, and nothing reads it).
ChunkStats chunk_stats(const void* row, DType dtype, int64_t begin, int64_t end, float scale,
                       bool probs, bool greedy, bool sum = true) {
  alignas(64) float buf[kChunk];
  const int64_t n = end - begin;
  convert_to_float(static_cast<const char*>(row) + begin * static_cast<int64_t>(dtype_size(dtype)),
                   dtype, n, buf);
  ChunkStats c;
  if (probs) {
    const uint32_t best = prob_max(buf, n);
    c.max_arg = num::pack_arg(best, static_cast<uint32_t>(begin + first_prob_index_of(buf, n, best)));
    c.sum = prob_sum(buf, n);
  } else {
    const uint32_t best = scale_and_max(buf, n, scale);
    c.max_arg = num::pack_arg(best, static_cast<uint32_t>(begin + first_index_of(buf, n, best)));
    if (!sum) {
      c.sum = 0;
    } else if (greedy) {
      const uint32_t best_rescaled = scale_and_max(buf, n, num::kLog2e);  // buf <- rescaled(buf)
      c.sum = logit_sum(buf, n, num::from_orderable(best_rescaled));
    } else {
      c.sum = logit_sum(buf, n, num::from_orderable(best));
    }
  }
  return c;
}

RowStats row_stats(const ChunkStats* chunks, int64_t count, bool logits, bool greedy) {
  uint64_t max_arg = 0;
  for (int64_t c = 0; c < count; ++c) max_arg = std::max(max_arg, chunks[c].max_arg);
  const float row_max = num::from_orderable(num::packed_value(max_arg));
  uint64_t total = 0;
  if (greedy) {
    const float row_max_rescaled = rescaled(row_max);
    for (int64_t c = 0; c < count; ++c) total += greedy_chunk_share(chunks[c], row_max_rescaled);
  } else {
    for (int64_t c = 0; c < count; ++c) total += chunk_share(chunks[c], row_max, logits);
  }
  return finish_row(max_arg, total, greedy);
}

const void* row_at(const void* base, DType dtype, int64_t stride, int64_t row) {
  return static_cast<const char*>(base) + row * stride * static_cast<int64_t>(dtype_size(dtype));
}

// Truncates target row `row` of a sampled request (its statistics in s): the
// cut key and the normaliser of the kept tokens (truncation.h). `z` and `hist`
// are the calling thread's buffers.
void truncate_row(const Problem& p, int64_t row, float scale, const truncation::Truncation& t, RowStats& s,
                  std::vector<float>& z, std::vector<uint64_t>& hist) {
  z.resize(static_cast<size_t>(p.vocab));
  hist.resize(truncation::kRadixBins);
  convert_to_float(row_at(p.target, p.target_dtype, p.target_stride, row), p.target_dtype, p.vocab, z.data());
  scale_and_max(z.data(), p.vocab, scale);
  const float* zs = z.data();
  const truncation::Cut c =
      truncation::truncate_host(p.vocab, [zs](int64_t v) { return zs[v]; }, s.max, t, hist.data());
  s.cut = c.cut;
  s.inv_sum = c.total > 0 ? num::div(1.0f, num::from_fixed(c.total)) : 0.0f;
}

struct RaceBest {
  uint64_t residual = 0, target = 0;
};


// Probabilities of a chunk of a logit row, in place: z <- p(z).
void logit_probs(float* x, int64_t n, float scale, RowStats s) { kernels().logit_probs(x, n, scale, s); }
void given_probs(float* x, int64_t n, RowStats s) { kernels().given_probs(x, n, s); }

// w <- max(0, pt - pd) flushed, in place over pd.
void residual_weights(const float* pt, float* pd, int64_t n) { kernels().residual_weights(pt, pd, n); }

const void* column_at(const void* row, DType dtype, int64_t column) {
  return static_cast<const char*>(row) + column * static_cast<int64_t>(dtype_size(dtype));
}

// Target probabilities of target columns [begin, begin + n) into pt.
void target_chunk_probs(const Problem& p, int64_t trow, float scale, const RowStats& ts, int64_t begin, int64_t n,
                        float* pt) {
  convert_to_float(column_at(row_at(p.target, p.target_dtype, p.target_stride, trow), p.target_dtype, begin),
                   p.target_dtype, n, pt);
  logit_probs(pt, n, scale, ts);
}

// Draft probabilities of draft columns [begin, begin + n) into pd.
void draft_chunk_probs(const Problem& p, int64_t drow, float scale, const RowStats& ds, int64_t begin, int64_t n,
                       float* pd) {
  convert_to_float(column_at(row_at(p.draft, p.draft_dtype, p.draft_stride, drow), p.draft_dtype, begin),
                   p.draft_dtype, n, pd);
  if (p.mode == DraftMode::kLogits) logit_probs(pd, n, scale, ds);
  else given_probs(pd, n, ds);
}

// Draft probabilities at target ids [begin, begin + n) into pd: the same
// columns without a draft vocabulary, else looked up (0 outside the map).
void draft_probs_at_targets(const Problem& p, int64_t drow, float scale, const RowStats& ds, int64_t begin,
                            int64_t n, float* pd) {
  if (!p.draft_index) {
    draft_chunk_probs(p, drow, scale, ds, begin, n, pd);
    return;
  }
  for (int64_t i = 0; i < n; ++i) pd[i] = draft_prob(p, drow, begin + i, scale, ds);
}

RaceBest race_chunk(const Problem& p, const RaceRow& rr, const RowStats& ts, const RowStats& ds,
                    int64_t begin, int64_t end) {
  alignas(64) float pt[kChunk], w[kChunk];
  alignas(64) uint32_t bits[kChunk], keys[kChunk];
  const int64_t n = end - begin;
  const bool draft_residual = rr.kind == RaceKind::kResidual && p.mode != DraftMode::kOneHot;
  target_chunk_probs(p, rr.target_row, rr.scale, ts, begin, n, pt);
  if (draft_residual) draft_probs_at_targets(p, rr.draft_row, rr.scale, ds, begin, n, w);
  if (draft_residual) {
    residual_weights(pt, w, n);
  } else if (rr.kind == RaceKind::kResidual) {  // one-hot drafter: p_t without the rejected token
    std::memcpy(w, pt, static_cast<size_t>(n) * sizeof(float));
    if (rr.rejected >= begin && rr.rejected < end) w[rr.rejected - begin] = 0.0f;
  }
  // begin is a multiple of kChunk, hence of 4.
  const int64_t groups = (n + 3) / 4;
  random_words(rr.stream, Purpose::kRace, rr.position, static_cast<uint32_t>(begin / 4), groups, bits);
  RaceBest best;
  if (rr.kind == RaceKind::kResidual) {
    race_keys(w, bits, n, keys);
    best.residual = best_key(keys, n, begin);
  }
  race_keys(pt, bits, n, keys);
  best.target = best_key(keys, n, begin);
  return best;
}

uint64_t soft_sum(const float* pt, const float* pd, int64_t n) { return kernels().soft_sum(pt, pd, n); }

// The soft-acceptance sum over draft columns [begin, end).
uint64_t soft_chunk(const Problem& p, int64_t trow, int64_t drow, float scale, const RowStats& ts,
                    const RowStats& ds, int64_t begin, int64_t end) {
  const int64_t n = end - begin;
  if (p.draft_vocab) {
    uint64_t s = 0;
    for (int64_t c = begin; c < end; ++c) s += soft_column_term(p, trow, drow, c, scale, ts, ds);
    return s;
  }
  alignas(64) float pt[kChunk], pd[kChunk];
  target_chunk_probs(p, trow, scale, ts, begin, n, pt);
  draft_chunk_probs(p, drow, scale, ds, begin, n, pd);
  return soft_sum(pt, pd, n);
}

}  // namespace

void rejection_sample(const Problem& p, const RejectionSampleArgs& args) {
  const IeeeDenormals ieee;
  const int32_t R = p.num_requests;
  int32_t* out_tokens = args.output_tokens.ptr<int32_t>();
  int32_t* out_accepted = args.num_accepted.ptr<int32_t>();
  float* out_soft = args.soft_acceptance.defined() ? args.soft_acceptance.ptr<float>() : nullptr;
  float* out_logprobs = args.output_logprobs.defined() ? args.output_logprobs.ptr<float>() : nullptr;
  const int64_t logprob_stride = out_logprobs ? args.output_logprobs.stride(0) : 0;
  const int64_t out_width = static_cast<int64_t>(p.max_num_draft) + 1;
  const int64_t out_stride = args.output_tokens.stride(0);
  if (R == 0) return;

  const int64_t V = p.vocab, Vd = p.draft_columns;
  const int64_t chunks = (V + kChunk - 1) / kChunk;
  const int64_t draft_chunks = (Vd + kChunk - 1) / kChunk;
  const bool draft_rows = p.mode != DraftMode::kOneHot;
  const int64_t nt = p.num_target_rows;
  const int64_t nd = draft_rows ? p.num_draft_rows : 0;
  const Rows rows = map_rows(p);

  // 1. chunk statistics: target rows (chunks of V columns), then draft rows
  //    (chunks of V_d columns). A greedy request reads its target rows' argmax
  //    (and their sums for log-probabilities) and its draft rows' statistics
  //    only for soft acceptance labels: without those its draft rows are
  //    skipped and its target rows' sums left out (the outputs are the same;
  //    the CUDA backend computes them all).
  const bool greedy_sums = out_logprobs != nullptr;
  const bool greedy_drafts = out_soft != nullptr;
  const int64_t target_jobs = nt * chunks;
  std::vector<ChunkStats> stats(static_cast<size_t>(target_jobs + nd * draft_chunks));
  parallel_for(target_jobs + nd * draft_chunks, kChunksPerTask, [&](int64_t begin, int64_t end) {
    for (int64_t job = begin; job < end; ++job) {
      const bool is_target = job < target_jobs;
      const int64_t local = is_target ? job / chunks : (job - target_jobs) / draft_chunks;
      const int64_t c = is_target ? job % chunks : (job - target_jobs) % draft_chunks;
      const int32_t r = is_target ? rows.target_request[static_cast<size_t>(local)]
                                  : rows.draft_request[static_cast<size_t>(local)];
      const float temperature = request_temperature(p, r);
      const bool greedy = is_greedy(temperature);
      const bool greedy_target = is_target && greedy;
      if (!is_target && greedy && !greedy_drafts) {
        stats[static_cast<size_t>(job)] = ChunkStats{0, 0};
        continue;
      }
      const float scale = logit_scale(temperature);
      const void* base = is_target ? p.target : p.draft;
      const DType dtype = is_target ? p.target_dtype : p.draft_dtype;
      const int64_t stride = is_target ? p.target_stride : p.draft_stride;
      const void* row_ptr = static_cast<const char*>(base) +
                            local * stride * static_cast<int64_t>(dtype_size(dtype));
      const bool probs = !is_target && p.mode == DraftMode::kProbs;
      const int64_t columns = is_target ? V : Vd;
      stats[static_cast<size_t>(job)] =
          chunk_stats(row_ptr, dtype, c * kChunk, std::min(columns, (c + 1) * kChunk), scale, probs,
                      greedy_target, /*sum=*/!greedy_target || greedy_sums);
    }
  });

  // 2. row statistics, truncation, decisions
  std::vector<RowStats> row(static_cast<size_t>(nt + nd));
  parallel_for(nt + nd, kRequestsPerTask, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const bool is_target = i < nt;
      const bool logits = is_target || p.mode == DraftMode::kLogits;
      const bool greedy = is_target && is_greedy(request_temperature(p, rows.target_request[static_cast<size_t>(i)]));
      const ChunkStats* first = is_target ? &stats[static_cast<size_t>(i * chunks)]
                                          : &stats[static_cast<size_t>(target_jobs + (i - nt) * draft_chunks)];
      row[static_cast<size_t>(i)] = row_stats(first, is_target ? chunks : draft_chunks, logits, greedy);
    }
  });
  if (p.truncation.any()) {
    parallel_for(nt, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> z;
      std::vector<uint64_t> hist;
      for (int64_t i = begin; i < end; ++i) {
        const int32_t r = rows.target_request[static_cast<size_t>(i)];
        const float temperature = request_temperature(p, r);
        const truncation::Truncation t = p.truncation.of(r);
        if (is_greedy(temperature) || !truncation::active(t, V) || !request_span(p, r).valid) continue;
        truncate_row(p, i, logit_scale(temperature), t, row[static_cast<size_t>(i)], z, hist);
      }
    });
  }
  const RowStats* target_stats = row.data();
  const RowStats* draft_stats = draft_rows ? row.data() + nt : nullptr;
  std::vector<Decision> decision(static_cast<size_t>(R));
  parallel_for(R, kRequestsPerTask, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r)
      decision[static_cast<size_t>(r)] = decide(p, static_cast<int32_t>(r), target_stats, draft_stats);
  });

  // 3. races (none when every request is greedy: no region is started)
  std::vector<RaceBest> race(static_cast<size_t>(R * chunks));
  const bool any_race = std::any_of(decision.begin(), decision.end(),
                                    [](const Decision& d) { return d.kind != RaceKind::kNone; });
  if (any_race) parallel_for(R * chunks, kChunksPerTask, [&](int64_t begin, int64_t end) {
    for (int64_t job = begin; job < end; ++job) {
      const int32_t r = static_cast<int32_t>(job / chunks);
      const int64_t c = job % chunks;
      const Decision& d = decision[static_cast<size_t>(r)];
      if (d.kind == RaceKind::kNone) continue;
      const RaceRow rr = race_row(p, r, d);
      const RowStats ds = rr.draft_row >= 0 && draft_stats ? draft_stats[rr.draft_row] : RowStats{};
      race[static_cast<size_t>(job)] =
          race_chunk(p, rr, target_stats[rr.target_row], ds, c * kChunk, std::min(V, (c + 1) * kChunk));
    }
  });

  // 3b. soft acceptance
  if (out_soft) {
    std::vector<uint64_t> soft(static_cast<size_t>(p.num_draft_rows * draft_chunks), 0);
    std::vector<uint8_t> direct(static_cast<size_t>(p.num_draft_rows), 0);
    parallel_for(R, kRequestsPerTask, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const Span s = request_span(p, static_cast<int32_t>(r));
        if (!s.valid) continue;
        for (int32_t k = 0; k < s.num_draft; ++k) {
          float value;
          if (soft_acceptance_direct(p, static_cast<int32_t>(r), k, target_stats, draft_stats, value)) {
            out_soft[s.draft_begin + k] = value;
            direct[static_cast<size_t>(s.draft_begin + k)] = 1;
          }
        }
      }
    });
    parallel_for(p.num_draft_rows * draft_chunks, kChunksPerTask, [&](int64_t begin, int64_t end) {
      for (int64_t job = begin; job < end; ++job) {
        const int64_t drow = job / draft_chunks, c = job % draft_chunks;
        if (direct[static_cast<size_t>(drow)]) continue;
        const int32_t r = rows.draft_request[static_cast<size_t>(drow)];
        const Span s = request_span(p, r);
        if (!draft_row_in_span(s, drow)) continue;
        const int64_t trow = s.target_begin + (drow - s.draft_begin);
        soft[static_cast<size_t>(job)] =
            soft_chunk(p, trow, drow, logit_scale(request_temperature(p, r)), target_stats[trow],
                       draft_stats[drow], c * kChunk, std::min(Vd, (c + 1) * kChunk));
      }
    });
    for (int64_t drow = 0; drow < p.num_draft_rows; ++drow) {
      if (direct[static_cast<size_t>(drow)]) continue;
      uint64_t total = 0;
      for (int64_t c = 0; c < draft_chunks; ++c) total += soft[static_cast<size_t>(drow * draft_chunks + c)];
      out_soft[drow] = soft_from_fixed(total);
    }
  }

  // 4. outputs
  for (int32_t r = 0; r < R; ++r) {
    const Span s = request_span(p, r);
    const Decision& d = decision[static_cast<size_t>(r)];
    int32_t* out = out_tokens + r * out_stride;
    for (int64_t i = 0; i < out_width; ++i) out[i] = -1;
    if (!s.valid) {
      out_accepted[r] = 0;
      if (out_logprobs)
        for (int64_t i = 0; i < out_width; ++i) out_logprobs[r * logprob_stride + i] = -num::kInf;
      continue;
    }
    for (int32_t k = 0; k < d.accepted; ++k)
      out[k] = static_cast<int32_t>(load_index(p.tokens, p.token_dtype, s.draft_begin + k));
    int32_t final_token = d.token;
    if (d.kind != RaceKind::kNone) {
      RaceBest best;
      for (int64_t c = 0; c < chunks; ++c) {
        best.residual = std::max(best.residual, race[static_cast<size_t>(r * chunks + c)].residual);
        best.target = std::max(best.target, race[static_cast<size_t>(r * chunks + c)].target);
      }
      final_token = race_winner(best.residual, best.target);
    }
    out[d.accepted] = final_token;
    out_accepted[r] = d.accepted;
    if (out_logprobs) {
      float* lp = out_logprobs + r * logprob_stride;
      for (int64_t i = 0; i < out_width; ++i) lp[i] = -num::kInf;
      for (int32_t j = 0; j <= d.accepted; ++j) lp[j] = committed_logprob(p, r, j, out[j], target_stats);
    }
  }
}

}  // namespace dspark::cpu
