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

  size_t chunk_stats = 0;  // ChunkStats [rows, chunks]; rows = target rows, then draft rows
  size_t row_stats = 0;    // RowStats [rows]
  size_t decisions = 0;    // Decision [R]
  size_t race_best = 0;    // uint64 [R, 2] (residual, target)
  size_t soft_sums = 0;    // uint64 [N_draft]
  size_t bytes = 0;

  static size_t align(size_t x) { return (x + kAlign - 1) / kAlign * kAlign; }

  static RejectionWorkspace layout(int64_t R, int64_t n_draft, int64_t vocab, bool draft_rows,
                                   bool soft) {
    using namespace rejection;
    const int64_t rows = (n_draft + R) + (draft_rows ? n_draft : 0);
    const int64_t chunks = (vocab + kChunk - 1) / kChunk;
    RejectionWorkspace w;
    size_t at = 0;
    w.chunk_stats = at;
    at = align(at + sizeof(ChunkStats) * static_cast<size_t>(rows * chunks));
    w.row_stats = at;
    at = align(at + sizeof(RowStats) * static_cast<size_t>(rows));
    w.decisions = at;
    at = align(at + sizeof(Decision) * static_cast<size_t>(R));
    w.race_best = at;
    at = align(at + sizeof(uint64_t) * 2 * static_cast<size_t>(R));
    w.soft_sums = at;
    at = align(at + (soft ? sizeof(uint64_t) * static_cast<size_t>(n_draft) : 0));
    w.bytes = at;
    return w;
  }
};

}  // namespace dspark
