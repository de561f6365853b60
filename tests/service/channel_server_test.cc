// The channel RPCs and cuda_ipc stream set-up over loopback gRPC, without a GPU: refusals
// (transport not built or not enabled, unauthenticated peers, unknown or foreign channels)
// and the open / register / close cycle with host memory standing in for IPC regions.
#include <grpcpp/grpcpp.h>

#include <memory>
#include <string>
#include <vector>

#include "client/client.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kvcompress/v1/kvcompress.grpc.pb.h"
#include "service/kvcompress_server.h"
#include "tests/service/host_regions.h"

namespace kvcompress {
namespace {

using ::testing::HasSubstr;

class ChannelServerTest : public ::testing::Test {
 protected:
  void StartServer(ServerOptions options = {}) {
    options.address = "127.0.0.1:0";
    options.metrics_address = "127.0.0.1:0";
    options.worker_threads = 1;
    options.backend_threads = 1;
    auto server = KvcServer::Start(std::move(options));
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = std::move(server).value();
    stub_ = v1::KvCompress::NewStub(grpc::CreateChannel(
        "127.0.0.1:" + std::to_string(server_->port()), grpc::InsecureChannelCredentials()));
  }

  // Channels as if kvcd had cuda_ipc and a cuda backend.
  static ServerOptions HostChannels(std::string token = "") {
    ServerOptions options;
    options.allow_cuda_ipc = true;
    options.auth_token = std::move(token);
    options.channel_resources_for_testing =
        [](Backend&) -> absl::StatusOr<std::unique_ptr<ChannelResources>> {
      return std::make_unique<testing::HostRegions>();
    };
    return options;
  }

  static std::unique_ptr<grpc::ClientContext> Context(const std::string& token = "") {
    auto context = std::make_unique<grpc::ClientContext>();
    context->set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
    if (!token.empty()) context->AddMetadata("authorization", "Bearer " + token);
    return context;
  }

  static v1::OpenChannelRequest CudaIpc(int regions) {
    v1::OpenChannelRequest request;
    request.set_transport(v1::TRANSPORT_CUDA_IPC);
    for (int i = 0; i < regions; ++i) {
      v1::CudaIpcRegion& region = *request.add_regions();
      region.set_ipc_handle(std::string(64, 'h'));
      region.set_size_bytes(1 << 20);
    }
    return request;
  }

  // Runs a Compress stream of `messages` and returns its status.
  grpc::Status RunStream(const std::vector<v1::CompressRequest>& messages,
                         const std::string& token = "") {
    std::unique_ptr<grpc::ClientContext> context = Context(token);
    auto stream = stub_->Compress(context.get());
    for (const v1::CompressRequest& message : messages) stream->Write(message);
    stream->WritesDone();
    v1::CompressResponse response;
    while (stream->Read(&response)) {
    }
    return stream->Finish();
  }

  static v1::CompressRequest CudaIpcHeader(const std::string& channel_id) {
    v1::CompressRequest request;
    v1::CompressHeader& header = *request.mutable_header();
    v1::CacheGeometry& geometry = *header.mutable_geometry();
    geometry.set_num_layers(1);
    geometry.set_num_kv_heads(2);
    geometry.set_num_query_heads(2);
    geometry.set_head_dim(64);
    geometry.set_dtype(v1::DTYPE_FLOAT16);
    geometry.set_layout(v1::LAYOUT_HND);
    header.add_sequences()->set_num_tokens(128);
    header.mutable_method()->mutable_scorer()->mutable_knorm();
    header.mutable_method()->set_keep_ratio(0.5);
    header.set_transport(v1::TRANSPORT_CUDA_IPC);
    header.set_channel_id(channel_id);
    return request;
  }

  void TearDown() override {
    stub_.reset();
    if (server_ != nullptr) server_->Shutdown(std::chrono::milliseconds(100));
  }

  std::unique_ptr<KvcServer> server_;
  std::unique_ptr<v1::KvCompress::Stub> stub_;
};

TEST_F(ChannelServerTest, CudaIpcIsRefusedUnlessBuiltAndEnabled) {
  StartServer();  // no --allow_cuda_ipc
  v1::ServerInfo info;
  ASSERT_TRUE(stub_->GetServerInfo(Context().get(), {}, &info).ok());
  EXPECT_THAT(info.transports(), ::testing::ElementsAre(v1::TRANSPORT_INLINE));
  v1::OpenChannelResponse response;
  grpc::Status status = stub_->OpenChannel(Context().get(), CudaIpc(0), &response);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::UNIMPLEMENTED);
  EXPECT_THAT(status.error_message(), HasSubstr("transport cuda_ipc is"));
  status = RunStream({CudaIpcHeader("00000000000000000000000000000000")});
  EXPECT_EQ(status.error_code(), grpc::StatusCode::UNIMPLEMENTED);

