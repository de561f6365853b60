// Malformed Compress streams against a real kvcd: each case must get a precise status
// (code and message), the server must stay up, and the same server must then serve a
// correct request.
#include <chrono>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#include "gmock/gmock.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "kvcompress/v1/kvcompress.grpc.pb.h"
#include "tests/integration/kvcd_process.h"
#include "tests/integration/raw_stream.h"

namespace kvcompress::testing {
namespace {

using ::testing::HasSubstr;

struct MalformedCase {
  std::string name;
  std::function<std::vector<v1::CompressRequest>()> build;
  grpc::StatusCode expected_code;
  std::vector<std::string> expected_message_parts;
};

std::vector<v1::CompressRequest> WithHeader(const std::function<void(v1::CompressHeader&)>& edit) {
  v1::CompressHeader header = SmallHeader();
  edit(header);
  return ValidRequests(header);
}

std::vector<v1::CompressRequest> WithChunks(
    const std::function<void(std::vector<v1::TensorChunk>&)>& edit) {
  const v1::CompressHeader header = SmallHeader();
  std::vector<v1::TensorChunk> chunks = ChunksFor(header);
  edit(chunks);
  std::vector<v1::CompressRequest> requests = {HeaderRequest(header)};
  for (const auto& chunk : chunks) requests.push_back(ChunkRequest(chunk));
  return requests;
}

// Splits chunk `index` into two halves at `split` bytes.
void Split(std::vector<v1::TensorChunk>& chunks, size_t index, size_t split) {
  v1::TensorChunk second = chunks[index];
  second.set_offset(chunks[index].offset() + split);
  second.set_data(chunks[index].data().substr(split));
  chunks[index].set_data(chunks[index].data().substr(0, split));
  chunks.insert(chunks.begin() + index + 1, second);
}

std::vector<MalformedCase> Cases() {
  using grpc::StatusCode;
  return {
      {"chunk_before_header",
       [] {
         auto requests = ValidRequests(SmallHeader());
         requests.erase(requests.begin());
         return requests;
       },
       StatusCode::INVALID_ARGUMENT, {"header"}},
      {"second_header",
       [] {
         auto requests = ValidRequests(SmallHeader());
         requests.insert(requests.begin() + 1, HeaderRequest(SmallHeader()));
         return requests;
       },
       StatusCode::INVALID_ARGUMENT, {"header"}},
      {"query_heads_not_multiple_of_kv_heads",
       [] { return WithHeader([](auto& h) { h.mutable_geometry()->set_num_query_heads(3); }); },
       StatusCode::INVALID_ARGUMENT, {"num_query_heads", "3"}},
      {"dtype_unspecified",
       [] {
         return WithHeader(
             [](auto& h) { h.mutable_geometry()->set_dtype(v1::DTYPE_UNSPECIFIED); });
       },
       StatusCode::INVALID_ARGUMENT, {"dtype"}},
      {"zero_head_dim",
       [] { return WithHeader([](auto& h) { h.mutable_geometry()->set_head_dim(0); }); },
       StatusCode::INVALID_ARGUMENT, {"head_dim"}},
      {"no_sequences", [] { return WithHeader([](auto& h) { h.clear_sequences(); }); },
       StatusCode::INVALID_ARGUMENT, {"sequences"}},
      {"scorer_unset",
       [] { return WithHeader([](auto& h) { h.mutable_method()->clear_scorer(); }); },
       StatusCode::INVALID_ARGUMENT, {"scorer"}},
      {"budget_unset",
       [] { return WithHeader([](auto& h) { h.mutable_method()->clear_budget(); }); },
       StatusCode::INVALID_ARGUMENT, {"keep_ratio"}},
      {"keep_ratio_above_one",
       [] { return WithHeader([](auto& h) { h.mutable_method()->set_keep_ratio(1.5); }); },
       StatusCode::INVALID_ARGUMENT, {"keep_ratio", "1.5"}},
      {"even_kernel_size",
       [] {
         return WithHeader([](auto& h) {
           h.mutable_method()->mutable_scorer()->mutable_snapkv()->set_kernel_size(4);
         });
       },
       StatusCode::INVALID_ARGUMENT, {"kernel_size", "4"}},
      {"snapkv_without_window_queries",
       [] {
         return WithHeader([](auto& h) { h.mutable_sequences(0)->set_num_window_queries(0); });
       },
       StatusCode::INVALID_ARGUMENT, {"sequences[0]"}},
      {"more_window_queries_than_tokens",
       [] {
         return WithHeader([](auto& h) { h.mutable_sequences(0)->set_num_window_queries(101); });
       },
       StatusCode::INVALID_ARGUMENT, {"sequences[0]", "101"}},
      {"chunk_for_missing_layer",
       [] { return WithChunks([](auto& chunks) { chunks[0].set_layer(7); }); },
       StatusCode::INVALID_ARGUMENT, {"layer", "7"}},
      {"chunk_for_missing_sequence",
       [] { return WithChunks([](auto& chunks) { chunks[0].set_sequence(3); }); },
       StatusCode::INVALID_ARGUMENT, {"sequence", "3"}},
      {"chunk_longer_than_tensor",
       [] { return WithChunks([](auto& chunks) { chunks[0].mutable_data()->append(64, 'x'); }); },
       StatusCode::INVALID_ARGUMENT, {"keys", "6400"}},
      {"chunk_with_gap",
       [] {
         return WithChunks([](auto& chunks) {
           Split(chunks, 0, 1024);
           chunks[1].set_offset(chunks[1].offset() + 2);
         });
       },
       StatusCode::INVALID_ARGUMENT, {"offset", "1026"}},
      {"duplicate_chunk",
       [] {
         return WithChunks([](auto& chunks) {
           Split(chunks, 0, 1024);
           chunks.insert(chunks.begin() + 1, chunks[0]);
         });
       },
       StatusCode::INVALID_ARGUMENT, {"offset"}},
      {"chunk_after_layer_complete",
       [] { return WithChunks([](auto& chunks) { chunks.push_back(chunks[1]); }); },
       StatusCode::INVALID_ARGUMENT, {"layer 0"}},
      {"queries_not_announced",
       [] {
         v1::CompressHeader header = SmallHeader();
         header.mutable_method()->mutable_scorer()->mutable_knorm();
         header.mutable_sequences(0)->set_num_window_queries(0);
         auto chunks = ChunksFor(header);
         v1::TensorChunk queries = chunks[0];
         queries.set_tensor(v1::TENSOR_KIND_QUERIES);
         std::vector<v1::CompressRequest> requests = {HeaderRequest(header), ChunkRequest(queries)};
         return requests;
       },
       StatusCode::INVALID_ARGUMENT, {"queries"}},
      {"result_tensor_kind_in_request",
       [] { return WithChunks([](auto& chunks) { chunks[0].set_tensor(v1::TENSOR_KIND_POSITIONS); }); },
       StatusCode::INVALID_ARGUMENT, {"tensor"}},
      {"empty_chunk",
       [] { return WithChunks([](auto& chunks) { chunks[0].clear_data(); }); },
       StatusCode::INVALID_ARGUMENT, {"empty"}},
      {"stream_ends_before_last_layer",
       [] { return WithChunks([](auto& chunks) { chunks.pop_back(); }); },
       StatusCode::INVALID_ARGUMENT, {"sequence 0 layer 1"}},
      {"unavailable_cuda_ipc_transport",
       [] { return WithHeader([](auto& h) { h.set_transport(v1::TRANSPORT_CUDA_IPC); }); },
       StatusCode::UNIMPLEMENTED, {"cuda_ipc"}},
      {"unavailable_transport",
       [] { return WithHeader([](auto& h) { h.set_transport(v1::TRANSPORT_NCCL); }); },
       StatusCode::UNIMPLEMENTED, {"nccl"}},
      {"too_many_tokens",
       [] {
         v1::CompressHeader header = SmallHeader();
         header.mutable_sequences(0)->set_num_tokens(50'000'000);
         return std::vector<v1::CompressRequest>{HeaderRequest(header)};
       },
       StatusCode::RESOURCE_EXHAUSTED, {"50000000"}},
  };
}

class MalformedStreamTest : public ::testing::TestWithParam<MalformedCase> {
 protected:
  static void SetUpTestSuite() {
    auto server = KvcdProcess::Start();
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = server->release();
    channel_ = grpc::CreateChannel(server_->target(), grpc::InsecureChannelCredentials());
  }
  static void TearDownTestSuite() {
    delete server_;
    server_ = nullptr;
    channel_.reset();
  }

