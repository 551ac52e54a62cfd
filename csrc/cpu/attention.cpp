// CPU backend of append_kv, paged_attention and rope.
//
// paged_attention: threads over (request, kv head). For one pair, the query
// rows are the q_len queries times the G query heads of the group; keys and
// values are gathered from the pages 64 at a time, so every loaded key and
// value serves all the rows; scores and P V are small products per tile, and
// the online softmax keeps a running maximum, sum and output per row (no
// score matrix over the whole context). With a sliding window the walk starts
// at the first key the request's first query sees (keys before it are never
// read), and each row masks the keys outside its own window.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "dspark/dtype_load.h"
#include "dspark/ops.h"
#include "fp_env.h"
#include "gemm.h"
#include "parallel.h"
#include "vec.h"

namespace dspark::cpu {
namespace {

constexpr int64_t kKeyTile = 64;

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
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();

  parallel_for(R * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> q, k, v, vt, pv, s, m, l, acc, alpha_row;
    for (int64_t job = begin; job < end; ++job) {
      const int64_t r = job / Hkv, h = job % Hkv;
      const int64_t q0 = cu[r], q_len = cu[r + 1] - cu[r], kv = lens[r];
      const int64_t rows = q_len * G;
      if (rows == 0) continue;
      q.resize(static_cast<size_t>(rows * D));
      for (int64_t i = 0; i < q_len; ++i)
        for (int64_t g = 0; g < G; ++g)
          convert_to_float(element(a.q, (q0 + i) * a.q.stride(0) + (h * G + g) * a.q.stride(1)), a.q.dtype, D,
                           &q[static_cast<size_t>((i * G + g) * D)]);
      m.assign(static_cast<size_t>(rows), kNegInf);
      l.assign(static_cast<size_t>(rows), 0.0f);
      acc.assign(static_cast<size_t>(rows * D), 0.0f);
      k.resize(static_cast<size_t>(kKeyTile * D));
      v.resize(static_cast<size_t>(kKeyTile * D));
      vt.resize(static_cast<size_t>(kKeyTile * D));
      pv.resize(static_cast<size_t>(rows * D));
      alpha_row.resize(static_cast<size_t>(rows));
      s.resize(static_cast<size_t>(rows * kKeyTile));
      // query i is at position kv - q_len + i; its window starts window - 1 keys before it
      const int64_t key_begin = window > 0 ? std::max<int64_t>(0, kv - q_len - window + 1) : 0;
      for (int64_t j0 = key_begin; j0 < kv; j0 += kKeyTile) {
        const int64_t n = std::min(kKeyTile, kv - j0);
        for (int64_t j = 0; j < n; ++j) {
          const int64_t key = j0 + j;
          const int64_t page = table[r * max_pages + key / page_size];
          const int64_t at = ((page * page_size + key % page_size) * Hkv + h) * D;
          convert_to_float(element(a.k_cache, at), a.k_cache.dtype, D, &k[static_cast<size_t>(j * D)]);
          convert_to_float(element(a.v_cache, at), a.v_cache.dtype, D, &v[static_cast<size_t>(j * D)]);
        }
        matmul_nt(q.data(), D, rows, k.data(), DType::kFloat32, D, n, D, s.data(), kKeyTile);
        // Scores -> probabilities of this tile (rows with no visible key: all 0).
        for (int64_t row = 0; row < rows; ++row) {
          const int64_t i = row / G;
          const int64_t last = a.mask == AttentionMask::kCausal ? kv - q_len + i : kv - 1;  // last visible key
          const int64_t first = window > 0 ? kv - q_len + i - window + 1 : 0;             // first visible key
          // visible keys of this tile: [begin, visible)
          const int64_t visible = std::max<int64_t>(0, std::min(n, last - j0 + 1));
          const int64_t begin = std::min(visible, std::max<int64_t>(0, first - j0));
          float* sr = &s[static_cast<size_t>(row * kKeyTile)];
          float tile_max = kNegInf;
          for (int64_t j = begin; j < visible; ++j) {
            sr[j] *= scale;
            tile_max = std::max(tile_max, sr[j]);
          }
          const float m_old = m[static_cast<size_t>(row)];
          const float m_new = std::max(m_old, tile_max);
          std::fill(sr, sr + begin, 0.0f);
          const float sum = m_new == kNegInf ? (std::fill(sr, sr + n, 0.0f), 0.0f)
                                             : exp_shifted(sr + begin, visible - begin, n - begin, m_new);
          const float alpha = m_new == kNegInf ? 1.0f : std::exp(m_old - m_new);
          alpha_row[static_cast<size_t>(row)] = alpha;
          l[static_cast<size_t>(row)] = l[static_cast<size_t>(row)] * alpha + sum;
          m[static_cast<size_t>(row)] = m_new;
        }
        // P V for all rows at once (V transposed so that the product reads rows).
        for (int64_t j = 0; j < kKeyTile; ++j)
          for (int64_t d = 0; d < D; ++d) vt[static_cast<size_t>(d * kKeyTile + j)] = j < n ? v[static_cast<size_t>(j * D + d)] : 0.0f;
        matmul_nt(s.data(), kKeyTile, rows, vt.data(), DType::kFloat32, kKeyTile, D, kKeyTile, pv.data(), D);
        for (int64_t row = 0; row < rows; ++row) {
          const float alpha = alpha_row[static_cast<size_t>(row)];
          float* o = &acc[static_cast<size_t>(row * D)];
          const float* add = &pv[static_cast<size_t>(row * D)];
          for (int64_t d = 0; d < D; ++d) o[d] = o[d] * alpha + add[d];
        }
      }
      for (int64_t i = 0; i < q_len; ++i)
        for (int64_t g = 0; g < G; ++g) {
          const int64_t row = i * G + g, t = q0 + i, head = h * G + g;
          const float sum = l[static_cast<size_t>(row)];
          const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
          const int64_t out_at = (t * Hq + head) * D;
          for (int64_t d = 0; d < D; ++d) store_float(a.out.data, a.out.dtype, out_at + d, acc[static_cast<size_t>(row * D + d)] * inv);
          if (a.lse.defined())
            a.lse.ptr<float>()[t * Hq + head] = sum > 0.0f ? m[static_cast<size_t>(row)] + std::log(sum) : kNegInf;
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
