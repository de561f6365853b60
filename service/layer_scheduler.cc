#include "service/layer_scheduler.h"

#include <algorithm>
#include <utility>

namespace kvcompress {

LayerScheduler::LayerScheduler(int num_threads) {
  const int count = std::max(num_threads, 1);
  workers_.reserve(count);
  for (int i = 0; i < count; ++i) workers_.emplace_back([this] { WorkerLoop(); });
}

LayerScheduler::~LayerScheduler() { Shutdown(); }

absl::Status LayerScheduler::Enqueue(Job job) {
  absl::MutexLock lock(&mu_);
  if (stopping_) return absl::UnavailableError("layer scheduler is shutting down");
  queue_.push_back(std::move(job));
  return absl::OkStatus();
}

size_t LayerScheduler::queue_depth() const {
  absl::MutexLock lock(&mu_);
  return queue_.size();
}

size_t LayerScheduler::running() const {
  absl::MutexLock lock(&mu_);
  return running_;
}

void LayerScheduler::Shutdown() {
  {
    absl::MutexLock lock(&mu_);
    if (stopping_ && workers_.empty()) return;
    stopping_ = true;
  }
  for (std::thread& worker : workers_) {
    if (worker.joinable()) worker.join();
  }
  workers_.clear();
}

void LayerScheduler::WorkerLoop() {
  while (true) {
    Job job;
    {
      absl::MutexLock lock(&mu_);
      mu_.Await(absl::Condition(
          +[](LayerScheduler* self) ABSL_EXCLUSIVE_LOCKS_REQUIRED(self->mu_) {
            return self->stopping_ || !self->queue_.empty();
          },
          this));
      if (queue_.empty()) return;  // stopping and drained
      job = std::move(queue_.front());
      queue_.pop_front();
      ++running_;
    }
    std::move(job)();
    absl::MutexLock lock(&mu_);
    --running_;
  }
}

}  // namespace kvcompress
