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

absl::Status ForwardOutbox::Deliver(v1::ForwardNotice notice, std::span<const DeviceSpan> tensors,
                                    absl::Time deadline) {
  std::unique_ptr<NcclTransfer> transfer;
  {
    absl::MutexLock lock(&mu_);
    if (listener_ == nullptr) {
      return absl::FailedPreconditionError(
          "the forward channel has no listener: its decode worker must call ReceiveForwarded "
          "before caches are forwarded to it");
    }
    // The notice goes first: NCCL may hold a group in progress until the peer takes part,
    // and the decode worker takes part once it has the notice. Waiting for the group before
    // announcing would cost one notice round trip per layer.
    listener_->Post(std::move(notice));
    absl::StatusOr<std::unique_ptr<NcclTransfer>> enqueued = link_.EnqueueSends(tensors, deadline);
    if (!enqueued.ok()) {
      // The link is aborted: the listener's receives for this layer will never complete, and
      // its stream ends with the failure.
      listener_->Close(enqueued.status());
      listener_ = nullptr;
      return enqueued.status();
    }
    transfer = std::move(enqueued).value();
  }
  absl::Status status = transfer->Wait(deadline);
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
