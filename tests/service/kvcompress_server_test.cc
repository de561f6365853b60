// In-process tests of KvcServer: a real gRPC server on a loopback port, driven by the
// generated stubs. Results are checked against CompressionPipeline run directly on the same
// tensors (the service must add nothing and lose nothing).
#include "service/kvcompress_server.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <map>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "gmock/gmock.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "gtest/gtest.h"
#include "kernels/backend.h"
#include "kernels/compression_pipeline.h"
#include "kernels/cuda_backend.h"
#include "kernels/dtype.h"
#include "kvcompress/v1/kvcompress.grpc.pb.h"
#include "service/spec_conversion.h"
#include "service/stream_assembler.h"

namespace kvcompress {
namespace {

using ::testing::HasSubstr;

// The tensors of one layer of one sequence, as bytes.
struct LayerTensors {
  std::string keys, values, queries, scores;
};

std::string RandomBf16(size_t elements, std::mt19937& rng) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::string bytes(elements * 2, '\0');
  for (size_t i = 0; i < elements; ++i) {
    const uint16_t bits = FloatToBFloat16(normal(rng));
    std::memcpy(&bytes[i * 2], &bits, 2);
  }
  return bytes;
}

// A request: header plus random tensors for every layer of every sequence.
struct TestRequest {
  v1::CompressHeader header;
  std::map<std::pair<int, int>, LayerTensors> layers;

  // Messages in a fixed interleaving: layer-major, tensors split into `chunk` bytes.
  std::vector<v1::CompressRequest> Messages(size_t chunk = kMaxChunkDataBytes) const {
    std::vector<v1::CompressRequest> messages(1);
    *messages[0].mutable_header() = header;
    for (const auto& [key, tensors] : layers) {
      const std::pair<v1::TensorKind, const std::string*> parts[] = {
          {v1::TENSOR_KIND_KEYS, &tensors.keys},
          {v1::TENSOR_KIND_VALUES, &tensors.values},
          {v1::TENSOR_KIND_QUERIES, &tensors.queries},
          {v1::TENSOR_KIND_SCORES, &tensors.scores}};
      for (const auto& [kind, bytes] : parts) {
        for (size_t offset = 0; offset < bytes->size(); offset += chunk) {
          v1::CompressRequest& message = messages.emplace_back();
          v1::TensorChunk* piece = message.mutable_chunk();
          piece->set_sequence(key.first);
          piece->set_layer(key.second);
          piece->set_tensor(kind);
          piece->set_offset(offset);
          piece->set_data(bytes->substr(offset, chunk));
        }
      }
    }
    return messages;
  }
};

TestRequest MakeRequest(const std::vector<std::pair<uint32_t, uint32_t>>& tokens_and_window,
                        uint32_t num_layers, uint32_t kv_heads, uint32_t head_dim, uint32_t seed) {
  std::mt19937 rng(seed);
  TestRequest request;
  v1::CompressHeader& header = request.header;
  header.set_request_id("test-request");
  v1::CacheGeometry* geometry = header.mutable_geometry();
  geometry->set_num_layers(num_layers);
  geometry->set_num_kv_heads(kv_heads);
  geometry->set_num_query_heads(kv_heads * 2);
  geometry->set_head_dim(head_dim);
  geometry->set_dtype(v1::DTYPE_BFLOAT16);
  geometry->set_layout(v1::LAYOUT_HND);
  header.mutable_method()->mutable_scorer()->mutable_knorm();
  header.mutable_method()->set_keep_ratio(0.5);
  for (size_t s = 0; s < tokens_and_window.size(); ++s) {
    const auto [tokens, window] = tokens_and_window[s];
    v1::SequenceShape* shape = header.add_sequences();
    shape->set_num_tokens(tokens);
    shape->set_num_window_queries(window);
    for (uint32_t layer = 0; layer < num_layers; ++layer) {
      LayerTensors& tensors = request.layers[{static_cast<int>(s), static_cast<int>(layer)}];
      tensors.keys = RandomBf16(static_cast<size_t>(kv_heads) * tokens * head_dim, rng);
      tensors.values = RandomBf16(static_cast<size_t>(kv_heads) * tokens * head_dim, rng);
      tensors.queries = RandomBf16(static_cast<size_t>(kv_heads) * 2 * window * head_dim, rng);
    }
  }
  return request;
}

// What came back on one stream.
struct StreamOutcome {
  grpc::Status status;
  std::vector<v1::CompressResponse> responses;

