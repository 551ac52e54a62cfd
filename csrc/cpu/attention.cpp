// CPU backend of append_kv, paged_attention and rope.
//
// paged_attention: threads over (request, kv head), and over parts of a
// request's queries when there are fewer pairs than twice the threads (calls
// with little work run on the calling thread). For one job, the query rows
// are its queries times the G query heads of the group, widened to float32
// once and scaled by scale * log2(e), so that scores are in base 2. Keys are
// walked in tiles of 64, read in place from the pages (in the cache's dtype,
// widened in registers) by the tile's runs of keys within a page, so that
// every loaded key and value serves all the job's rows: S = Q K^T and O +=
// P V are register-blocked products over the tile (isa.h / kernels.inc:
// attention_scores, attention_values), and the online softmax keeps a
// running maximum, sum and output per row (no score matrix over the whole
// context), its maximum and exponentials vectorised (vec.h: max_f32,
// exp2_sum). Under the causal mask the walk stops at the job's last query's
// key; with a sliding window it starts at the first key the job's first query
// sees (keys outside are never read), and each row masks the keys outside its
// own window. Bytes: each job reads its keys and values once, R Hkv parts
// kv_len D (2 x dtype) in all, plus q and out.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "dspark/dtype_load.h"
#include "dspark/numerics.h"
#include "dspark/ops.h"
#include "fp_env.h"
#include "isa.h"
#include "parallel.h"
#include "vec.h"

namespace dspark::cpu {
namespace {

// Work below which paged_attention runs on the calling thread, in
// multiply-adds, a key element read (widened and transposed: about one
// instruction, as 16 FMA lanes are) counting kWorkPerKeyElement: about 100 us
// of one core, a one-token step or a batch-1 verification of SmolLM2's 9
// heads over a few hundred keys. Measured on a 2-core VM, a pool region cost
// 30-100 us more than such a call; a one-token step of 16 requests (7x the
// keys) ran 1.2x slower on one thread than the previous kernel on two.
constexpr int64_t kMinParallelWork = int64_t{1} << 22;
constexpr int64_t kWorkPerKeyElement = 16;

const char* element(const TensorView& t, int64_t offset) {
  return static_cast<const char*>(t.data) + offset * static_cast<int64_t>(dtype_size(t.dtype));
}

}  // namespace

void append_kv(const AppendKvArgs& a) {
  const int64_t T = a.k.size(0), H = a.k.size(1), D = a.k.size(2);
  const int64_t page_size = a.k_cache.size(1);
  const int64_t* slots = a.slot_mapping.ptr<int64_t>();
  parallel_for(T, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t slot = slots[t];
      if (slot < 0) continue;  // padding
      const int64_t page = slot / page_size, offset = slot % page_size;
      for (const auto& pair : {std::make_pair(&a.k, &a.k_cache), std::make_pair(&a.v, &a.v_cache)}) {
        const TensorView& src = *pair.first;
        const TensorView& dst = *pair.second;
        for (int64_t h = 0; h < H; ++h) {
          const int64_t from = t * src.stride(0) + h * src.stride(1);
          const int64_t to = ((page * page_size + offset) * H + h) * D;
          if (src.dtype == dst.dtype) {
            std::copy(element(src, from), element(src, from + D), const_cast<char*>(element(dst, to)));
          } else {
            for (int64_t d = 0; d < D; ++d) store_float(dst.data, dst.dtype, to + d, load_float(src.data, src.dtype, from + d));
          }
        }
      }
    }
  });
}

