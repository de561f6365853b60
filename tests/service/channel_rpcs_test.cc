#include "service/channel_rpcs.h"

#include <atomic>
#include <memory>
#include <string>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace kvcompress {
namespace {

using ::testing::HasSubstr;

std::atomic<int> released{0};

class HostRegions final : public ChannelResources {
 public:
  absl::StatusOr<std::byte*> OpenRegion(const RegionDescriptor& region) override {
    if (region.ipc_handle.size() != 64) return absl::InvalidArgumentError("ipc_handle: 64 bytes");
    memory_.emplace_back(std::make_unique<std::byte[]>(region.size_bytes));
    return memory_.back().get();
  }
  void Release() override { ++released; }

 private:
  std::vector<std::unique_ptr<std::byte[]>> memory_;
};

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
      return std::make_unique<HostRegions>();
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
