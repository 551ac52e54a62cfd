// Layout of the device workspace of markov_sample (CUDA backend).
#pragma once

#include <cstddef>
#include <cstdint>

#include "dspark/markov.h"

namespace dspark {

struct MarkovWorkspace {
  static constexpr size_t kAlign = 256;
  static constexpr int64_t kRowTile = 16;  // requests per CUDA block (one WMMA tile)

  size_t a_rows = 0;        // float [R_pad, rank]: the product's left operand (16-bit ones use half of it)
  size_t state = 0;         // float [2, R, rank]: the RNN state (double-buffered by position)
  size_t hidden_part = 0;   // float [R, gamma, rank or 3 rank]: W_h h_k of the gated / rnn head
  size_t chunk_states = 0;  // ChunkState [R, chunks]
  size_t counters = 0;      // uint32 [gamma, R tiles]: blocks done per position and row tile
  size_t z_rows = 0;        // float [R, V]: the rows of a position that are truncated (with truncation)
  size_t bytes = 0;

  static size_t align(size_t x) { return (x + kAlign - 1) / kAlign * kAlign; }

  static MarkovWorkspace layout(int64_t R, int64_t gamma, int64_t V, int64_t rank, int64_t d,
                                markov::Head head, bool truncation = false) {
    const int64_t tiles = (R + kRowTile - 1) / kRowTile;
    const int64_t chunks = (V + markov::kMarkovChunk - 1) / markov::kMarkovChunk;
    const int64_t hidden_width = head == markov::Head::kGated ? rank : head == markov::Head::kRnn ? 3 * rank : 0;
    (void)d;
    MarkovWorkspace w;
    size_t at = 0;
    w.a_rows = at;
    at = align(at + sizeof(float) * static_cast<size_t>(tiles * kRowTile * rank));
    w.state = at;
    at = align(at + sizeof(float) * static_cast<size_t>(head == markov::Head::kRnn ? 2 * R * rank : 0));
    w.hidden_part = at;
    at = align(at + sizeof(float) * static_cast<size_t>(R * gamma * hidden_width));
    w.chunk_states = at;
    at = align(at + sizeof(markov::ChunkState) * static_cast<size_t>(R * chunks));
    w.counters = at;
    at = align(at + sizeof(uint32_t) * static_cast<size_t>(gamma * tiles));
    w.z_rows = at;
    at = align(at + (truncation ? sizeof(float) * static_cast<size_t>(R * V) : 0));
    w.bytes = at;
    return w;
  }
};

}  // namespace dspark