  // The server is alive and still answers a correct request completely.
  static void ExpectServesCorrectRequest() {
    ASSERT_TRUE(server_->Alive()) << "kvcd died";
    auto stub = v1::KvCompress::NewStub(channel_);
    const StreamOutcome outcome = RunStream(*stub, ValidRequests(SmallHeader()));
    EXPECT_TRUE(outcome.status.ok()) << outcome.status.error_message();
    EXPECT_EQ(outcome.layer_results(), 2);
    EXPECT_TRUE(outcome.has_summary());
  }

  static KvcdProcess* server_;
  static std::shared_ptr<grpc::Channel> channel_;
};

KvcdProcess* MalformedStreamTest::server_ = nullptr;
std::shared_ptr<grpc::Channel> MalformedStreamTest::channel_;

TEST_P(MalformedStreamTest, GetsPreciseStatusAndServerKeepsServing) {
  const MalformedCase& bad = GetParam();
  auto stub = v1::KvCompress::NewStub(channel_);
  const StreamOutcome outcome = RunStream(*stub, bad.build());
  EXPECT_EQ(outcome.status.error_code(), bad.expected_code)
      << "message: " << outcome.status.error_message();
  for (const std::string& part : bad.expected_message_parts) {
    EXPECT_THAT(outcome.status.error_message(), HasSubstr(part));
  }
  EXPECT_FALSE(outcome.has_summary());
  ExpectServesCorrectRequest();
}

INSTANTIATE_TEST_SUITE_P(AllCases, MalformedStreamTest, ::testing::ValuesIn(Cases()),
                         [](const auto& info) { return info.param.name; });

TEST_F(MalformedStreamTest, ClientDisconnectMidStreamLeavesServerServing) {
  auto stub = v1::KvCompress::NewStub(channel_);
  const auto requests = ValidRequests(SmallHeader());
  {
    grpc::ClientContext context;
    auto stream = stub->Compress(&context);
    ASSERT_TRUE(stream->Write(requests[0]));
    ASSERT_TRUE(stream->Write(requests[1]));
    context.TryCancel();
    v1::CompressResponse response;
    while (stream->Read(&response)) {
    }
    EXPECT_EQ(stream->Finish().error_code(), grpc::StatusCode::CANCELLED);
  }
  ExpectServesCorrectRequest();
}

TEST_F(MalformedStreamTest, StalledClientGetsDeadlineExceeded) {
  auto stub = v1::KvCompress::NewStub(channel_);
  const auto requests = ValidRequests(SmallHeader());
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::milliseconds(500));
  auto stream = stub->Compress(&context);
  ASSERT_TRUE(stream->Write(requests[0]));
  ASSERT_TRUE(stream->Write(requests[1]));
  std::this_thread::sleep_for(std::chrono::milliseconds(800));  // stall past the deadline
  v1::CompressResponse response;
  while (stream->Read(&response)) {
  }
  EXPECT_EQ(stream->Finish().error_code(), grpc::StatusCode::DEADLINE_EXCEEDED);
  ExpectServesCorrectRequest();
}

TEST_F(MalformedStreamTest, OversizedChunkIsRejected) {
  // A chunk above the 4 MiB − 1 KiB protocol limit but below gRPC's message limit.
  v1::CompressHeader header = SmallHeader();
  header.mutable_sequences(0)->set_num_tokens(70'000);
  header.mutable_method()->mutable_scorer()->mutable_knorm();
  header.mutable_sequences(0)->set_num_window_queries(0);
  v1::TensorChunk chunk;
  chunk.set_tensor(v1::TENSOR_KIND_KEYS);
  chunk.set_data(std::string(4 * 1024 * 1024 - 16, '\x01'));
  auto stub = v1::KvCompress::NewStub(channel_);
  const StreamOutcome outcome = RunStream(*stub, {HeaderRequest(header), ChunkRequest(chunk)});
  EXPECT_EQ(outcome.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT)
      << outcome.status.error_message();
  EXPECT_THAT(outcome.status.error_message(), HasSubstr("4193280"));
  ExpectServesCorrectRequest();
}

}  // namespace
}  // namespace kvcompress::testing
