// The SDK against an in-process fake kvcd whose behaviour each test scripts: an honest
// server (chunking, streaming, padded output), server errors, deadlines, cancellation, and
// servers that break the protocol in every way the SDK must catch without crashing.
#include "client/client.h"

#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/synchronization/notification.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace kvcompress {
namespace {

using ::testing::HasSubstr;
using Stream = grpc::ServerReaderWriter<v1::CompressResponse, v1::CompressRequest>;
using Script = std::function<grpc::Status(grpc::ServerContext*, Stream*)>;
using ForwardScript =
    std::function<grpc::Status(grpc::ServerContext*, const v1::ReceiveForwardedRequest*,
                               grpc::ServerWriter<v1::ForwardNotice>*)>;

class ScriptedService final : public v1::KvCompress::Service {
 public:
  grpc::Status GetServerInfo(grpc::ServerContext*, const v1::GetServerInfoRequest*,
                             v1::ServerInfo* info) override {
    info->set_version("fake-1");
    info->set_backend("fake");
    return grpc::Status::OK;
  }
  grpc::Status Compress(grpc::ServerContext* context, Stream* stream) override {
    return script(context, stream);
  }
  grpc::Status ReceiveForwarded(grpc::ServerContext* context,
                                const v1::ReceiveForwardedRequest* request,
                                grpc::ServerWriter<v1::ForwardNotice>* writer) override {
    return forward_script(context, request, writer);
  }
  Script script;
  ForwardScript forward_script;
};

// What the fake server received: the header and every tensor, assembled.
struct Received {
  v1::CompressHeader header;
  // (sequence, layer, kind) → bytes
  std::map<std::tuple<uint32_t, uint32_t, int>, std::string> tensors;
  size_t largest_chunk = 0;
  bool offsets_in_order = true;
};

// Reads until the client half-closes.
Received Drain(Stream* stream) {
  Received received;
  v1::CompressRequest request;
  while (stream->Read(&request)) {
    if (request.has_header()) {
      received.header = request.header();
      continue;
    }
    const v1::TensorChunk& chunk = request.chunk();
    std::string& bytes =
        received.tensors[{chunk.sequence(), chunk.layer(), static_cast<int>(chunk.tensor())}];
    if (chunk.offset() != bytes.size()) received.offsets_in_order = false;
    bytes += chunk.data();
    received.largest_chunk = std::max(received.largest_chunk, chunk.data().size());
  }
  return received;
}

// Reads just the header.
v1::CompressHeader ReadHeader(Stream* stream) {
  v1::CompressRequest request;
  stream->Read(&request);
  return request.header();
}

void Send(Stream* stream, const v1::LayerResult& result) {
  v1::CompressResponse response;
  *response.mutable_layer_result() = result;
  stream->Write(response);
}

void SendChunk(Stream* stream, uint32_t sequence, uint32_t layer, v1::TensorKind kind,
               uint64_t offset, const std::string& data) {
  v1::CompressResponse response;
  v1::TensorChunk* chunk = response.mutable_result_chunk();
  chunk->set_sequence(sequence);
  chunk->set_layer(layer);
  chunk->set_tensor(kind);
  chunk->set_offset(offset);
  chunk->set_data(data);
  stream->Write(response);
}

void SendSummary(Stream* stream, uint64_t tokens_in = 0) {
  v1::CompressResponse response;
  response.mutable_summary()->set_backend("fake");
  response.mutable_summary()->set_tokens_in(tokens_in);
  stream->Write(response);
}

std::string Int32Bytes(const std::vector<int32_t>& values) {
  return std::string(reinterpret_cast<const char*>(values.data()), values.size() * 4);
}

// The honest answer for one layer: head h keeps positions 0, 2, 4, ... (kept_per_head of
// them), rows copied from the received HND keys and values.
struct HonestLayer {
  v1::LayerResult header;
  std::string keys, values, positions, merged;
};

HonestLayer MakeHonestLayer(const v1::CompressHeader& header, uint32_t sequence, uint32_t layer,
                            const std::string& keys, const std::string& values,
                            uint32_t kept_per_head) {
  const v1::CacheGeometry& g = header.geometry();
  const uint32_t tokens = header.sequences(sequence).num_tokens();
  const size_t row = g.head_dim() * DTypeBytes(g.dtype());
  const bool padded = header.output().format() == v1::OUTPUT_FORMAT_PADDED;
  const uint32_t kept = std::min(kept_per_head, (tokens + 1) / 2);
  HonestLayer out;
  out.header.set_sequence(sequence);
  out.header.set_layer(layer);
  out.header.set_format(padded ? v1::OUTPUT_FORMAT_PADDED : v1::OUTPUT_FORMAT_RAGGED);
  const uint32_t max_kept = padded ? kept + 1 : kept;  // one padding row per head
  out.header.set_max_kept(padded ? max_kept : 0);
  std::vector<int32_t> positions;
  std::vector<int32_t> merged;
  for (uint32_t h = 0; h < g.num_kv_heads(); ++h) {
    out.header.add_kept(kept);
    for (uint32_t i = 0; i < max_kept; ++i) {
      if (i < kept) {
        const size_t source = (size_t{h} * tokens + 2 * i) * row;
        out.keys += keys.substr(source, row);
        out.values += values.substr(source, row);
        positions.push_back(static_cast<int32_t>(2 * i));
        merged.push_back(1);
      } else {
        out.keys += std::string(row, '\0');
        out.values += std::string(row, '\0');
        positions.push_back(-1);
        merged.push_back(0);
      }
    }
  }
  out.positions = Int32Bytes(positions);
  if (header.output().return_merged_counts()) out.merged = Int32Bytes(merged);
  out.header.set_keys_bytes(out.keys.size());
  out.header.set_values_bytes(out.values.size());
  out.header.set_positions_bytes(out.positions.size());
  out.header.set_merged_bytes(out.merged.size());
  out.header.set_attention_mass_kept(layer == 0 ? -1.0 : 0.5);
  return out;
}

void SendChunked(Stream* stream, uint32_t sequence, uint32_t layer, v1::TensorKind kind,
                 const std::string& bytes, size_t chunk_bytes) {
  for (size_t offset = 0; offset < bytes.size(); offset += chunk_bytes) {
    SendChunk(stream, sequence, layer, kind, offset, bytes.substr(offset, chunk_bytes));
  }
}

void SendHonestLayer(Stream* stream, const HonestLayer& layer, size_t chunk_bytes) {
  Send(stream, layer.header);
  const uint32_t s = layer.header.sequence(), l = layer.header.layer();
  SendChunked(stream, s, l, v1::TENSOR_KIND_KEYS, layer.keys, chunk_bytes);
  SendChunked(stream, s, l, v1::TENSOR_KIND_VALUES, layer.values, chunk_bytes);
  SendChunked(stream, s, l, v1::TENSOR_KIND_POSITIONS, layer.positions, chunk_bytes);
  SendChunked(stream, s, l, v1::TENSOR_KIND_MERGED, layer.merged, chunk_bytes);
}

// An honest server that answers each layer as soon as its keys and values are complete,
// while the client is still sending later layers.
Script HonestServer(uint32_t kept_per_head, size_t chunk_bytes, Received* record = nullptr) {
  return [=](grpc::ServerContext*, Stream* stream) {
    Received received;
    v1::CompressRequest request;
    int layers_done = 0;
    std::map<std::pair<uint32_t, uint32_t>, bool> answered;
    while (stream->Read(&request)) {
      if (request.has_header()) {
        received.header = request.header();
        continue;
      }
      const v1::TensorChunk& chunk = request.chunk();
      auto key = std::make_tuple(chunk.sequence(), chunk.layer(), static_cast<int>(chunk.tensor()));
      std::string& bytes = received.tensors[key];
      if (chunk.offset() != bytes.size()) received.offsets_in_order = false;
      bytes += chunk.data();
      received.largest_chunk = std::max(received.largest_chunk, chunk.data().size());
      const LayerTensorBytes want = ExpectedLayerBytes(received.header, chunk.sequence());
      const std::string& keys = received.tensors[{chunk.sequence(), chunk.layer(), 1}];
      const std::string& values = received.tensors[{chunk.sequence(), chunk.layer(), 2}];
      const std::string& queries = received.tensors[{chunk.sequence(), chunk.layer(), 3}];
      if (keys.size() == want.keys && values.size() == want.keys &&
          queries.size() == want.queries && !answered[{chunk.sequence(), chunk.layer()}]) {
        answered[{chunk.sequence(), chunk.layer()}] = true;
        SendHonestLayer(stream,
                        MakeHonestLayer(received.header, chunk.sequence(), chunk.layer(), keys,
                                        values, kept_per_head),
                        chunk_bytes);
        ++layers_done;
      }
    }
    SendSummary(stream, 1234);
    if (record != nullptr) *record = received;
    return grpc::Status::OK;
  };
}

class ClientTest : public ::testing::Test {
 protected:
  void SetUp() override {
    grpc::ServerBuilder builder;
    builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port_);
    builder.RegisterService(&service_);
    server_ = builder.BuildAndStart();
    ASSERT_NE(server_, nullptr);
    ClientOptions options;
    options.default_deadline = absl::Seconds(20);
    options.max_chunk_bytes = 1000;  // many chunks per tensor
    auto client = Client::Connect("127.0.0.1:" + std::to_string(port_), options);
    ASSERT_TRUE(client.ok()) << client.status();
    client_ = std::move(*client);
  }
  void TearDown() override {
    client_.reset();
    server_->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(2));
  }

  // L = 2 layers, H_kv = 2, H_q = 4, D = 8, fp32; sequences of 37 and 11 tokens, W = 3.
  static v1::CompressHeader Header(int num_sequences = 2) {
    v1::CompressHeader header;
    v1::CacheGeometry* g = header.mutable_geometry();
    g->set_num_layers(2);
    g->set_num_kv_heads(2);
    g->set_num_query_heads(4);
    g->set_head_dim(8);
    g->set_dtype(v1::DTYPE_FLOAT32);
    g->set_layout(v1::LAYOUT_HND);
    for (int s = 0; s < num_sequences; ++s) {
      v1::SequenceShape* shape = header.add_sequences();
      shape->set_num_tokens(s == 0 ? 37 : 11);
      shape->set_num_window_queries(3);
    }
    header.mutable_method()->mutable_scorer()->mutable_snapkv();
    header.mutable_method()->set_keep_ratio(0.25);
    return header;
  }

  // Random tensors for `header`: [sequence][layer] owned bytes.
  struct OwnedLayer {
    std::vector<std::byte> keys, values, queries;
    LayerTensors view() const { return {keys, values, queries, {}}; }
  };
  static std::vector<std::vector<OwnedLayer>> Tensors(const v1::CompressHeader& header) {
    std::mt19937 rng(7);
    auto random = [&](uint64_t n) {
      std::vector<std::byte> bytes(n);
      for (std::byte& b : bytes) b = static_cast<std::byte>(rng() & 0xff);
      return bytes;
    };
    std::vector<std::vector<OwnedLayer>> all;
    for (int s = 0; s < header.sequences_size(); ++s) {
      const LayerTensorBytes want = ExpectedLayerBytes(header, s);
      all.emplace_back();
      for (uint32_t l = 0; l < header.geometry().num_layers(); ++l) {
        all.back().push_back({random(want.keys), random(want.keys), random(want.queries)});
      }
    }
    return all;
  }

  static CacheRequest Request(const v1::CompressHeader& header,
                              const std::vector<std::vector<OwnedLayer>>& tensors) {
    CacheRequest request;
    request.header = header;
    for (const auto& sequence : tensors) {
      request.tensors.emplace_back();
      for (const OwnedLayer& layer : sequence) request.tensors.back().push_back(layer.view());
    }
    return request;
  }

  // Runs CompressCache against `script` and returns its status.
  absl::Status RunAgainst(Script script, v1::CompressHeader header = Header()) {
    service_.script = std::move(script);
    const auto tensors = Tensors(header);
    return client_->CompressCache(Request(header, tensors)).status();
  }

  ScriptedService service_;
  std::unique_ptr<grpc::Server> server_;
  int port_ = 0;
  std::unique_ptr<Client> client_;
};