  const v1::CompressSummary* summary() const {
    return !responses.empty() && responses.back().has_summary() ? &responses.back().summary()
                                                                : nullptr;
  }
};

StreamOutcome RunStream(v1::KvCompress::Stub& stub,
                        const std::vector<v1::CompressRequest>& messages) {
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
  auto stream = stub.Compress(&context);
  StreamOutcome outcome;
  // Read concurrently, as a real client does.
  std::thread reader([&] {
    v1::CompressResponse response;
    while (stream->Read(&response)) outcome.responses.push_back(response);
  });
  for (const v1::CompressRequest& message : messages) {
    if (!stream->Write(message)) break;
  }
  stream->WritesDone();
  reader.join();
  outcome.status = stream->Finish();
  return outcome;
}

// One layer's result reassembled from the stream.
struct ReceivedLayer {
  v1::LayerResult result;
  std::map<v1::TensorKind, std::string> tensors;
};

// Bytes of one tensor of a received layer; empty when none were sent.
std::string TensorBytes(const ReceivedLayer& layer, v1::TensorKind kind) {
  const auto it = layer.tensors.find(kind);
  return it == layer.tensors.end() ? std::string() : it->second;
}

// The sizes a LayerResult announces match the bytes that followed it.
void ExpectAnnouncedSizes(const ReceivedLayer& layer) {
  EXPECT_EQ(TensorBytes(layer, v1::TENSOR_KIND_KEYS).size(), layer.result.keys_bytes());
  EXPECT_EQ(TensorBytes(layer, v1::TENSOR_KIND_VALUES).size(), layer.result.values_bytes());
  EXPECT_EQ(TensorBytes(layer, v1::TENSOR_KIND_POSITIONS).size(), layer.result.positions_bytes());
  EXPECT_EQ(TensorBytes(layer, v1::TENSOR_KIND_MERGED).size(), layer.result.merged_bytes());
}

// Checks the message order (LayerResult, then its chunks in KEYS, VALUES, POSITIONS, MERGED
// order with contiguous offsets, every chunk within the size limit) and reassembles layers.
std::map<std::pair<int, int>, ReceivedLayer> CollectLayers(const StreamOutcome& outcome) {
  std::map<std::pair<int, int>, ReceivedLayer> layers;
  ReceivedLayer* current = nullptr;
  int last_kind = 0;
  for (const v1::CompressResponse& response : outcome.responses) {
    if (response.has_layer_result()) {
      if (current != nullptr) ExpectAnnouncedSizes(*current);
      const auto key = std::make_pair(static_cast<int>(response.layer_result().sequence()),
                                      static_cast<int>(response.layer_result().layer()));
      EXPECT_EQ(layers.count(key), 0u) << "layer sent twice";
      current = &layers[key];
      current->result = response.layer_result();
      last_kind = 0;
    } else if (response.has_result_chunk()) {
      const v1::TensorChunk& chunk = response.result_chunk();
      EXPECT_NE(current, nullptr) << "chunk before any LayerResult";
      if (current == nullptr) continue;
      EXPECT_EQ(chunk.sequence(), current->result.sequence());
      EXPECT_EQ(chunk.layer(), current->result.layer());
      EXPECT_GE(static_cast<int>(chunk.tensor()), last_kind) << "tensors out of order";
      last_kind = chunk.tensor();
      EXPECT_LE(chunk.data().size(), kMaxChunkDataBytes);
      EXPECT_GT(chunk.data().size(), 0u);
      std::string& bytes = current->tensors[chunk.tensor()];
      EXPECT_EQ(chunk.offset(), bytes.size());
      bytes += chunk.data();
    } else {
      EXPECT_TRUE(response.has_summary());
      EXPECT_EQ(&response, &outcome.responses.back()) << "summary is not last";
    }
  }
  if (current != nullptr) ExpectAnnouncedSizes(*current);
  return layers;
}

// The oracle: the pipeline run directly on the same tensors.
std::map<std::pair<int, int>, LayerResult> ExpectedResults(const TestRequest& request) {
  auto geometry = GeometryFromProto(request.header.geometry());
  auto spec = MethodSpecFromProto(request.header.method());
  std::vector<SequenceShape> sequences;
  for (const auto& shape : request.header.sequences()) {
    sequences.push_back(SequenceShapeFromProto(shape));
  }
  std::unique_ptr<Backend> backend = MakeCpuBackend(2);
  auto pipeline = CompressionPipeline::Create(backend.get(), *geometry, *spec, sequences);
  EXPECT_TRUE(pipeline.ok()) << pipeline.status();
  std::map<std::pair<int, int>, LayerResult> expected;
  for (const auto& [key, tensors] : request.layers) {
    LayerInput input;
    input.sequence = key.first;
    input.layer = key.second;
    input.shape = sequences[key.first];
    auto to_bytes = [](const std::string& s) {
      const auto* begin = reinterpret_cast<const std::byte*>(s.data());
      return std::vector<std::byte>(begin, begin + s.size());
    };
    input.keys = to_bytes(tensors.keys);
    input.values = to_bytes(tensors.values);
    input.queries = to_bytes(tensors.queries);
    input.scores.resize(tensors.scores.size() / sizeof(float));
    if (!tensors.scores.empty()) {
      std::memcpy(input.scores.data(), tensors.scores.data(), tensors.scores.size());
    }
    auto results = (*pipeline)->AddLayer(std::move(input));
    EXPECT_TRUE(results.ok()) << results.status();
    for (LayerResult& result : *results) {
      expected[{result.sequence, result.layer}] = std::move(result);
    }
  }
  return expected;
}

template <typename T>
std::string AsBytes(const std::vector<T>& values) {
  return std::string(reinterpret_cast<const char*>(values.data()), values.size() * sizeof(T));
}

// GET over a plain socket; returns the whole HTTP response.
std::string HttpGet(int port, const std::string& path) {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_port = htons(static_cast<uint16_t>(port));
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (connect(fd, reinterpret_cast<sockaddr*>(&address), sizeof(address)) != 0) {
    close(fd);
    return "";
  }
  const std::string request = "GET " + path + " HTTP/1.1\r\nHost: localhost\r\n\r\n";
  if (write(fd, request.data(), request.size()) < 0) {
    close(fd);
    return "";
  }
  std::string response;
  char buffer[4096];
  ssize_t n;
  while ((n = read(fd, buffer, sizeof(buffer))) > 0) response.append(buffer, n);
  close(fd);
  return response;
}

class KvcServerTest : public ::testing::Test {
 protected:
  void StartServer(ServerOptions options = {}) {
    options.address = "127.0.0.1:0";
    options.metrics_address = "127.0.0.1:0";
    if (options.worker_threads == 0) options.worker_threads = 2;
    if (options.backend_threads == 0) options.backend_threads = 2;
    auto server = KvcServer::Start(std::move(options));
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = std::move(server).value();
    channel_ = grpc::CreateChannel("127.0.0.1:" + std::to_string(server_->port()),
                                   grpc::InsecureChannelCredentials());
    stub_ = v1::KvCompress::NewStub(channel_);
  }

