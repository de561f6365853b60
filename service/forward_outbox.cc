#include "service/forward_outbox.h"

#include <memory>
#include <utility>

#include "absl/strings/str_cat.h"

namespace kvcompress {

ForwardOutbox::ForwardOutbox(NcclLink& link) : link_(link) {}

absl::Status ForwardOutbox::Attach(ForwardListener* listener) {
  absl::MutexLock lock(&mu_);
  if (link_.aborted()) {
    return absl::FailedPreconditionError(absl::StrCat(
        "the forward channel was aborted (", link_.abort_reason(), "); open a new channel"));
  }
  if (listener_ != nullptr) {
    return absl::AlreadyExistsError(
        "the channel already has a ReceiveForwarded listener (one per channel)");
  }
  listener_ = listener;
  return absl::OkStatus();
}

void ForwardOutbox::Detach(ForwardListener* listener) {
  absl::MutexLock lock(&mu_);
  if (listener_ != listener) return;
  listener_ = nullptr;
  link_.Abort("its ReceiveForwarded listener went away");
}

bool ForwardOutbox::has_listener() const {
  absl::MutexLock lock(&mu_);
  return listener_ != nullptr;
}

// One NCCL group of one or more layers; the first of its callers to wait waits for all.
struct ForwardOutbox::Batch {
  absl::Mutex mu;
  std::unique_ptr<NcclTransfer> transfer;  // null when the enqueue failed
  absl::Status status;                     // the enqueue's failure, then the wait's result
  bool waited = false;
};

struct ForwardOutbox::Delivery {
  std::vector<v1::ForwardNotice> notices;
  std::vector<DeviceSpan> tensors;
  std::shared_ptr<Batch> batch;  // set (with taken) by the caller that enqueued it
  bool taken = false;
};

absl::Status ForwardOutbox::Deliver(v1::ForwardNotice notice, std::span<const DeviceSpan> tensors,
                                    absl::Time deadline) {
  std::vector<v1::ForwardNotice> notices;
  notices.push_back(std::move(notice));
  return DeliverAll(std::move(notices), std::vector<DeviceSpan>(tensors.begin(), tensors.end()),
                    deadline);
}

absl::Status ForwardOutbox::DeliverAll(std::vector<v1::ForwardNotice> notices,
                                       std::vector<DeviceSpan> tensors, absl::Time deadline) {
  auto delivery = std::make_shared<Delivery>();
  delivery->notices = std::move(notices);
  delivery->tensors = std::move(tensors);
  mu_.Lock();
  if (listener_ == nullptr) {
    mu_.Unlock();
    return absl::FailedPreconditionError(
        "the forward channel has no listener: its decode worker must call ReceiveForwarded "
        "before caches are forwarded to it");
  }
  queue_.push_back(delivery);
  if (flushing_) {
    // Another caller is enqueueing; it takes this layer with the next group.
    mu_.Await(absl::Condition(&delivery->taken));
  } else {
    flushing_ = true;
    while (!queue_.empty()) {
      std::deque<std::shared_ptr<Delivery>> batch_items;
      batch_items.swap(queue_);
      auto batch = std::make_shared<Batch>();
      if (listener_ == nullptr) {
        batch->status = absl::FailedPreconditionError(
            absl::StrCat("the forward channel was aborted (", link_.abort_reason(), ")"));
      } else {
        // The notices go first: NCCL may hold a group in progress until the peer takes part,
        // and the decode worker takes part once it has the notices.
        std::vector<DeviceSpan> spans;
        for (const std::shared_ptr<Delivery>& item : batch_items) {
          for (v1::ForwardNotice& notice : item->notices) listener_->Post(std::move(notice));
          spans.insert(spans.end(), item->tensors.begin(), item->tensors.end());
        }
        // Only the flushing caller enqueues, so groups keep the notices' order while others
        // queue behind the lock.
        mu_.Unlock();
        absl::StatusOr<std::unique_ptr<NcclTransfer>> enqueued =
            link_.EnqueueSends(spans, deadline);
        mu_.Lock();
        if (enqueued.ok()) {
          batch->transfer = std::move(enqueued).value();
        } else {
          // The link is aborted: the listener's receives will never complete, and its stream
          // ends with the failure.
          batch->status = enqueued.status();
          if (listener_ != nullptr) {
            listener_->Close(batch->status);
            listener_ = nullptr;
          }
        }
      }
      for (const std::shared_ptr<Delivery>& item : batch_items) {
        item->batch = batch;
        item->taken = true;
      }
    }
    flushing_ = false;
  }
  const std::shared_ptr<Batch> batch = delivery->batch;
  mu_.Unlock();

  absl::Status status;
  {
    absl::MutexLock lock(&batch->mu);
    if (!batch->waited && batch->transfer != nullptr) {
      batch->status = batch->transfer->Wait(deadline);
      batch->waited = true;
    }
    status = batch->status;
  }
  if (!status.ok()) {
    absl::MutexLock lock(&mu_);
    if (listener_ != nullptr) {
      listener_->Close(status);
      listener_ = nullptr;
    }
  }
  return status;
}

void ForwardOutbox::Post(v1::ForwardNotice notice) {
  absl::MutexLock lock(&mu_);
  if (listener_ != nullptr) listener_->Post(std::move(notice));
}

}  // namespace kvcompress
