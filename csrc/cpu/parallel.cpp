#include "parallel.h"

#include "fp_env.h"

#include <algorithm>
#include <atomic>
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
    {
      std::lock_guard<std::mutex> lock(mutex_);
      task_ = &task;
      count_ = count;
      next_.store(0);
      pending_ = static_cast<int64_t>(workers_.size());
      error_ = nullptr;
      ++generation_;
    }
    wake_.notify_all();
    drain();
    std::unique_lock<std::mutex> lock(mutex_);
    done_.wait(lock, [this] { return pending_ == 0; });
    task_ = nullptr;
    if (error_) std::rethrow_exception(error_);
  }

 private:
  void drain() {
    const bool was_in_region = t_in_parallel_region;
    t_in_parallel_region = true;
    const IeeeDenormals ieee;  // workers may have inherited flush-to-zero
    for (int64_t i = next_.fetch_add(1); i < count_; i = next_.fetch_add(1)) {
      try {
        (*task_)(i);
      } catch (...) {
        std::lock_guard<std::mutex> lock(mutex_);
        if (!error_) error_ = std::current_exception();
      }
    }
    t_in_parallel_region = was_in_region;
  }

  void work(uint64_t seen) {
    for (;;) {
      {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] { return shutdown_ || generation_ != seen; });
        if (shutdown_) return;
        seen = generation_;
      }
      drain();
      {
        std::lock_guard<std::mutex> lock(mutex_);
        --pending_;
      }
      done_.notify_all();
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
  std::atomic<int64_t> next_{0};
  int64_t pending_ = 0;
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