void ExpectHonestResult(const v1::CompressHeader& header, const CompressedLayer& got,
                        const std::vector<std::byte>& keys, const std::vector<std::byte>& values,
                        uint32_t kept_per_head) {
  const std::string k(reinterpret_cast<const char*>(keys.data()), keys.size());
  const std::string v(reinterpret_cast<const char*>(values.data()), values.size());
  const HonestLayer want = MakeHonestLayer(header, got.sequence, got.layer, k, v, kept_per_head);
  ASSERT_EQ(got.kept.size(), 2u);
  EXPECT_EQ(uint32_t(got.kept[0]), want.header.kept(0));
  EXPECT_EQ(got.max_kept, want.header.max_kept());
  EXPECT_EQ(std::string(reinterpret_cast<const char*>(got.keys.data()), got.keys.size()),
            want.keys);
  EXPECT_EQ(std::string(reinterpret_cast<const char*>(got.values.data()), got.values.size()),
            want.values);
  EXPECT_EQ(Int32Bytes(got.positions), want.positions);
  EXPECT_EQ(Int32Bytes(got.merged), want.merged);
  EXPECT_EQ(got.attention_mass_kept, want.header.attention_mass_kept());
}

TEST_F(ClientTest, GetServerInfo) {
  auto info = client_->GetServerInfo();
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->version(), "fake-1");
  EXPECT_EQ(info->backend(), "fake");
}

