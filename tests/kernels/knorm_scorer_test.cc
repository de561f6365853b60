#include "kernels/cpu/internal/knorm_scorer.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/backend.h"
#include "tests/kernels/test_layers.h"

namespace kvcompress {
namespace {

CacheGeometry Geometry(DType dtype, Layout layout, int head_dim, int num_kv_heads = 2) {
  CacheGeometry geometry;
  geometry.num_layers = 1;
  geometry.num_kv_heads = num_kv_heads;
  geometry.num_query_heads = num_kv_heads;
  geometry.head_dim = head_dim;
  geometry.dtype = dtype;
  geometry.layout = layout;
  return geometry;
}

TEST(KnormScorerTest, ScoresAreNegativeKeyNorms) {
  cpu::HeadKeys keys;
  keys.num_tokens = 3;
  keys.head_dim = 2;
  keys.rows = {3.0f, 4.0f, -1.0f, 0.0f, 0.5f, -0.5f};
  std::vector<float> scores(3);
  cpu::ScoreKnormHead(keys, scores);
  EXPECT_EQ(scores[0], -5.0f);
  EXPECT_EQ(scores[1], -1.0f);
  EXPECT_FLOAT_EQ(scores[2], -std::sqrt(0.5f));
}

TEST(KnormScorerTest, MatchesTheReferenceOnRandomKeys) {
  for (Layout layout : {Layout::kHND, Layout::kNHD}) {
    const CacheGeometry geometry = Geometry(DType::kFloat16, layout, 128, 3);
    const LayerInput input = testing::MakeRandomLayer(geometry, 733, 0, 21);
    MethodSpec spec;
    spec.scorer = ScorerKind::kKnorm;
    const auto reference = testing::ReferenceScores(geometry, spec, input);
    for (int head = 0; head < 3; ++head) {
      const cpu::HeadKeys keys = cpu::LoadHeadKeys(geometry, input.view(), head);
      std::vector<float> scores(733);
      cpu::ScoreKnormHead(keys, scores);
      for (int64_t j = 0; j < 733; ++j) {
        ASSERT_LT(reference[head][j], -1.0);
        ASSERT_NEAR(scores[j], reference[head][j], 1e-7 * -reference[head][j]) << j;
      }
    }
  }
}

// knorm at keep 0.5 through the backend: exactly the floor(T/2) smallest-norm positions of
// each head, and their K and V rows byte for byte.
TEST(KnormScorerTest, BackendKeepsTheLowestNormHalfWithIdenticalRows) {
  auto backend = MakeCpuBackend(2);
  MethodSpec spec;
  spec.scorer = ScorerKind::kKnorm;
  spec.budget.keep_ratio = 0.5;
  int64_t tolerated = 0;
  int64_t cases = 0;
  int index = 0;
  for (int64_t tokens : {1, 2, 63, 64, 65, 733, 4099}) {
    for (DType dtype : {DType::kFloat16, DType::kBFloat16, DType::kFloat32}) {
      for (Layout layout : {Layout::kHND, Layout::kNHD}) {
        const int head_dim = index++ % 2 == 0 ? 64 : 128;
        const CacheGeometry geometry = Geometry(dtype, layout, head_dim);
        const LayerInput input =
            testing::MakeRandomLayer(geometry, tokens, 0, static_cast<uint32_t>(index));
        const int64_t n = std::max<int64_t>(1, tokens / 2);
        LayerJob job;
        job.input = input.view();
        job.tokens_per_head = n;
        job.keep_all = n >= tokens;
        LayerResult result;
        ASSERT_TRUE(backend->CompressLayers(geometry, spec, {&job, 1}, {&result, 1}).ok());
        const auto reference = testing::ReferenceScores(geometry, spec, input);
        const size_t row_bytes = head_dim * DTypeSize(dtype);
        ASSERT_EQ(result.kept, std::vector<int32_t>(2, static_cast<int32_t>(n)));
        ASSERT_EQ(result.keys.size(), 2 * n * row_bytes);
        ASSERT_TRUE(result.merged.empty());
        for (int head = 0; head < 2; ++head) {
          const std::vector<int32_t> kept = testing::KeptOfHead(result, head);
          const auto comparison = testing::CompareKept(reference[head], n, kept);
          ASSERT_TRUE(comparison.ok) << comparison.failure << " T=" << tokens;
          tolerated += comparison.tolerated;
          ++cases;
          for (int64_t row = 0; row < n; ++row) {
            const size_t at = (result.offsets[head] + row) * row_bytes;
            ASSERT_EQ(
                std::memcmp(result.keys.data() + at,
                            testing::RowBytes(geometry, input, input.keys, head, kept[row]).data(),
                            row_bytes),
                0);
            ASSERT_EQ(std::memcmp(
                          result.values.data() + at,
                          testing::RowBytes(geometry, input, input.values, head, kept[row]).data(),
                          row_bytes),
                      0);
          }
        }
      }
    }
  }
  // Norms of random keys are far apart relative to fp32 rounding: near-ties are rare.
  EXPECT_LE(tolerated, cases / 10) << tolerated << " near-tie swaps in " << cases << " heads";
}

}  // namespace
}  // namespace kvcompress
