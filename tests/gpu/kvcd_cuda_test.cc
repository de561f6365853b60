// kvcd with --backend=cuda, in process: requests the GPU runs (the merging reducers included)
// come back from the cuda backend with the CPU reference's kept sets, merged counts and rows;
// requests using a stage the GPU lacks (a head_dim it is not built for) fall back to the CPU
// backend (and say so in the summary and the metrics); GetServerInfo and /metrics describe the
// device; device memory is back to zero once requests are done.
//
// Skips (GTEST_SKIP) when there is no usable CUDA device.
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "client/client.h"
#include "gmock/gmock.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "kernels/backend.h"
#include "kernels/compression_pipeline.h"
#include "kernels/cuda_backend.h"
#include "kernels/dtype.h"
#include "service/kvcompress_server.h"
#include "service/spec_conversion.h"
#include "tests/integration/reference_results.h"

namespace kvcompress {
namespace {

using ::testing::Contains;
using ::testing::ElementsAre;
using ::testing::HasSubstr;

// Two sequences of different lengths, 3 layers, GQA 4, D `head_dim` (128), bf16, fixed-seed
// data. With `similar_key_runs` each key continues the previous one's with a small perturbation
// or starts afresh (probability 0.35), so that merge_similar finds sets to merge.
struct Batch {
  v1::CompressHeader header;
  std::vector<std::vector<LayerInput>> layers;  // [sequence][layer]
};

Batch MakeBatch(uint32_t seed, int head_dim = 128, bool similar_key_runs = false) {
  Batch batch;
  v1::CacheGeometry* geometry = batch.header.mutable_geometry();
  geometry->set_num_layers(3);
  geometry->set_num_kv_heads(2);
  geometry->set_num_query_heads(8);
  geometry->set_head_dim(head_dim);
  geometry->set_dtype(v1::DTYPE_BFLOAT16);
  geometry->set_layout(v1::LAYOUT_HND);
  batch.header.mutable_method()->mutable_scorer()->mutable_snapkv()->set_window_size(32);
  batch.header.mutable_method()->set_keep_ratio(0.2);
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_real_distribution<float> uniform(0.0f, 1.0f);
  const auto key_runs_bf16 = [&](int tokens) {  // [2, tokens, head_dim] (HND)
    std::vector<std::byte> bytes(size_t{2} * tokens * head_dim * 2);
    std::vector<float> row(head_dim);
    for (size_t t = 0; t < size_t{2} * tokens; ++t) {
      const bool fresh = t % tokens == 0 || uniform(rng) < 0.35f;
      for (int d = 0; d < head_dim; ++d) {
        row[d] = fresh ? normal(rng) : row[d] + 0.35f * normal(rng);
        const uint16_t bits = FloatToBFloat16(row[d]);
        std::memcpy(&bytes[(t * head_dim + d) * 2], &bits, 2);
      }
    }
    return bytes;
  };
  const auto random_bf16 = [&](size_t elements) {
    std::vector<std::byte> bytes(elements * 2);
    for (size_t i = 0; i < elements; ++i) {
      const uint16_t bits = FloatToBFloat16(normal(rng));
      std::memcpy(&bytes[i * 2], &bits, 2);
    }
    return bytes;
  };
  for (int tokens : {2053, 311}) {
    v1::SequenceShape* sequence = batch.header.add_sequences();
    sequence->set_num_tokens(tokens);
    sequence->set_num_window_queries(32);
    std::vector<LayerInput> layers;
    for (int l = 0; l < 3; ++l) {
      LayerInput layer;
      layer.sequence = batch.header.sequences_size() - 1;
      layer.layer = l;
      layer.shape = SequenceShape{tokens, 32, 0};
      layer.keys =
          similar_key_runs ? key_runs_bf16(tokens) : random_bf16(size_t{2} * tokens * head_dim);
      layer.values = random_bf16(size_t{2} * tokens * head_dim);
      layer.queries = random_bf16(size_t{8} * 32 * head_dim);
      layers.push_back(std::move(layer));
    }
    batch.layers.push_back(std::move(layers));
  }
  return batch;
}

CacheRequest RequestOf(const Batch& batch) {
  CacheRequest request;
  request.header = batch.header;
  for (const auto& sequence : batch.layers) {
    request.tensors.emplace_back();
    for (const LayerInput& layer : sequence) {
      request.tensors.back().push_back(LayerTensors{layer.keys, layer.values, layer.queries, {}});
    }
  }
  return request;
}

class KvcdCudaTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!MakeCudaBackend(CudaBackendOptions{}).ok()) GTEST_SKIP() << "no usable CUDA device";
    ServerOptions options;
    options.address = "127.0.0.1:0";
    options.metrics_address = "";
    options.worker_threads = 2;
    options.backend_threads = 4;
    options.backend_kind = "cuda";
    auto server = KvcServer::Start(std::move(options));
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = std::move(server).value();
    auto client = Client::Connect("127.0.0.1:" + std::to_string(server_->port()));
    ASSERT_TRUE(client.ok()) << client.status();
    client_ = std::move(client).value();
  }
  void TearDown() override {
    client_.reset();
    if (server_ != nullptr) server_->Shutdown(std::chrono::milliseconds(100));
  }

  void ExpectMatchesReference(const Batch& batch, const std::string& backend) {
    absl::StatusOr<CompressedCache> cache = client_->CompressCache(RequestOf(batch));
    ASSERT_TRUE(cache.ok()) << cache.status();
    EXPECT_EQ(cache->summary.backend(), backend);
    const auto reference = testing::ReferenceResults(batch.header, batch.layers, 4);
    for (size_t s = 0; s < reference.size(); ++s) {
      for (size_t l = 0; l < reference[s].size(); ++l) {
        const CompressedLayer& got = cache->layers[s][l];
        const LayerResult& want = reference[s][l];
        EXPECT_EQ(got.kept, want.kept) << "sequence " << s << " layer " << l;
        EXPECT_EQ(got.positions, want.positions) << "sequence " << s << " layer " << l;
        EXPECT_TRUE(got.keys == want.keys) << "keys differ, sequence " << s << " layer " << l;
        EXPECT_TRUE(got.values == want.values) << "values differ";
        EXPECT_EQ(got.merged, want.merged);
        EXPECT_NEAR(got.attention_mass_kept, want.attention_mass_kept, 1e-4);
      }
    }
  }

  v1::ServerInfo Info() {
    absl::StatusOr<v1::ServerInfo> info = client_->GetServerInfo();
    EXPECT_TRUE(info.ok()) << info.status();
    return info.ok() ? *info : v1::ServerInfo();
  }

  std::unique_ptr<KvcServer> server_;
  std::unique_ptr<Client> client_;
};