TEST_F(ClientTest, CompressCacheChunksBothWaysAndCollectsEveryLayer) {
  Received received;
  service_.script = HonestServer(5, 77, &received);
  const v1::CompressHeader header = Header();
  const auto tensors = Tensors(header);
  auto result = client_->CompressCache(Request(header, tensors));
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ(result->summary.tokens_in(), 1234u);
  EXPECT_FALSE(result->request_id.empty());
  EXPECT_EQ(received.header.request_id(), result->request_id);
  EXPECT_TRUE(received.offsets_in_order);
  EXPECT_EQ(received.largest_chunk, 1000u);  // max_chunk_bytes
  ASSERT_EQ(result->layers.size(), 2u);
  for (uint32_t s = 0; s < 2; ++s) {
    ASSERT_EQ(result->layers[s].size(), 2u);
    for (uint32_t l = 0; l < 2; ++l) {
      const CompressedLayer& got = result->layers[s][l];
      EXPECT_EQ(got.sequence, s);
      EXPECT_EQ(got.layer, l);
      ExpectHonestResult(header, got, tensors[s][l].keys, tensors[s][l].values, 5);
      // Everything the client sent arrived intact.
      const std::string& keys = received.tensors[{s, l, 1}];
      ASSERT_EQ(keys.size(), tensors[s][l].keys.size());
      EXPECT_EQ(std::memcmp(keys.data(), tensors[s][l].keys.data(), keys.size()), 0);
    }
  }
}

TEST_F(ClientTest, PaddedOutputWithMergedCounts) {
  v1::CompressHeader header = Header();
  header.mutable_output()->set_format(v1::OUTPUT_FORMAT_PADDED);
  header.mutable_output()->set_return_merged_counts(true);
  service_.script = HonestServer(4, 4096);
  const auto tensors = Tensors(header);
  auto result = client_->CompressCache(Request(header, tensors));
  ASSERT_TRUE(result.ok()) << result.status();
  const CompressedLayer& got = result->layers[1][1];
  EXPECT_EQ(got.format, v1::OUTPUT_FORMAT_PADDED);
  EXPECT_EQ(got.max_kept, 5u);
  ExpectHonestResult(header, got, tensors[1][1].keys, tensors[1][1].values, 4);
}

TEST_F(ClientTest, StreamingSessionYieldsLayersWhileSending) {
  service_.script = HonestServer(3, 100);
  const v1::CompressHeader header = Header(1);
  const auto tensors = Tensors(header);
  auto session = client_->StartCompress(header);
  ASSERT_TRUE(session.ok()) << session.status();
  EXPECT_EQ((*session)->layers_expected(), 2);
  for (uint32_t l = 0; l < 2; ++l) {
    ASSERT_TRUE((*session)->SendLayer(0, l, tensors[0][l].view()).ok());
    auto next = (*session)->NextResult();  // before the next layer is sent
    ASSERT_TRUE(next.ok()) << next.status();
    ASSERT_TRUE(next->has_value());
    EXPECT_EQ((*next)->layer, l);
    ExpectHonestResult(header, **next, tensors[0][l].keys, tensors[0][l].values, 3);
  }
  EXPECT_GT((*session)->bytes_sent(), 0u);
  EXPECT_GT((*session)->bytes_received(), 0u);
  auto summary = (*session)->Finish();
  ASSERT_TRUE(summary.ok()) << summary.status();
  EXPECT_EQ(summary->backend(), "fake");
  auto end = (*session)->NextResult();
  ASSERT_TRUE(end.ok());
  EXPECT_FALSE(end->has_value());
  EXPECT_TRUE((*session)->Finish().ok());  // idempotent
}

TEST_F(ClientTest, CallbackSessionAndNextResultDoNotMix) {
  service_.script = HonestServer(3, 100);
  const v1::CompressHeader header = Header(1);
  const auto tensors = Tensors(header);
  std::vector<uint32_t> layers;
  SessionOptions options;
  options.on_layer = [&layers](CompressedLayer layer) { layers.push_back(layer.layer); };
  auto session = client_->StartCompress(header, options);
  ASSERT_TRUE(session.ok());
  EXPECT_EQ((*session)->NextResult().status().code(), absl::StatusCode::kFailedPrecondition);
  for (uint32_t l = 0; l < 2; ++l)
    ASSERT_TRUE((*session)->SendLayer(0, l, tensors[0][l].view()).ok());
  ASSERT_TRUE((*session)->Finish().ok());
  EXPECT_THAT(layers, ::testing::ElementsAre(0u, 1u));
  // Every layer was sent; a repeat is refused before anything goes out.
  EXPECT_EQ((*session)->SendLayer(0, 0, tensors[0][0].view()).code(),
            absl::StatusCode::kInvalidArgument);  // already sent
}

