#include "service/channel_rpcs.h"

#include <atomic>
#include <memory>
#include <string>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/service/fake_nccl_link.h"
#include "tests/service/host_regions.h"

namespace kvcompress {
namespace {

using ::testing::HasSubstr;

std::atomic<int> released{0};

class ChannelRpcsTest : public ::testing::Test {
 protected:
  ChannelRpcsTest() : registry_(ChannelRegistryOptions{}), backend_(MakeCpuBackend(1)) {
    environment_.registry = &registry_;
    environment_.device_backend = backend_.get();
    environment_.allow_cuda_ipc = true;
    environment_.authentication_configured = true;
    environment_.cuda_ipc_compiled = true;
    environment_.cuda_ipc_resources =
        [](Backend&) -> absl::StatusOr<std::unique_ptr<ChannelResources>> {
      return std::make_unique<testing::HostRegions>(&released, /*require_ipc_handle=*/true);
    };
    token_.authenticated = token_.token_checked = true;
    cert_.authenticated = cert_.certificate_verified = true;
    cert_.certificate_subject = "prefill-0";
  }

  static v1::OpenChannelRequest Request(int regions = 0) {
    v1::OpenChannelRequest request;
    request.set_transport(v1::TRANSPORT_CUDA_IPC);
    for (int i = 0; i < regions; ++i) {
      v1::CudaIpcRegion& region = *request.add_regions();
      region.set_ipc_handle(std::string(64, 'h'));
      region.set_size_bytes(4096);
      region.set_device_ordinal(0);
    }
    return request;
  }

