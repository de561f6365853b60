// The cuda_ipc transport across two processes on one GPU: this test process (the "prefill
// worker") allocates K, V and Q_win with cudaMalloc, fills them with fixed-seed random data,
// registers the allocation on a channel of a kvcd process started with --backend=cuda
// --allow_cuda_ipc, and compresses in place with LayerReady messages. Results must equal, byte
// for byte, what the inline transport returns for the same tensors from the same kvcd.
// Faults: a bad region offset (INVALID_ARGUMENT, the channel and kvcd keep serving), a
// deadline that passes (DEADLINE_EXCEEDED), and a client killed mid-request (a child process:
// this binary re-run with KVC_CUDA_IPC_CHILD set), after which kvcd holds no device memory,
// closes the orphaned channel after its idle timeout and keeps serving.
//
// Skipped without a CUDA device. Run: ctest -R gpu_cuda_ipc_test (label gpu).
#include <cuda_runtime_api.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "client/client.h"
#include "client/cuda_ipc_channel.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/gpu/gpu_test_support.h"
#include "tests/integration/kvcd_process.h"

namespace kvcompress {
namespace {

using ::kvcompress::testing::DeviceMemoryInUse;
using ::kvcompress::testing::KvcdProcess;
using ::testing::HasSubstr;

constexpr int kLayers = 3;
constexpr int kKvHeads = 4;
constexpr int kQueryHeads = 8;
constexpr int kHeadDim = 128;
constexpr int kTokens = 1000;
constexpr int kWindow = 16;

bool HaveGpu() {
  int count = 0;
  const bool ok = cudaGetDeviceCount(&count) == cudaSuccess && count > 0;
  (void)cudaGetLastError();
  return ok;
}

v1::CompressHeader Header() {
  v1::CompressHeader header;
  v1::CacheGeometry& geometry = *header.mutable_geometry();
  geometry.set_num_layers(kLayers);
  geometry.set_num_kv_heads(kKvHeads);
  geometry.set_num_query_heads(kQueryHeads);
  geometry.set_head_dim(kHeadDim);
  geometry.set_dtype(v1::DTYPE_FLOAT32);
  geometry.set_layout(v1::LAYOUT_HND);
  v1::SequenceShape& sequence = *header.add_sequences();
  sequence.set_num_tokens(kTokens);
  sequence.set_num_window_queries(kWindow);
  header.mutable_method()->mutable_scorer()->mutable_snapkv()->set_window_size(kWindow);
  header.mutable_method()->set_keep_ratio(0.25);
  return header;
}

constexpr size_t kKvBytes = size_t{kKvHeads} * kTokens * kHeadDim * sizeof(float);
constexpr size_t kQueryBytes = size_t{kQueryHeads} * kWindow * kHeadDim * sizeof(float);
constexpr size_t Align(size_t bytes) { return (bytes + 255) / 256 * 256; }
constexpr size_t kLayerStride = 2 * Align(kKvBytes) + Align(kQueryBytes);

// [layer][keys, values, queries] host tensors, fixed seed.
std::vector<std::vector<std::vector<float>>> RandomCache() {
  std::mt19937 generator(20261122);
  std::normal_distribution<float> normal(0.f, 1.f);
  std::vector<std::vector<std::vector<float>>> cache(kLayers);
  for (auto& layer : cache) {
    for (size_t bytes : {kKvBytes, kKvBytes, kQueryBytes}) {
      std::vector<float> tensor(bytes / sizeof(float));
      for (float& x : tensor) x = normal(generator);
      layer.push_back(std::move(tensor));
    }
  }
  return cache;
}

std::span<const std::byte> Bytes(const std::vector<float>& tensor) {
  return std::as_bytes(std::span<const float>(tensor));
}

// The cache in one cudaMalloc allocation: layer l's keys at l·kLayerStride, values and
// queries after them (256-byte aligned).
class DeviceCache {
 public:
  explicit DeviceCache(const std::vector<std::vector<std::vector<float>>>& cache) {
    EXPECT_EQ(cudaMalloc(&base_, kLayers * kLayerStride), cudaSuccess);
    for (int l = 0; l < kLayers; ++l) {
      EXPECT_EQ(cudaMemcpy(Keys(l), cache[l][0].data(), kKvBytes, cudaMemcpyHostToDevice),
                cudaSuccess);
      EXPECT_EQ(cudaMemcpy(Values(l), cache[l][1].data(), kKvBytes, cudaMemcpyHostToDevice),
                cudaSuccess);
      EXPECT_EQ(cudaMemcpy(Queries(l), cache[l][2].data(), kQueryBytes, cudaMemcpyHostToDevice),
                cudaSuccess);
    }
  }
  ~DeviceCache() { cudaFree(base_); }
  std::byte* base() const { return static_cast<std::byte*>(base_); }
  size_t bytes() const { return kLayers * kLayerStride; }
  std::byte* Keys(int l) const { return base() + l * kLayerStride; }
  std::byte* Values(int l) const { return Keys(l) + Align(kKvBytes); }
  std::byte* Queries(int l) const { return Values(l) + Align(kKvBytes); }

