// ForwardOutbox: the delivery side of forwarding (CompressHeader.forward_channel_id). A decode
// worker opens an nccl channel with direction FROM_KVCD and listens on it with
// ReceiveForwarded; the listener's stream attaches here. Compress streams that forward into
// the channel call Deliver for each compressed layer: the ForwardNotice goes to the listener
// and the layer's tensors are enqueued on the channel's NcclLink in one step under the
// outbox's lock, so the listener sees notices in exactly the order of the transfers it must
// receive, however many prefill streams forward into the channel at once.
//
// Failure rules: no listener → FAILED_PRECONDITION (nothing is sent). A listener that goes
// away (Detach: the decode worker's stream ended) aborts the link: transfers already
// announced could never be received, and a later listener could not tell where the byte
// stream stands. A transfer that fails or outlives its deadline aborts the link too (in
// NcclTransfer::Wait) and closes the listener's stream with that status. After an abort every
// Deliver answers FAILED_PRECONDITION; the decode worker opens a new channel.
//
// Thread safety: thread-safe. Listener callbacks (Post, Close) run with the outbox's lock
// held and must not call back into the outbox.
#ifndef KVCOMPRESS_SERVICE_FORWARD_OUTBOX_H_
#define KVCOMPRESS_SERVICE_FORWARD_OUTBOX_H_

#include <deque>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "kvcompress/v1/kvcompress.pb.h"
#include "service/nccl_link.h"

namespace kvcompress {

// The ReceiveForwarded stream of a channel, as the outbox sees it.
class ForwardListener {
 public:
  virtual ~ForwardListener() = default;
  // Queues `notice` for the decode worker; never blocks.
  virtual void Post(v1::ForwardNotice notice) = 0;
  // Ends the stream with `status` (the channel is unusable).
  virtual void Close(const absl::Status& status) = 0;
};

class ForwardOutbox final {
 public:
  // `link` (FROM_KVCD) must outlive the outbox.
  explicit ForwardOutbox(NcclLink& link);

  // One listener at a time: ALREADY_EXISTS when one is attached, FAILED_PRECONDITION when the
  // link was aborted.
  absl::Status Attach(ForwardListener* listener);
  // Detaches `listener` (if it is the one attached) and aborts the link.
  void Detach(ForwardListener* listener);
  bool has_listener() const;

  // Announces `notice` (a ForwardNotice.layer) and sends `tensors` in one ordered step, then
  // waits for the transfer until `deadline`. On failure the listener is closed with it.
  // Concurrent calls are combined: while one caller enqueues a group, the layers that arrive
  // queue up and go out as the next group (one NCCL group launch for all of them), their
  // notices first, in queue order.
  absl::Status Deliver(v1::ForwardNotice notice, std::span<const DeviceSpan> tensors,
                       absl::Time deadline);
  // Several layers at once: `notices` in order, `tensors` every layer's tensors in the same
  // order, all in one group.
  absl::Status DeliverAll(std::vector<v1::ForwardNotice> notices, std::vector<DeviceSpan> tensors,
                          absl::Time deadline);
  // Announces a notice with no tensors (ForwardNotice.end); dropped without a listener.
  void Post(v1::ForwardNotice notice);

 private:
  struct Batch;
  struct Delivery;

  NcclLink& link_;
  mutable absl::Mutex mu_;
  ForwardListener* listener_ ABSL_GUARDED_BY(mu_) = nullptr;
  // Layers waiting for the caller that is enqueueing (flushing_) to take them.
  std::deque<std::shared_ptr<Delivery>> queue_ ABSL_GUARDED_BY(mu_);
  bool flushing_ ABSL_GUARDED_BY(mu_) = false;
};

}  // namespace kvcompress

#endif  // KVCOMPRESS_SERVICE_FORWARD_OUTBOX_H_