TEST_F(ClientTest, ClientSideValidation) {
  service_.script = HonestServer(3, 100);
  const v1::CompressHeader header = Header(1);
  const auto tensors = Tensors(header);
  auto session = client_->StartCompress(header);
  ASSERT_TRUE(session.ok());
  LayerTensors short_keys = tensors[0][0].view();
  short_keys.keys = short_keys.keys.subspan(1);
  absl::Status status = (*session)->SendLayer(0, 0, short_keys);
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(status.message(), HasSubstr("sequence 0 layer 0 keys: expected 2368 bytes"));
  EXPECT_THAT((*session)->SendLayer(0, 2, tensors[0][0].view()).message(),
              HasSubstr("1 sequences of 2 layers"));
  EXPECT_THAT((*session)->SendLayer(1, 0, tensors[0][0].view()).message(),
              HasSubstr("1 sequences of 2 layers"));
  LayerTensors no_queries = tensors[0][0].view();
  no_queries.queries = {};
  EXPECT_THAT((*session)->SendLayer(0, 0, no_queries).message(), HasSubstr("queries"));
  ASSERT_TRUE((*session)->SendLayer(0, 0, tensors[0][0].view()).ok());
  EXPECT_THAT((*session)->SendLayer(0, 0, tensors[0][0].view()).message(),
              HasSubstr("already sent"));
  (*session)->Cancel();

  v1::CompressHeader bad = header;
  bad.mutable_geometry()->set_dtype(v1::DTYPE_UNSPECIFIED);
  EXPECT_THAT(client_->StartCompress(bad).status().message(), HasSubstr("geometry.dtype"));
  bad = header;
  bad.clear_sequences();
  EXPECT_THAT(client_->StartCompress(bad).status().message(), HasSubstr("sequences"));

  CacheRequest request = Request(header, tensors);
  request.tensors[0].pop_back();
  EXPECT_THAT(client_->CompressCache(request).status().message(),
              HasSubstr("tensors[0] has 1 layers"));
}

TEST_F(ClientTest, ServerErrorsKeepTheirCodeAndMessage) {
  const absl::Status status = RunAgainst([](grpc::ServerContext*, Stream* stream) {
    ReadHeader(stream);
    return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                        "layer 3 keys: expected 8*4096*128 bf16 elements");
  });
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(status.message(), "layer 3 keys: expected 8*4096*128 bf16 elements");

  const absl::Status unimplemented = RunAgainst([](grpc::ServerContext*, Stream* stream) {
    Drain(stream);
    return grpc::Status(grpc::StatusCode::UNIMPLEMENTED, "method.scorer: tova");
  });
  EXPECT_EQ(unimplemented.code(), absl::StatusCode::kUnimplemented);
  EXPECT_EQ(unimplemented.message(), "method.scorer: tova");
}

TEST_F(ClientTest, DeadlineExceededWhenTheServerHangs) {
  service_.script = [](grpc::ServerContext* context, Stream* stream) {
    ReadHeader(stream);
    while (!context->IsCancelled()) std::this_thread::sleep_for(std::chrono::milliseconds(5));
    return grpc::Status::CANCELLED;
  };
  const v1::CompressHeader header = Header();
  const auto tensors = Tensors(header);
  CacheRequest request = Request(header, tensors);
  request.deadline = absl::Milliseconds(300);
  const absl::Time start = absl::Now();
  auto result = client_->CompressCache(request);
  EXPECT_EQ(result.status().code(), absl::StatusCode::kDeadlineExceeded) << result.status();
  EXPECT_LT(absl::Now() - start, absl::Seconds(10));
  EXPECT_EQ(client_->GetServerInfo(absl::Seconds(5)).status().code(), absl::StatusCode::kOk);
}

TEST_F(ClientTest, CancelEndsTheStream) {
  absl::Notification header_seen;
  service_.script = [&](grpc::ServerContext* context, Stream* stream) {
    ReadHeader(stream);
    header_seen.Notify();
    while (!context->IsCancelled()) std::this_thread::sleep_for(std::chrono::milliseconds(5));
    return grpc::Status::CANCELLED;
  };
  auto session = client_->StartCompress(Header());
  ASSERT_TRUE(session.ok());
  header_seen.WaitForNotification();
  std::thread waiter([&] {
    auto next = (*session)->NextResult();
    EXPECT_EQ(next.status().code(), absl::StatusCode::kCancelled);
  });
  (*session)->Cancel();
  waiter.join();
  EXPECT_EQ((*session)->Finish().status().code(), absl::StatusCode::kCancelled);
}

TEST_F(ClientTest, DestroyingAnUnfinishedSessionCancelsIt) {
  absl::Notification cancelled;
  service_.script = [&](grpc::ServerContext* context, Stream* stream) {
    ReadHeader(stream);
    while (!context->IsCancelled()) std::this_thread::sleep_for(std::chrono::milliseconds(5));
    cancelled.Notify();
    return grpc::Status::CANCELLED;
  };
  auto session = client_->StartCompress(Header());
  ASSERT_TRUE(session.ok());
  session->reset();
  EXPECT_TRUE(cancelled.WaitForNotificationWithTimeout(absl::Seconds(10)));
}

TEST_F(ClientTest, ServerThatStopsReadingFailsSendLayerWithItsStatus) {
  // The server answers after the header; the client still has megabytes to send.
  v1::CompressHeader header = Header(1);
  header.mutable_sequences(0)->set_num_tokens(200000);
  const absl::Status status = RunAgainst(
      [](grpc::ServerContext*, Stream* stream) {
        ReadHeader(stream);
        return grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED, "request too large");
      },
      header);
  EXPECT_EQ(status.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(status.message(), "request too large");
}