void paged_attention(const PagedAttentionArgs& a) {
  const IeeeDenormals ieee;
  const int64_t Hq = a.q.size(1), D = a.q.size(2);
  const int64_t page_size = a.k_cache.size(1), Hkv = a.k_cache.size(2);
  const int64_t R = a.block_table.size(0), max_pages = a.block_table.size(1);
  const int64_t G = Hq / Hkv;
  const int32_t* cu = a.cu_q.ptr<int32_t>();
  const int32_t* lens = a.kv_lens.ptr<int32_t>();
  const int32_t* table = a.block_table.ptr<int32_t>();
  const float scale = a.scale;
  const int64_t window = a.window;
  const int64_t key_stride = Hkv * D;  // elements between consecutive keys of one head in a page
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();

  // Jobs: (request, kv head, part of the request's queries). A request's
  // queries are split into parts only when there are fewer (request, head)
  // pairs than twice the threads, so that small batches use every core. A
  // call with less work than kMinParallelWork runs on the calling thread:
  // waking the pool's workers costs more than it saves there.
  int64_t max_q = 0, work = 0;
  for (int64_t r = 0; r < R; ++r) {
    max_q = std::max<int64_t>(max_q, cu[r + 1] - cu[r]);
    work += static_cast<int64_t>(cu[r + 1] - cu[r]) * lens[r] * Hq * D * 2  // Q K^T and P V, unmasked
            + kWorkPerKeyElement * lens[r] * Hkv * D;                       // keys read and transposed
  }
  const bool serial = work < kMinParallelWork;
  const int64_t pairs = R * Hkv;
  const int64_t parts = serial ? 1 : std::max<int64_t>(
      1, std::min<int64_t>(max_q, (2 * num_threads() + pairs - 1) / std::max<int64_t>(pairs, 1)));

  // scores are taken in base 2: the queries carry scale * log2(e)
  const float q_scale = scale * num::kLog2e;
  parallel_for(pairs * parts, serial ? pairs * parts : 1, [&](int64_t begin, int64_t end) {
    std::vector<float> q, s, m, l, acc;
    // the tile's keys by dimension, for the keys-in-lanes products (zeros until written)
    std::vector<float> kt(D <= kMaxLanesDim ? static_cast<size_t>(kKeyTile * D) : 0, 0.0f);
    std::vector<KeyRun> runs;
    for (int64_t job = begin; job < end; ++job) {
      const int64_t r = job / (Hkv * parts), h = job / parts % Hkv, part = job % parts;
      const int64_t q0 = cu[r], q_len = cu[r + 1] - cu[r], kv = lens[r];
      // this job's queries [i0, i1) of the request's q_len
      const int64_t per = (q_len + parts - 1) / parts;
      const int64_t i0 = std::min(q_len, part * per), i1 = std::min(q_len, i0 + per);
      const int64_t rows = (i1 - i0) * G;
      if (rows == 0) continue;
      q.resize(static_cast<size_t>(rows * D));
      for (int64_t i = i0; i < i1; ++i)
        for (int64_t g = 0; g < G; ++g) {
          float* qr = &q[static_cast<size_t>(((i - i0) * G + g) * D)];
          convert_to_float(element(a.q, (q0 + i) * a.q.stride(0) + (h * G + g) * a.q.stride(1)), a.q.dtype, D, qr);
          for (int64_t d = 0; d < D; ++d) qr[d] = num::mul(qr[d], q_scale);
        }
      m.assign(static_cast<size_t>(rows), kNegInf);
      l.assign(static_cast<size_t>(rows), 0.0f);
      acc.assign(static_cast<size_t>(rows * D), 0.0f);
      s.resize(static_cast<size_t>(rows * kKeyTile));
      // query i is at position kv - q_len + i; its window starts window - 1 keys before it
      const int64_t key_begin = window > 0 ? std::max<int64_t>(0, kv - q_len + i0 - window + 1) : 0;
      // under the causal mask no query of this job sees past its last query's key
      const int64_t key_end = a.mask == AttentionMask::kCausal ? kv - q_len + i1 : kv;
      for (int64_t j0 = key_begin; j0 < key_end; j0 += kKeyTile) {
        const int64_t n = std::min(kKeyTile, key_end - j0);
        // the tile's runs of keys within one page (keys of a run are key_stride apart)
        runs.clear();
        for (int64_t j = 0; j < n;) {
          const int64_t key = j0 + j, offset = key % page_size;
          const int64_t page = table[r * max_pages + key / page_size];
          const KeyRun run{j, std::min(n - j, page_size - offset), ((page * page_size + offset) * Hkv + h) * D};
          runs.push_back(run);
          j += run.length;
        }
        const int64_t num_runs = static_cast<int64_t>(runs.size());
        // S = Q K^T (base-2 scores), straight from the pages
        kernels().attention_scores(q.data(), rows, D, a.k_cache.data, a.k_cache.dtype, key_stride, runs.data(),
                                   num_runs, kt.data(), s.data());
        // Scores -> probabilities of this tile (keys a row does not see: 0; rows
        // with no visible key so far: all 0); the running output is rescaled to
        // the new maximum before P V is added.
        for (int64_t row = 0; row < rows; ++row) {
          const int64_t i = i0 + row / G;
          const int64_t last = a.mask == AttentionMask::kCausal ? kv - q_len + i : kv - 1;  // last visible key
          const int64_t first = window > 0 ? kv - q_len + i - window + 1 : 0;             // first visible key
          // visible keys of this tile: [begin, visible)
          const int64_t visible = std::max<int64_t>(0, std::min(n, last - j0 + 1));
          const int64_t begin = std::min(visible, std::max<int64_t>(0, first - j0));
          float* sr = &s[static_cast<size_t>(row * kKeyTile)];
          std::fill(sr, sr + begin, kNegInf);
          std::fill(sr + visible, sr + n, kNegInf);
          const float m_old = m[static_cast<size_t>(row)];
          const float m_new = std::max(m_old, max_f32(sr + begin, visible - begin));
          if (m_new == kNegInf) {
            std::fill(sr, sr + n, 0.0f);
            continue;
          }
          const float sum = exp2_sum(sr, n, m_new);
          const float alpha = num::exp2(num::sub(m_old, m_new));  // 0 for the first visible key
          l[static_cast<size_t>(row)] = num::add(num::mul(l[static_cast<size_t>(row)], alpha), sum);
          m[static_cast<size_t>(row)] = m_new;
          if (alpha != 1.0f) {
            float* o = &acc[static_cast<size_t>(row * D)];
            for (int64_t d = 0; d < D; ++d) o[d] = num::mul(o[d], alpha);
          }
        }
        // O += P V, straight from the pages (values lie where the keys do, in v_cache)
        kernels().attention_values(s.data(), rows, a.v_cache.data, a.v_cache.dtype, key_stride, runs.data(), num_runs,
                                   D, acc.data());
      }
      for (int64_t i = i0; i < i1; ++i)
        for (int64_t g = 0; g < G; ++g) {
          const int64_t row = (i - i0) * G + g, t = q0 + i, head = h * G + g;
          const float sum = l[static_cast<size_t>(row)];
          const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
          const int64_t out_at = (t * Hq + head) * D;
          for (int64_t d = 0; d < D; ++d) store_float(a.out.data, a.out.dtype, out_at + d, acc[static_cast<size_t>(row * D + d)] * inv);
          // lse in natural units: (m + log2(sum)) ln 2
          if (a.lse.defined())
            a.lse.ptr<float>()[t * Hq + head] =
                sum > 0.0f ? (m[static_cast<size_t>(row)] + std::log2(sum)) * num::kLn2 : kNegInf;
        }
    }
  });
}