  void TearDown() override {
    stub_.reset();
    channel_.reset();
    if (server_ != nullptr) server_->Shutdown(std::chrono::milliseconds(100));
  }

  std::unique_ptr<KvcServer> server_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::KvCompress::Stub> stub_;
};

TEST_F(KvcServerTest, UnknownBackendKindIsRefused) {
  ServerOptions options;
  options.address = "127.0.0.1:0";
  options.metrics_address = "";
  options.backend_kind = "tpu";
  auto server = KvcServer::Start(std::move(options));
  ASSERT_FALSE(server.ok());
  EXPECT_EQ(server.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(server.status().message(), HasSubstr("expected cpu, cuda or auto"));
}

TEST_F(KvcServerTest, AutoBackendRunsTheGpuWhenThereIsOneElseTheCpu) {
  ServerOptions options;
  options.backend_kind = "auto";
  StartServer(std::move(options));
  const bool has_gpu = MakeCudaBackend(CudaBackendOptions{}).ok();
  if (has_gpu) {
    EXPECT_EQ(server_->backend_name(), "cuda");
    EXPECT_TRUE(server_->backend_note().empty());
  } else {
    EXPECT_EQ(server_->backend_name(), "cpu");
    EXPECT_THAT(server_->backend_note(), HasSubstr("running the cpu backend"));
  }
  grpc::ClientContext context;
  v1::ServerInfo info;
  ASSERT_TRUE(stub_->GetServerInfo(&context, v1::GetServerInfoRequest(), &info).ok());
  EXPECT_EQ(info.backend(), server_->backend_name());
  EXPECT_EQ(info.backends(info.backends_size() - 1), "cpu");  // the reference is always last
}

TEST_F(KvcServerTest, CudaBackendWithoutAGpuFailsToStart) {
  if (MakeCudaBackend(CudaBackendOptions{}).ok()) GTEST_SKIP() << "this machine has a GPU";
  ServerOptions options;
  options.address = "127.0.0.1:0";
  options.metrics_address = "";
  options.backend_kind = "cuda";
  auto server = KvcServer::Start(std::move(options));
  ASSERT_FALSE(server.ok());
  EXPECT_THAT(server.status().message(), HasSubstr("--backend=cuda: "));
}

TEST_F(KvcServerTest, ServerInfoDescribesThisBuild) {
  ServerOptions options;
  options.limits.max_tokens = 4096;
  options.worker_threads = 3;
  StartServer(std::move(options));
  grpc::ClientContext context;
  v1::ServerInfo info;
  ASSERT_TRUE(stub_->GetServerInfo(&context, v1::GetServerInfoRequest(), &info).ok());
  EXPECT_EQ(info.version(), "0.1.0");
  EXPECT_EQ(info.backend(), "cpu");
  EXPECT_EQ(info.worker_threads(), 3u);
  EXPECT_EQ(info.limits().max_tokens(), 4096u);
  EXPECT_EQ(info.limits().max_request_bytes(), uint64_t{16} << 30);
  EXPECT_EQ(info.limits().max_layers(), 512u);
  EXPECT_EQ(info.limits().max_sequences(), 256u);
  EXPECT_EQ(info.limits().max_concurrent_streams(), 64u);
  EXPECT_EQ(info.limits().max_chunk_bytes(), 4193280u);
  ASSERT_EQ(info.transports_size(), 1);
  EXPECT_EQ(info.transports(0), v1::TRANSPORT_INLINE);
  EXPECT_EQ(info.dtypes_size(), 3);
  EXPECT_EQ(info.layouts_size(), 2);

  std::map<std::string, const v1::MethodInfo*> methods;
  for (const v1::MethodInfo& method : info.methods()) {
    methods[method.stage() + "/" + method.name()] = &method;
  }
  const std::vector<std::string> every_method = {
      "scorer/snapkv",         "scorer/knorm",         "scorer/streaming",
      "scorer/observed",       "scorer/tova",          "scorer/keydiff",
      "layer_budget/uniform",  "layer_budget/pyramid", "layer_budget/dynamic",
      "head_budget/uniform",   "head_budget/adaptive", "reducer/drop",
      "reducer/merge_similar", "reducer/merge_nearest"};
  EXPECT_EQ(methods.size(), every_method.size());
  for (const std::string& name : every_method) {
    ASSERT_EQ(methods.count(name), 1u) << name;
    EXPECT_FALSE(methods[name]->description().empty()) << name;
  }
  // The foundation methods run in every build.
  for (const char* name : {"scorer/snapkv", "scorer/knorm", "scorer/streaming",
                           "layer_budget/uniform", "head_budget/uniform", "reducer/drop"}) {
    EXPECT_TRUE(methods[name]->implemented()) << name;
  }
  // The default options run the CPU reference alone, which runs every stage.
  ASSERT_EQ(info.backends_size(), 1);
  EXPECT_EQ(info.backends(0), "cpu");
  for (const v1::MethodInfo& method : info.methods()) {
    EXPECT_THAT(method.backends(), ::testing::ElementsAre("cpu")) << method.name();
  }
  ASSERT_EQ(info.devices_size(), 1);
  EXPECT_EQ(info.devices(0).name(), "host");
  EXPECT_EQ(info.devices(0).backend(), "cpu");
  EXPECT_GT(info.devices(0).memory_bytes(), 0u);
  // `implemented` follows the engine's own check.
  MethodSpec tova;
  tova.scorer = ScorerKind::kTova;
  EXPECT_EQ(methods["scorer/tova"]->implemented(), CheckMethodImplemented(tova).ok());

  const v1::MethodInfo& snapkv = *methods["scorer/snapkv"];
  std::map<std::string, std::string> defaults;
  for (const v1::MethodParameter& parameter : snapkv.parameters()) {
    defaults[parameter.name()] = parameter.default_value();
  }
  EXPECT_EQ(defaults["window_size"], "64");
  EXPECT_EQ(defaults["kernel_size"], "5");
  EXPECT_EQ(defaults["pooling"], "avg");
  EXPECT_EQ(defaults["group_reduction"], "mean");
  EXPECT_EQ(methods["reducer/merge_similar"]->parameters(0).default_value(), "0.75");
  EXPECT_EQ(methods["head_budget/adaptive"]->parameters(0).default_value(), "0.2");
}

TEST_F(KvcServerTest, HealthIsServing) {
  StartServer();
  auto health = grpc::health::v1::Health::NewStub(channel_);
  for (const char* service : {"", "kvcompress.v1.KvCompress"}) {
    grpc::ClientContext context;
    grpc::health::v1::HealthCheckRequest request;
    request.set_service(service);
    grpc::health::v1::HealthCheckResponse response;
    ASSERT_TRUE(health->Check(&context, request, &response).ok()) << service;
    EXPECT_EQ(response.status(), grpc::health::v1::HealthCheckResponse::SERVING) << service;
  }
}

TEST_F(KvcServerTest, CompressMatchesThePipelineLayerByLayer) {
  StartServer();
  const TestRequest request = MakeRequest({{300, 0}, {77, 0}}, 3, 2, 64, 7);
  const StreamOutcome outcome = RunStream(*stub_, request.Messages(1000));
  ASSERT_TRUE(outcome.status.ok()) << outcome.status.error_message();
  const auto layers = CollectLayers(outcome);
  const auto expected = ExpectedResults(request);
  ASSERT_EQ(layers.size(), 6u);
  uint64_t tokens_kept = 0, bytes_out = 0;
  for (const auto& [key, want] : expected) {
    ASSERT_EQ(layers.count(key), 1u);
    const ReceivedLayer& got = layers.at(key);
    EXPECT_EQ(got.result.format(), v1::OUTPUT_FORMAT_RAGGED);
    ASSERT_EQ(got.result.kept_size(), static_cast<int>(want.kept.size()));
    for (size_t h = 0; h < want.kept.size(); ++h) {
      EXPECT_EQ(got.result.kept(h), static_cast<uint32_t>(want.kept[h]));
    }
    EXPECT_TRUE(TensorBytes(got, v1::TENSOR_KIND_KEYS) == AsBytes(want.keys));
    EXPECT_TRUE(TensorBytes(got, v1::TENSOR_KIND_VALUES) == AsBytes(want.values));
    EXPECT_TRUE(TensorBytes(got, v1::TENSOR_KIND_POSITIONS) == AsBytes(want.positions));
    EXPECT_EQ(got.tensors.count(v1::TENSOR_KIND_MERGED), 0u);  // drop: no merged counts
    EXPECT_EQ(got.result.merged_bytes(), 0u);
    EXPECT_DOUBLE_EQ(got.result.attention_mass_kept(), want.attention_mass_kept);
    tokens_kept += want.total_kept();
    bytes_out += want.keys.size() + want.values.size() + want.positions.size() * 4;
  }
  const v1::CompressSummary* summary = outcome.summary();
  ASSERT_NE(summary, nullptr);
  EXPECT_EQ(summary->request_id(), "test-request");
  EXPECT_EQ(summary->tokens_in(), (300u + 77u) * 3 * 2);
  EXPECT_EQ(summary->tokens_kept(), tokens_kept);
  EXPECT_EQ(summary->bytes_in(), (300u + 77u) * 3 * 2 * 64 * 2 * 2);
  EXPECT_EQ(summary->bytes_out(), bytes_out);
  EXPECT_EQ(summary->backend(), "cpu");
  EXPECT_GE(summary->timings().total_seconds(), summary->timings().receive_seconds());
  EXPECT_GT(summary->timings().total_seconds(), 0);
  EXPECT_EQ(summary->timings().deferred_layers(), 0u);
}

TEST_F(KvcServerTest, SnapKvWithWindowQueries) {
  StartServer();
  TestRequest request = MakeRequest({{200, 16}}, 2, 2, 32, 11);
  request.header.mutable_method()->mutable_scorer()->mutable_snapkv()->set_window_size(16);
  request.header.mutable_method()->set_keep_tokens(40);
  const StreamOutcome outcome = RunStream(*stub_, request.Messages());
  ASSERT_TRUE(outcome.status.ok()) << outcome.status.error_message();
  const auto layers = CollectLayers(outcome);
  const auto expected = ExpectedResults(request);
  ASSERT_EQ(layers.size(), expected.size());
  for (const auto& [key, want] : expected) {
    const ReceivedLayer& got = layers.at(key);
    EXPECT_TRUE(TensorBytes(got, v1::TENSOR_KIND_POSITIONS) == AsBytes(want.positions));
    EXPECT_TRUE(TensorBytes(got, v1::TENSOR_KIND_KEYS) == AsBytes(want.keys));
    EXPECT_DOUBLE_EQ(got.result.attention_mass_kept(), want.attention_mass_kept);
    EXPECT_GE(got.result.attention_mass_kept(), 0.0);
  }
}

TEST_F(KvcServerTest, ObservedScoresArriveAsScoreChunks) {
  StartServer();
  TestRequest request = MakeRequest({{120, 0}, {60, 0}}, 2, 2, 16, 21);
  request.header.mutable_method()->mutable_scorer()->mutable_observed();
  std::mt19937 rng(5);
  std::uniform_real_distribution<float> uniform(0.0f, 1.0f);
  for (auto& [key, tensors] : request.layers) {
    const uint32_t tokens = request.header.sequences(key.first).num_tokens();
    std::vector<float> scores(4 * tokens);  // per query head: [H_q, T]
    for (float& score : scores) score = uniform(rng);
    tensors.scores = AsBytes(scores);
  }
  for (auto& shape : *request.header.mutable_sequences()) shape.set_num_score_heads(4);
  const StreamOutcome outcome = RunStream(*stub_, request.Messages(100));
  ASSERT_TRUE(outcome.status.ok()) << outcome.status.error_message();
  const auto layers = CollectLayers(outcome);
  const auto expected = ExpectedResults(request);
  ASSERT_EQ(layers.size(), 4u);
  for (const auto& [key, want] : expected) {
    const ReceivedLayer& got = layers.at(key);
    EXPECT_TRUE(TensorBytes(got, v1::TENSOR_KIND_POSITIONS) == AsBytes(want.positions));
    EXPECT_TRUE(TensorBytes(got, v1::TENSOR_KIND_VALUES) == AsBytes(want.values));
  }
  ASSERT_NE(outcome.summary(), nullptr);
  EXPECT_EQ(outcome.summary()->bytes_in(), (120u + 60u) * 2 * (2 * 2 * 16 * 2 + 4 * sizeof(float)));
}

TEST_F(KvcServerTest, PaddedOutputWithMergedCounts) {
  StartServer();
  TestRequest request = MakeRequest({{50, 0}}, 1, 2, 16, 3);
  request.header.mutable_method()->mutable_scorer()->mutable_streaming()->set_sinks(2);
  request.header.mutable_method()->set_keep_tokens(10);
  request.header.mutable_output()->set_format(v1::OUTPUT_FORMAT_PADDED);
  request.header.mutable_output()->set_return_merged_counts(true);
  const StreamOutcome outcome = RunStream(*stub_, request.Messages());
  ASSERT_TRUE(outcome.status.ok()) << outcome.status.error_message();
  const auto layers = CollectLayers(outcome);
  const auto expected = ExpectedResults(request);
  const LayerResult& want = expected.at({0, 0});
  const ReceivedLayer& got = layers.at({0, 0});
  EXPECT_EQ(got.result.format(), v1::OUTPUT_FORMAT_PADDED);
  auto geometry = GeometryFromProto(request.header.geometry());
  const PaddedLayerResult padded = ToPadded(want, *geometry);
  EXPECT_EQ(got.result.max_kept(), static_cast<uint32_t>(padded.max_kept));
  EXPECT_TRUE(TensorBytes(got, v1::TENSOR_KIND_KEYS) == AsBytes(padded.keys));
  EXPECT_TRUE(TensorBytes(got, v1::TENSOR_KIND_POSITIONS) == AsBytes(padded.positions));
  // Drop keeps every row as itself: merged = 1 for kept rows, 0 for padding.
  std::vector<int32_t> merged(2 * padded.max_kept, 0);
  for (int h = 0; h < 2; ++h) {
    for (int r = 0; r < want.kept[h]; ++r) merged[h * padded.max_kept + r] = 1;
  }
  EXPECT_TRUE(TensorBytes(got, v1::TENSOR_KIND_MERGED) == AsBytes(merged));
  EXPECT_EQ(got.result.merged_bytes(), merged.size() * 4);
}

TEST_F(KvcServerTest, LargeResultsAreSplitIntoChunks) {
  StartServer();
  // 8 heads x 8192 tokens x 128 dims bf16 = 16 MiB per tensor; half is kept.
  TestRequest request = MakeRequest({{8192, 0}}, 1, 8, 128, 5);
  const StreamOutcome outcome = RunStream(*stub_, request.Messages());
  ASSERT_TRUE(outcome.status.ok()) << outcome.status.error_message();
  const auto layers = CollectLayers(outcome);
  const ReceivedLayer& got = layers.at({0, 0});
  EXPECT_EQ(got.result.keys_bytes(), 8u * 4096 * 128 * 2);
  int key_chunks = 0;
  for (const v1::CompressResponse& response : outcome.responses) {
    if (response.has_result_chunk() && response.result_chunk().tensor() == v1::TENSOR_KIND_KEYS) {
      ++key_chunks;
    }
  }
  EXPECT_EQ(key_chunks, 3);  // 8 MiB in chunks of at most 4 MiB - 1 KiB
  const auto expected = ExpectedResults(request);
  EXPECT_TRUE(TensorBytes(got, v1::TENSOR_KIND_VALUES) == AsBytes(expected.at({0, 0}).values));
}

TEST_F(KvcServerTest, TinyStreamBufferStillCompletes) {
  ServerOptions options;
  options.stream_buffer_bytes = 1;  // reads pause whenever a layer is in flight
  options.worker_threads = 1;
  StartServer(std::move(options));
  const TestRequest request = MakeRequest({{128, 0}, {64, 0}}, 6, 2, 32, 9);
  const StreamOutcome outcome = RunStream(*stub_, request.Messages(500));
  ASSERT_TRUE(outcome.status.ok()) << outcome.status.error_message();
  EXPECT_EQ(CollectLayers(outcome).size(), 12u);
}

TEST_F(KvcServerTest, ErrorsEndTheStreamAndTheServerKeepsServing) {
  StartServer();
  TestRequest request = MakeRequest({{100, 0}}, 2, 2, 16, 1);
  std::vector<v1::CompressRequest> messages = request.Messages();
  messages[3].mutable_chunk()->set_offset(5);  // layer 1 keys, out of order
  StreamOutcome outcome = RunStream(*stub_, messages);
  EXPECT_EQ(outcome.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(outcome.status.error_message(), HasSubstr("sequence 0 layer 1 keys: chunk offset 5"));
  EXPECT_EQ(outcome.summary(), nullptr);

  // Header-only errors, limits and unimplemented features.
  request.header.mutable_sequences(0)->set_num_tokens(2'000'000);
  outcome = RunStream(*stub_, {request.Messages()[0]});
  EXPECT_EQ(outcome.status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_THAT(outcome.status.error_message(),
              HasSubstr("sequences[0].num_tokens: 2000000 tokens exceed the server limit of "
                        "1048576 per sequence (--max_tokens)"));
  request.header.mutable_sequences(0)->set_num_tokens(100);
  request.header.set_transport(v1::TRANSPORT_CUDA_IPC);
  outcome = RunStream(*stub_, {request.Messages()[0]});
  EXPECT_EQ(outcome.status.error_code(), grpc::StatusCode::UNIMPLEMENTED);
  EXPECT_THAT(outcome.status.error_message(),
              HasSubstr("transport cuda_ipc is"));  // not built, or not enabled
  request.header.set_transport(v1::TRANSPORT_INLINE);

  outcome = RunStream(*stub_, {});  // half-close without a header
  EXPECT_EQ(outcome.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(outcome.status.error_message(), HasSubstr("before the header"));

  outcome = RunStream(*stub_, request.Messages());
  EXPECT_TRUE(outcome.status.ok()) << outcome.status.error_message();
  EXPECT_NE(outcome.summary(), nullptr);
}

TEST_F(KvcServerTest, RequestBytesLimit) {
  ServerOptions options;
  options.limits.max_request_bytes = 10000;
  StartServer(std::move(options));
  const TestRequest request = MakeRequest({{100, 0}}, 2, 2, 16, 1);  // 25600 bytes
  const StreamOutcome outcome = RunStream(*stub_, {request.Messages()[0]});
  EXPECT_EQ(outcome.status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_THAT(outcome.status.error_message(),
              HasSubstr("the header announces 25600 tensor bytes (1 sequences x 2 layers); the "
                        "server limit is 10000 bytes (--max_request_bytes)"));
}

TEST_F(KvcServerTest, StreamsBeyondTheLimitAreRefusedAtOnce) {
  ServerOptions options;
  options.limits.max_concurrent_streams = 1;
  StartServer(std::move(options));
  const TestRequest request = MakeRequest({{100, 0}}, 1, 2, 16, 1);
  const std::vector<v1::CompressRequest> messages = request.Messages();

  grpc::ClientContext first_context;
  auto first = stub_->Compress(&first_context);
  ASSERT_TRUE(first->Write(messages[0]));  // open, header sent, nothing else yet
  // Give the server time to create the first reactor.
  std::this_thread::sleep_for(std::chrono::milliseconds(200));

  const StreamOutcome refused = RunStream(*stub_, messages);
  EXPECT_EQ(refused.status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_THAT(refused.status.error_message(),
              HasSubstr("the limit is 1 (--max_concurrent_streams)"));

  for (size_t i = 1; i < messages.size(); ++i) ASSERT_TRUE(first->Write(messages[i]));
  first->WritesDone();
  v1::CompressResponse response;
  int results = 0;
  while (first->Read(&response)) results += response.has_layer_result();
  EXPECT_TRUE(first->Finish().ok());
  EXPECT_EQ(results, 1);

  // The slot is free again once the first stream is done.
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  EXPECT_TRUE(RunStream(*stub_, messages).status.ok());
}

TEST_F(KvcServerTest, CancelledStreamsReleaseEverything) {
  ServerOptions options;
  options.worker_threads = 1;
  StartServer(std::move(options));
  const TestRequest request = MakeRequest({{2048, 0}}, 6, 8, 128, 2);
  const std::vector<v1::CompressRequest> messages = request.Messages();
  for (int attempt = 0; attempt < 3; ++attempt) {
    grpc::ClientContext context;
    auto stream = stub_->Compress(&context);
    // Enough layers for jobs to be queued and running when the cancel lands.
    for (size_t i = 0; i < messages.size() / 2; ++i) ASSERT_TRUE(stream->Write(messages[i]));
    context.TryCancel();
    v1::CompressResponse response;
    while (stream->Read(&response)) {
    }
    EXPECT_EQ(stream->Finish().error_code(), grpc::StatusCode::CANCELLED);
  }
  // Everything the cancelled streams held is returned.
  const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  std::string metrics;
  while (std::chrono::steady_clock::now() < give_up) {
    metrics = HttpGet(server_->metrics_port(), "/metrics");
    if (metrics.find("kvcompress_buffered_bytes 0\n") != std::string::npos &&
        metrics.find("kvcompress_requests_in_flight 0\n") != std::string::npos) {
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  EXPECT_THAT(metrics, HasSubstr("kvcompress_buffered_bytes 0\n"));
  EXPECT_THAT(metrics, HasSubstr("kvcompress_requests_in_flight 0\n"));
  EXPECT_TRUE(RunStream(*stub_, MakeRequest({{100, 0}}, 1, 2, 16, 1).Messages()).status.ok());
}

TEST_F(KvcServerTest, MetricsEndpoint) {
  StartServer();
  ASSERT_TRUE(RunStream(*stub_, MakeRequest({{100, 0}}, 2, 2, 16, 1).Messages()).status.ok());
  TestRequest bad = MakeRequest({{100, 0}}, 2, 2, 16, 1);
  bad.header.mutable_method()->clear_scorer();
  EXPECT_FALSE(RunStream(*stub_, bad.Messages()).status.ok());
  bad.header.mutable_method()->mutable_scorer()->mutable_knorm();
  bad.header.mutable_geometry()->set_head_dim(0);
  EXPECT_FALSE(RunStream(*stub_, bad.Messages()).status.ok());

  // A stream leaves the in-flight gauge when its reactor is done, which can be just after
  // the client has read the final status: wait (bounded) for that before reading counters.
  std::string response;
  for (int attempt = 0; attempt < 250; ++attempt) {
    response = HttpGet(server_->metrics_port(), "/metrics");
    if (response.find("kvcompress_requests_in_flight 0\n") != std::string::npos) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  EXPECT_THAT(response, HasSubstr("HTTP/1.1 200 OK\r\n"));
  EXPECT_THAT(response, HasSubstr("Content-Type: text/plain; version=0.0.4\r\n"));
  EXPECT_THAT(response, HasSubstr("# TYPE kvcompress_requests_total counter\n"));
  EXPECT_THAT(response, HasSubstr("kvcompress_requests_total{method=\"knorm\",code=\"OK\"} 1\n"));
  EXPECT_THAT(response,
              HasSubstr("kvcompress_requests_total{method=\"unknown\",code=\"INVALID_ARGUMENT\"} "
                        "1\n"));
  EXPECT_THAT(response,
              HasSubstr("kvcompress_requests_total{method=\"knorm\",code=\"INVALID_ARGUMENT\"} "
                        "1\n"));
  EXPECT_THAT(response, HasSubstr("kvcompress_tokens_in_total 400\n"));
  EXPECT_THAT(response, HasSubstr("kvcompress_bytes_received_total{transport=\"inline\"} 25600\n"));
  EXPECT_THAT(response, HasSubstr("kvcompress_errors_total{reason=\"invalid_header\"} 2\n"));
  EXPECT_THAT(response,
              HasSubstr("kvcompress_request_stage_duration_seconds_count{stage=\"score\"} "
                        "1\n"));
  EXPECT_THAT(response,
              HasSubstr("kvcompress_request_duration_seconds_count{method=\"knorm\"} 2\n"));
  EXPECT_THAT(response,
              HasSubstr("# TYPE kvcompress_queue_depth gauge\nkvcompress_queue_depth 0\n"));
  EXPECT_THAT(response, HasSubstr("kvcompress_requests_in_flight 0\n"));
  EXPECT_THAT(HttpGet(server_->metrics_port(), "/other"), HasSubstr("404"));
}

TEST_F(KvcServerTest, ShutdownCancelsOpenStreamsAfterTheDeadline) {
  StartServer();
  const TestRequest request = MakeRequest({{100, 0}}, 2, 2, 16, 1);
  grpc::ClientContext context;
  auto stream = stub_->Compress(&context);
  ASSERT_TRUE(stream->Write(request.Messages()[0]));
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  const auto start = std::chrono::steady_clock::now();
  server_->Shutdown(std::chrono::milliseconds(200));
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(5));
  v1::CompressResponse response;
  while (stream->Read(&response)) {
  }
  EXPECT_FALSE(stream->Finish().ok());
}

TEST_F(KvcServerTest, ShutdownLetsOpenStreamsFinishAndRefusesNewOnes) {
  StartServer();
  const TestRequest request = MakeRequest({{100, 0}}, 2, 2, 16, 1);
  const std::vector<v1::CompressRequest> messages = request.Messages();
  grpc::ClientContext context;
  auto stream = stub_->Compress(&context);
  ASSERT_TRUE(stream->Write(messages[0]));
  std::this_thread::sleep_for(std::chrono::milliseconds(100));

  std::thread shutdown([&] { server_->Shutdown(std::chrono::seconds(20)); });
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  // Draining: a new stream is refused, the open one may finish.
  const StreamOutcome refused = RunStream(*stub_, messages);
  EXPECT_EQ(refused.status.error_code(), grpc::StatusCode::UNAVAILABLE);
  for (size_t i = 1; i < messages.size(); ++i) ASSERT_TRUE(stream->Write(messages[i]));
  stream->WritesDone();
  v1::CompressResponse response;
  bool summary = false;
  while (stream->Read(&response)) summary = response.has_summary();
  EXPECT_TRUE(stream->Finish().ok());
  EXPECT_TRUE(summary);
  const auto start = std::chrono::steady_clock::now();
  shutdown.join();
  // Shutdown returns once the last stream is done, not at the deadline.
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(5));
}

TEST(KvcServerStartTest, BusyAddressIsUnavailable) {
  ServerOptions first_options;
  first_options.address = "127.0.0.1:0";
  first_options.metrics_address = "";
  auto first = KvcServer::Start(std::move(first_options));
  ASSERT_TRUE(first.ok()) << first.status();
  ServerOptions second_options;
  second_options.address = "127.0.0.1:" + std::to_string((*first)->port());
  second_options.metrics_address = "";
  auto second = KvcServer::Start(std::move(second_options));
  ASSERT_FALSE(second.ok());
  EXPECT_EQ(second.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ((*first)->metrics_port(), 0);
}

}  // namespace
}  // namespace kvcompress
