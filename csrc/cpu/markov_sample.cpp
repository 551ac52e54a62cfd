// CPU backend of markov_sample and confidence.
//
// markov_sample walks the block left to right. Per position, for the whole
// batch at once:
//   1. the A rows [R, rank]: W1 rows of the previous tokens, gated or passed
//      through the RNN cell (small products, threaded over requests);
//   2. threads over 256-column chunks of the vocabulary: B = A W2^T for that
//      chunk and a block of 16 requests (W2 read once per position, in its
//      stored dtype), then per request the corrected logits U + B, the chunk
//      maximum, its fixed-point sum and its race winner, kept in a small
//      ChunkState; the [R, V] bias is never materialised (unless the caller
//      asks for the corrected logits);
//   3. per request: the chunks combined into the token, its log-probability
//      and the row's log-sum-exp (dspark/markov.h); with a draft vocabulary
//      the winning column is mapped to its target id. A request with top-k /
//      top-p / min-p keeps its row z (step 2 writes it instead of racing) and
//      is truncated and raced here, one thread per request (the radix selects
//      of dspark/truncation.h).
#include <algorithm>
#include <cstdint>
#include <vector>

#include "../ops/request_params.h"
#include "dspark/dtype_load.h"
#include "dspark/markov.h"
#include "dspark/ops.h"
#include "dspark/sampling.h"
#include "dspark/truncation.h"
#include "fp_env.h"
#include "gemm.h"
#include "parallel.h"
#include "vec.h"

