// ForwardListenerReactor: one ReceiveForwarded stream, the decode worker's end of forwarding.
// It leases the decode worker's nccl channel (so the channel cannot expire while its worker
// listens), attaches to the channel's ForwardOutbox, and writes the notices the outbox posts in
// order (an outgoing queue, one write in flight). The stream ends when the outbox closes it (a
// transfer failed: the channel was aborted), or when the decode worker cancels it or goes away
// — which detaches and aborts the channel, since what it was sent can no longer be received.
//
// Refusals, before anything is written: the channel access rules of OpenChannel (nccl),
// FAILED_PRECONDITION for an unknown channel, PERMISSION_DENIED for another client's,
// INVALID_ARGUMENT for a channel that is not nccl FROM_KVCD, ALREADY_EXISTS for a second
// listener.
//
// Thread safety: gRPC callbacks and outbox callbacks may run concurrently; state is guarded by
// mu_. The outbox calls Post and Close with its own lock held, so this reactor never calls
// the outbox while holding mu_ (the locks are always taken outbox first).
#ifndef KVCOMPRESS_SERVICE_FORWARD_LISTENER_H_
#define KVCOMPRESS_SERVICE_FORWARD_LISTENER_H_

#include <grpcpp/grpcpp.h>

#include <deque>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "kvcompress/v1/kvcompress.grpc.pb.h"
#include "service/call_authenticator.h"
#include "service/channel_registry.h"
#include "service/channel_rpcs.h"
#include "service/forward_outbox.h"

namespace kvcompress {

class ForwardListenerReactor final : public grpc::ServerWriteReactor<v1::ForwardNotice>,
                                     public ForwardListener {
 public:
  // `identity` is the authenticated caller, or the authentication failure to answer with.
  ForwardListenerReactor(const ChannelEnvironment& environment,
                         absl::StatusOr<CallIdentity> identity,
                         const v1::ReceiveForwardedRequest& request);

  // ForwardListener (called with the outbox's lock held).
  void Post(v1::ForwardNotice notice) override;
  void Close(const absl::Status& status) override;

  void OnWriteDone(bool ok) override;
  void OnCancel() override;
  void OnDone() override;

 private:
  ~ForwardListenerReactor() override = default;
  // Starts the next write or, once closing and idle, Finish.
  void Continue() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Leaves the outbox (aborting the channel) unless the outbox already let go of us.
  void DetachFromOutbox() ABSL_LOCKS_EXCLUDED(mu_);

  ChannelLease channel_;
  ForwardOutbox* outbox_ = nullptr;  // null when the stream was refused

  absl::Mutex mu_;
  std::deque<v1::ForwardNotice> queue_ ABSL_GUARDED_BY(mu_);
  bool write_in_flight_ ABSL_GUARDED_BY(mu_) = false;
  bool closing_ ABSL_GUARDED_BY(mu_) = false;
  absl::Status close_status_ ABSL_GUARDED_BY(mu_);
  bool finish_called_ ABSL_GUARDED_BY(mu_) = false;
};

}  // namespace kvcompress

#endif  // KVCOMPRESS_SERVICE_FORWARD_LISTENER_H_
