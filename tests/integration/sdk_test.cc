// The C++ SDK against a real kvcd: whole-cache and streaming calls on a batch of sequences
// with different lengths, byte-exact against the in-process engine; per-layer results
// arrive before the stream ends; padded output; health, server info and /metrics.
#include <cstring>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "client/client.h"
#include "gmock/gmock.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "kernels/backend.h"
#include "kernels/compression_pipeline.h"
#include "kernels/dtype.h"
#include "service/spec_conversion.h"
#include "tests/integration/kvcd_process.h"
#include "tests/integration/reference_results.h"

namespace kvcompress::testing {
namespace {

using ::testing::HasSubstr;

// A batch of two sequences of different lengths, 3 layers, GQA 4, bf16, fixed-seed data.
struct Batch {
  v1::CompressHeader header;
  std::vector<std::vector<LayerInput>> layers;  // [sequence][layer]
};

Batch MakeBatch(v1::Layout layout, uint32_t seed) {
  Batch batch;
  auto* g = batch.header.mutable_geometry();
  g->set_num_layers(3);
  g->set_num_kv_heads(2);
  g->set_num_query_heads(8);
  g->set_head_dim(64);
  g->set_dtype(v1::DTYPE_BFLOAT16);
  g->set_layout(layout);
  batch.header.mutable_method()->mutable_scorer()->mutable_snapkv()->set_window_size(16);
  batch.header.mutable_method()->set_keep_ratio(0.3);
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  auto random_bf16 = [&](size_t elements) {
    std::vector<std::byte> bytes(elements * 2);
    for (size_t i = 0; i < elements; ++i) {
      const uint16_t bits = FloatToBFloat16(normal(rng));
      std::memcpy(&bytes[i * 2], &bits, 2);
    }
    return bytes;
  };
  for (int tokens : {733, 97}) {
    auto* sequence = batch.header.add_sequences();
    sequence->set_num_tokens(tokens);
    sequence->set_num_window_queries(16);
    std::vector<LayerInput> layers;
    for (int l = 0; l < 3; ++l) {
      LayerInput layer;
      layer.sequence = batch.header.sequences_size() - 1;
      layer.layer = l;
      layer.shape = SequenceShape{tokens, 16, 0};
      layer.keys = random_bf16(size_t{2} * tokens * 64);
      layer.values = random_bf16(size_t{2} * tokens * 64);
      layer.queries = random_bf16(size_t{8} * 16 * 64);
      layers.push_back(std::move(layer));
    }
    batch.layers.push_back(std::move(layers));
  }
  return batch;
}

LayerTensors TensorsOf(const LayerInput& layer) {
  return LayerTensors{layer.keys, layer.values, layer.queries, {}};
}

// The in-process engine's results for the batch: [sequence][layer].
std::vector<std::vector<LayerResult>> LocalResults(const Batch& batch) {
  return ReferenceResults(batch.header, batch.layers, 2);
}

void ExpectSameAsLocal(const CompressedLayer& got, const LayerResult& want) {
  EXPECT_EQ(got.kept, want.kept);
  EXPECT_EQ(got.positions, want.positions);
  EXPECT_TRUE(got.keys == want.keys) << "keys differ";
  EXPECT_TRUE(got.values == want.values) << "values differ";
  EXPECT_DOUBLE_EQ(got.attention_mass_kept, want.attention_mass_kept);
}

class SdkTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    auto server = KvcdProcess::Start();
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = server->release();
  }
  static void TearDownTestSuite() { delete server_; }

  void SetUp() override {
    auto client = Client::Connect(server_->target());
    ASSERT_TRUE(client.ok()) << client.status();
    client_ = std::move(*client);
  }

  static KvcdProcess* server_;
  std::unique_ptr<Client> client_;
};

KvcdProcess* SdkTest::server_ = nullptr;

TEST_F(SdkTest, CompressCacheMatchesTheEngineForABatchOfDifferentLengths) {
  for (v1::Layout layout : {v1::LAYOUT_HND, v1::LAYOUT_NHD}) {
    const Batch batch = MakeBatch(layout, 11);
    CacheRequest request;
    request.header = batch.header;
    for (const auto& sequence : batch.layers) {
      request.tensors.emplace_back();
      for (const LayerInput& layer : sequence) request.tensors.back().push_back(TensorsOf(layer));
    }
    auto result = client_->CompressCache(request);
    ASSERT_TRUE(result.ok()) << result.status();
    const auto local = LocalResults(batch);
    ASSERT_EQ(result->layers.size(), 2u);
    for (size_t s = 0; s < 2; ++s) {
      ASSERT_EQ(result->layers[s].size(), 3u);
      for (size_t l = 0; l < 3; ++l) ExpectSameAsLocal(result->layers[s][l], local[s][l]);
    }
    // Σ over sequences × layers × heads: T·H_kv·L tokens in; ⌊0.3·T⌋ per head kept.
    EXPECT_EQ(result->summary.tokens_in(), uint64_t{(733 + 97) * 2 * 3});
    EXPECT_EQ(result->summary.tokens_kept(), uint64_t{(219 + 29) * 2 * 3});
  }
}

