// FakeNcclLink: an NcclLink without a GPU for the CPU tests of the rules built on it. It
// records every enqueued group (direction and sizes, in order), can be told to fail the next
// enqueue or to leave transfers pending (their Wait then runs into its deadline and aborts the
// link, as the real link does).
#ifndef KVCOMPRESS_TESTS_SERVICE_FAKE_NCCL_LINK_H_
#define KVCOMPRESS_TESTS_SERVICE_FAKE_NCCL_LINK_H_

#include <memory>
#include <string>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "service/nccl_link.h"

namespace kvcompress::testing {

class FakeNcclLink final : public NcclLink {
 public:
  struct Group {
    bool send = false;
    std::vector<uint64_t> bytes;
  };

  explicit FakeNcclLink(ChannelDirection direction) : direction_(direction) {}

  ChannelDirection direction() const override { return direction_; }

  absl::StatusOr<std::unique_ptr<NcclTransfer>> EnqueueSends(std::span<const DeviceSpan> tensors,
                                                             absl::Time /*deadline*/) override {
    return Enqueue(true, tensors);
  }
  absl::StatusOr<std::unique_ptr<NcclTransfer>> EnqueueReceives(std::span<const DeviceSpan> tensors,
                                                                absl::Time /*deadline*/) override {
    return Enqueue(false, tensors);
  }
  void Abort(absl::string_view reason) override {
    absl::MutexLock lock(&mu_);
    if (!aborted_) abort_reason_ = std::string(reason);
    aborted_ = true;
  }
  bool aborted() const override {
    absl::MutexLock lock(&mu_);
    return aborted_;
  }
  std::string abort_reason() const override {
    absl::MutexLock lock(&mu_);
    return abort_reason_;
  }

  // The next enqueue fails with INTERNAL (and aborts the link, as a failed group does).
  void FailNextEnqueue() {
    absl::MutexLock lock(&mu_);
    fail_next_ = true;
  }
  // Transfers from now on never complete: Wait runs into its deadline.
  void StallTransfers() {
    absl::MutexLock lock(&mu_);
    stalled_ = true;
  }
  // While held, enqueues block (a group being launched), so that concurrent callers queue.
  void HoldEnqueues(bool hold) {
    absl::MutexLock lock(&gate_mu_);
    held_ = hold;
  }
  std::vector<Group> groups() const {
    absl::MutexLock lock(&mu_);
    return groups_;
  }

 private:
  class Transfer final : public NcclTransfer {
   public:
    Transfer(FakeNcclLink& link, bool stalled) : link_(link), stalled_(stalled) {}
    absl::Status Wait(absl::Time deadline) override {
      if (link_.aborted()) return absl::FailedPreconditionError("nccl channel aborted");
      if (!stalled_) return absl::OkStatus();
      absl::SleepFor(std::max(absl::ZeroDuration(), deadline - absl::Now()));
      link_.Abort("a transfer did not complete by its deadline");
      return absl::DeadlineExceededError("nccl: a transfer did not complete by the deadline");
    }

   private:
    FakeNcclLink& link_;
    const bool stalled_;
  };

  absl::StatusOr<std::unique_ptr<NcclTransfer>> Enqueue(bool send,
                                                        std::span<const DeviceSpan> tensors) {
    {
      absl::MutexLock gate(&gate_mu_);
      gate_mu_.Await(absl::Condition(
          +[](bool* held) { return !*held; }, &held_));
    }
    absl::MutexLock lock(&mu_);
    if (aborted_) return absl::FailedPreconditionError("nccl channel aborted");
    if (fail_next_) {
      fail_next_ = false;
      aborted_ = true;
      abort_reason_ = "ncclSend failed";
      return absl::InternalError("nccl: ncclSend failed");
    }
    Group group{send, {}};
    for (const DeviceSpan& tensor : tensors) group.bytes.push_back(tensor.bytes);
    groups_.push_back(std::move(group));
    return std::unique_ptr<NcclTransfer>(new Transfer(*this, stalled_));
  }

  const ChannelDirection direction_;
  mutable absl::Mutex mu_;
  bool aborted_ ABSL_GUARDED_BY(mu_) = false;
  std::string abort_reason_ ABSL_GUARDED_BY(mu_);
  bool fail_next_ ABSL_GUARDED_BY(mu_) = false;
  bool stalled_ ABSL_GUARDED_BY(mu_) = false;
  std::vector<Group> groups_ ABSL_GUARDED_BY(mu_);
  absl::Mutex gate_mu_;
  bool held_ ABSL_GUARDED_BY(gate_mu_) = false;
};

}  // namespace kvcompress::testing

#endif  // KVCOMPRESS_TESTS_SERVICE_FAKE_NCCL_LINK_H_
