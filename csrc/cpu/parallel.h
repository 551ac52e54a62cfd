// A small persistent thread pool for the CPU backend. parallel_for splits
// [0, n) into contiguous ranges of at least `grain` items; the calling thread
// takes part. Calls from inside a parallel region run serially, so ops can
// nest without oversubscribing. No OpenMP: the extension must not load a
// second OpenMP runtime next to PyTorch's.
#pragma once

#include <cstdint>
#include <functional>

namespace dspark::cpu {

int num_threads();
void set_num_threads(int n);

// fn(begin, end) is called on disjoint ranges covering [0, n).
void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn);

}  // namespace dspark::cpu