 private:
  void* base_ = nullptr;
};

absl::StatusOr<LayerRegions> RegionsOf(const CudaIpcChannel& channel, uint32_t region,
                                       const DeviceCache& cache, int layer) {
  LayerRegions regions;
  absl::StatusOr<RegionSlice> keys = channel.Slice(region, cache.Keys(layer), kKvBytes);
  if (!keys.ok()) return keys.status();
  absl::StatusOr<RegionSlice> values = channel.Slice(region, cache.Values(layer), kKvBytes);
  if (!values.ok()) return values.status();
  absl::StatusOr<RegionSlice> queries = channel.Slice(region, cache.Queries(layer), kQueryBytes);
  if (!queries.ok()) return queries.status();
  regions.keys = *keys;
  regions.values = *values;
  regions.queries = *queries;
  return regions;
}

// Every layer through cuda_ipc; results by layer.
absl::StatusOr<std::vector<CompressedLayer>> CompressInPlace(Client& client,
                                                             const CudaIpcChannel& channel,
                                                             uint32_t region,
                                                             const DeviceCache& cache,
                                                             absl::Duration deadline) {
  v1::CompressHeader header = Header();
  channel.Attach(header);
  SessionOptions options;
  options.deadline = deadline;
  absl::StatusOr<std::unique_ptr<CompressSession>> session =
      client.StartCompress(header, std::move(options));
  if (!session.ok()) return session.status();
  for (int l = 0; l < kLayers; ++l) {
    absl::StatusOr<LayerRegions> regions = RegionsOf(channel, region, cache, l);
    if (!regions.ok()) return regions.status();
    if (absl::Status sent = (*session)->SendLayerReady(0, l, *regions); !sent.ok()) return sent;
  }
  absl::StatusOr<v1::CompressSummary> summary = (*session)->Finish();
  if (!summary.ok()) return summary.status();
  std::vector<CompressedLayer> layers(kLayers);
  while (true) {
    absl::StatusOr<std::optional<CompressedLayer>> next = (*session)->NextResult();
    if (!next.ok()) return next.status();
    if (!next->has_value()) break;
    const uint32_t layer = (*next)->layer;
    layers.at(layer) = std::move(**next);
  }
  return layers;
}

class CudaIpcTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (std::getenv("KVC_CUDA_IPC_CHILD") != nullptr) GTEST_SKIP() << "child process";
    if (!HaveGpu()) GTEST_SKIP() << "no CUDA device";
    auto kvcd =
        KvcdProcess::Start({"--backend=cuda", "--allow_cuda_ipc", "--channel_idle_timeout=3s"});
    ASSERT_TRUE(kvcd.ok()) << kvcd.status();
    kvcd_ = std::move(kvcd).value();
    auto client = Client::Connect(kvcd_->target());
    ASSERT_TRUE(client.ok()) << client.status();
    client_ = std::move(client).value();
    cache_ = RandomCache();
    device_ = std::make_unique<DeviceCache>(cache_);
  }

  // The inline transport's answer for the same tensors from the same kvcd.
  std::vector<CompressedLayer> Inline() {
    CacheRequest request;
    request.header = Header();
    request.tensors.resize(1);
    for (int l = 0; l < kLayers; ++l) {
      request.tensors[0].push_back(
          LayerTensors{Bytes(cache_[l][0]), Bytes(cache_[l][1]), Bytes(cache_[l][2]), {}});
    }
    absl::StatusOr<CompressedCache> result = client_->CompressCache(request);
    EXPECT_TRUE(result.ok()) << result.status();
    return result.ok() ? result->layers[0] : std::vector<CompressedLayer>();
  }

  std::unique_ptr<KvcdProcess> kvcd_;
  std::unique_ptr<Client> client_;
  std::vector<std::vector<std::vector<float>>> cache_;
  std::unique_ptr<DeviceCache> device_;
};