// A valid ragged layer_result for Header(): both heads keep `kept` tokens.
v1::LayerResult GoodResult(uint32_t sequence, uint32_t layer, uint32_t kept = 3) {
  v1::LayerResult result;
  result.set_sequence(sequence);
  result.set_layer(layer);
  result.set_format(v1::OUTPUT_FORMAT_RAGGED);
  result.add_kept(kept);
  result.add_kept(kept);
  result.set_keys_bytes(2 * kept * 8 * 4);
  result.set_values_bytes(2 * kept * 8 * 4);
  result.set_positions_bytes(2 * kept * 4);
  result.set_attention_mass_kept(0.5);
  return result;
}

// Sends GoodResult's tensors with the given positions.
void SendGoodTensors(Stream* stream, uint32_t sequence, uint32_t layer,
                     const std::vector<int32_t>& positions) {
  const std::string rows(positions.size() * 8 * 4, '\x01');
  SendChunk(stream, sequence, layer, v1::TENSOR_KIND_KEYS, 0, rows);
  SendChunk(stream, sequence, layer, v1::TENSOR_KIND_VALUES, 0, rows);
  SendChunk(stream, sequence, layer, v1::TENSOR_KIND_POSITIONS, 0, Int32Bytes(positions));
}

struct BadServerCase {
  std::string name;
  std::function<void(Stream*)> respond;  // runs after the client half-closed
  absl::StatusCode code;
  std::string message_part;
};

TEST_F(ClientTest, ProtocolViolationsAreCaughtNotTrusted) {
  const std::vector<int32_t> ok_positions = {0, 4, 9, 1, 2, 3};
  const std::vector<BadServerCase> cases = {
      {"chunk_for_unknown_layer",
       [](Stream* s) { SendChunk(s, 0, 99, v1::TENSOR_KIND_KEYS, 0, "xxxx"); },
       absl::StatusCode::kInternal, "unknown layer"},
      {"chunk_for_unknown_sequence",
       [](Stream* s) { SendChunk(s, 7, 0, v1::TENSOR_KIND_KEYS, 0, "xxxx"); },
       absl::StatusCode::kInternal, "unknown layer"},
      {"chunk_before_layer_result",
       [](Stream* s) { SendChunk(s, 0, 0, v1::TENSOR_KIND_KEYS, 0, "xxxx"); },
       absl::StatusCode::kInternal, "no layer_result announced it"},
      {"layer_result_for_unknown_layer", [](Stream* s) { Send(s, GoodResult(0, 2)); },
       absl::StatusCode::kInternal, "2 sequences of 2 layers"},
      {"sizes_do_not_add_up",
       [](Stream* s) {
         v1::LayerResult result = GoodResult(0, 0);
         result.set_keys_bytes(result.keys_bytes() + 4);
         Send(s, result);
       },
       absl::StatusCode::kInternal, "its kept counts need 192/192/24"},
      {"merged_bytes_wrong",
       [](Stream* s) {
         v1::LayerResult result = GoodResult(0, 0);
         result.set_merged_bytes(8);
         Send(s, result);
       },
       absl::StatusCode::kInternal, "announces"},
      {"wrong_head_count",
       [](Stream* s) {
         v1::LayerResult result = GoodResult(0, 0);
         result.add_kept(3);
         Send(s, result);
       },
       absl::StatusCode::kInternal, "kept has 3 heads, expected 2"},
      {"keeps_more_than_t",
       [](Stream* s) { Send(s, GoodResult(1, 0, 12)); },  // sequence 1 has 11 tokens
       absl::StatusCode::kInternal, "keeps 12 of 11 tokens"},
      {"bad_attention_mass",
       [](Stream* s) {
         v1::LayerResult result = GoodResult(0, 0);
         result.set_attention_mass_kept(1.5);
         Send(s, result);
       },
       absl::StatusCode::kInternal, "attention_mass_kept"},
      {"wrong_format",
       [](Stream* s) {
         v1::LayerResult result = GoodResult(0, 0);
         result.set_format(v1::OUTPUT_FORMAT_PADDED);
         Send(s, result);
       },
       absl::StatusCode::kInternal, "format OUTPUT_FORMAT_PADDED"},
      {"duplicate_layer_result",
       [](Stream* s) {
         Send(s, GoodResult(0, 0));
         Send(s, GoodResult(0, 0));
       },
       absl::StatusCode::kInternal, "sent twice"},
      {"wrong_offset",
       [](Stream* s) {
         Send(s, GoodResult(0, 0));
         SendChunk(s, 0, 0, v1::TENSOR_KIND_KEYS, 8, "xxxx");
       },
       absl::StatusCode::kInternal, "offset 8, expected 0"},
      {"overrun",
       [](Stream* s) {
         Send(s, GoodResult(0, 0));
         SendChunk(s, 0, 0, v1::TENSOR_KIND_POSITIONS, 0, std::string(28, 'x'));
       },
       absl::StatusCode::kInternal, "overrun the announced 24 bytes"},
      {"not_a_result_tensor",
       [](Stream* s) {
         Send(s, GoodResult(0, 0));
         SendChunk(s, 0, 0, v1::TENSOR_KIND_QUERIES, 0, "xxxx");
       },
       absl::StatusCode::kInternal, "not a result tensor"},
      {"merged_not_announced",
       [](Stream* s) {
         Send(s, GoodResult(0, 0));
         SendChunk(s, 0, 0, v1::TENSOR_KIND_MERGED, 0, "xxxx");
       },
       absl::StatusCode::kInternal, "overrun the announced 0 bytes"},
      {"positions_not_ascending",
       [](Stream* s) {
         Send(s, GoodResult(0, 0));
         SendGoodTensors(s, 0, 0, {0, 9, 4, 1, 2, 3});
       },
       absl::StatusCode::kInternal, "head 0 row 2 holds 4"},
      {"position_out_of_range",
       [](Stream* s) {
         Send(s, GoodResult(1, 0));
         SendGoodTensors(s, 1, 0, {0, 1, 11, 1, 2, 3});  // T = 11
       },
       absl::StatusCode::kInternal, "holds 11"},
      {"chunk_after_layer_complete",
       [ok_positions](Stream* s) {
         Send(s, GoodResult(0, 0));
         SendGoodTensors(s, 0, 0, ok_positions);
         SendChunk(s, 0, 0, v1::TENSOR_KIND_KEYS, 192, "xxxx");
       },
       absl::StatusCode::kInternal, "already complete"},
      {"early_summary",
       [ok_positions](Stream* s) {
         Send(s, GoodResult(0, 0));
         SendGoodTensors(s, 0, 0, ok_positions);
         SendSummary(s);
       },
       absl::StatusCode::kInternal, "summary arrived after 1 of 4 layer results"},
      {"no_payload", [](Stream* s) { s->Write(v1::CompressResponse()); },
       absl::StatusCode::kInternal, "no payload"},
      {"stream_ends_without_summary",
       [ok_positions](Stream* s) {
         Send(s, GoodResult(0, 0));
         SendGoodTensors(s, 0, 0, ok_positions);
       },
       absl::StatusCode::kDataLoss, "after 1 of 4 layer results without a summary"},
      {"stream_ends_mid_layer",
       [](Stream* s) {
         Send(s, GoodResult(0, 0));
         SendChunk(s, 0, 0, v1::TENSOR_KIND_KEYS, 0, "xxxx");
       },
       absl::StatusCode::kDataLoss, "without a summary"},
  };
  for (const BadServerCase& c : cases) {
    SCOPED_TRACE(c.name);
    const absl::Status status = RunAgainst([&c](grpc::ServerContext*, Stream* stream) {
      Drain(stream);
      c.respond(stream);
      return grpc::Status::OK;
    });
    EXPECT_EQ(status.code(), c.code) << status;
    EXPECT_THAT(status.message(), HasSubstr(c.message_part));
  }

  // A message after a complete, valid stream.
  SCOPED_TRACE("message_after_summary");
  const absl::Status after = RunAgainst([](grpc::ServerContext*, Stream* stream) {
    Received received = Drain(stream);
    for (uint32_t s = 0; s < 2; ++s) {
      for (uint32_t l = 0; l < 2; ++l) {
        SendHonestLayer(stream,
                        MakeHonestLayer(received.header, s, l, received.tensors[{s, l, 1}],
                                        received.tensors[{s, l, 2}], 3),
                        4096);
      }
    }
    SendSummary(stream);
    SendSummary(stream);
    return grpc::Status::OK;
  });
  EXPECT_EQ(after.code(), absl::StatusCode::kInternal) << after;
  EXPECT_THAT(after.message(), HasSubstr("after the summary"));
}