  v1::CloseChannelRequest close;
  close.set_channel_id("00000000000000000000000000000000");
  v1::CloseChannelResponse closed;
  status = stub_->CloseChannel(Context().get(), close, &closed);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_THAT(status.error_message(), HasSubstr("not open on this kvcd"));
}

TEST_F(ChannelServerTest, CudaIpcWithoutACudaBackendIsFailedPrecondition) {
  if (!CudaIpcCompiled()) GTEST_SKIP() << "this build has no cuda_ipc";
  ServerOptions options;
  options.allow_cuda_ipc = true;
  StartServer(std::move(options));  // the cpu backend
  v1::OpenChannelResponse response;
  grpc::Status status = stub_->OpenChannel(Context().get(), CudaIpc(0), &response);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_THAT(status.error_message(), HasSubstr("--backend=cuda"));
}

TEST_F(ChannelServerTest, OpenRegisterUseAndCloseWithAToken) {
  StartServer(HostChannels("s3cret"));
  v1::ServerInfo info;
  ASSERT_TRUE(stub_->GetServerInfo(Context("s3cret").get(), {}, &info).ok());
  EXPECT_THAT(info.transports(),
              ::testing::ElementsAre(v1::TRANSPORT_INLINE, v1::TRANSPORT_CUDA_IPC));
  v1::OpenChannelResponse opened;
  // Without the token the call never reaches the channel rules.
  grpc::Status status = stub_->OpenChannel(Context().get(), CudaIpc(1), &opened);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::UNAUTHENTICATED);

  status = stub_->OpenChannel(Context("s3cret").get(), CudaIpc(2), &opened);
  ASSERT_TRUE(status.ok()) << status.error_message();
  EXPECT_EQ(opened.channel_id().size(), 32u);
  EXPECT_THAT(opened.region_ids(), ::testing::ElementsAre(0, 1));
  EXPECT_EQ(opened.idle_timeout_seconds(), 300u);

  v1::RegisterRegionRequest more;
  more.set_channel_id(opened.channel_id());
  *more.mutable_region() = CudaIpc(1).regions(0);
  v1::RegisterRegionResponse registered;
  status = stub_->RegisterRegion(Context("s3cret").get(), more, &registered);
  ASSERT_TRUE(status.ok()) << status.error_message();
  EXPECT_EQ(registered.region_id(), 2u);

  // A bad slice is INVALID_ARGUMENT naming the field, and the channel stays usable.
  v1::CompressRequest ready;
  v1::LayerReady& layer = *ready.mutable_layer_ready();
  layer.mutable_keys()->set_offset(8);
  layer.mutable_keys()->set_bytes(2 * 128 * 64 * 2);
  status = RunStream({CudaIpcHeader(opened.channel_id()), ready}, "s3cret");
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(status.error_message(), HasSubstr("sequence 0 layer 0 keys: offset 8"));
  // A chunk on a cuda_ipc stream.
  v1::CompressRequest chunk;
  chunk.mutable_chunk()->set_data("x");
  status = RunStream({CudaIpcHeader(opened.channel_id()), chunk}, "s3cret");
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(status.error_message(), HasSubstr("chunk on a cuda_ipc stream"));
  // A stream that announces nothing.
  status = RunStream({CudaIpcHeader(opened.channel_id())}, "s3cret");
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(status.error_message(), HasSubstr("never announced"));

  const std::string gauge = server_->metrics().Exposition();
  EXPECT_THAT(gauge, HasSubstr("kvcompress_channels_open{transport=\"cuda_ipc\"} 1"));

  v1::CloseChannelRequest close;
  close.set_channel_id(opened.channel_id());
  v1::CloseChannelResponse closed;
  status = stub_->CloseChannel(Context("s3cret").get(), close, &closed);
  ASSERT_TRUE(status.ok()) << status.error_message();
  EXPECT_THAT(server_->metrics().Exposition(),
              HasSubstr("kvcompress_channels_open{transport=\"cuda_ipc\"} 0"));

