#include "service/internal/encoded_layer_result.h"

#include <cstring>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "service/stream_assembler.h"

namespace kvcompress {
namespace {

CacheGeometry Fp32Geometry(int kv_heads, int head_dim) {
  CacheGeometry geometry;
  geometry.num_layers = 4;
  geometry.num_kv_heads = kv_heads;
  geometry.num_query_heads = kv_heads;
  geometry.head_dim = head_dim;
  geometry.dtype = DType::kFloat32;
  return geometry;
}

// Two heads, head_dim 2, fp32: head 0 keeps rows at positions 1, 4, 6; head 1 keeps 3.
LayerResult SmallResult(bool with_merged) {
  LayerResult result;
  result.sequence = 1;
  result.layer = 2;
  result.kept = {3, 1};
  result.offsets = {0, 3, 4};
  const std::vector<float> keys = {1, 2, 3, 4, 5, 6, 7, 8};
  const std::vector<float> values = {-1, -2, -3, -4, -5, -6, -7, -8};
  result.keys.resize(keys.size() * 4);
  result.values.resize(values.size() * 4);
  std::memcpy(result.keys.data(), keys.data(), result.keys.size());
  std::memcpy(result.values.data(), values.data(), result.values.size());
  result.positions = {1, 4, 6, 3};
  if (with_merged) result.merged = {2, 1, 3, 7};
  result.attention_mass_kept = 0.75;
  return result;
}

template <typename T>
std::vector<T> Decode(const std::string& bytes) {
  std::vector<T> values(bytes.size() / sizeof(T));
  std::memcpy(values.data(), bytes.data(), values.size() * sizeof(T));
  return values;
}

struct Drained {
  v1::LayerResult header;
  std::vector<v1::TensorChunk> chunks;
};

Drained Drain(EncodedLayerResult& encoded) {
  Drained drained;
  v1::CompressResponse response;
  EXPECT_TRUE(encoded.Next(response));
  EXPECT_TRUE(response.has_layer_result());
  drained.header = response.layer_result();
  response.Clear();
  while (encoded.Next(response)) {
    EXPECT_TRUE(response.has_result_chunk());
    drained.chunks.push_back(response.result_chunk());
    response.Clear();
  }
  EXPECT_EQ(encoded.pending_bytes(), 0u);
  return drained;
}

TEST(EncodedLayerResultTest, RaggedWithoutMergedCounts) {
  EncodedLayerResult encoded(SmallResult(false), Fp32Geometry(2, 2), false, false);
  EXPECT_EQ(encoded.total_bytes(), 32u + 32u + 16u);
  const Drained drained = Drain(encoded);
  EXPECT_EQ(drained.header.sequence(), 1u);
  EXPECT_EQ(drained.header.layer(), 2u);
  EXPECT_EQ(drained.header.format(), v1::OUTPUT_FORMAT_RAGGED);
  ASSERT_EQ(drained.header.kept_size(), 2);
  EXPECT_EQ(drained.header.kept(0), 3u);
  EXPECT_EQ(drained.header.kept(1), 1u);
  EXPECT_EQ(drained.header.max_kept(), 3u);
  EXPECT_EQ(drained.header.keys_bytes(), 32u);
  EXPECT_EQ(drained.header.values_bytes(), 32u);
  EXPECT_EQ(drained.header.positions_bytes(), 16u);
  EXPECT_EQ(drained.header.merged_bytes(), 0u);
  EXPECT_DOUBLE_EQ(drained.header.attention_mass_kept(), 0.75);
  ASSERT_EQ(drained.chunks.size(), 3u);
  EXPECT_EQ(drained.chunks[0].tensor(), v1::TENSOR_KIND_KEYS);
  EXPECT_EQ(drained.chunks[1].tensor(), v1::TENSOR_KIND_VALUES);
  EXPECT_EQ(drained.chunks[2].tensor(), v1::TENSOR_KIND_POSITIONS);
  EXPECT_EQ(Decode<float>(drained.chunks[0].data()), (std::vector<float>{1, 2, 3, 4, 5, 6, 7, 8}));
  EXPECT_EQ(Decode<int32_t>(drained.chunks[2].data()), (std::vector<int32_t>{1, 4, 6, 3}));
  for (const v1::TensorChunk& chunk : drained.chunks) {
    EXPECT_EQ(chunk.sequence(), 1u);
    EXPECT_EQ(chunk.layer(), 2u);
    EXPECT_EQ(chunk.offset(), 0u);
  }
}

TEST(EncodedLayerResultTest, ResultsInAnOutputRegionSendTheHeaderAlone) {
  LayerResult result = SmallResult(false);
  result.keys.clear();
  result.values.clear();
  result.positions.clear();
  result.in_output_region = true;
  EncodedLayerResult encoded(std::move(result), Fp32Geometry(2, 2), false, true);
  EXPECT_EQ(encoded.total_bytes(), 0u);
  const Drained drained = Drain(encoded);
  EXPECT_TRUE(drained.header.in_output_region());
  EXPECT_EQ(drained.header.keys_bytes(), 32u);  // the sizes of what lies in the region
  EXPECT_EQ(drained.header.values_bytes(), 32u);
  EXPECT_EQ(drained.header.positions_bytes(), 16u);
  EXPECT_EQ(drained.header.merged_bytes(), 0u);
  EXPECT_TRUE(drained.chunks.empty());
}

TEST(EncodedLayerResultTest, RaggedMergedCountsOfAMergingReducer) {
  EncodedLayerResult encoded(SmallResult(true), Fp32Geometry(2, 2), false, false);
  const Drained drained = Drain(encoded);
  ASSERT_EQ(drained.chunks.size(), 4u);
  EXPECT_EQ(drained.chunks[3].tensor(), v1::TENSOR_KIND_MERGED);
  EXPECT_EQ(Decode<int32_t>(drained.chunks[3].data()), (std::vector<int32_t>{2, 1, 3, 7}));
  EXPECT_EQ(drained.header.merged_bytes(), 16u);
}

TEST(EncodedLayerResultTest, RequestedMergedCountsForDropAreOnes) {
  EncodedLayerResult encoded(SmallResult(false), Fp32Geometry(2, 2), false, true);
  const Drained drained = Drain(encoded);
  ASSERT_EQ(drained.chunks.size(), 4u);
  EXPECT_EQ(Decode<int32_t>(drained.chunks[3].data()), (std::vector<int32_t>{1, 1, 1, 1}));
}

TEST(EncodedLayerResultTest, PaddedLayout) {
  EncodedLayerResult encoded(SmallResult(true), Fp32Geometry(2, 2), true, false);
  const Drained drained = Drain(encoded);
  EXPECT_EQ(drained.header.format(), v1::OUTPUT_FORMAT_PADDED);
  EXPECT_EQ(drained.header.max_kept(), 3u);
  EXPECT_EQ(drained.header.keys_bytes(), 2u * 3 * 2 * 4);
  ASSERT_EQ(drained.chunks.size(), 4u);
  EXPECT_EQ(Decode<float>(drained.chunks[0].data()),
            (std::vector<float>{1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0, 0}));
  EXPECT_EQ(Decode<int32_t>(drained.chunks[2].data()), (std::vector<int32_t>{1, 4, 6, 3, -1, -1}));
  EXPECT_EQ(Decode<int32_t>(drained.chunks[3].data()), (std::vector<int32_t>{2, 1, 3, 7, 0, 0}));
}

TEST(EncodedLayerResultTest, PaddedRequestedMergedCountsForDrop) {
  EncodedLayerResult encoded(SmallResult(false), Fp32Geometry(2, 2), true, true);
  const Drained drained = Drain(encoded);
  ASSERT_EQ(drained.chunks.size(), 4u);
  EXPECT_EQ(Decode<int32_t>(drained.chunks[3].data()), (std::vector<int32_t>{1, 1, 1, 1, 0, 0}));
}

TEST(EncodedLayerResultTest, LargeTensorsSplitAtTheChunkLimit) {
  // One head, head_dim 1024 fp32 = 4 KiB per row; 2500 rows = 10240000 bytes per tensor.
  constexpr int kRows = 2500;
  LayerResult result;
  result.kept = {kRows};
  result.offsets = {0, kRows};
  result.keys.resize(static_cast<size_t>(kRows) * 1024 * 4);
  for (size_t i = 0; i < result.keys.size(); ++i) result.keys[i] = std::byte(i % 251);
  result.values = result.keys;
  for (int i = 0; i < kRows; ++i) result.positions.push_back(i);
  const std::vector<std::byte> keys = result.keys;
  EncodedLayerResult encoded(std::move(result), Fp32Geometry(1, 1024), false, false);
  const Drained drained = Drain(encoded);
  // 10240000 = 4193280 + 4193280 + 1853440 for keys and values; positions in one chunk.
  ASSERT_EQ(drained.chunks.size(), 7u);
  std::string key_bytes;
  for (int i = 0; i < 3; ++i) {
    const v1::TensorChunk& chunk = drained.chunks[i];
    EXPECT_EQ(chunk.tensor(), v1::TENSOR_KIND_KEYS);
    EXPECT_EQ(chunk.offset(), key_bytes.size());
    EXPECT_LE(chunk.data().size(), kMaxChunkDataBytes);
    key_bytes += chunk.data();
  }
  EXPECT_EQ(drained.chunks[0].data().size(), kMaxChunkDataBytes);
  EXPECT_EQ(drained.chunks[2].data().size(), 1853440u);
  EXPECT_TRUE(key_bytes == std::string(reinterpret_cast<const char*>(keys.data()), keys.size()));
  EXPECT_EQ(drained.chunks[3].tensor(), v1::TENSOR_KIND_VALUES);
  EXPECT_EQ(drained.chunks[6].tensor(), v1::TENSOR_KIND_POSITIONS);
}

}  // namespace
}  // namespace kvcompress
