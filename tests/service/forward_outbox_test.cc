#include "service/forward_outbox.h"

#include <string>
#include <thread>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/service/fake_nccl_link.h"

namespace kvcompress {
namespace {

using ::kvcompress::testing::FakeNcclLink;
using ::testing::ElementsAre;
using ::testing::HasSubstr;

class RecordingListener final : public ForwardListener {
 public:
  void Post(v1::ForwardNotice notice) override { notices.push_back(std::move(notice)); }
  void Close(const absl::Status& status) override { closed_with.push_back(status); }

  std::vector<v1::ForwardNotice> notices;
  std::vector<absl::Status> closed_with;
};

v1::ForwardNotice LayerNotice(uint32_t layer) {
  v1::ForwardNotice notice;
  notice.mutable_layer()->set_request_id("r");
  notice.mutable_layer()->mutable_result()->set_layer(layer);
  return notice;
}

std::vector<DeviceSpan> Tensors(uint64_t keys, uint64_t values, uint64_t positions) {
  return {{nullptr, keys}, {nullptr, values}, {nullptr, positions}};
}

absl::Time Soon() { return absl::Now() + absl::Seconds(5); }

TEST(ForwardOutboxTest, AnnouncesEachLayerAndSendsItsTensorsInOneOrder) {
  FakeNcclLink link(ChannelDirection::kFromKvcd);
  ForwardOutbox outbox(link);
  RecordingListener listener;
  ASSERT_TRUE(outbox.Attach(&listener).ok());
  EXPECT_TRUE(outbox.has_listener());
  for (uint32_t layer = 0; layer < 3; ++layer) {
    ASSERT_TRUE(outbox.Deliver(LayerNotice(layer), Tensors(100 + layer, 200, 12), Soon()).ok());
  }
  v1::ForwardNotice end;
  end.mutable_end()->set_request_id("r");
  outbox.Post(end);

  ASSERT_EQ(listener.notices.size(), 4u);
  for (uint32_t layer = 0; layer < 3; ++layer) {
    EXPECT_EQ(listener.notices[layer].layer().result().layer(), layer);
  }
  EXPECT_TRUE(listener.notices[3].has_end());
  const std::vector<FakeNcclLink::Group> groups = link.groups();
  ASSERT_EQ(groups.size(), 3u);
  for (uint32_t layer = 0; layer < 3; ++layer) {
    EXPECT_TRUE(groups[layer].send);
    EXPECT_THAT(groups[layer].bytes, ElementsAre(100 + layer, 200, 12));
  }
  EXPECT_TRUE(listener.closed_with.empty());
  EXPECT_FALSE(link.aborted());
}

TEST(ForwardOutboxTest, LayersArrivingWhileAGroupIsEnqueuedGoOutAsOneGroup) {
  FakeNcclLink link(ChannelDirection::kFromKvcd);
  ForwardOutbox outbox(link);
  RecordingListener listener;
  ASSERT_TRUE(outbox.Attach(&listener).ok());
  link.HoldEnqueues(true);
  std::vector<std::thread> senders;
  // Layer 0 starts enqueueing and is held there; layers 1..3 queue behind it.
  senders.emplace_back(
      [&] { EXPECT_TRUE(outbox.Deliver(LayerNotice(0), Tensors(100, 200, 10), Soon()).ok()); });
  absl::SleepFor(absl::Milliseconds(100));
  for (uint32_t layer = 1; layer <= 3; ++layer) {
    senders.emplace_back([&, layer] {
      EXPECT_TRUE(
          outbox.Deliver(LayerNotice(layer), Tensors(100 + layer, 200 + layer, 10 + layer), Soon())
              .ok());
    });
  }
  absl::SleepFor(absl::Milliseconds(100));
  link.HoldEnqueues(false);
  for (std::thread& sender : senders) sender.join();

  const std::vector<FakeNcclLink::Group> groups = link.groups();
  ASSERT_EQ(groups.size(), 2u);  // layer 0, then 1..3 together
  EXPECT_THAT(groups[0].bytes, ElementsAre(100, 200, 10));
  ASSERT_EQ(groups[1].bytes.size(), 9u);
  // The notices come in the order of the tensors in the groups.
  ASSERT_EQ(listener.notices.size(), 4u);
  EXPECT_EQ(listener.notices[0].layer().result().layer(), 0u);
  for (size_t i = 1; i < 4; ++i) {
    const uint32_t layer = listener.notices[i].layer().result().layer();
    EXPECT_EQ(groups[1].bytes[3 * (i - 1)], 100 + layer);
    EXPECT_EQ(groups[1].bytes[3 * (i - 1) + 2], 10 + layer);
  }
}

TEST(ForwardOutboxTest, WithoutAListenerNothingIsSent) {
  FakeNcclLink link(ChannelDirection::kFromKvcd);
  ForwardOutbox outbox(link);
  const absl::Status status = outbox.Deliver(LayerNotice(0), Tensors(1, 1, 1), Soon());
  EXPECT_EQ(status.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(status.message(), HasSubstr("ReceiveForwarded"));
  EXPECT_TRUE(link.groups().empty());
}

TEST(ForwardOutboxTest, OneListenerAtATime) {
  FakeNcclLink link(ChannelDirection::kFromKvcd);
  ForwardOutbox outbox(link);
  RecordingListener first, second;
  ASSERT_TRUE(outbox.Attach(&first).ok());
  EXPECT_EQ(outbox.Attach(&second).code(), absl::StatusCode::kAlreadyExists);
  // Detaching someone who is not attached changes nothing.
  outbox.Detach(&second);
  EXPECT_TRUE(outbox.has_listener());
  EXPECT_FALSE(link.aborted());
}

TEST(ForwardOutboxTest, AListenerLeavingAbortsTheChannel) {
  FakeNcclLink link(ChannelDirection::kFromKvcd);
  ForwardOutbox outbox(link);
  RecordingListener listener, later;
  ASSERT_TRUE(outbox.Attach(&listener).ok());
  outbox.Detach(&listener);
  EXPECT_FALSE(outbox.has_listener());
  EXPECT_TRUE(link.aborted());
  EXPECT_THAT(link.abort_reason(), HasSubstr("listener went away"));
  // A new listener cannot pick up a byte stream in an unknown state.
  const absl::Status attach = outbox.Attach(&later);
  EXPECT_EQ(attach.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(attach.message(), HasSubstr("open a new channel"));
}

TEST(ForwardOutboxTest, AFailedEnqueueClosesTheListener) {
  FakeNcclLink link(ChannelDirection::kFromKvcd);
  ForwardOutbox outbox(link);
  RecordingListener listener;
  ASSERT_TRUE(outbox.Attach(&listener).ok());
  link.FailNextEnqueue();
  const absl::Status status = outbox.Deliver(LayerNotice(0), Tensors(1, 1, 1), Soon());
  EXPECT_EQ(status.code(), absl::StatusCode::kInternal);
  // Announced before the enqueue failed: the stream's end tells the listener its receives
  // will never complete.
  EXPECT_EQ(listener.notices.size(), 1u);
  ASSERT_EQ(listener.closed_with.size(), 1u);
  EXPECT_EQ(listener.closed_with[0].code(), absl::StatusCode::kInternal);
  EXPECT_FALSE(outbox.has_listener());
  EXPECT_EQ(outbox.Deliver(LayerNotice(1), Tensors(1, 1, 1), Soon()).code(),
            absl::StatusCode::kFailedPrecondition);
}

TEST(ForwardOutboxTest, AStalledTransferFailsByItsDeadlineAndAbortsTheChannel) {
  FakeNcclLink link(ChannelDirection::kFromKvcd);
  ForwardOutbox outbox(link);
  RecordingListener listener;
  ASSERT_TRUE(outbox.Attach(&listener).ok());
  link.StallTransfers();
  const absl::Time started = absl::Now();
  const absl::Status status =
      outbox.Deliver(LayerNotice(0), Tensors(1, 1, 1), absl::Now() + absl::Milliseconds(50));
  EXPECT_EQ(status.code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_LT(absl::Now() - started, absl::Seconds(5));
  ASSERT_EQ(listener.notices.size(), 1u);  // it was announced before it stalled
  ASSERT_EQ(listener.closed_with.size(), 1u);
  EXPECT_EQ(listener.closed_with[0].code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_TRUE(link.aborted());
}

}  // namespace
}  // namespace kvcompress