  ChannelRegistry registry_;
  std::unique_ptr<Backend> backend_;
  ChannelEnvironment environment_;
  CallIdentity anonymous_, token_, cert_;
};

TEST_F(ChannelRpcsTest, OpensRegistersUsesAndClosesForTheOwner) {
  absl::StatusOr<v1::OpenChannelResponse> opened = OpenChannel(environment_, token_, Request(2));
  ASSERT_TRUE(opened.ok()) << opened.status();
  EXPECT_EQ(opened->channel_id().size(), 32u);
  EXPECT_EQ(opened->idle_timeout_seconds(), 300u);
  EXPECT_THAT(opened->region_ids(), ::testing::ElementsAre(0, 1));
  EXPECT_EQ(registry_.OpenChannels("cuda_ipc"), 1u);

  v1::RegisterRegionRequest more;
  more.set_channel_id(opened->channel_id());
  *more.mutable_region() = Request(1).regions(0);
  absl::StatusOr<v1::RegisterRegionResponse> region = RegisterRegion(environment_, token_, more);
  ASSERT_TRUE(region.ok()) << region.status();
  EXPECT_EQ(region->region_id(), 2u);
  EXPECT_EQ(RegisterRegion(environment_, cert_, more).status().code(),
            absl::StatusCode::kPermissionDenied);

  v1::CompressHeader header;
  header.set_transport(v1::TRANSPORT_CUDA_IPC);
  header.set_channel_id(opened->channel_id());
  EXPECT_TRUE(AcquireStreamChannel(environment_, token_, header).ok());
  EXPECT_EQ(AcquireStreamChannel(environment_, cert_, header).status().code(),
            absl::StatusCode::kPermissionDenied);
  header.clear_channel_id();
  EXPECT_THAT(AcquireStreamChannel(environment_, token_, header).status().message(),
              HasSubstr("channel_id: empty"));

  v1::CloseChannelRequest close;
  close.set_channel_id(opened->channel_id());
  EXPECT_EQ(CloseChannel(environment_, cert_, close).code(), absl::StatusCode::kPermissionDenied);
  const int before = released.load();
  EXPECT_TRUE(CloseChannel(environment_, token_, close).ok());
  EXPECT_EQ(released.load(), before + 1);
  EXPECT_EQ(CloseChannel(environment_, token_, close).code(),
            absl::StatusCode::kFailedPrecondition);
  header.set_channel_id(opened->channel_id());
  EXPECT_EQ(AcquireStreamChannel(environment_, token_, header).status().code(),
            absl::StatusCode::kFailedPrecondition);
}

TEST_F(ChannelRpcsTest, ABadRegionFailsTheOpenAndLeavesNoChannel) {
  v1::OpenChannelRequest request = Request(2);
  request.mutable_regions(1)->set_ipc_handle("short");
  absl::StatusOr<v1::OpenChannelResponse> opened = OpenChannel(environment_, token_, request);
  EXPECT_EQ(opened.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(opened.status().message(), HasSubstr("regions[1]: "));
  EXPECT_EQ(registry_.OpenChannels(), 0u);
}

TEST_F(ChannelRpcsTest, RefusalsSayWhy) {
  // Unauthenticated peers of a kvcd that requires authentication.
  EXPECT_EQ(OpenChannel(environment_, anonymous_, Request()).status().code(),
            absl::StatusCode::kUnauthenticated);
  // A kvcd without any authentication, started with --allow_cuda_ipc, lets them in.
  environment_.authentication_configured = false;
  absl::StatusOr<v1::OpenChannelResponse> anonymous =
      OpenChannel(environment_, anonymous_, Request());
  ASSERT_TRUE(anonymous.ok()) << anonymous.status();
  // ... but not without --allow_cuda_ipc.
  environment_.allow_cuda_ipc = false;
  absl::Status disabled = OpenChannel(environment_, token_, Request()).status();
  EXPECT_EQ(disabled.code(), absl::StatusCode::kUnimplemented);
  EXPECT_THAT(disabled.message(), HasSubstr("--allow_cuda_ipc"));
  environment_.allow_cuda_ipc = true;
  // Without the cuda backend.
  environment_.device_backend = nullptr;
  EXPECT_THAT(OpenChannel(environment_, token_, Request()).status().message(),
              HasSubstr("--backend=cuda"));
  // Builds without CUDA.
  environment_.cuda_ipc_compiled = false;
  EXPECT_EQ(OpenChannel(environment_, token_, Request()).status().code(),
            absl::StatusCode::kUnimplemented);
  // Other transports.
  v1::OpenChannelRequest nccl = Request();
  nccl.set_transport(v1::TRANSPORT_NCCL);
  EXPECT_EQ(OpenChannel(environment_, token_, nccl).status().code(),
            absl::StatusCode::kUnimplemented);
  v1::OpenChannelRequest inline_request = Request();
  inline_request.set_transport(v1::TRANSPORT_INLINE);
  EXPECT_EQ(OpenChannel(environment_, token_, inline_request).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(ChannelRpcsRealTransportTest, WithoutCudaTheTransportIsUnimplemented) {
  ChannelRegistry registry(ChannelRegistryOptions{});
  ChannelEnvironment environment;
  environment.registry = &registry;
  environment.allow_cuda_ipc = true;
  std::unique_ptr<Backend> cpu = MakeCpuBackend(1);
  environment.device_backend = cpu.get();
  v1::OpenChannelRequest request;
  request.set_transport(v1::TRANSPORT_CUDA_IPC);
  absl::Status status = OpenChannel(environment, CallIdentity(), request).status();
  if (CudaIpcCompiled()) {
    // The CUDA build refuses the cpu backend.
    EXPECT_EQ(status.code(), absl::StatusCode::kFailedPrecondition) << status;
    EXPECT_THAT(status.message(), HasSubstr("cuda backend"));
  } else {
    EXPECT_EQ(status.code(), absl::StatusCode::kUnimplemented) << status;
    EXPECT_THAT(status.message(), HasSubstr("built without CUDA"));
  }
}

}  // namespace
}  // namespace kvcompress

namespace kvcompress {
namespace {

using ::kvcompress::testing::FakeNcclLink;
using ::testing::HasSubstr;

class RecordingListener final : public ForwardListener {
 public:
  void Post(v1::ForwardNotice) override {}
  void Close(const absl::Status&) override {}
};

class NcclChannelRpcsTest : public ::testing::Test {
 protected:
  NcclChannelRpcsTest() : registry_(ChannelRegistryOptions{}), backend_(MakeCpuBackend(1)) {
    environment_.registry = &registry_;
    environment_.device_backend = backend_.get();
    environment_.allow_nccl = true;
    environment_.nccl_compiled = true;
    environment_.authentication_configured = true;
    environment_.nccl_links =
        [this](Backend&, absl::string_view unique_id,
               ChannelDirection direction) -> absl::StatusOr<std::unique_ptr<NcclLink>> {
      last_unique_id_ = std::string(unique_id);
      auto link = std::make_unique<FakeNcclLink>(direction);
      links_.push_back(link.get());
      return std::unique_ptr<NcclLink>(std::move(link));
    };
    prefill_.authenticated = prefill_.certificate_verified = true;
    prefill_.certificate_subject = "prefill-0";
    decode_.authenticated = decode_.certificate_verified = true;
    decode_.certificate_subject = "decode-0";
  }

  static v1::OpenChannelRequest Request(v1::ChannelDirection direction) {
    v1::OpenChannelRequest request;
    request.set_transport(v1::TRANSPORT_NCCL);
    request.mutable_nccl()->set_unique_id(std::string(kNcclUniqueIdBytes, 'u'));
    request.mutable_nccl()->set_direction(direction);
    return request;
  }

  std::string Open(const CallIdentity& who, v1::ChannelDirection direction) {
    absl::StatusOr<v1::OpenChannelResponse> opened =
        OpenChannel(environment_, who, Request(direction));
    EXPECT_TRUE(opened.ok()) << opened.status();
    return opened.ok() ? opened->channel_id() : "";
  }

  ChannelRegistry registry_;
  std::unique_ptr<Backend> backend_;
  ChannelEnvironment environment_;
  CallIdentity anonymous_, prefill_, decode_;
  std::string last_unique_id_;
  std::vector<FakeNcclLink*> links_;
};

TEST_F(NcclChannelRpcsTest, OpensWithTheClientsUniqueIdAndDirection) {
  const std::string id = Open(prefill_, v1::CHANNEL_DIRECTION_TO_KVCD);
  EXPECT_EQ(last_unique_id_, std::string(kNcclUniqueIdBytes, 'u'));
  EXPECT_EQ(registry_.OpenChannels("nccl"), 1u);
  ASSERT_EQ(links_.size(), 1u);
  EXPECT_EQ(links_[0]->direction(), ChannelDirection::kToKvcd);
  Open(decode_, v1::CHANNEL_DIRECTION_FROM_KVCD);
  EXPECT_EQ(links_[1]->direction(), ChannelDirection::kFromKvcd);
  // Regions are for cuda_ipc channels.
  v1::RegisterRegionRequest region;
  region.set_channel_id(id);
  region.mutable_region()->set_ipc_handle(std::string(64, 'h'));
  region.mutable_region()->set_size_bytes(64);
  EXPECT_EQ(RegisterRegion(environment_, prefill_, region).status().code(),
            absl::StatusCode::kFailedPrecondition);
  // Closing aborts the communicator.
  v1::CloseChannelRequest close;
  close.set_channel_id(id);
  ASSERT_TRUE(CloseChannel(environment_, prefill_, close).ok());
  EXPECT_TRUE(links_[0]->aborted());
}

TEST_F(NcclChannelRpcsTest, RefusesBadRequestsNamingTheField) {
  v1::OpenChannelRequest missing = Request(v1::CHANNEL_DIRECTION_TO_KVCD);
  missing.clear_nccl();
  absl::Status status = OpenChannel(environment_, prefill_, missing).status();
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(status.message(), HasSubstr("nccl.unique_id"));

  v1::OpenChannelRequest short_id = Request(v1::CHANNEL_DIRECTION_TO_KVCD);
  short_id.mutable_nccl()->set_unique_id("abc");
  status = OpenChannel(environment_, prefill_, short_id).status();
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(status.message(), HasSubstr("128 bytes"));

  v1::OpenChannelRequest bad_direction = Request(v1::CHANNEL_DIRECTION_TO_KVCD);
  bad_direction.mutable_nccl()->set_direction(static_cast<v1::ChannelDirection>(9));
  EXPECT_EQ(OpenChannel(environment_, prefill_, bad_direction).status().code(),
            absl::StatusCode::kInvalidArgument);

  v1::OpenChannelRequest with_regions = Request(v1::CHANNEL_DIRECTION_TO_KVCD);
  with_regions.add_regions()->set_size_bytes(1);
  EXPECT_EQ(OpenChannel(environment_, prefill_, with_regions).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(links_.empty());
  EXPECT_EQ(registry_.OpenChannels(), 0u);
}

TEST_F(NcclChannelRpcsTest, TheOperatorEnablesNcclAndPeersMustBeAuthenticated) {
  environment_.allow_nccl = false;
  absl::Status status =
      OpenChannel(environment_, prefill_, Request(v1::CHANNEL_DIRECTION_TO_KVCD)).status();
  EXPECT_EQ(status.code(), absl::StatusCode::kUnimplemented);
  EXPECT_THAT(status.message(), HasSubstr("--allow_nccl"));
  environment_.allow_nccl = true;
  EXPECT_EQ(
      OpenChannel(environment_, anonymous_, Request(v1::CHANNEL_DIRECTION_TO_KVCD)).status().code(),
      absl::StatusCode::kUnauthenticated);
  environment_.nccl_compiled = false;
  status = OpenChannel(environment_, prefill_, Request(v1::CHANNEL_DIRECTION_TO_KVCD)).status();
  EXPECT_EQ(status.code(), absl::StatusCode::kUnimplemented);
  EXPECT_THAT(status.message(), HasSubstr("NCCL"));
}

TEST_F(NcclChannelRpcsTest, StreamsUseOnlyTheirOwnToKvcdChannels) {
  const std::string in = Open(prefill_, v1::CHANNEL_DIRECTION_TO_KVCD);
  const std::string out = Open(decode_, v1::CHANNEL_DIRECTION_FROM_KVCD);
  v1::CompressHeader header;
  header.set_transport(v1::TRANSPORT_NCCL);
  header.set_channel_id(in);
  EXPECT_TRUE(AcquireStreamChannel(environment_, prefill_, header).ok());
  EXPECT_EQ(AcquireStreamChannel(environment_, decode_, header).status().code(),
            absl::StatusCode::kPermissionDenied);
  // A FROM_KVCD channel receives forwarded caches; it carries none in.
  header.set_channel_id(out);
  absl::Status status = AcquireStreamChannel(environment_, decode_, header).status();
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(status.message(), HasSubstr("CHANNEL_DIRECTION_TO_KVCD"));
  // The header's transport must be the channel's.
  header.set_channel_id(in);
  header.set_transport(v1::TRANSPORT_CUDA_IPC);
  environment_.allow_cuda_ipc = environment_.cuda_ipc_compiled = true;
  status = AcquireStreamChannel(environment_, prefill_, header).status();
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(status.message(), HasSubstr("is a nccl channel"));
}

TEST_F(NcclChannelRpcsTest, ForwardingNeedsTheIdOfAListeningFromKvcdChannel) {
  const std::string in = Open(prefill_, v1::CHANNEL_DIRECTION_TO_KVCD);
  const std::string out = Open(decode_, v1::CHANNEL_DIRECTION_FROM_KVCD);
  v1::CompressHeader header;
  header.set_forward_channel_id("00000000000000000000000000000000");
  absl::Status status = AcquireForwardChannel(environment_, prefill_, header).status();
  EXPECT_EQ(status.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(status.message(), HasSubstr("forward_channel_id"));

  header.set_forward_channel_id(in);
  EXPECT_EQ(AcquireForwardChannel(environment_, prefill_, header).status().code(),
            absl::StatusCode::kInvalidArgument);

  header.set_forward_channel_id(out);
  status = AcquireForwardChannel(environment_, prefill_, header).status();
  EXPECT_EQ(status.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(status.message(), HasSubstr("ReceiveForwarded"));

  // Once the decode worker listens, another principal holding the id may forward into it.
  absl::StatusOr<ChannelLease> listened = registry_.Acquire(out, ChannelOwnerFor(decode_));
  ASSERT_TRUE(listened.ok());
  RecordingListener listener;
  ASSERT_TRUE((*listened)->resources().forward_outbox()->Attach(&listener).ok());
  EXPECT_TRUE(AcquireForwardChannel(environment_, prefill_, header).ok());
  // Unauthenticated peers may not, where kvcd requires authentication.
  EXPECT_EQ(AcquireForwardChannel(environment_, anonymous_, header).status().code(),
            absl::StatusCode::kUnauthenticated);
  (*listened)->resources().forward_outbox()->Detach(&listener);
}

}  // namespace
}  // namespace kvcompress