void ExpectSameLayers(const std::vector<CompressedLayer>& got,
                      const std::vector<CompressedLayer>& want) {
  ASSERT_EQ(got.size(), want.size());
  for (size_t l = 0; l < got.size(); ++l) {
    SCOPED_TRACE(absl::StrCat("layer ", l));
    EXPECT_EQ(got[l].kept, want[l].kept);
    EXPECT_EQ(got[l].positions, want[l].positions);
    EXPECT_TRUE(got[l].keys == want[l].keys);
    EXPECT_TRUE(got[l].values == want[l].values);
    EXPECT_DOUBLE_EQ(got[l].attention_mass_kept, want[l].attention_mass_kept);
  }
}

TEST_F(CudaIpcTest, InPlaceResultsEqualTheInlineTransport) {
  absl::StatusOr<std::unique_ptr<CudaIpcChannel>> channel = OpenCudaIpcChannel(*client_);
  ASSERT_TRUE(channel.ok()) << channel.status();
  absl::StatusOr<uint32_t> region = (*channel)->RegisterRegion(device_->base(), device_->bytes());
  ASSERT_TRUE(region.ok()) << region.status();

  const std::vector<CompressedLayer> want = Inline();
  absl::StatusOr<std::vector<CompressedLayer>> got =
      CompressInPlace(*client_, **channel, *region, *device_, absl::Seconds(60));
  ASSERT_TRUE(got.ok()) << got.status();
  ExpectSameLayers(*got, want);
  for (const CompressedLayer& layer : *got) EXPECT_EQ(layer.total_kept(), kKvHeads * 250);
  // The same channel again (regions are opened once per channel).
  got = CompressInPlace(*client_, **channel, *region, *device_, absl::Seconds(60));
  ASSERT_TRUE(got.ok()) << got.status();
  ExpectSameLayers(*got, want);
  EXPECT_EQ(DeviceMemoryInUse(*client_), 0u);
  EXPECT_TRUE((*channel)->Close().ok());
}

TEST_F(CudaIpcTest, ResultsWrittenIntoAClientRegionEqualTheInlineTransport) {
  absl::StatusOr<std::unique_ptr<CudaIpcChannel>> channel = OpenCudaIpcChannel(*client_);
  ASSERT_TRUE(channel.ok()) << channel.status();
  absl::StatusOr<uint32_t> region = (*channel)->RegisterRegion(device_->base(), device_->bytes());
  ASSERT_TRUE(region.ok()) << region.status();
  // One output allocation, a slot per layer with room for every token kept.
  const uint64_t slot = 2 * kKvBytes + kKvHeads * kTokens * sizeof(int32_t) + 64;
  void* output = nullptr;
  ASSERT_EQ(cudaMalloc(&output, kLayers * slot), cudaSuccess);
  ASSERT_EQ(cudaMemset(output, 0xab, kLayers * slot), cudaSuccess);
  absl::StatusOr<uint32_t> output_region = (*channel)->RegisterRegion(output, kLayers * slot);
  ASSERT_TRUE(output_region.ok()) << output_region.status();

  const std::vector<CompressedLayer> want = Inline();
  v1::CompressHeader header = Header();
  (*channel)->Attach(header);
  auto session = client_->StartCompress(header);
  ASSERT_TRUE(session.ok()) << session.status();
  for (int l = 0; l < kLayers; ++l) {
    absl::StatusOr<LayerRegions> regions = RegionsOf(**channel, *region, *device_, l);
    ASSERT_TRUE(regions.ok()) << regions.status();
    regions->output = RegionSlice{*output_region, l * slot, slot};
    ASSERT_TRUE((*session)->SendLayerReady(0, l, *regions).ok());
  }
  absl::StatusOr<v1::CompressSummary> summary = (*session)->Finish();
  ASSERT_TRUE(summary.ok()) << summary.status();
  EXPECT_EQ(summary->bytes_out(), 0u);  // nothing came over the stream
  int layers = 0;
  while (true) {
    absl::StatusOr<std::optional<CompressedLayer>> next = (*session)->NextResult();
    ASSERT_TRUE(next.ok()) << next.status();
    if (!next->has_value()) break;
    const CompressedLayer& got = **next;
    const CompressedLayer& expected = want.at(got.layer);
    SCOPED_TRACE(absl::StrCat("layer ", got.layer));
    ++layers;
    EXPECT_TRUE(got.in_output_region);
    EXPECT_TRUE(got.keys.empty());
    EXPECT_EQ(got.kept, expected.kept);
    EXPECT_DOUBLE_EQ(got.attention_mass_kept, expected.attention_mass_kept);
    // The bytes in the region, where LayerReady.output says they go.
    const uint64_t keys_bytes = expected.keys.size();
    const uint64_t values_at = (keys_bytes + 15) / 16 * 16;
    const uint64_t positions_at = (values_at + keys_bytes + 15) / 16 * 16;
    std::vector<std::byte> bytes(positions_at + expected.positions.size() * sizeof(int32_t));
    ASSERT_EQ(cudaMemcpy(bytes.data(), static_cast<std::byte*>(output) + got.layer * slot,
                         bytes.size(), cudaMemcpyDeviceToHost),
              cudaSuccess);
    EXPECT_EQ(std::memcmp(bytes.data(), expected.keys.data(), keys_bytes), 0);
    EXPECT_EQ(std::memcmp(bytes.data() + values_at, expected.values.data(), keys_bytes), 0);
    EXPECT_EQ(std::memcmp(bytes.data() + positions_at, expected.positions.data(),
                          expected.positions.size() * sizeof(int32_t)),
              0);
  }
  EXPECT_EQ(layers, kLayers);

  // A slot too small for the result: INVALID_ARGUMENT naming the layer, kvcd serving.
  v1::CompressHeader small_header = Header();
  (*channel)->Attach(small_header);
  auto small = client_->StartCompress(small_header);
  ASSERT_TRUE(small.ok());
  for (int l = 0; l < kLayers; ++l) {
    absl::StatusOr<LayerRegions> regions = RegionsOf(**channel, *region, *device_, l);
    ASSERT_TRUE(regions.ok());
    regions->output = RegionSlice{*output_region, l * slot, 4096};
    if (!(*small)->SendLayerReady(0, l, *regions).ok()) break;  // the stream may fail first
  }
  absl::Status status = (*small)->Finish().status();
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << status;
  EXPECT_THAT(std::string(status.message()), HasSubstr(" output: the result needs"));
  EXPECT_EQ(DeviceMemoryInUse(*client_), 0u);
  EXPECT_TRUE((*channel)->Close().ok());
  cudaFree(output);
}

