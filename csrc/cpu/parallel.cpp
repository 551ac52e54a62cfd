#include "parallel.h"

#include "fp_env.h"

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <condition_variable>
#include <cstdlib>
#include <exception>
#include <memory>
#include <new>
#include <mutex>
#include <thread>

#include <pthread.h>
#include <vector>

namespace dspark::cpu {
namespace {

thread_local bool t_in_parallel_region = false;

int default_num_threads() {
  if (const char* env = std::getenv("DSPARK_NUM_THREADS")) {
    const int n = std::atoi(env);
    if (n > 0) return n;
  }
  const unsigned hw = std::thread::hardware_concurrency();
  return hw > 0 ? static_cast<int>(hw) : 1;
}

// Workers sleep on a condition variable between regions. A region's tasks are
// claimed one at a time from an atomic word that carries the region's
// generation with the next index, so a worker that wakes late (its core taken
// by another runtime's spinning threads, e.g. PyTorch's OpenMP workers after an
// op) cannot claim a task of a later region; and the caller waits for the
// tasks to be done, not for every worker to wake: when no worker gets a core
// in time, the calling thread runs the whole region itself instead of waiting.
class ThreadPool {
 public:
  explicit ThreadPool(int threads) { resize(threads); }
  ~ThreadPool() { stop(); }

  int size() const { return static_cast<int>(workers_.size()) + 1; }

  void resize(int threads) {
    std::lock_guard<std::mutex> call(call_mutex_);  // not while a region runs
    stop();
    std::lock_guard<std::mutex> lock(mutex_);
    shutdown_ = false;
    // New workers wait for the next region, not the last one.
    for (int i = 1; i < std::max(threads, 1); ++i)
      workers_.emplace_back([this, seen = generation_] { work(seen); });
  }

  // Runs task(i) for i in [0, count) on the pool and the calling thread.
  void run(int64_t count, const std::function<void(int64_t)>& task) {
    std::unique_lock<std::mutex> call(call_mutex_);  // one parallel region at a time
    uint32_t tag;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      task_ = &task;
      count_ = count;
      tag = static_cast<uint32_t>(++generation_);
      claim_.store(static_cast<uint64_t>(tag) << 32);
      completed_.store(0);
      error_ = nullptr;
    }
    wake_.notify_all();
    drain(tag, &task, count);
    std::unique_lock<std::mutex> lock(mutex_);
    done_.wait(lock, [&] { return completed_.load() == count; });
    task_ = nullptr;
    if (error_) std::rethrow_exception(error_);
  }

 private:
  // Claims and runs tasks of the region tagged `tag` until none is left (or
  // a later region has started).
  void drain(uint32_t tag, const std::function<void(int64_t)>* task, int64_t count) {
    const bool was_in_region = t_in_parallel_region;
    t_in_parallel_region = true;
    const IeeeDenormals ieee;  // workers may have inherited flush-to-zero
    for (;;) {
      uint64_t word = claim_.load();
      int64_t index = -1;
      while ((word >> 32) == tag && static_cast<int64_t>(word & 0xffffffffu) < count) {
        if (claim_.compare_exchange_weak(word, word + 1)) {
          index = static_cast<int64_t>(word & 0xffffffffu);
          break;
        }
      }
      if (index < 0) break;
      try {
        (*task)(index);
      } catch (...) {
        std::lock_guard<std::mutex> lock(mutex_);
        if (!error_) error_ = std::current_exception();
      }
      if (completed_.fetch_add(1) + 1 == count) {
        std::lock_guard<std::mutex> lock(mutex_);
        done_.notify_all();
      }
    }
    t_in_parallel_region = was_in_region;
  }

  void work(uint64_t seen) {
    for (;;) {
      const std::function<void(int64_t)>* task;
      int64_t count;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] { return shutdown_ || (generation_ != seen && task_ != nullptr); });
        if (shutdown_) return;
        seen = generation_;
        task = task_;
        count = count_;
      }
      // the task is only called after a claim of this region succeeds, so it is alive then
      drain(static_cast<uint32_t>(seen), task, count);
    }
  }

  void stop() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      shutdown_ = true;
    }
    wake_.notify_all();
    for (auto& w : workers_) w.join();
    workers_.clear();
  }

  std::vector<std::thread> workers_;
  std::mutex call_mutex_;
  std::mutex mutex_;
  std::condition_variable wake_, done_;
  const std::function<void(int64_t)>* task_ = nullptr;
  int64_t count_ = 0;
  std::atomic<uint64_t> claim_{0};  // (region tag << 32) | next task index
  std::atomic<int64_t> completed_{0};
  uint64_t generation_ = 0;
  bool shutdown_ = false;
  std::exception_ptr error_;
};

std::mutex g_pool_mutex;
std::unique_ptr<ThreadPool> g_pool;

// A forked child has none of the parent's worker threads: drop (leak) the
// parent's pool so that the child builds its own on first use.
void forget_pool_in_child() {
  (void)g_pool.release();
  new (&g_pool_mutex) std::mutex();
}

ThreadPool& pool() {
  static const bool registered = [] {
    pthread_atfork(nullptr, nullptr, forget_pool_in_child);
    return true;
  }();
  (void)registered;
  std::lock_guard<std::mutex> lock(g_pool_mutex);
  if (!g_pool) g_pool = std::make_unique<ThreadPool>(default_num_threads());
  return *g_pool;
}

}  // namespace

int num_threads() { return pool().size(); }

void set_num_threads(int n) {
  ThreadPool& p = pool();
  std::lock_guard<std::mutex> lock(g_pool_mutex);
  p.resize(std::max(n, 1));
}

void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn) {
  if (n <= 0) return;
  grain = std::max<int64_t>(grain, 1);
  const int64_t max_tasks = (n + grain - 1) / grain;
  if (t_in_parallel_region || max_tasks <= 1) {
    fn(0, n);
    return;
  }
  ThreadPool& p = pool();
  const int64_t tasks = std::min<int64_t>(max_tasks, int64_t{4} * p.size());
  if (p.size() == 1) {
    fn(0, n);
    return;
  }
  const int64_t step = (n + tasks - 1) / tasks;
  p.run(tasks, [&](int64_t t) {
    const int64_t begin = t * step;
    const int64_t end = std::min(n, begin + step);
    if (begin < end) fn(begin, end);
  });
}

}  // namespace dspark::cpu