void rope(const RopeArgs& a) {
  const int64_t T = a.q.size(0), half = a.inv_freq.size(0);
  const float* inv_freq = a.inv_freq.ptr<float>();
  parallel_for(T, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> cos(static_cast<size_t>(half)), sin(static_cast<size_t>(half));
    for (int64_t t = begin; t < end; ++t) {
      const float pos = static_cast<float>(load_index(a.positions.data, a.positions.dtype, t));
      for (int64_t i = 0; i < half; ++i) {
        const float angle = pos * inv_freq[i];
        cos[static_cast<size_t>(i)] = std::cos(angle);
        sin[static_cast<size_t>(i)] = std::sin(angle);
      }
      for (const TensorView* x : {&a.q, &a.k}) {
        if (!x->defined()) continue;
        for (int64_t h = 0; h < x->size(1); ++h) {
          const int64_t base = t * x->stride(0) + h * x->stride(1);
          for (int64_t i = 0; i < half; ++i) {
            const float x1 = load_float(x->data, x->dtype, base + i);
            const float x2 = load_float(x->data, x->dtype, base + i + half);
            const float c = cos[static_cast<size_t>(i)], s = sin[static_cast<size_t>(i)];
            store_float(x->data, x->dtype, base + i, x1 * c - x2 * s);
            store_float(x->data, x->dtype, base + i + half, x2 * c + x1 * s);
          }
        }
      }
    }
  });
}

}  // namespace dspark::cpu
