#include "kernels/cpu/internal/snapkv_scorer.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <ostream>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/snapkv_window.h"
#include "tests/kernels/test_layers.h"

namespace kvcompress::cpu {
namespace {

struct SnapKvCase {
  int64_t num_tokens;
  int num_sent;  // window queries sent
  int window_size = 64;
  int kernel_size = 5;
  Pooling pooling = Pooling::kAvg;
  GroupReduction reduction = GroupReduction::kMean;
  int group = 4;
  int head_dim = 64;
  DType dtype = DType::kBFloat16;
  Layout layout = Layout::kHND;
  int num_kv_heads = 2;
};

std::ostream& operator<<(std::ostream& out, const SnapKvCase& c) {
  return out << "T=" << c.num_tokens << " sent=" << c.num_sent << " window=" << c.window_size
             << " kernel=" << c.kernel_size << " pooling=" << PoolingName(c.pooling)
             << " reduction=" << GroupReductionName(c.reduction) << " G=" << c.group
             << " D=" << c.head_dim << " " << DTypeName(c.dtype) << " " << LayoutName(c.layout)
             << " H_kv=" << c.num_kv_heads;
}

CacheGeometry GeometryOf(const SnapKvCase& c) {
  CacheGeometry geometry;
  geometry.num_layers = 1;
  geometry.num_kv_heads = c.num_kv_heads;
  geometry.num_query_heads = c.num_kv_heads * c.group;
  geometry.head_dim = c.head_dim;
  geometry.dtype = c.dtype;
  geometry.layout = c.layout;
  return geometry;
}

MethodSpec SpecOf(const SnapKvCase& c) {
  MethodSpec spec;
  spec.snapkv.window_size = c.window_size;
  spec.snapkv.kernel_size = c.kernel_size;
  spec.snapkv.pooling = c.pooling;
  spec.snapkv.group_reduction = c.reduction;
  return spec;
}

// Scores every head with the implementation: [H_kv][T].
std::vector<std::vector<float>> ScoreAllHeads(const CacheGeometry& geometry, const MethodSpec& spec,
                                              const LayerInput& input) {
  const int window = EffectiveWindowSize(spec.snapkv.window_size, input.shape.num_window_queries);
  std::vector<std::vector<float>> scores(geometry.num_kv_heads);
  for (int head = 0; head < geometry.num_kv_heads; ++head) {
    const HeadKeys keys = LoadHeadKeys(geometry, input.view(), head);
    const GroupQueries queries = LoadGroupQueries(geometry, input.view(), head, window);
    scores[head].resize(input.shape.num_tokens);
    std::vector<SoftmaxNormalizer> normalizers;
    ScoreSnapKvHead(spec.snapkv, keys, queries, scores[head], &normalizers);
    EXPECT_EQ(normalizers.size(), static_cast<size_t>(geometry.group_size()) * window);
  }
  return scores;
}

class SnapKvScorerTest : public ::testing::TestWithParam<SnapKvCase> {};

TEST_P(SnapKvScorerTest, MatchesTheFullAttentionReference) {
  const SnapKvCase& c = GetParam();
  const CacheGeometry geometry = GeometryOf(c);
  const MethodSpec spec = SpecOf(c);
  const LayerInput input = testing::MakeRandomLayer(geometry, c.num_tokens, c.num_sent,
                                                    static_cast<uint32_t>(c.num_tokens * 7 + 1));
  const auto reference = testing::ReferenceScores(geometry, spec, input);
  const auto scores = ScoreAllHeads(geometry, spec, input);
  const int64_t prefix = c.num_tokens - std::min(c.window_size, c.num_sent);
  int64_t finite = 0;
  for (int head = 0; head < c.num_kv_heads; ++head) {
    for (int64_t j = 0; j < c.num_tokens; ++j) {
      const double expected = reference[head][j];
      const float got = scores[head][j];
      if (j >= prefix) {
        ASSERT_TRUE(std::isinf(got) && got > 0) << "window token " << j << " scored " << got;
        continue;
      }
      ++finite;
      ASSERT_TRUE(std::isfinite(expected));
      ASSERT_GT(expected, 0.0);
      // Only the final fp32 rounding (and fp64 summation order) separates the two.
      ASSERT_NEAR(got, expected, 2e-7 * expected) << "head " << head << " token " << j;
    }
  }
  EXPECT_EQ(finite, c.num_kv_heads * prefix);
}

std::vector<SnapKvCase> Cases() {
  std::vector<SnapKvCase> cases;
  const DType dtypes[] = {DType::kBFloat16, DType::kFloat16, DType::kFloat32};
  int index = 0;
  // T ∈ {1, 2, W − 1, W, W + 1, 733} with all W = 64 queries sent (or T when fewer).
  for (int64_t tokens : {1, 2, 63, 64, 65, 733}) {
    for (int group : {1, 4, 8}) {
      SnapKvCase c{tokens, static_cast<int>(std::min<int64_t>(64, tokens))};
      c.group = group;
      c.dtype = dtypes[index % 3];
      c.layout = index % 2 == 0 ? Layout::kHND : Layout::kNHD;
      cases.push_back(c);
      ++index;
    }
  }
  // Fewer queries than the window, and more than the window (the last ones score).
  cases.push_back({63, 16});
  cases.push_back({50, 3, 64, 5, Pooling::kAvg, GroupReduction::kMean, 1});
  cases.push_back({100, 16, 8, 5, Pooling::kAvg, GroupReduction::kMean, 4, 64, DType::kFloat16});
  cases.push_back({2, 2, 1, 5, Pooling::kMax, GroupReduction::kMax, 8});
  // Kernel sizes, including one wider than the prefix.
  for (int kernel : {1, 3, 7, 31}) {
    cases.push_back({20, 8, 8, kernel, Pooling::kAvg, GroupReduction::kMean, 4});
    cases.push_back({97, 12, 64, kernel, Pooling::kMax, GroupReduction::kMean, 4, 64,
                     DType::kFloat32, Layout::kNHD});
  }
  // Pooling × group reductions.
  for (Pooling pooling : {Pooling::kAvg, Pooling::kMax}) {
    for (GroupReduction reduction :
         {GroupReduction::kMean, GroupReduction::kMax, GroupReduction::kSum}) {
      cases.push_back({211, 64, 64, 5, pooling, reduction, 8, 64, DType::kBFloat16, Layout::kNHD});
    }
  }
  cases.push_back({301, 64, 64, 5, Pooling::kAvg, GroupReduction::kMean, 4, 128, DType::kFloat16,
                   Layout::kNHD});
  cases.push_back({4099, 64, 64, 5, Pooling::kAvg, GroupReduction::kMean, 4, 64, DType::kBFloat16,
                   Layout::kHND, 1});
  return cases;
}

INSTANTIATE_TEST_SUITE_P(Grid, SnapKvScorerTest, ::testing::ValuesIn(Cases()));

// Only the last W_eff sent queries score: changing the ones before them changes nothing.
TEST(SnapKvScorerSemanticsTest, OnlyTheLastEffectiveWindowQueriesCount) {
  SnapKvCase c{120, 24, 8};
  const CacheGeometry geometry = GeometryOf(c);
  const MethodSpec spec = SpecOf(c);
  LayerInput input = testing::MakeRandomLayer(geometry, c.num_tokens, c.num_sent, 3);
  const auto before = ScoreAllHeads(geometry, spec, input);
  // Overwrite sent queries 0 … 15 of every query head (the window is the last 8).
  const size_t row_bytes = geometry.head_dim * DTypeSize(geometry.dtype);
  const LayerInput other = testing::MakeRandomLayer(geometry, c.num_tokens, c.num_sent, 99);
  for (int qh = 0; qh < geometry.num_query_heads; ++qh) {
    std::memcpy(input.queries.data() + qh * c.num_sent * row_bytes,
                other.queries.data() + qh * c.num_sent * row_bytes, 16 * row_bytes);
  }
  EXPECT_EQ(ScoreAllHeads(geometry, spec, input), before);
  // Changing the last query does change the scores.
  const size_t last = (static_cast<size_t>(c.num_sent) - 1) * row_bytes;
  std::memcpy(input.queries.data() + last, other.queries.data() + last, row_bytes);
  EXPECT_NE(ScoreAllHeads(geometry, spec, input), before);
}

// A prefix key that a window query attends to strongly outscores the others.
TEST(SnapKvScorerSemanticsTest, AttendedKeysScoreHighest) {
  CacheGeometry geometry;
  geometry.num_layers = 1;
  geometry.num_kv_heads = 1;
  geometry.num_query_heads = 1;
  geometry.head_dim = 4;
  geometry.dtype = DType::kFloat32;
  HeadKeys keys;
  keys.num_tokens = 30;
  keys.head_dim = 4;
  keys.rows.assign(30 * 4, 0.01f);
  for (int d = 0; d < 4; ++d) keys.rows[12 * 4 + d] = 3.0f;  // token 12 aligns with the query
  GroupQueries queries;
  queries.group_size = 1;
  queries.num_queries = 2;
  queries.head_dim = 4;
  queries.rows.assign(2 * 4, 1.0f);
  SnapKvOptions options;
  options.kernel_size = 1;
  std::vector<float> scores(30);
  ScoreSnapKvHead(options, keys, queries, scores, nullptr);
  for (int64_t j = 0; j < 28; ++j) {
    if (j != 12) {
      EXPECT_GT(scores[12], 10 * scores[j]) << j;
    }
  }
  EXPECT_TRUE(std::isinf(scores[28]) && std::isinf(scores[29]));
  // With kernel 3 (avg), the neighbours get a third of token 12's mass.
  options.kernel_size = 3;
  std::vector<float> pooled(30);
  ScoreSnapKvHead(options, keys, queries, pooled, nullptr);
  EXPECT_NEAR(pooled[11], (scores[10] + scores[11] + scores[12]) / 3, 1e-7);
  EXPECT_NEAR(pooled[0], (scores[0] + scores[1]) / 3, 1e-9);  // zero padding, divide by k
}

}  // namespace
}  // namespace kvcompress::cpu
