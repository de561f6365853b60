#include "service/channel_registry.h"

#include <atomic>
#include <memory>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/match.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace kvcompress {
namespace {

using ::testing::HasSubstr;

// Counts releases; regions are slices of a host buffer standing in for device memory.
struct ResourceLog {
  std::atomic<int> releases{0};
  std::atomic<int> opened{0};
};

class FakeResources final : public ChannelResources {
 public:
  explicit FakeResources(std::shared_ptr<ResourceLog> log) : log_(std::move(log)) {}
  absl::StatusOr<std::byte*> OpenRegion(const RegionDescriptor& region) override {
    if (region.ipc_handle == "bad") return absl::InvalidArgumentError("region ipc_handle: bad");
    memory_.emplace_back(std::make_unique<std::byte[]>(region.size_bytes));
    ++log_->opened;
    return memory_.back().get();
  }
  void Release() override { ++log_->releases; }

 private:
  std::shared_ptr<ResourceLog> log_;
  std::vector<std::unique_ptr<std::byte[]>> memory_;
};

// A clock the test moves by hand.
struct FakeClock {
  absl::Time now = absl::FromUnixSeconds(1'000'000);
  std::function<absl::Time()> Function() {
    return [this] { return now; };
  }
};

ChannelRegistryOptions Options(FakeClock& clock, size_t max_channels = 4) {
  ChannelRegistryOptions options;
  options.max_channels = max_channels;
  options.idle_timeout = absl::Minutes(5);
  options.max_regions_per_channel = 3;
  options.clock = clock.Function();
  return options;
}

std::shared_ptr<Channel> MustOpen(ChannelRegistry& registry, const std::string& owner,
                                  std::shared_ptr<ResourceLog> log,
                                  absl::Duration idle = absl::ZeroDuration()) {
  absl::StatusOr<std::shared_ptr<Channel>> channel =
      registry.Open("cuda_ipc", owner, idle, std::make_unique<FakeResources>(std::move(log)));
  EXPECT_TRUE(channel.ok()) << channel.status();
  return channel.ok() ? *channel : nullptr;
}

TEST(ChannelOwnerForTest, CertificateThenTokenThenAnonymous) {
  CallIdentity identity;
  EXPECT_EQ(ChannelOwnerFor(identity), "anonymous");
  identity.token_checked = true;
  identity.authenticated = true;
  EXPECT_EQ(ChannelOwnerFor(identity), "token");
  identity.certificate_verified = true;
  identity.certificate_subject = "prefill-7";
  EXPECT_EQ(ChannelOwnerFor(identity), "cert:prefill-7");
}

TEST(ChannelRegistryTest, IdsAreUnguessableHexAndDistinct) {
  FakeClock clock;
  ChannelRegistry registry(Options(clock, 100));
  auto log = std::make_shared<ResourceLog>();
  std::set<std::string> ids;
  for (int i = 0; i < 50; ++i) {
    std::shared_ptr<Channel> channel = MustOpen(registry, "token", log);
    ASSERT_NE(channel, nullptr);
    EXPECT_EQ(channel->id().size(), 32u);
    EXPECT_EQ(channel->id().find_first_not_of("0123456789abcdef"), std::string::npos);
    ids.insert(channel->id());
  }
  EXPECT_EQ(ids.size(), 50u);
  EXPECT_EQ(registry.OpenChannels("cuda_ipc"), 50u);
  EXPECT_EQ(registry.OpenChannels("nccl"), 0u);
}

TEST(ChannelRegistryTest, OnlyTheOwnerMayUseOrCloseAChannel) {
  FakeClock clock;
  ChannelRegistry registry(Options(clock));
  auto log = std::make_shared<ResourceLog>();
  const std::string id = MustOpen(registry, "cert:a", log)->id();

  absl::StatusOr<ChannelLease> foreign = registry.Acquire(id, "cert:b");
  EXPECT_EQ(foreign.status().code(), absl::StatusCode::kPermissionDenied);
  EXPECT_THAT(foreign.status().message(), HasSubstr("another client"));
  EXPECT_EQ(registry.Close(id, "token").code(), absl::StatusCode::kPermissionDenied);

  EXPECT_TRUE(registry.Acquire(id, "cert:a").ok());
  EXPECT_TRUE(registry.Close(id, "cert:a").ok());
  EXPECT_EQ(log->releases.load(), 1);
}

TEST(ChannelRegistryTest, UnknownChannelIsFailedPrecondition) {
  FakeClock clock;
  ChannelRegistry registry(Options(clock));
  absl::StatusOr<ChannelLease> lease = registry.Acquire("00112233445566778899aabbccddeeff", "x");
  EXPECT_EQ(lease.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(lease.status().message(), HasSubstr("not open on this kvcd"));
  EXPECT_EQ(registry.Close("nope", "x").code(), absl::StatusCode::kFailedPrecondition);
}

TEST(ChannelRegistryTest, IdleChannelsExpireAfterTheirTimeout) {
  FakeClock clock;
  ChannelRegistry registry(Options(clock));
  auto log = std::make_shared<ResourceLog>();
  const std::string id = MustOpen(registry, "token", log)->id();
  const std::string short_id = MustOpen(registry, "token", log, absl::Seconds(10))->id();
  // A request above the server's timeout is capped at it.
  EXPECT_EQ(MustOpen(registry, "token", log, absl::Hours(3))->idle_timeout(), absl::Minutes(5));

  clock.now += absl::Seconds(11);
  EXPECT_EQ(registry.ExpireIdle(), 1);
  EXPECT_EQ(log->releases.load(), 1);
  EXPECT_EQ(registry.Acquire(short_id, "token").status().code(),
            absl::StatusCode::kFailedPrecondition);

  // Use restarts the idle clock.
  clock.now += absl::Minutes(4);
  ASSERT_TRUE(registry.Acquire(id, "token").ok());  // the lease ends at once
  clock.now += absl::Minutes(4);
  EXPECT_EQ(registry.ExpireIdle(), 1);  // the capped one, idle 8 min 11 s
  EXPECT_TRUE(registry.Acquire(id, "token").ok());
  clock.now += absl::Minutes(5);
  EXPECT_EQ(registry.ExpireIdle(), 1);
  EXPECT_EQ(log->releases.load(), 3);
  EXPECT_EQ(registry.OpenChannels(), 0u);
}

TEST(ChannelRegistryTest, LeasedChannelsNeverExpireAndCloseWaitsForTheLastLease) {
  FakeClock clock;
  ChannelRegistry registry(Options(clock));
  auto log = std::make_shared<ResourceLog>();
  const std::string id = MustOpen(registry, "token", log)->id();
  absl::StatusOr<ChannelLease> lease = registry.Acquire(id, "token");
  ASSERT_TRUE(lease.ok());
  clock.now += absl::Hours(1);
  EXPECT_EQ(registry.ExpireIdle(), 0);

  // Closing removes it for new callers but keeps the resources for the stream using them.
  ASSERT_TRUE(registry.Close(id, "token").ok());
  EXPECT_EQ(registry.OpenChannels(), 0u);
  EXPECT_EQ(registry.Acquire(id, "token").status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(log->releases.load(), 0);
  lease->Reset();
  EXPECT_EQ(log->releases.load(), 1);
  lease->Reset();
  EXPECT_EQ(log->releases.load(), 1);
}

TEST(ChannelRegistryTest, AfterTheLeaseEndsTheIdleClockStartsAgain) {
  FakeClock clock;
  ChannelRegistry registry(Options(clock));
  auto log = std::make_shared<ResourceLog>();
  const std::string id = MustOpen(registry, "token", log)->id();
  {
    absl::StatusOr<ChannelLease> lease = registry.Acquire(id, "token");
    ASSERT_TRUE(lease.ok());
    clock.now += absl::Hours(1);
  }
  EXPECT_EQ(registry.ExpireIdle(), 0);
  clock.now += absl::Minutes(5);
  EXPECT_EQ(registry.ExpireIdle(), 1);
  EXPECT_EQ(log->releases.load(), 1);
}

TEST(ChannelRegistryTest, MaxChannelsIsResourceExhaustedAndFreesTheRefusedResources) {
  FakeClock clock;
  ChannelRegistry registry(Options(clock, 2));
  auto log = std::make_shared<ResourceLog>();
  MustOpen(registry, "token", log);
  MustOpen(registry, "token", log);
  absl::StatusOr<std::shared_ptr<Channel>> third = registry.Open(
      "cuda_ipc", "token", absl::ZeroDuration(), std::make_unique<FakeResources>(log));
  EXPECT_EQ(third.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(third.status().message(), HasSubstr("--max_channels 2"));
  EXPECT_EQ(log->releases.load(), 1);
  // Idle channels make room.
  clock.now += absl::Minutes(6);
  EXPECT_TRUE(
      registry.Open("cuda_ipc", "token", absl::ZeroDuration(), std::make_unique<FakeResources>(log))
          .ok());
  EXPECT_EQ(log->releases.load(), 3);
}

TEST(ChannelRegistryTest, RegionsAreBoundsAndAlignmentChecked) {
  FakeClock clock;
  ChannelRegistry registry(Options(clock));
  auto log = std::make_shared<ResourceLog>();
  std::shared_ptr<Channel> channel = MustOpen(registry, "token", log);
  RegionDescriptor region;
  region.ipc_handle = "h";
  region.size_bytes = 1024;
  absl::StatusOr<uint32_t> id = channel->AddRegion(region, 3);
  ASSERT_TRUE(id.ok()) << id.status();
  EXPECT_EQ(*id, 0u);

  absl::StatusOr<std::byte*> whole = channel->ResolveSlice(0, 0, 1024, 1024, "keys");
  ASSERT_TRUE(whole.ok());
  absl::StatusOr<std::byte*> tail = channel->ResolveSlice(0, 512, 512, 512, "keys");
  ASSERT_TRUE(tail.ok());
  EXPECT_EQ(*tail - *whole, 512);

  const auto code_and_message = [&](uint32_t r, uint64_t offset, uint64_t bytes,
                                    uint64_t expected) {
    absl::StatusOr<std::byte*> slice =
        channel->ResolveSlice(r, offset, bytes, expected, "sequence 1 layer 2 values");
    EXPECT_FALSE(slice.ok());
    EXPECT_EQ(slice.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(slice.status().message(), HasSubstr("sequence 1 layer 2 values"));
    return std::string(slice.status().message());
  };
  EXPECT_THAT(code_and_message(0, 528, 512, 512), HasSubstr("outside region 0 (1024 bytes)"));
  EXPECT_THAT(code_and_message(0, 8, 16, 16), HasSubstr("not a multiple of 16"));
  EXPECT_THAT(code_and_message(0, 0, 100, 128), HasSubstr("expected 128 bytes"));
  EXPECT_THAT(code_and_message(1, 0, 16, 16), HasSubstr("region 1 is not registered"));
  // Offsets near 2^64 do not wrap around.
  EXPECT_THAT(code_and_message(0, ~uint64_t{15}, 32, 32), HasSubstr("outside region 0"));

  RegionDescriptor empty;
  EXPECT_EQ(channel->AddRegion(empty, 3).status().code(), absl::StatusCode::kInvalidArgument);
  RegionDescriptor bad = region;
  bad.ipc_handle = "bad";
  EXPECT_EQ(channel->AddRegion(bad, 3).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(channel->AddRegion(region, 3).ok());  // the failure left the channel usable
  EXPECT_TRUE(channel->AddRegion(region, 3).ok());
  EXPECT_EQ(channel->AddRegion(region, 3).status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(channel->num_regions(), 3u);
}

TEST(ChannelRegistryTest, DestroyingTheRegistryReleasesEveryChannelOnce) {
  FakeClock clock;
  auto log = std::make_shared<ResourceLog>();
  {
    ChannelRegistry registry(Options(clock));
    MustOpen(registry, "token", log);
    MustOpen(registry, "anonymous", log);
  }
  EXPECT_EQ(log->releases.load(), 2);
}

TEST(ChannelRegistryTest, ReaperExpiresIdleChannels) {
  ChannelRegistryOptions options;
  options.idle_timeout = absl::Milliseconds(20);
  ChannelRegistry registry(options);
  auto log = std::make_shared<ResourceLog>();
  MustOpen(registry, "token", log);
  registry.StartReaper(absl::Milliseconds(5));
  for (int i = 0; i < 400 && log->releases.load() == 0; ++i) absl::SleepFor(absl::Milliseconds(5));
  EXPECT_EQ(log->releases.load(), 1);
  EXPECT_EQ(registry.OpenChannels(), 0u);
}

}  // namespace
}  // namespace kvcompress
