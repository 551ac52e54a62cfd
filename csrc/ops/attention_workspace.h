// The split-KV plan of paged_attention on CUDA and its workspace. The plan
// depends on shapes only (never on kv_lens or cu_q, which live on the
// device), so the workspace is allocated without a host synchronisation.
//
// Work is cut into tiles: a tile is up to tokens_per_tile consecutive queries
// of one request with all the query heads of one kv head (tokens_per_tile * G
// rows, G = H_q / H_kv), and a split is a slice of keys_per_split keys of the
// keys the tile can see. A CUDA block owns one (tile, kv head, split).
//
// With a sliding window W the keys a tile can see start at its first query's
// position - W + 1: the splits cover only that span (at most W + tokens_per_tile
// - 1 keys under the causal mask, W + T - 1 under the block mask), so keys
// outside the window are never read, and a long context with a short window
// is not split for nothing.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>

namespace dspark {

struct AttentionPlan {
  static constexpr int64_t kKeyTile = 64;         // split granularity (a multiple of every kernel's key step)
  static constexpr int64_t kRowsPerBlock = 64;    // query rows per block (4 warps x 16), head dims up to 256
  static constexpr int64_t kTargetBlocks = 264;   // about two waves of an H100 / H200
  static constexpr int64_t kMinKeysPerSplit = 256;
  static constexpr int64_t kMaxSplits = 64;

  int64_t tokens_per_tile = 1;
  int64_t max_tiles = 1;  // an upper bound on sum_r ceil(q_len_r / tokens_per_tile)
  int64_t splits = 1;
  int64_t keys_per_split = kKeyTile;  // a multiple of kKeyTile

  // Query rows per block of the tensor-core kernel for a head dim: 64, and 32
  // for head dim 512 (its shared memory holds half as many rows).
  static constexpr int64_t rows_per_block(int64_t D) { return D > 256 ? kRowsPerBlock / 2 : kRowsPerBlock; }

  // Whether the tensor-core kernel handles these shapes (it also needs
  // 16-byte aligned q and caches; otherwise the float32 kernel runs).
  static bool tensor_core_shapes(bool sixteen_bit, int64_t Hq, int64_t Hkv, int64_t D) {
    return sixteen_bit && (D == 64 || D == 128 || D == 256 || D == 512) && Hkv > 0 &&
           Hq / Hkv <= rows_per_block(D);
  }

  // window: 0, or the sliding window (keys per query, itself included);
  // causal: the mask (the span a tile sees under a window depends on it).
  static AttentionPlan make(int64_t T, int64_t R, int64_t Hq, int64_t Hkv, int64_t D, int64_t max_pages,
                            int64_t page_size, int64_t window = 0, bool causal = true) {
    AttentionPlan p;
    const int64_t group = Hkv > 0 ? std::max<int64_t>(1, Hq / Hkv) : 1;
    p.tokens_per_tile = std::max<int64_t>(1, rows_per_block(D) / group);
    p.max_tiles = std::max<int64_t>(1, (T + p.tokens_per_tile - 1) / p.tokens_per_tile + R);
    int64_t max_keys = std::max<int64_t>(1, max_pages * page_size);
    if (window > 0) max_keys = std::min(max_keys, window + (causal ? p.tokens_per_tile : std::max<int64_t>(T, 1)) - 1);
    // Enough splits that a batch of one long request fills the GPU. The busy
    // blocks before splitting are the real tiles times H_kv: at least
    // ceil(T / tokens_per_tile) (a long prefill gets no splits and no
    // partials), and one per request with a query: min(R, T) when every
    // request has one, as in decode and verification (R x H_kv blocks, where
    // T / tokens_per_tile would over-split).
    const int64_t tiles = std::max<int64_t>({1, (T + p.tokens_per_tile - 1) / p.tokens_per_tile, std::min(R, T)});
    const int64_t busy = tiles * std::max<int64_t>(Hkv, 1);
    const int64_t want = (kTargetBlocks + busy - 1) / busy;
    const int64_t by_length = (max_keys + kMinKeysPerSplit - 1) / kMinKeysPerSplit;
    p.splits = std::max<int64_t>(1, std::min({want, by_length, kMaxSplits}));
    const int64_t per = (max_keys + p.splits - 1) / p.splits;
    p.keys_per_split = (per + kKeyTile - 1) / kKeyTile * kKeyTile;
    return p;
  }
};

struct AttentionWorkspace {
  static constexpr size_t kAlign = 256;
  size_t cu_tiles = 0;     // int32 [R + 1]: prefix of the tiles per request
  size_t partial_out = 0;  // float [splits, T, Hq, D] (splits > 1)
  size_t partial_lse = 0;  // float [splits, T, Hq]
  size_t bytes = 0;

  static size_t align(size_t x) { return (x + kAlign - 1) / kAlign * kAlign; }

  // tensor_cores: whether the split kernel can run (16-bit, head dim 64, 128,
  // 256 or 512); the float32 kernel needs no partials.
  static AttentionWorkspace layout(int64_t T, int64_t R, int64_t Hq, int64_t Hkv, int64_t D, int64_t max_pages,
                                   int64_t page_size, bool tensor_cores, int64_t window = 0, bool causal = true) {
    const AttentionPlan plan = AttentionPlan::make(T, R, Hq, Hkv, D, max_pages, page_size, window, causal);
    AttentionWorkspace w;
    size_t at = 0;
    w.cu_tiles = at;
    at = align(at + sizeof(int32_t) * static_cast<size_t>(R + 1));
    const size_t rows = static_cast<size_t>(tensor_cores && plan.splits > 1 ? plan.splits * T * Hq : 0);
    w.partial_out = at;
    at = align(at + rows * static_cast<size_t>(D) * sizeof(float));
    w.partial_lse = at;
    at = align(at + rows * sizeof(float));
    w.bytes = at;
    return w;
  }
};

}  // namespace dspark
