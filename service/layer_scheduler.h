// LayerScheduler: a fixed pool of worker threads running layer jobs in FIFO order.
//
// Reactors enqueue a job per completed layer and return at once; the worker that runs the
// job calls back into the reactor. Jobs of cancelled streams are not removed from the queue:
// the job itself checks its stream's state and returns quickly (see CompressReactor).
//
// Thread safety: Enqueue and queue_depth may be called from any thread. Shutdown (also run
// by the destructor) stops accepting jobs, runs every job already queued, and joins the
// workers; it must not be called from a worker.
#ifndef KVCOMPRESS_SERVICE_LAYER_SCHEDULER_H_
#define KVCOMPRESS_SERVICE_LAYER_SCHEDULER_H_

#include <cstddef>
#include <deque>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/functional/any_invocable.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"

namespace kvcompress {

class LayerScheduler final {
 public:
  using Job = absl::AnyInvocable<void() &&>;

  // Starts `num_threads` workers (at least one).
  explicit LayerScheduler(int num_threads);
  ~LayerScheduler();
  LayerScheduler(const LayerScheduler&) = delete;
  LayerScheduler& operator=(const LayerScheduler&) = delete;

  // Queues `job` behind every job queued before it. UNAVAILABLE after Shutdown (the job is
  // then destroyed without running).
  absl::Status Enqueue(Job job);

  // Jobs waiting for a worker (not counting running ones).
  size_t queue_depth() const;
  // Jobs running right now.
  size_t running() const;
  int num_threads() const { return static_cast<int>(workers_.size()); }

  void Shutdown();

 private:
  void WorkerLoop();

  mutable absl::Mutex mu_;
  std::deque<Job> queue_ ABSL_GUARDED_BY(mu_);
  size_t running_ ABSL_GUARDED_BY(mu_) = 0;
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::vector<std::thread> workers_;
};

}  // namespace kvcompress

#endif  // KVCOMPRESS_SERVICE_LAYER_SCHEDULER_H_
