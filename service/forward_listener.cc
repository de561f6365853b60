#include "service/forward_listener.h"

#include <utility>

#include "absl/strings/str_cat.h"
#include "service/nccl_link.h"
#include "service/status_conversion.h"

namespace kvcompress {
namespace {

absl::StatusOr<ChannelLease> LeaseListenedChannel(const ChannelEnvironment& environment,
                                                  const CallIdentity& identity,
                                                  const v1::ReceiveForwardedRequest& request) {
  if (absl::Status access = CheckChannelAccess(environment, identity, v1::TRANSPORT_NCCL);
      !access.ok()) {
    return access;
  }
  absl::StatusOr<ChannelLease> lease =
      environment.registry->Acquire(request.channel_id(), ChannelOwnerFor(identity));
  if (!lease.ok()) return lease.status();
  if ((*lease)->resources().forward_outbox() == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat(
        "channel_id: channel ", request.channel_id(),
        " is not an nccl channel opened with CHANNEL_DIRECTION_FROM_KVCD; only those receive "
        "forwarded caches"));
  }
  return lease;
}

}  // namespace

ForwardListenerReactor::ForwardListenerReactor(const ChannelEnvironment& environment,
                                               absl::StatusOr<CallIdentity> identity,
                                               const v1::ReceiveForwardedRequest& request) {
  absl::Status status = identity.status();
  if (status.ok()) {
    absl::StatusOr<ChannelLease> lease = LeaseListenedChannel(environment, *identity, request);
    status = lease.status();
    if (lease.ok()) {
      channel_ = std::move(lease).value();
      ForwardOutbox* outbox = channel_->resources().forward_outbox();
      status = outbox->Attach(this);
      if (status.ok()) outbox_ = outbox;
    }
  }
  if (!status.ok()) {
    channel_.Reset();
    absl::MutexLock lock(&mu_);
    finish_called_ = true;
    Finish(ToGrpcStatus(status));
  }
}

void ForwardListenerReactor::Post(v1::ForwardNotice notice) {
  absl::MutexLock lock(&mu_);
  if (closing_ || finish_called_) return;
  queue_.push_back(std::move(notice));
  Continue();
}

void ForwardListenerReactor::Close(const absl::Status& status) {
  absl::MutexLock lock(&mu_);
  if (closing_) return;
  closing_ = true;
  close_status_ = status;
  // What is queued still goes out: those notices' transfers were enqueued before the failure.
  Continue();
}

void ForwardListenerReactor::Continue() {
  if (finish_called_ || write_in_flight_) return;
  if (!queue_.empty()) {
    write_in_flight_ = true;
    StartWrite(&queue_.front());
    return;
  }
  if (closing_) {
    finish_called_ = true;
    Finish(ToGrpcStatus(close_status_));
  }
}

void ForwardListenerReactor::OnWriteDone(bool ok) {
  bool failed = false;
  {
    absl::MutexLock lock(&mu_);
    write_in_flight_ = false;
    if (!queue_.empty()) queue_.pop_front();
    if (!ok) {
      failed = true;
      queue_.clear();
      if (!closing_) {
        closing_ = true;
        close_status_ = absl::CancelledError("the listener stopped receiving");
      }
    }
    Continue();
  }
  if (failed) DetachFromOutbox();
}

void ForwardListenerReactor::OnCancel() {
  {
    absl::MutexLock lock(&mu_);
    queue_.clear();
    if (!closing_) {
      closing_ = true;
      close_status_ = absl::CancelledError("the listener cancelled its stream");
    }
  }
  DetachFromOutbox();
  absl::MutexLock lock(&mu_);
  Continue();
}

void ForwardListenerReactor::DetachFromOutbox() {
  if (outbox_ != nullptr) outbox_->Detach(this);
}

void ForwardListenerReactor::OnDone() {
  // After Detach no outbox callback can reach this object any more.
  DetachFromOutbox();
  channel_.Reset();
  delete this;
}

}  // namespace kvcompress