TEST_F(CudaIpcTest, BadOffsetIsInvalidArgumentAndTheChannelKeepsServing) {
  absl::StatusOr<std::unique_ptr<CudaIpcChannel>> channel = OpenCudaIpcChannel(*client_);
  ASSERT_TRUE(channel.ok()) << channel.status();
  absl::StatusOr<uint32_t> region = (*channel)->RegisterRegion(device_->base(), device_->bytes());
  ASSERT_TRUE(region.ok()) << region.status();

  for (const uint64_t offset : {uint64_t{8}, uint64_t{device_->bytes() - 1024}}) {
    v1::CompressHeader header = Header();
    (*channel)->Attach(header);
    auto session = client_->StartCompress(header);
    ASSERT_TRUE(session.ok()) << session.status();
    absl::StatusOr<LayerRegions> regions = RegionsOf(**channel, *region, *device_, 0);
    ASSERT_TRUE(regions.ok());
    regions->keys->offset = offset;
    (*session)->SendLayerReady(0, 0, *regions).IgnoreError();
    absl::StatusOr<v1::CompressSummary> summary = (*session)->Finish();
    EXPECT_EQ(summary.status().code(), absl::StatusCode::kInvalidArgument) << summary.status();
    EXPECT_THAT(summary.status().message(), HasSubstr("sequence 0 layer 0 keys"));
  }
  // A region id never registered.
  {
    v1::CompressHeader header = Header();
    (*channel)->Attach(header);
    auto session = client_->StartCompress(header);
    ASSERT_TRUE(session.ok());
    absl::StatusOr<LayerRegions> regions = RegionsOf(**channel, *region, *device_, 0);
    ASSERT_TRUE(regions.ok());
    regions->values->region = 7;
    (*session)->SendLayerReady(0, 0, *regions).IgnoreError();
    EXPECT_THAT((*session)->Finish().status().message(), HasSubstr("region 7 is not registered"));
  }
  ASSERT_TRUE(kvcd_->Alive());
  absl::StatusOr<std::vector<CompressedLayer>> got =
      CompressInPlace(*client_, **channel, *region, *device_, absl::Seconds(60));
  ASSERT_TRUE(got.ok()) << got.status();
  ExpectSameLayers(*got, Inline());
  EXPECT_EQ(DeviceMemoryInUse(*client_), 0u);
}