TEST_F(ClientTest, PaddedRowsMustBePaddedWithMinusOne) {
  v1::CompressHeader header = Header();
  header.mutable_output()->set_format(v1::OUTPUT_FORMAT_PADDED);
  const absl::Status status = RunAgainst(
      [](grpc::ServerContext*, Stream* stream) {
        Drain(stream);
        v1::LayerResult result = GoodResult(0, 0, 2);
        result.set_format(v1::OUTPUT_FORMAT_PADDED);
        result.set_max_kept(3);
        result.set_keys_bytes(2 * 3 * 8 * 4);
        result.set_values_bytes(2 * 3 * 8 * 4);
        result.set_positions_bytes(2 * 3 * 4);
        Send(stream, result);
        const std::string rows(6 * 8 * 4, '\0');
        SendChunk(stream, 0, 0, v1::TENSOR_KIND_KEYS, 0, rows);
        SendChunk(stream, 0, 0, v1::TENSOR_KIND_VALUES, 0, rows);
        SendChunk(stream, 0, 0, v1::TENSOR_KIND_POSITIONS, 0, Int32Bytes({0, 1, -1, 0, 1, 7}));
        return grpc::Status::OK;
      },
      header);
  EXPECT_EQ(status.code(), absl::StatusCode::kInternal) << status;
  EXPECT_THAT(status.message(), HasSubstr("head 1 padding row 2 holds 7, expected -1"));
}

