// A small fixed pool of worker threads running index ranges (ParallelFor) for the CPU backend.
//
// The thread that calls ParallelFor works on its own range too, and waits only for indices
// that were already started, never for a free worker. So ParallelFor never deadlocks: not
// when many threads call it at once, not when it is called from inside a ParallelFor body,
// and not with zero workers (then the caller runs everything itself).
//
// Thread safety: ParallelFor may be called concurrently. The destructor joins the workers; it
// requires that no ParallelFor is running.
#ifndef KVCOMPRESS_KERNELS_CPU_INTERNAL_THREAD_POOL_H_
#define KVCOMPRESS_KERNELS_CPU_INTERNAL_THREAD_POOL_H_

#include <cstdint>
#include <deque>
#include <functional>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/functional/function_ref.h"
#include "absl/synchronization/mutex.h"

namespace kvcompress::cpu {

class ThreadPool final {
 public:
  // Starts `num_workers` ≥ 0 threads.
  explicit ThreadPool(int num_workers);
  ~ThreadPool();

  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int num_workers() const { return static_cast<int>(workers_.size()); }

  // Runs body(i) for every i in [0, count), on the workers and the calling thread, and
  // returns when all have finished. Each index runs exactly once; order is unspecified.
  void ParallelFor(int64_t count, absl::FunctionRef<void(int64_t)> body);

 private:
  void WorkerLoop();

  absl::Mutex mu_;
  std::deque<std::function<void()>> tasks_ ABSL_GUARDED_BY(mu_);
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::vector<std::thread> workers_;
};

}  // namespace kvcompress::cpu

#endif  // KVCOMPRESS_KERNELS_CPU_INTERNAL_THREAD_POOL_H_