TEST_F(KvcdCudaTest, ServerInfoDescribesTheGpu) {
  const v1::ServerInfo info = Info();
  EXPECT_EQ(info.backend(), "cuda");
  EXPECT_THAT(info.backends(), ElementsAre("cuda", "cpu"));
  bool found_gpu = false;
  for (const v1::DeviceInfo& device : info.devices()) {
    if (device.backend() != "cuda") continue;
    found_gpu = true;
    EXPECT_FALSE(device.name().empty());
    EXPECT_FALSE(device.compute_capability().empty());
    EXPECT_GT(device.memory_bytes(), 0u);
    EXPECT_GT(device.memory_budget_bytes(), 0u);
    EXPECT_LE(device.memory_budget_bytes(), device.memory_bytes());
  }
  EXPECT_TRUE(found_gpu);
  for (const v1::MethodInfo& method : info.methods()) {
    if (method.name() == "snapkv" || method.name() == "knorm" || method.name() == "drop") {
      EXPECT_THAT(method.backends(), Contains("cuda")) << method.name();
    }
    if (method.name() == "merge_similar" || method.name() == "merge_nearest") {
      EXPECT_THAT(method.backends(), Contains("cuda")) << method.name();
    }
  }
}

TEST_F(KvcdCudaTest, GpuRequestsMatchTheReferenceAndReleaseDeviceMemory) {
  ExpectMatchesReference(MakeBatch(7), "cuda");
  Batch pyramid = MakeBatch(8);
  pyramid.header.mutable_method()->mutable_layer_budget()->mutable_pyramid();
  ExpectMatchesReference(pyramid, "cuda");
  // DynamicKV: the pipeline scores every layer on the GPU, then compresses with its budgets.
  Batch dynamic = MakeBatch(10);
  dynamic.header.mutable_method()->mutable_layer_budget()->mutable_dynamic();
  ExpectMatchesReference(dynamic, "cuda");
  // AdaKV over keydiff scores: ragged heads from the GPU.
  Batch adaptive = MakeBatch(11);
  adaptive.header.mutable_method()->mutable_scorer()->mutable_keydiff();
  adaptive.header.mutable_method()->mutable_head_budget()->mutable_adaptive();
  ExpectMatchesReference(adaptive, "cuda");
  const v1::ServerInfo info = Info();
  for (const v1::DeviceInfo& device : info.devices()) {
    if (device.backend() == "cuda") {
      EXPECT_EQ(device.memory_in_use_bytes(), 0u);
    }
  }
  const std::string metrics = server_->metrics().Exposition();
  EXPECT_THAT(metrics, HasSubstr("kvcompress_backend_requests_total{backend=\"cuda\",route="
                                 "\"preferred\"} 4"));
  EXPECT_THAT(metrics, HasSubstr("kvcompress_device_memory_bytes{device=\"0\",state=\"budget\"}"));
}

TEST_F(KvcdCudaTest, MergingReducersRunOnTheGpu) {
  // knorm scores are the CPU's bit for bit, so merge_similar's ranking is too.
  Batch similar = MakeBatch(12, 128, /*similar_key_runs=*/true);
  similar.header.mutable_method()->mutable_scorer()->mutable_knorm();
  similar.header.mutable_method()->mutable_reducer()->mutable_merge_similar();
  similar.header.mutable_output()->set_return_merged_counts(true);
  ExpectMatchesReference(similar, "cuda");
  Batch nearest = MakeBatch(13);
  nearest.header.mutable_method()->mutable_reducer()->mutable_merge_nearest();
  nearest.header.mutable_output()->set_return_merged_counts(true);
  ExpectMatchesReference(nearest, "cuda");
  const v1::ServerInfo info = Info();
  for (const v1::DeviceInfo& device : info.devices()) {
    if (device.backend() == "cuda") {
      EXPECT_EQ(device.memory_in_use_bytes(), 0u);
    }
  }
  const std::string metrics = server_->metrics().Exposition();
  EXPECT_THAT(metrics, HasSubstr("kvcompress_backend_requests_total{backend=\"cuda\",route="
                                 "\"preferred\"} 2"));
}

TEST_F(KvcdCudaTest, StagesTheGpuLacksFallBackToTheCpu) {
  Batch odd_dim = MakeBatch(9, /*head_dim=*/96);
  ExpectMatchesReference(odd_dim, "cpu");
  const std::string metrics = server_->metrics().Exposition();
  EXPECT_THAT(metrics, HasSubstr("kvcompress_backend_requests_total{backend=\"cpu\",route="
                                 "\"fallback\"} 1"));
}

}  // namespace
}  // namespace kvcompress