namespace dspark::cpu {
namespace {

using markov::ChunkState;
using markov::Head;
using markov::kMarkovChunk;

constexpr int64_t kRowBlock = 16;  // requests per product block (A rows stay in L1)

const char* element(const TensorView& t, int64_t offset) {
  return static_cast<const char*>(t.data) + offset * static_cast<int64_t>(dtype_size(t.dtype));
}

// float(t[i0, i1, i2 ...]) helpers for strided views.
void load_row(const TensorView& t, int64_t offset, int64_t n, float* out) {
  convert_to_float(element(t, offset), t.dtype, n, out);
}

struct Shapes {
  int64_t R, gamma, V, rank, d;
};

// The A rows of position k from the previous tokens (and the RNN state).
void head_rows(const MarkovSampleArgs& a, const Shapes& s, int64_t k, const int64_t* prev,
               std::vector<float>& A, std::vector<float>& state) {
  const int64_t rank = s.rank, d = s.d;
  parallel_for(s.R, 4, [&](int64_t begin, int64_t end) {
    std::vector<float> x, y;
    for (int64_t r = begin; r < end; ++r) {
      float* e = &A[static_cast<size_t>(r * rank)];
      load_row(a.w1, prev[r] * a.w1.stride(0), rank, e);
      if (a.head == Head::kVanilla) {
        if (a.w2.dtype != DType::kFloat32)
          for (int64_t i = 0; i < rank; ++i) e[i] = round_to(e[i], a.w2.dtype);
        continue;
      }
      const int64_t hidden_offset = r * a.hidden.stride(0) + k * a.hidden.stride(1);
      if (a.head == Head::kGated) {
        // g = sigmoid(Wg [h ; e] + bg); a = g * e
        x.resize(static_cast<size_t>(d + rank));
        y.resize(static_cast<size_t>(rank));
        load_row(a.hidden, hidden_offset, d, x.data());
        std::copy(e, e + rank, x.data() + d);
        matmul_nt(x.data(), d + rank, 1, a.gate_weight.data, a.gate_weight.dtype, a.gate_weight.stride(0),
                  rank, d + rank, y.data(), rank);
        for (int64_t i = 0; i < rank; ++i) {
          const float b = load_float(a.gate_bias.data, a.gate_bias.dtype, i);
          e[i] = num::mul(markov::sigmoid(num::add(y[static_cast<size_t>(i)], b)), e[i]);
        }
      } else {
        // y = Wj [s ; e ; h] + bj; s = sig(gate) s + (1 - sig(gate)) tanh(cand); a = tanh(out)
        float* st = &state[static_cast<size_t>(r * rank)];
        x.resize(static_cast<size_t>(2 * rank + d));
        y.resize(static_cast<size_t>(3 * rank));
        std::copy(st, st + rank, x.data());
        std::copy(e, e + rank, x.data() + rank);
        load_row(a.hidden, hidden_offset, d, x.data() + 2 * rank);
        matmul_nt(x.data(), 2 * rank + d, 1, a.joint_weight.data, a.joint_weight.dtype,
                  a.joint_weight.stride(0), 3 * rank, 2 * rank + d, y.data(), 3 * rank);
        for (int64_t i = 0; i < 3 * rank; ++i)
          y[static_cast<size_t>(i)] = num::add(y[static_cast<size_t>(i)], load_float(a.joint_bias.data, a.joint_bias.dtype, i));
        for (int64_t i = 0; i < rank; ++i) {
          const float g = markov::sigmoid(y[static_cast<size_t>(i)]);
          const float cand = markov::tanh_(y[static_cast<size_t>(rank + i)]);
          st[i] = num::add(num::mul(g, st[i]), num::mul(num::sub(1.0f, g), cand));
          e[i] = markov::tanh_(y[static_cast<size_t>(2 * rank + i)]);
        }
      }
      if (a.w2.dtype != DType::kFloat32)  // the product's inputs are 16-bit (markov.h)
        for (int64_t i = 0; i < rank; ++i) e[i] = round_to(e[i], a.w2.dtype);
    }
  });
}

// A truncated row (its z in `z`, its chunks' maxima in `chunks`): the cut, the
// race over the kept columns and the result (dspark/markov.h, Truncation);
// the corrected logits outside the kept set become -inf.
markov::RowResult truncated_row(const float* z, int64_t n, const ChunkState* chunks, int64_t count,
                                const truncation::Truncation& t, const RandomStream& stream, uint32_t position,
                                float* corrected, std::vector<uint64_t>& hist, std::vector<uint32_t>& bits) {
  float row_max = -num::kFloatMax;
  for (int64_t c = 0; c < count; ++c) row_max = num::fmax(row_max, chunks[c].max);
  hist.resize(truncation::kRadixBins);
  const truncation::Cut cut = truncation::truncate_host(n, [z](int64_t v) { return z[v]; }, row_max, t, hist.data());
  bits.resize(static_cast<size_t>((n + 3) / 4 * 4));
  random_words(stream, Purpose::kDraft, position, 0, (n + 3) / 4, bits.data());
  uint64_t best = 0;
  for (int64_t v = 0; v < n; ++v) {
    const float key = markov::truncated_key(z[v], row_max, cut.cut, bits[static_cast<size_t>(v)]);
    best = std::max(best, num::pack_arg(num::float_bits(key), static_cast<uint32_t>(v)));
  }
  if (corrected)
    for (int64_t v = 0; v < n; ++v)
      if (num::orderable(z[v]) < cut.cut) corrected[v] = -num::kInf;
  const int32_t token = static_cast<int32_t>(num::packed_index(best));
  return markov::truncated_result(token, z[token], row_max, cut.total);
}

}  // namespace

void markov_sample(const MarkovSampleArgs& a) {
  const IeeeDenormals ieee;
  Shapes s{a.base_logits.size(0), a.base_logits.size(1), a.base_logits.size(2), a.w1.size(1),
           a.hidden.defined() ? a.hidden.size(2) : 0};
  if (s.R == 0 || s.gamma == 0) return;
  const RequestParams params =
      RequestParams{a.temperature, a.temperatures.defined() ? a.temperatures.ptr<float>() : nullptr, a.seed,
                    a.seeds.defined() ? a.seeds.ptr<int64_t>() : nullptr, a.seeds.defined() ? a.seeds.size(0) : 0,
                    a.offset, a.offsets.defined() ? a.offsets.ptr<int64_t>() : nullptr,
                    a.offsets.defined() ? a.offsets.size(0) : 0};
  const int64_t chunks = (s.V + kMarkovChunk - 1) / kMarkovChunk;
  std::vector<float> A(static_cast<size_t>(s.R * s.rank)), state(static_cast<size_t>(s.R * s.rank), 0.0f);
  std::vector<ChunkState> chunk_state(static_cast<size_t>(s.R * chunks));
  std::vector<int64_t> prev(static_cast<size_t>(s.R));
  for (int64_t r = 0; r < s.R; ++r) prev[static_cast<size_t>(r)] = load_index(a.anchor_tokens.data, a.anchor_tokens.dtype, r);
  int64_t* tokens = a.draft_tokens.ptr<int64_t>();
  float* logprobs = a.logprobs.ptr<float>();
  float* lse = a.lse.ptr<float>();
  float* corrected = a.corrected.defined() ? a.corrected.ptr<float>() : nullptr;
  const int32_t* draft_vocab = a.draft_vocab.defined() ? a.draft_vocab.ptr<int32_t>() : nullptr;
  const size_t w2_size = dtype_size(a.w2.dtype);
  // Requests whose sampled rows are truncated keep them in z_rows (slot per request).
  const truncation::Params trunc = truncation_params(a.top_k, a.top_ks, a.top_p, a.top_ps, a.min_p, a.min_ps);
  std::vector<int64_t> slot(static_cast<size_t>(s.R), -1);
  int64_t slots = 0;
  if (trunc.any())
    for (int64_t r = 0; r < s.R; ++r)
      if (!is_greedy(params.temperature_of(static_cast<int32_t>(r))) &&
          truncation::active(trunc.of(static_cast<int32_t>(r)), s.V))
        slot[static_cast<size_t>(r)] = slots++;
  std::vector<float> z_rows(static_cast<size_t>(slots * s.V));

  for (int64_t k = 0; k < s.gamma; ++k) {
    head_rows(a, s, k, prev.data(), A, state);

    parallel_for(chunks, 1, [&](int64_t c_begin, int64_t c_end) {
      alignas(64) float bias[kRowBlock * kMarkovChunk];
      alignas(64) float row[kMarkovChunk];
      alignas(64) uint32_t bits[kMarkovChunk], keys[kMarkovChunk];
      for (int64_t c = c_begin; c < c_end; ++c) {
        const int64_t v0 = c * kMarkovChunk;
        const int64_t n = std::min(kMarkovChunk, s.V - v0);
        const void* w2_chunk = static_cast<const char*>(a.w2.data) + v0 * a.w2.stride(0) * static_cast<int64_t>(w2_size);
        for (int64_t r0 = 0; r0 < s.R; r0 += kRowBlock) {
          const int64_t rows = std::min(kRowBlock, s.R - r0);
          // A rows are rounded to W2's 16-bit dtype already (head_rows): exact as 16-bit inputs
          matmul_nt(&A[static_cast<size_t>(r0 * s.rank)], s.rank, rows, w2_chunk, a.w2.dtype, a.w2.stride(0), n,
                    s.rank, bias, kMarkovChunk, /*a_exact16=*/a.w2.dtype != DType::kFloat32);
          for (int64_t i = 0; i < rows; ++i) {
            const int64_t r = r0 + i;
            load_row(a.base_logits, r * a.base_logits.stride(0) + k * a.base_logits.stride(1) + v0, n, row);
            for (int64_t v = 0; v < n; ++v) row[v] = num::add(row[v], bias[i * kMarkovChunk + v]);
            if (corrected) std::copy(row, row + n, corrected + (r * s.gamma + k) * s.V + v0);
            ChunkState& cs = chunk_state[static_cast<size_t>(r * chunks + c)];
            const float temperature = params.temperature_of(static_cast<int32_t>(r));
            if (is_greedy(temperature)) {
              for (int64_t v = 0; v < n; ++v) row[v] = num::sanitize_logit(row[v]);
              const uint32_t best = sanitized_max(row, n);
              cs.max = num::from_orderable(best);
              cs.best = static_cast<int32_t>(v0 + first_index_of(row, n, best));
              cs.sum = 0;
              cs.best_key = 0.0f;
              cs.best_z = cs.max;
              continue;
            }
            const uint32_t best = scale_and_max(row, n, logit_scale(temperature));
            cs.max = num::from_orderable(best);
            const int64_t at = slot[static_cast<size_t>(r)];
            if (at >= 0) {  // truncated: raced in step 3, over the kept set
              std::copy(row, row + n, &z_rows[static_cast<size_t>(at * s.V + v0)]);
              continue;
            }
            alignas(64) float weights[kMarkovChunk];
            cs.sum = logit_weights(row, n, cs.max, weights);
            const RandomStream stream = params.stream_of(static_cast<int32_t>(r));
            random_words(stream, Purpose::kDraft, static_cast<uint32_t>(k), static_cast<uint32_t>(v0 / 4),
                         (n + 3) / 4, bits);
            race_keys(weights, bits, n, keys);
            const uint64_t winner = best_key(keys, n, v0);
            cs.best_key = num::bits_float(num::packed_value(winner));
            cs.best = static_cast<int32_t>(num::packed_index(winner));
            cs.best_z = row[cs.best - v0];
          }
        }
      }
    });

    parallel_for(s.R, 8, [&](int64_t begin, int64_t end) {
      std::vector<uint64_t> hist;
      std::vector<uint32_t> bits;
      for (int64_t r = begin; r < end; ++r) {
        const bool greedy = is_greedy(params.temperature_of(static_cast<int32_t>(r)));
        const int64_t at = slot[static_cast<size_t>(r)];
        const markov::RowResult res =
            at >= 0 ? truncated_row(&z_rows[static_cast<size_t>(at * s.V)], s.V,
                                    &chunk_state[static_cast<size_t>(r * chunks)], chunks,
                                    trunc.of(static_cast<int32_t>(r)), params.stream_of(static_cast<int32_t>(r)),
                                    static_cast<uint32_t>(k), corrected ? corrected + (r * s.gamma + k) * s.V : nullptr,
                                    hist, bits)
                    : markov::combine_chunks(&chunk_state[static_cast<size_t>(r * chunks)], chunks, greedy);
        const int64_t token = draft_vocab ? draft_vocab[res.token] : res.token;  // a target id
        tokens[r * s.gamma + k] = token;
        logprobs[r * s.gamma + k] = res.logprob;
        lse[r * s.gamma + k] = res.lse;
        prev[static_cast<size_t>(r)] = token;
      }
    });
  }
}

void confidence(const ConfidenceArgs& a) {
  const IeeeDenormals ieee;
  const int64_t R = a.hidden.size(0), gamma = a.hidden.size(1), d = a.hidden.size(2), rank = a.w1.size(1);
  float* logits = a.logits.ptr<float>();
  float* conf = a.conf.ptr<float>();
  float* survival = a.survival.ptr<float>();
  const float bias = load_float(a.bias.data, a.bias.dtype, 0);
  parallel_for(R, 4, [&](int64_t begin, int64_t end) {
    std::vector<float> x(static_cast<size_t>(gamma * (d + rank)));
    for (int64_t r = begin; r < end; ++r) {
      for (int64_t k = 0; k < gamma; ++k) {
        const int64_t prev = k == 0 ? load_index(a.anchor_tokens.data, a.anchor_tokens.dtype, r)
                                    : load_index(a.draft_tokens.data, a.draft_tokens.dtype,
                                                 r * a.draft_tokens.stride(0) + (k - 1) * a.draft_tokens.stride(1));
        float* row = &x[static_cast<size_t>(k * (d + rank))];
        load_row(a.hidden, r * a.hidden.stride(0) + k * a.hidden.stride(1), d, row);
        load_row(a.w1, prev * a.w1.stride(0), rank, row + d);
      }
      matmul_nt(x.data(), d + rank, gamma, a.weight.data, a.weight.dtype, d + rank, 1, d + rank,
                logits + r * gamma, 1);
      float a_k = 1.0f;
      for (int64_t k = 0; k < gamma; ++k) {
        const float logit = num::add(logits[r * gamma + k], bias);
        logits[r * gamma + k] = logit;
        const float t = a.temperatures.defined() ? load_float(a.temperatures.data, a.temperatures.dtype, k) : 1.0f;
        const float c = markov::confidence_of(num::div(logit, t));
        conf[r * gamma + k] = c;
        a_k = num::mul(a_k, c);
        survival[r * gamma + k] = a_k;
      }
    }
  });
}

}  // namespace dspark::cpu
