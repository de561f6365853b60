#include "kernels/cpu/internal/tova_scorer.h"

#include <algorithm>
#include <cmath>
#include <ostream>
#include <vector>

#include "gtest/gtest.h"
#include "tests/kernels/test_layers.h"

namespace kvcompress {
namespace {

struct TovaCase {
  int64_t num_tokens;
  int num_sent;
  int group;
  int num_kv_heads;
  DType dtype;
  Layout layout;
  int head_dim = 64;
};

std::ostream& operator<<(std::ostream& out, const TovaCase& c) {
  return out << "T=" << c.num_tokens << " sent=" << c.num_sent << " G=" << c.group
             << " H_kv=" << c.num_kv_heads << " " << DTypeName(c.dtype) << " "
             << LayoutName(c.layout) << " D=" << c.head_dim;
}

CacheGeometry GeometryOf(const TovaCase& c) {
  CacheGeometry geometry;
  geometry.num_layers = 1;
  geometry.num_kv_heads = c.num_kv_heads;
  geometry.num_query_heads = c.num_kv_heads * c.group;
  geometry.head_dim = c.head_dim;
  geometry.dtype = c.dtype;
  geometry.layout = c.layout;
  return geometry;
}

MethodSpec TovaSpec() {
  MethodSpec spec;
  spec.scorer = ScorerKind::kTova;
  return spec;
}

class TovaScorerTest : public ::testing::TestWithParam<TovaCase> {};

// The backend's scores equal the brute-force reference (the last query's softmax over all T
// keys, averaged over every query head of the layer), one row shared by all KV heads.
TEST_P(TovaScorerTest, ScoresMatchTheReferenceAndAreSharedByAllHeads) {
  const TovaCase& c = GetParam();
  const CacheGeometry geometry = GeometryOf(c);
  const LayerInput input =
      testing::MakeRandomLayer(geometry, c.num_tokens, c.num_sent, 7 + c.num_tokens + c.group);
  const auto reference = testing::ReferenceScores(geometry, TovaSpec(), input);
  auto scores = testing::ScoreLayer(geometry, TovaSpec(), input);
  ASSERT_TRUE(scores.ok()) << scores.status();
  for (int head = 0; head < c.num_kv_heads; ++head) {
    EXPECT_EQ((*scores)[head], (*scores)[0]) << "head " << head << " differs from head 0";
    for (int64_t j = 0; j < c.num_tokens; ++j) {
      const double expected = reference[head][j];
      if (j == c.num_tokens - 1) {
        ASSERT_EQ((*scores)[head][j], INFINITY) << "the last token is always kept";
      } else {
        ASSERT_NEAR((*scores)[head][j], expected, 2e-7 * expected + 1e-30) << "token " << j;
      }
    }
  }
}

// Every head keeps the same reference set; the last token survives any budget.
TEST_P(TovaScorerTest, EveryHeadKeepsTheReferenceSet) {
  const TovaCase& c = GetParam();
  const CacheGeometry geometry = GeometryOf(c);
  const LayerInput input =
      testing::MakeRandomLayer(geometry, c.num_tokens, c.num_sent, 7 + c.num_tokens + c.group);
  const auto reference = testing::ReferenceScores(geometry, TovaSpec(), input);
  for (int64_t n : {int64_t{1}, std::max<int64_t>(1, c.num_tokens / 3), c.num_tokens - 1}) {
    if (n < 1 || n >= c.num_tokens) continue;
    auto result = testing::CompressLayer(geometry, TovaSpec(), input, n);
    ASSERT_TRUE(result.ok()) << result.status();
    const std::vector<int32_t> first = testing::KeptOfHead(*result, 0);
    for (int head = 0; head < c.num_kv_heads; ++head) {
      const std::vector<int32_t> kept = testing::KeptOfHead(*result, head);
      const auto comparison = testing::CompareKept(reference[head], n, kept);
      EXPECT_TRUE(comparison.ok) << "n=" << n << " head " << head << ": " << comparison.failure;
      EXPECT_EQ(kept, first) << "one selection shared by all heads";
      EXPECT_EQ(kept.back(), c.num_tokens - 1);
    }
    // The mass signal averages over every query sent.
    std::vector<std::vector<int32_t>> kept_sets;
    for (int head = 0; head < c.num_kv_heads; ++head) {
      kept_sets.push_back(testing::KeptOfHead(*result, head));
    }
    EXPECT_NEAR(result->attention_mass_kept,
                testing::ReferenceAttentionMass(geometry, input, c.num_sent, kept_sets), 1e-9);
  }
}

INSTANTIATE_TEST_SUITE_P(Grid, TovaScorerTest,
                         ::testing::Values(TovaCase{2, 1, 1, 2, DType::kFloat32, Layout::kHND},
                                           TovaCase{65, 8, 4, 2, DType::kBFloat16, Layout::kNHD},
                                           TovaCase{333, 16, 8, 1, DType::kFloat16, Layout::kHND,
                                                    128},
                                           TovaCase{511, 1, 4, 3, DType::kBFloat16, Layout::kHND},
                                           TovaCase{733, 64, 1, 3, DType::kFloat32, Layout::kNHD}));

TEST(TovaScorerUnitTest, CombinesHeadsAndProtectsTheLastToken) {
  const std::vector<double> head0 = {0.5, 0.25, 0.25};
  const std::vector<double> head1 = {1.0, 0.5, 0.5};  // a group of two, summed
  const std::vector<const std::vector<double>*> sums = {&head0, &head1};
  const std::vector<float> scores = cpu::CombineTovaScores(sums, 3);
  ASSERT_EQ(scores.size(), 3u);
  EXPECT_FLOAT_EQ(scores[0], 0.5f);
  EXPECT_FLOAT_EQ(scores[1], 0.25f);
  EXPECT_EQ(scores[2], INFINITY);
}

TEST(TovaScorerUnitTest, ProtectedTokensAndMissingQueries) {
  CacheGeometry geometry = GeometryOf({0, 0, 4, 2, DType::kBFloat16, Layout::kHND});
  const LayerInput input = testing::MakeRandomLayer(geometry, 90, 4, 3);
  MethodSpec spec = TovaSpec();
  spec.protect_sinks = 3;
  auto result = testing::CompressLayer(geometry, spec, input, 5);
  ASSERT_TRUE(result.ok()) << result.status();
  for (int head = 0; head < 2; ++head) {
    const std::vector<int32_t> kept = testing::KeptOfHead(*result, head);
    EXPECT_EQ(kept[0], 0);
    EXPECT_EQ(kept[1], 1);
    EXPECT_EQ(kept[2], 2);
    EXPECT_EQ(kept.back(), 89);
  }
  const LayerInput no_queries = testing::MakeRandomLayer(geometry, 90, 0, 3);
  auto missing = testing::CompressLayer(geometry, TovaSpec(), no_queries, 5);
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(missing.status().message().find("tova scorer needs window queries"), std::string::npos)
      << missing.status();
}

}  // namespace
}  // namespace kvcompress
