#include "kernels/cpu/internal/keydiff_scorer.h"

#include <cmath>
#include <cstring>
#include <vector>

#include "gtest/gtest.h"
#include "tests/kernels/test_layers.h"

namespace kvcompress {
namespace {

CacheGeometry Geometry(DType dtype, Layout layout, int head_dim, int num_kv_heads, int group) {
  CacheGeometry geometry;
  geometry.num_layers = 1;
  geometry.num_kv_heads = num_kv_heads;
  geometry.num_query_heads = num_kv_heads * group;
  geometry.head_dim = head_dim;
  geometry.dtype = dtype;
  geometry.layout = layout;
  return geometry;
}

MethodSpec KeyDiffSpec() {
  MethodSpec spec;
  spec.scorer = ScorerKind::kKeyDiff;
  return spec;
}

TEST(KeyDiffScorerTest, ScoresAreMinusCosineWithTheMeanUnitKey) {
  cpu::HeadKeys keys;
  keys.num_tokens = 3;
  keys.head_dim = 2;
  // Unit keys (1,0), (1,0) and a long (0,3): the anchor is (2/3, 1/3), the mean of the unit
  // vectors, not of the raw keys (which would be (2/3, 1)).
  keys.rows = {1.0f, 0.0f, 1.0f, 0.0f, 0.0f, 3.0f};
  std::vector<float> scores(3);
  cpu::ScoreKeyDiffHead(keys, scores);
  const double anchor_norm = std::sqrt(5.0) / 3.0;
  EXPECT_FLOAT_EQ(scores[0], static_cast<float>(-(2.0 / 3.0) / anchor_norm));
  EXPECT_FLOAT_EQ(scores[1], scores[0]);
  EXPECT_FLOAT_EQ(scores[2], static_cast<float>(-(1.0 / 3.0) / anchor_norm));
}

TEST(KeyDiffScorerTest, MatchesTheReferenceAndKeepsItsSetsWithIdenticalRows) {
  struct Case {
    DType dtype;
    Layout layout;
    int64_t num_tokens;
    int head_dim;
    int num_kv_heads;
    int group;
  };
  for (const Case& c : {Case{DType::kBFloat16, Layout::kHND, 733, 64, 2, 4},
                        Case{DType::kFloat16, Layout::kNHD, 129, 128, 3, 1},
                        Case{DType::kFloat32, Layout::kNHD, 1001, 64, 1, 8},
                        Case{DType::kBFloat16, Layout::kNHD, 1, 64, 2, 4}}) {
    const CacheGeometry geometry = Geometry(c.dtype, c.layout, c.head_dim, c.num_kv_heads, c.group);
    const LayerInput input = testing::MakeRandomLayer(geometry, c.num_tokens, 0, 40 + c.group);
    const auto reference = testing::ReferenceScores(geometry, KeyDiffSpec(), input);
    auto scores = testing::ScoreLayer(geometry, KeyDiffSpec(), input);
    ASSERT_TRUE(scores.ok()) << scores.status();
    for (int head = 0; head < c.num_kv_heads; ++head) {
      for (int64_t j = 0; j < c.num_tokens; ++j) {
        ASSERT_NEAR((*scores)[head][j], reference[head][j],
                    2e-7 * std::abs(reference[head][j]) + 1e-7)
            << "head " << head << " token " << j;
      }
    }
    const int64_t n = std::max<int64_t>(1, c.num_tokens * 3 / 10);
    auto result = testing::CompressLayer(geometry, KeyDiffSpec(), input, n);
    ASSERT_TRUE(result.ok()) << result.status();
    const size_t row_bytes = c.head_dim * DTypeSize(c.dtype);
    for (int head = 0; head < c.num_kv_heads; ++head) {
      const std::vector<int32_t> kept = testing::KeptOfHead(*result, head);
      const auto comparison = testing::CompareKept(reference[head], n, kept);
      ASSERT_TRUE(comparison.ok) << "head " << head << ": " << comparison.failure;
      for (size_t row = 0; row < kept.size(); ++row) {
        const size_t at = (result->offsets[head] + row) * row_bytes;
        ASSERT_EQ(
            std::memcmp(result->keys.data() + at,
                        testing::RowBytes(geometry, input, input.keys, head, kept[row]).data(),
                        row_bytes),
            0);
        ASSERT_EQ(
            std::memcmp(result->values.data() + at,
                        testing::RowBytes(geometry, input, input.values, head, kept[row]).data(),
                        row_bytes),
            0);
      }
    }
    EXPECT_EQ(result->attention_mass_kept, -1.0);  // no window queries
  }
}

}  // namespace
}  // namespace kvcompress
