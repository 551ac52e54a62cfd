// Layout of the device workspace of rejection_sample (the CUDA backend keeps
// all intermediate state here; the Python layer allocates it with the caching
// allocator, so calls are graph-capturable).
#pragma once

#include <cstddef>
#include <cstdint>

#include "dspark/rejection.h"

namespace dspark {

struct RejectionWorkspace {
  static constexpr size_t kAlign = 256;

  size_t chunk_stats = 0;  // ChunkStats: [target rows, chunks], then [draft rows, draft chunks]
  size_t row_stats = 0;    // RowStats [rows]
  size_t decisions = 0;    // Decision [R]
  size_t race_best = 0;    // uint64 [R, 2] (residual, target)
  size_t soft_sums = 0;    // uint64 [N_draft]
  size_t draft_index = 0;  // int32 [vocab]: draft column of each target id (with a draft vocabulary)
  size_t bytes = 0;

  static size_t align(size_t x) { return (x + kAlign - 1) / kAlign * kAlign; }

  static RejectionWorkspace layout(int64_t R, int64_t n_draft, int64_t vocab, bool draft_rows,
                                   bool soft, int64_t draft_columns, bool draft_vocab) {
    using namespace rejection;
    const int64_t target_rows = n_draft + R;
    const int64_t rows = target_rows + (draft_rows ? n_draft : 0);
    const int64_t chunks = (vocab + kChunk - 1) / kChunk;
    const int64_t draft_chunks = (draft_columns + kChunk - 1) / kChunk;
    RejectionWorkspace w;
    size_t at = 0;
    w.chunk_stats = at;
    at = align(at + sizeof(ChunkStats) *
                        static_cast<size_t>(target_rows * chunks + (draft_rows ? n_draft * draft_chunks : 0)));
    w.row_stats = at;
    at = align(at + sizeof(RowStats) * static_cast<size_t>(rows));
    w.decisions = at;
    at = align(at + sizeof(Decision) * static_cast<size_t>(R));
    w.race_best = at;
    at = align(at + sizeof(uint64_t) * 2 * static_cast<size_t>(R));
    w.soft_sums = at;
    at = align(at + (soft ? sizeof(uint64_t) * static_cast<size_t>(n_draft) : 0));
    w.draft_index = at;
    at = align(at + (draft_vocab ? sizeof(int32_t) * static_cast<size_t>(vocab) : 0));
    w.bytes = at;
    return w;
  }
};

}  // namespace dspark
