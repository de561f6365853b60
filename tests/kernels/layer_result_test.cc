#include "kernels/layer_result.h"

#include <cstring>
#include <vector>

#include "gtest/gtest.h"

namespace kvcompress {
namespace {

// A ragged fp16 result with head_dim 3: head 0 keeps 2 rows, head 1 none, head 2 three.
LayerResult RaggedResult(bool with_merged) {
  LayerResult result;
  result.kept = {2, 0, 3};
  result.offsets = {0, 2, 2, 5};
  const size_t row_bytes = 3 * 2;
  result.keys.resize(5 * row_bytes);
  result.values.resize(5 * row_bytes);
  for (size_t i = 0; i < result.keys.size(); ++i) {
    result.keys[i] = static_cast<std::byte>(i + 1);
    result.values[i] = static_cast<std::byte>(200 - i);
  }
  result.positions = {4, 9, 0, 7, 8};
  if (with_merged) result.merged = {1, 3, 2, 1, 5};
  return result;
}

CacheGeometry Fp16Geometry() {
  CacheGeometry geometry;
  geometry.num_layers = 1;
  geometry.num_kv_heads = 3;
  geometry.num_query_heads = 3;
  geometry.head_dim = 3;
  geometry.dtype = DType::kFloat16;
  return geometry;
}

TEST(ToPaddedTest, PadsEachHeadToTheLongest) {
  const LayerResult result = RaggedResult(/*with_merged=*/true);
  const PaddedLayerResult padded = ToPadded(result, Fp16Geometry());
  const size_t row_bytes = 6;
  EXPECT_EQ(padded.max_kept, 3);
  EXPECT_EQ(padded.kept, std::vector<int32_t>({2, 0, 3}));
  EXPECT_EQ(padded.positions, std::vector<int32_t>({4, 9, -1, -1, -1, -1, 0, 7, 8}));
  EXPECT_EQ(padded.merged, std::vector<int32_t>({1, 3, 0, 0, 0, 0, 2, 1, 5}));
  ASSERT_EQ(padded.keys.size(), 9 * row_bytes);
  ASSERT_EQ(padded.values.size(), 9 * row_bytes);
  const std::vector<std::byte> zero_row(row_bytes, std::byte{0});
  // Head 0: rows 0, 1 of the ragged result, then a zero row.
  EXPECT_EQ(std::memcmp(padded.keys.data(), result.keys.data(), 2 * row_bytes), 0);
  EXPECT_EQ(std::memcmp(padded.values.data(), result.values.data(), 2 * row_bytes), 0);
  EXPECT_EQ(std::memcmp(padded.keys.data() + 2 * row_bytes, zero_row.data(), row_bytes), 0);
  // Head 1: all zero.
  for (int row = 3; row < 6; ++row) {
    EXPECT_EQ(std::memcmp(padded.keys.data() + row * row_bytes, zero_row.data(), row_bytes), 0);
    EXPECT_EQ(std::memcmp(padded.values.data() + row * row_bytes, zero_row.data(), row_bytes), 0);
  }
  // Head 2: rows 2..4 of the ragged result.
  EXPECT_EQ(std::memcmp(padded.keys.data() + 6 * row_bytes, result.keys.data() + 2 * row_bytes,
                        3 * row_bytes),
            0);
  EXPECT_EQ(std::memcmp(padded.values.data() + 6 * row_bytes, result.values.data() + 2 * row_bytes,
                        3 * row_bytes),
            0);
}

TEST(ToPaddedTest, MergedStaysEmptyForDrop) {
  const PaddedLayerResult padded = ToPadded(RaggedResult(/*with_merged=*/false), Fp16Geometry());
  EXPECT_TRUE(padded.merged.empty());
  EXPECT_EQ(padded.positions.size(), 9u);
}

TEST(ToPaddedTest, UniformCountsNeedNoPadding) {
  LayerResult result;
  result.kept = {2, 2};
  result.offsets = {0, 2, 4};
  result.positions = {1, 5, 0, 5};
  for (int i = 0; i < 4 * 4; ++i) {
    result.keys.push_back(static_cast<std::byte>(i + 1));
    result.values.push_back(static_cast<std::byte>(i + 100));
  }
  CacheGeometry geometry;
  geometry.num_kv_heads = 2;
  geometry.num_query_heads = 2;
  geometry.head_dim = 1;
  geometry.dtype = DType::kFloat32;
  const PaddedLayerResult padded = ToPadded(result, geometry);
  EXPECT_EQ(padded.max_kept, 2);
  EXPECT_EQ(padded.keys, result.keys);
  EXPECT_EQ(padded.values, result.values);
  EXPECT_EQ(padded.positions, result.positions);
}

}  // namespace
}  // namespace kvcompress