  // Unknown channels: FAILED_PRECONDITION everywhere.
  status = stub_->CloseChannel(Context("s3cret").get(), close, &closed);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  status = stub_->RegisterRegion(Context("s3cret").get(), more, &registered);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  status = RunStream({CudaIpcHeader(opened.channel_id())}, "s3cret");
  EXPECT_EQ(status.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_THAT(status.error_message(), HasSubstr("not open on this kvcd"));
}

TEST_F(ChannelServerTest, WithoutAnyAuthenticationAllowCudaIpcOpensChannelsToEveryPeer) {
  StartServer(HostChannels());
  v1::OpenChannelResponse opened;
  grpc::Status status = stub_->OpenChannel(Context().get(), CudaIpc(0), &opened);
  ASSERT_TRUE(status.ok()) << status.error_message();
  v1::OpenChannelRequest too_many = CudaIpc(0);
  too_many.set_idle_timeout_seconds(1);
  status = stub_->OpenChannel(Context().get(), too_many, &opened);
  ASSERT_TRUE(status.ok()) << status.error_message();
  EXPECT_EQ(opened.idle_timeout_seconds(), 1u);
}

TEST_F(ChannelServerTest, MaxChannelsIsResourceExhausted) {
  ServerOptions options = HostChannels();
  options.max_channels = 1;
  StartServer(std::move(options));
  v1::OpenChannelResponse opened;
  ASSERT_TRUE(stub_->OpenChannel(Context().get(), CudaIpc(0), &opened).ok());
  grpc::Status status = stub_->OpenChannel(Context().get(), CudaIpc(0), &opened);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_THAT(status.error_message(), HasSubstr("--max_channels 1"));
}

TEST_F(ChannelServerTest, SdkOpensChannelsAndSendsLayerReady) {
  StartServer(HostChannels());
  auto client = Client::Connect("127.0.0.1:" + std::to_string(server_->port()));
  ASSERT_TRUE(client.ok()) << client.status();
  absl::StatusOr<v1::OpenChannelResponse> opened = (*client)->OpenChannel(CudaIpc(1));
  ASSERT_TRUE(opened.ok()) << opened.status();

  v1::CompressHeader header = CudaIpcHeader(opened->channel_id()).header();
  auto session = (*client)->StartCompress(header);
  ASSERT_TRUE(session.ok()) << session.status();
  const uint64_t kv = 2 * 128 * 64 * 2;
  // The SDK checks sizes against the header before sending.
  LayerRegions wrong{.keys = RegionSlice{0, 0, kv - 2}, .values = RegionSlice{0, kv, kv}};
  absl::Status sent = (*session)->SendLayerReady(0, 0, wrong);
  EXPECT_EQ(sent.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(sent.message(), HasSubstr("sequence 0 layer 0 keys: expected 32768 bytes"));
  LayerRegions extra{.keys = RegionSlice{0, 0, kv},
                     .values = RegionSlice{0, kv, kv},
                     .queries = RegionSlice{0, 2 * kv, 16}};
  EXPECT_THAT((*session)->SendLayerReady(0, 0, extra).message(), HasSubstr("queries: expected no"));
  // The server checks the region: offset past its end.
  LayerRegions outside{.keys = RegionSlice{0, (1 << 20) - 16, kv}, .values = RegionSlice{0, 0, kv}};
  EXPECT_TRUE((*session)->SendLayerReady(0, 0, outside).ok());
  absl::StatusOr<v1::CompressSummary> summary = (*session)->Finish();
  EXPECT_EQ(summary.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(summary.status().message(), HasSubstr("lie outside region 0"));

  // Inline sessions do not take SendLayerReady.
  header.set_transport(v1::TRANSPORT_INLINE);
  header.clear_channel_id();
  auto inline_session = (*client)->StartCompress(header);
  ASSERT_TRUE(inline_session.ok());
  EXPECT_EQ((*inline_session)->SendLayerReady(0, 0, outside).code(),
            absl::StatusCode::kFailedPrecondition);
  (*inline_session)->Cancel();

  EXPECT_TRUE((*client)->CloseChannel(opened->channel_id()).ok());
  EXPECT_EQ((*client)->CloseChannel(opened->channel_id()).code(),
            absl::StatusCode::kFailedPrecondition);
}

}  // namespace
}  // namespace kvcompress