// A server that records the layer_ready messages of an nccl stream and answers each layer
// with an honest result of zero tensors' rows (it receives no tensor bytes).
TEST_F(ClientTest, NcclAnnouncementsCarryNoSlicesAndKeepTheirOrder) {
  std::vector<std::pair<uint32_t, uint32_t>> announced;
  int slices_seen = 0;
  service_.script = [&](grpc::ServerContext*, Stream* stream) {
    v1::CompressRequest request;
    while (stream->Read(&request)) {
      if (!request.has_layer_ready()) continue;
      const v1::LayerReady& ready = request.layer_ready();
      announced.emplace_back(ready.sequence(), ready.layer());
      slices_seen += ready.has_keys() + ready.has_values() + ready.has_queries();
    }
    SendSummary(stream);
    return grpc::Status::OK;
  };
  v1::CompressHeader header = Header(1);
  header.set_transport(v1::TRANSPORT_NCCL);
  header.set_channel_id("0123456789abcdef0123456789abcdef");
  // A session whose results never come back is not what this test is about: forward them.
  header.set_forward_channel_id("fedcba9876543210fedcba9876543210");
  auto session = client_->StartCompress(header);
  ASSERT_TRUE(session.ok()) << session.status();
  CompressSession& stream = **session;

  EXPECT_EQ(stream.SendLayer(0, 0, {}).code(), absl::StatusCode::kFailedPrecondition);
  const absl::Status with_slice = stream.SendLayerReady(0, 0, {.keys = RegionSlice{0, 0, 16}});
  EXPECT_EQ(with_slice.code(), absl::StatusCode::kInvalidArgument) << with_slice;
  EXPECT_THAT(with_slice.message(), HasSubstr("no region slices"));

  std::vector<int> enqueued;
  const absl::Status failed = stream.SendLayerAnnouncement(0, 1, [&] {
    enqueued.push_back(-1);
    return absl::InternalError("ncclSend failed");
  });
  EXPECT_EQ(failed.code(), absl::StatusCode::kInternal);
  EXPECT_TRUE(stream
                  .SendLayerAnnouncement(0, 1,
                                         [&] {
                                           enqueued.push_back(1);
                                           return absl::OkStatus();
                                         })
                  .ok());
  EXPECT_TRUE(stream.SendLayerReady(0, 0, {}).ok());
  const absl::Status twice = stream.SendLayerAnnouncement(0, 1, [&] {
    enqueued.push_back(99);
    return absl::OkStatus();
  });
  EXPECT_EQ(twice.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(twice.message(), HasSubstr("already sent"));
  EXPECT_EQ(stream.SendLayerAnnouncement(1, 0).code(), absl::StatusCode::kInvalidArgument);

  auto done = stream.Finish();
  // The fake sends forwarded_layers = 0 for a request of 2 layers: caught, not trusted.
  EXPECT_EQ(done.status().code(), absl::StatusCode::kInternal) << done.status();
  EXPECT_THAT(done.status().message(), HasSubstr("forwarded_layers = 0, expected 2"));
  EXPECT_EQ(enqueued, (std::vector<int>{-1, 1}));
  EXPECT_EQ(announced, (std::vector<std::pair<uint32_t, uint32_t>>{{0, 1}, {0, 0}}));
  EXPECT_EQ(slices_seen, 0);
}

TEST_F(ClientTest, AnnouncementsNeedAnNcclSession) {
  service_.script = [](grpc::ServerContext*, Stream* stream) {
    Drain(stream);
    return grpc::Status::OK;
  };
  auto inline_session = client_->StartCompress(Header(1));
  ASSERT_TRUE(inline_session.ok());
  EXPECT_EQ((*inline_session)->SendLayerAnnouncement(0, 0).code(),
            absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ((*inline_session)->SendLayerReady(0, 0, {}).code(),
            absl::StatusCode::kFailedPrecondition);
  v1::CompressHeader header = Header(1);
  header.set_transport(v1::TRANSPORT_CUDA_IPC);
  header.set_channel_id("0123456789abcdef0123456789abcdef");
  auto ipc_session = client_->StartCompress(header);
  ASSERT_TRUE(ipc_session.ok());
  EXPECT_EQ((*ipc_session)->SendLayerReady(0, 0, {}).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ((*ipc_session)->SendLayerAnnouncement(0, 0).code(),
            absl::StatusCode::kFailedPrecondition);
}

TEST_F(ClientTest, ForwardedSessionEndsWithTheSummaryAlone) {
  v1::CompressHeader header = Header();
  header.set_forward_channel_id("fedcba9876543210fedcba9876543210");
  Received received;
  service_.script = [&](grpc::ServerContext*, Stream* stream) {
    received = Drain(stream);
    v1::CompressResponse response;
    response.mutable_summary()->set_forwarded_layers(4);  // 2 sequences × 2 layers
    response.mutable_summary()->set_tokens_kept(12);
    stream->Write(response);
    return grpc::Status::OK;
  };
  const auto tensors = Tensors(header);
  auto session = client_->StartCompress(header);
  ASSERT_TRUE(session.ok());
  EXPECT_TRUE((*session)->forwarded());
  EXPECT_EQ((*session)->layers_expected(), 0);
  for (uint32_t l = 0; l < 2; ++l) {
    for (uint32_t s = 0; s < 2; ++s) {
      ASSERT_TRUE((*session)->SendLayer(s, l, tensors[s][l].view()).ok());
    }
  }
  auto summary = (*session)->Finish();
  ASSERT_TRUE(summary.ok()) << summary.status();
  EXPECT_EQ(summary->forwarded_layers(), 4u);
  EXPECT_EQ(summary->tokens_kept(), 12u);
  EXPECT_EQ(received.header.forward_channel_id(), header.forward_channel_id());
  auto next = (*session)->NextResult();
  ASSERT_TRUE(next.ok());
  EXPECT_FALSE(next->has_value());

  // CompressCache of a forwarded header: every layer sent, no layer back, the summary.
  auto cache = client_->CompressCache(Request(header, tensors));
  ASSERT_TRUE(cache.ok()) << cache.status();
  EXPECT_EQ(cache->summary.forwarded_layers(), 4u);
}

TEST_F(ClientTest, ForwardedSessionRejectsInlineResults) {
  v1::CompressHeader header = Header();
  header.set_forward_channel_id("fedcba9876543210fedcba9876543210");
  const absl::Status status = RunAgainst(
      [](grpc::ServerContext*, Stream* stream) {
        Drain(stream);
        Send(stream, GoodResult(0, 0, 2));
        return grpc::Status::OK;
      },
      header);
  EXPECT_EQ(status.code(), absl::StatusCode::kInternal) << status;
  EXPECT_THAT(status.message(), HasSubstr("none may come back inline"));

  // And a request that forwards nothing must not claim forwarded layers.
  const absl::Status claimed = RunAgainst([](grpc::ServerContext*, Stream* stream) {
    Drain(stream);
    v1::CompressResponse response;
    response.mutable_summary()->set_forwarded_layers(1);
    stream->Write(response);
    return grpc::Status::OK;
  });
  EXPECT_EQ(claimed.code(), absl::StatusCode::kInternal) << claimed;
}

v1::ForwardNotice LayerNotice(uint32_t kept_per_head) {
  v1::ForwardNotice notice;
  v1::ForwardedLayer& layer = *notice.mutable_layer();
  layer.set_request_id("prefill-1");
  layer.set_num_sequences(1);
  v1::CacheGeometry& g = *layer.mutable_geometry();
  g.set_num_layers(2);
  g.set_num_kv_heads(2);
  g.set_num_query_heads(4);
  g.set_head_dim(8);
  g.set_dtype(v1::DTYPE_BFLOAT16);
  layer.mutable_sequence_shape()->set_num_tokens(37);
  v1::LayerResult& result = *layer.mutable_result();
  result.set_layer(1);
  result.add_kept(kept_per_head);
  result.add_kept(kept_per_head);
  result.set_keys_bytes(2 * kept_per_head * 8 * 2);
  result.set_values_bytes(2 * kept_per_head * 8 * 2);
  result.set_positions_bytes(2 * kept_per_head * 4);
  return notice;
}

TEST_F(ClientTest, ReceiveForwardedYieldsNoticesThenEnds) {
  std::string token_seen;
  std::string channel_seen;
  service_.forward_script = [&](grpc::ServerContext* context,
                                const v1::ReceiveForwardedRequest* request,
                                grpc::ServerWriter<v1::ForwardNotice>* writer) {
    channel_seen = request->channel_id();
    writer->Write(LayerNotice(5));
    v1::ForwardNotice end;
    end.mutable_end()->set_request_id("prefill-1");
    end.mutable_end()->set_forwarded_layers(1);
    writer->Write(end);
    (void)context;
    return grpc::Status::OK;
  };
  auto stream = client_->ReceiveForwarded("abc", absl::InfiniteDuration());
  ASSERT_TRUE(stream.ok()) << stream.status();
  auto first = (*stream)->Next();
  ASSERT_TRUE(first.ok()) << first.status();
  ASSERT_TRUE(first->has_value() && (*first)->has_layer());
  EXPECT_EQ((*first)->layer().result().keys_bytes(), 2u * 5 * 8 * 2);
  auto second = (*stream)->Next();
  ASSERT_TRUE(second.ok() && second->has_value() && (*second)->has_end());
  EXPECT_EQ((*second)->end().forwarded_layers(), 1u);
  auto last = (*stream)->Next();
  ASSERT_TRUE(last.ok()) << last.status();
  EXPECT_FALSE(last->has_value());
  EXPECT_FALSE((*stream)->Next()->has_value());
  EXPECT_EQ(channel_seen, "abc");
  EXPECT_EQ(client_->ReceiveForwarded("").status().code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(ClientTest, ReceiveForwardedChecksNoticesAndKeepsServerErrors) {
  service_.forward_script = [](grpc::ServerContext*, const v1::ReceiveForwardedRequest*,
                               grpc::ServerWriter<v1::ForwardNotice>* writer) {
    v1::ForwardNotice notice = LayerNotice(5);
    notice.mutable_layer()->mutable_result()->set_positions_bytes(3);
    writer->Write(notice);
    return grpc::Status::OK;
  };
  auto bad = client_->ReceiveForwarded("abc");
  ASSERT_TRUE(bad.ok());
  auto notice = (*bad)->Next();
  EXPECT_EQ(notice.status().code(), absl::StatusCode::kInternal) << notice.status();
  EXPECT_THAT(notice.status().message(), HasSubstr("keys/values/positions/merged bytes"));
  EXPECT_EQ((*bad)->Next().status().code(), absl::StatusCode::kInternal);

  service_.forward_script = [](grpc::ServerContext*, const v1::ReceiveForwardedRequest*,
                               grpc::ServerWriter<v1::ForwardNotice>*) {
    return grpc::Status(grpc::StatusCode::ALREADY_EXISTS, "channel has a listener");
  };
  auto second = client_->ReceiveForwarded("abc");
  ASSERT_TRUE(second.ok());
  auto refused = (*second)->Next();
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kAlreadyExists);
  EXPECT_THAT(refused.status().message(), HasSubstr("channel has a listener"));
}

TEST_F(ClientTest, ReceiveForwardedCancelEndsAWaitingListener) {
  service_.forward_script = [](grpc::ServerContext* context, const v1::ReceiveForwardedRequest*,
                               grpc::ServerWriter<v1::ForwardNotice>*) {
    while (!context->IsCancelled()) std::this_thread::sleep_for(std::chrono::milliseconds(5));
    return grpc::Status::CANCELLED;
  };
  auto stream = client_->ReceiveForwarded("abc", absl::InfiniteDuration());
  ASSERT_TRUE(stream.ok());
  std::thread canceller([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    (*stream)->Cancel();
  });
  auto next = (*stream)->Next();
  canceller.join();
  EXPECT_EQ(next.status().code(), absl::StatusCode::kCancelled) << next.status();

  // Destroying a listener that is still waiting cancels it too.
  auto abandoned = client_->ReceiveForwarded("abc", absl::InfiniteDuration());
  ASSERT_TRUE(abandoned.ok());
  abandoned->reset();
}

TEST(ClientOptionsTest, BadOptionsAreRejected) {
  ClientOptions options;
  options.max_chunk_bytes = kDefaultMaxChunkBytes + 1;
  EXPECT_EQ(Client::Connect("127.0.0.1:1", options).status().code(),
            absl::StatusCode::kInvalidArgument);
  options = ClientOptions();
  options.default_deadline = absl::ZeroDuration();
  EXPECT_EQ(Client::Connect("127.0.0.1:1", options).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(Client::Connect("").status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(ClientOptionsTest, UnreachableServerIsUnavailable) {
  auto client = Client::Connect("127.0.0.1:1");
  ASSERT_TRUE(client.ok());
  auto info = (*client)->GetServerInfo(absl::Seconds(5));
  EXPECT_TRUE(absl::IsUnavailable(info.status()) || absl::IsDeadlineExceeded(info.status()))
      << info.status();
  v1::CompressHeader header;
  header.mutable_geometry()->set_num_layers(1);
  header.mutable_geometry()->set_num_kv_heads(1);
  header.mutable_geometry()->set_num_query_heads(1);
  header.mutable_geometry()->set_head_dim(4);
  header.mutable_geometry()->set_dtype(v1::DTYPE_FLOAT32);
  header.add_sequences()->set_num_tokens(4);
  SessionOptions options;
  options.deadline = absl::Seconds(5);
  auto session = (*client)->StartCompress(header, options);
  if (session.ok()) {
    const std::vector<std::byte> bytes(64);
    absl::Status status = (*session)->SendLayer(0, 0, {bytes, bytes, {}, {}});
    if (status.ok()) status = (*session)->Finish().status();
    EXPECT_TRUE(absl::IsUnavailable(status) || absl::IsDeadlineExceeded(status)) << status;
  } else {
    EXPECT_TRUE(absl::IsUnavailable(session.status()) || absl::IsDeadlineExceeded(session.status()))
        << session.status();
  }
}

}  // namespace
}  // namespace kvcompress