TEST_F(SdkTest, StreamingSessionReturnsEachLayerBeforeTheNextIsSent) {
  const Batch batch = MakeBatch(v1::LAYOUT_HND, 12);
  auto session = client_->StartCompress(batch.header);
  ASSERT_TRUE(session.ok()) << session.status();
  const auto local = LocalResults(batch);
  for (int l = 0; l < 3; ++l) {
    for (int s = 0; s < 2; ++s) {
      ASSERT_TRUE((*session)->SendLayer(s, l, TensorsOf(batch.layers[s][l])).ok());
    }
    // Both sequences' results for layer l arrive while later layers are still unsent.
    for (int received = 0; received < 2; ++received) {
      auto next = (*session)->NextResult();
      ASSERT_TRUE(next.ok()) << next.status();
      ASSERT_TRUE(next->has_value());
      EXPECT_EQ((*next)->layer, uint32_t(l));
      ExpectSameAsLocal(**next, local[(*next)->sequence][l]);
    }
  }
  auto summary = (*session)->Finish();
  ASSERT_TRUE(summary.ok()) << summary.status();
  EXPECT_GT(summary->bytes_in(), 0u);
  EXPECT_GT(summary->bytes_out(), 0u);
  EXPECT_GT(summary->timings().total_seconds(), 0.0);
  EXPECT_GT(summary->timings().score_seconds(), 0.0);
}

TEST_F(SdkTest, PaddedOutputMatchesThePaddedLayoutOfTheEngine) {
  Batch batch = MakeBatch(v1::LAYOUT_HND, 13);
  batch.header.mutable_method()->mutable_scorer()->mutable_knorm();
  batch.header.mutable_output()->set_format(v1::OUTPUT_FORMAT_PADDED);
  CacheRequest request;
  request.header = batch.header;
  for (const auto& sequence : batch.layers) {
    request.tensors.emplace_back();
    for (const LayerInput& layer : sequence) request.tensors.back().push_back(TensorsOf(layer));
  }
  auto result = client_->CompressCache(request);
  ASSERT_TRUE(result.ok()) << result.status();
  const auto local = LocalResults(batch);
  const CacheGeometry geometry = *GeometryFromProto(batch.header.geometry());
  for (size_t s = 0; s < 2; ++s) {
    for (size_t l = 0; l < 3; ++l) {
      const PaddedLayerResult want = ToPadded(local[s][l], geometry);
      const CompressedLayer& got = result->layers[s][l];
      EXPECT_EQ(got.format, v1::OUTPUT_FORMAT_PADDED);
      EXPECT_EQ(int(got.max_kept), want.max_kept);
      EXPECT_EQ(got.positions, want.positions);
      EXPECT_TRUE(got.keys == want.keys);
      EXPECT_TRUE(got.values == want.values);
    }
  }
}

TEST_F(SdkTest, ServerInfoHealthAndMetrics) {
  auto info = client_->GetServerInfo();
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->backend(), "cpu");
  // Every stage of DESIGN §3 is listed, with whether this build runs it.
  std::set<std::string> listed;
  bool snapkv_implemented = false;
  for (const auto& method : info->methods()) {
    listed.insert(method.name());
    if (method.name() == "snapkv") snapkv_implemented = method.implemented();
  }
  EXPECT_TRUE(snapkv_implemented);
  for (const char* name :
       {"snapkv", "knorm", "streaming", "observed", "tova", "keydiff", "uniform", "pyramid",
        "dynamic", "adaptive", "drop", "merge_similar", "merge_nearest"}) {
    EXPECT_TRUE(listed.count(name)) << name << " missing from GetServerInfo";
  }

  auto channel = grpc::CreateChannel(server_->target(), grpc::InsecureChannelCredentials());
  auto health = grpc::health::v1::Health::NewStub(channel);
  for (const char* service : {"", "kvcompress.v1.KvCompress"}) {
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
    grpc::health::v1::HealthCheckRequest request;
    request.set_service(service);
    grpc::health::v1::HealthCheckResponse response;
    ASSERT_TRUE(health->Check(&context, request, &response).ok());
    EXPECT_EQ(response.status(), grpc::health::v1::HealthCheckResponse::SERVING);
  }

  // One successful knorm request, then the counters must show it.
  Batch batch = MakeBatch(v1::LAYOUT_HND, 14);
  batch.header.mutable_method()->mutable_scorer()->mutable_knorm();
  CacheRequest request;
  request.header = batch.header;
  for (const auto& sequence : batch.layers) {
    request.tensors.emplace_back();
    for (const LayerInput& layer : sequence) request.tensors.back().push_back(TensorsOf(layer));
  }
  ASSERT_TRUE(client_->CompressCache(request).ok());
  auto metrics = HttpGet(server_->metrics_port(), "/metrics");
  ASSERT_TRUE(metrics.ok()) << metrics.status();
  EXPECT_THAT(*metrics, HasSubstr("# TYPE kvcompress_requests_total counter"));
  EXPECT_THAT(*metrics, HasSubstr("method=\"knorm\""));
  EXPECT_THAT(*metrics, HasSubstr("kvcompress_request_duration_seconds_bucket"));
  EXPECT_THAT(*metrics, HasSubstr("kvcompress_requests_in_flight"));
}

TEST_F(SdkTest, UnreachableServerIsUnavailableWithinTheDeadline) {
  auto client = Client::Connect("127.0.0.1:1");
  ASSERT_TRUE(client.ok());
  auto info = (*client)->GetServerInfo(absl::Seconds(2));
  EXPECT_FALSE(info.ok());
  EXPECT_TRUE(absl::IsUnavailable(info.status()) || absl::IsDeadlineExceeded(info.status()))
      << info.status();
}

}  // namespace
}  // namespace kvcompress::testing