TEST_F(CudaIpcTest, DeadlinePassingIsDeadlineExceeded) {
  absl::StatusOr<std::unique_ptr<CudaIpcChannel>> channel = OpenCudaIpcChannel(*client_);
  ASSERT_TRUE(channel.ok()) << channel.status();
  absl::StatusOr<uint32_t> region = (*channel)->RegisterRegion(device_->base(), device_->bytes());
  ASSERT_TRUE(region.ok()) << region.status();
  v1::CompressHeader header = Header();
  (*channel)->Attach(header);
  SessionOptions options;
  options.deadline = absl::Milliseconds(300);
  auto session = client_->StartCompress(header, std::move(options));
  ASSERT_TRUE(session.ok()) << session.status();
  absl::StatusOr<LayerRegions> regions = RegionsOf(**channel, *region, *device_, 0);
  ASSERT_TRUE(regions.ok());
  ASSERT_TRUE((*session)->SendLayerReady(0, 0, *regions).ok());
  std::this_thread::sleep_for(std::chrono::milliseconds(800));  // layers 1, 2 never come
  EXPECT_EQ((*session)->Finish().status().code(), absl::StatusCode::kDeadlineExceeded);
  for (int i = 0; i < 100 && DeviceMemoryInUse(*client_) != 0; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  EXPECT_EQ(DeviceMemoryInUse(*client_), 0u);
  absl::StatusOr<std::vector<CompressedLayer>> got =
      CompressInPlace(*client_, **channel, *region, *device_, absl::Seconds(60));
  ASSERT_TRUE(got.ok()) << got.status();
}

// The killed client: started by KilledClientReleasesEverything, it registers its own cache,
// sends one layer of three and waits to be killed.
TEST(CudaIpcChild, SendOneLayerAndWait) {
  const char* target = std::getenv("KVC_CUDA_IPC_CHILD");
  const char* ready_file = std::getenv("KVC_CUDA_IPC_CHILD_READY");
  if (target == nullptr || ready_file == nullptr) GTEST_SKIP() << "only as a child process";
  auto client = Client::Connect(target);
  ASSERT_TRUE(client.ok());
  const auto cache = RandomCache();
  DeviceCache device(cache);
  auto channel = OpenCudaIpcChannel(**client);
  ASSERT_TRUE(channel.ok()) << channel.status();
  auto region = (*channel)->RegisterRegion(device.base(), device.bytes());
  ASSERT_TRUE(region.ok()) << region.status();
  v1::CompressHeader header = Header();
  (*channel)->Attach(header);
  auto session = (*client)->StartCompress(header);
  ASSERT_TRUE(session.ok());
  auto regions = RegionsOf(**channel, *region, device, 0);
  ASSERT_TRUE(regions.ok());
  ASSERT_TRUE((*session)->SendLayerReady(0, 0, *regions).ok());
  std::ofstream(ready_file) << "ready\n";
  std::this_thread::sleep_for(std::chrono::minutes(5));
}

TEST_F(CudaIpcTest, KilledClientReleasesEverythingAndKvcdKeepsServing) {
  const std::string ready_file = ::kvcompress::testing::MakeScratchDir() + "/ready";
  const pid_t child = ::kvcompress::testing::SpawnSelf(
      "CudaIpcChild.*",
      {"KVC_CUDA_IPC_CHILD=" + kvcd_->target(), "KVC_CUDA_IPC_CHILD_READY=" + ready_file});
  ASSERT_GE(child, 0);
  const bool ready = ::kvcompress::testing::WaitForFile(ready_file);
  if (!ready) kill(child, SIGKILL);
  ASSERT_TRUE(ready) << "the child never sent its layer";
  kill(child, SIGKILL);
  int status = 0;
  waitpid(child, &status, 0);

  for (int i = 0; i < 250 && DeviceMemoryInUse(*client_) != 0; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  EXPECT_EQ(DeviceMemoryInUse(*client_), 0u);
  // The orphaned channel goes after its idle timeout (3 s here).
  bool closed = false;
  for (int i = 0; i < 100 && !closed; ++i) {
    absl::StatusOr<std::string> metrics =
        ::kvcompress::testing::HttpGet(kvcd_->metrics_port(), "/metrics");
    closed = metrics.ok() &&
             absl::StrContains(*metrics, "kvcompress_channels_open{transport=\"cuda_ipc\"} 0");
    if (!closed) std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  EXPECT_TRUE(closed) << "the killed client's channel is still open";
  ASSERT_TRUE(kvcd_->Alive());
  absl::StatusOr<std::unique_ptr<CudaIpcChannel>> channel = OpenCudaIpcChannel(*client_);
  ASSERT_TRUE(channel.ok()) << channel.status();
  absl::StatusOr<uint32_t> region = (*channel)->RegisterRegion(device_->base(), device_->bytes());
  ASSERT_TRUE(region.ok()) << region.status();
  absl::StatusOr<std::vector<CompressedLayer>> got =
      CompressInPlace(*client_, **channel, *region, *device_, absl::Seconds(60));
  ASSERT_TRUE(got.ok()) << got.status();
  ExpectSameLayers(*got, Inline());
}

}  // namespace
}  // namespace kvcompress
