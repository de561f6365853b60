#include "kernels/cpu/internal/thread_pool.h"

#include <algorithm>
#include <atomic>
#include <memory>

namespace kvcompress::cpu {
namespace {

// One ParallelFor call. Shared between the caller and the helper tasks it queued: a helper
// that starts after all indices are taken finds nothing to do and never touches `body`, so
// the caller may return (and its body go away) once every claimed index has finished.
class IndexRange final {
 public:
  IndexRange(int64_t count, absl::FunctionRef<void(int64_t)> body)
      : count_(count), body_(body), unfinished_(count) {}

  // Claims and runs indices until none are left.
  void RunAvailable() {
    int64_t finished = 0;
    for (int64_t index = next_.fetch_add(1); index < count_; index = next_.fetch_add(1)) {
      body_(index);
      ++finished;
    }
    if (finished > 0 && unfinished_.fetch_sub(finished) == finished) {
      absl::MutexLock lock(&mu_);
      done_ = true;
    }
  }

  void WaitUntilDone() {
    absl::MutexLock lock(&mu_);
    mu_.Await(absl::Condition(&done_));
  }

 private:
  const int64_t count_;
  const absl::FunctionRef<void(int64_t)> body_;
  std::atomic<int64_t> next_{0};
  std::atomic<int64_t> unfinished_;
  absl::Mutex mu_;
  bool done_ ABSL_GUARDED_BY(mu_) = false;
};

}  // namespace

ThreadPool::ThreadPool(int num_workers) {
  workers_.reserve(std::max(num_workers, 0));
  for (int i = 0; i < num_workers; ++i) workers_.emplace_back([this] { WorkerLoop(); });
}

ThreadPool::~ThreadPool() {
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
  }
  for (std::thread& worker : workers_) worker.join();
}

void ThreadPool::ParallelFor(int64_t count, absl::FunctionRef<void(int64_t)> body) {
  if (count <= 0) return;
  if (count == 1 || workers_.empty()) {
    for (int64_t i = 0; i < count; ++i) body(i);
    return;
  }
  auto range = std::make_shared<IndexRange>(count, body);
  const int64_t helpers = std::min<int64_t>(count - 1, num_workers());
  {
    absl::MutexLock lock(&mu_);
    for (int64_t i = 0; i < helpers; ++i) tasks_.emplace_back([range] { range->RunAvailable(); });
  }
  range->RunAvailable();
  range->WaitUntilDone();
}

void ThreadPool::WorkerLoop() {
  while (true) {
    std::function<void()> task;
    {
      absl::MutexLock lock(&mu_);
      mu_.Await(absl::Condition(
          +[](ThreadPool* pool) ABSL_EXCLUSIVE_LOCKS_REQUIRED(pool->mu_) {
            return pool->stopping_ || !pool->tasks_.empty();
          },
          this));
      if (tasks_.empty()) return;  // stopping, and nothing left to run
      task = std::move(tasks_.front());
      tasks_.pop_front();
    }
    task();
  }
}

}  // namespace kvcompress::cpu
