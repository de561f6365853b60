// NcclLink: kvcd's end of an nccl channel, a 2-rank NCCL communicator with one client (the
// client is rank 0, kvcd rank 1), seen through an interface free of CUDA and NCCL types so
// that the rules built on it (ForwardOutbox, the channel RPCs) are tested on the CPU. The
// implementation lives in nccl_transport.cc; tests substitute their own.
//
// Every transfer is bounded: Enqueue* waits for the communicator to be formed until its
// deadline, NcclTransfer::Wait until its own; a wait that runs out aborts the communicator
// (ncclCommAbort) and answers DEADLINE_EXCEEDED, after which every call on the link answers
// FAILED_PRECONDITION ("channel aborted": the client must open a new channel). A peer that
// dies mid-transfer therefore fails the request within its deadline and never hangs kvcd.
//
// Thread safety: all members are thread-safe; transfers enqueued by different threads are
// ordered by the order of their Enqueue* calls.
#ifndef KVCOMPRESS_SERVICE_NCCL_LINK_H_
#define KVCOMPRESS_SERVICE_NCCL_LINK_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"

namespace kvcompress {

// Which way an nccl channel's data flows (v1::ChannelDirection).
enum class ChannelDirection {
  kToKvcd,    // the client sends caches to compress
  kFromKvcd,  // kvcd forwards compressed caches to the client (a decode worker)
};

// Device memory on kvcd's device.
struct DeviceSpan {
  std::byte* data = nullptr;
  uint64_t bytes = 0;
};

// One enqueued group of sends or receives.
class NcclTransfer {
 public:
  virtual ~NcclTransfer() = default;
  // Blocks until the transfer has completed on the device (OK), the link failed (INTERNAL /
  // FAILED_PRECONDITION) or `deadline` passed (DEADLINE_EXCEEDED; the link is aborted).
  virtual absl::Status Wait(absl::Time deadline) = 0;
};

class NcclLink {
 public:
  virtual ~NcclLink() = default;

  virtual ChannelDirection direction() const = 0;

  // Enqueues one ncclSend (uint8) per span to the client, in order, as one group.
  virtual absl::StatusOr<std::unique_ptr<NcclTransfer>> EnqueueSends(
      std::span<const DeviceSpan> tensors, absl::Time deadline) = 0;
  // Enqueues one ncclRecv (uint8) per span from the client, in order, as one group.
  virtual absl::StatusOr<std::unique_ptr<NcclTransfer>> EnqueueReceives(
      std::span<const DeviceSpan> tensors, absl::Time deadline) = 0;

  // Aborts the communicator (idempotent); `reason` is kept for later errors.
  virtual void Abort(absl::string_view reason) = 0;
  virtual bool aborted() const = 0;
  // Why the link was aborted; empty while it is not.
  virtual std::string abort_reason() const = 0;
};

}  // namespace kvcompress

#endif  // KVCOMPRESS_SERVICE_NCCL_LINK_H_
