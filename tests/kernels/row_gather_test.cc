#include "kernels/cpu/internal/row_gather.h"

#include <cstring>
#include <vector>

#include "gtest/gtest.h"
#include "tests/kernels/test_layers.h"

namespace kvcompress::cpu {
namespace {

TEST(GatherHeadRowsTest, CopiesRowsByteForByteInEveryDTypeAndLayout) {
  for (DType dtype : {DType::kFloat16, DType::kBFloat16, DType::kFloat32}) {
    for (Layout layout : {Layout::kHND, Layout::kNHD}) {
      for (int head_dim : {64, 128}) {
        CacheGeometry geometry;
        geometry.num_layers = 1;
        geometry.num_kv_heads = 3;
        geometry.num_query_heads = 3;
        geometry.head_dim = head_dim;
        geometry.dtype = dtype;
        geometry.layout = layout;
        const int64_t num_tokens = 65;
        const LayerInput input = testing::MakeRandomLayer(geometry, num_tokens, 0, 5);
        const std::vector<int32_t> positions = {0, 1, 17, 63, 64};
        const size_t row_bytes = head_dim * DTypeSize(dtype);
        for (int head = 0; head < 3; ++head) {
          std::vector<std::byte> out(positions.size() * row_bytes, std::byte{0xAB});
          GatherHeadRows(geometry, input.values.data(), num_tokens, head, positions, out.data());
          for (size_t row = 0; row < positions.size(); ++row) {
            const auto expected =
                testing::RowBytes(geometry, input, input.values, head, positions[row]);
            ASSERT_EQ(expected.size(), row_bytes);
            EXPECT_EQ(std::memcmp(out.data() + row * row_bytes, expected.data(), row_bytes), 0)
                << DTypeName(dtype) << " " << LayoutName(layout) << " head " << head << " row "
                << row;
          }
        }
      }
    }
  }
}

TEST(GatherHeadRowsTest, NoPositionsWritesNothing) {
  CacheGeometry geometry;
  geometry.num_kv_heads = 1;
  geometry.num_query_heads = 1;
  geometry.head_dim = 4;
  geometry.dtype = DType::kFloat32;
  const LayerInput input = testing::MakeRandomLayer(geometry, 3, 0, 1);
  std::byte sentinel{0x5A};
  GatherHeadRows(geometry, input.keys.data(), 3, 0, {}, &sentinel);
  EXPECT_EQ(sentinel, std::byte{0x5A});
}

}  // namespace
}  // namespace kvcompress::cpu
