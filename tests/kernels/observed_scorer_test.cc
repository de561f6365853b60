#include "kernels/cpu/internal/observed_scorer.h"

#include <cmath>
#include <vector>

#include "gtest/gtest.h"
#include "tests/kernels/test_layers.h"

namespace kvcompress {
namespace {

CacheGeometry Geometry(int num_kv_heads, int group) {
  CacheGeometry geometry;
  geometry.num_layers = 1;
  geometry.num_kv_heads = num_kv_heads;
  geometry.num_query_heads = num_kv_heads * group;
  geometry.head_dim = 64;
  geometry.dtype = DType::kBFloat16;
  geometry.layout = Layout::kNHD;
  return geometry;
}

MethodSpec ObservedSpec(GroupReduction reduction) {
  MethodSpec spec;
  spec.scorer = ScorerKind::kObserved;
  spec.observed.group_reduction = reduction;
  return spec;
}

TEST(ObservedScorerTest, PerKvHeadScoresPassThroughExactly) {
  const CacheGeometry geometry = Geometry(3, 4);
  LayerInput input = testing::MakeRandomLayer(geometry, 257, 0, 5);
  testing::AddRandomScores(input, 3, 5);
  auto scores = testing::ScoreLayer(geometry, ObservedSpec(GroupReduction::kMax), input);
  ASSERT_TRUE(scores.ok()) << scores.status();
  for (int head = 0; head < 3; ++head) {
    for (int64_t j = 0; j < 257; ++j) ASSERT_EQ((*scores)[head][j], input.scores[head * 257 + j]);
  }
}

TEST(ObservedScorerTest, PerQueryHeadScoresAreReducedOverTheGroup) {
  for (int group : {1, 4, 8}) {
    for (GroupReduction reduction :
         {GroupReduction::kMean, GroupReduction::kMax, GroupReduction::kSum}) {
      const CacheGeometry geometry = Geometry(2, group);
      LayerInput input = testing::MakeRandomLayer(geometry, 301, 0, 9 + group);
      testing::AddRandomScores(input, 2 * group, 9 + group);
      const MethodSpec spec = ObservedSpec(reduction);
      const auto reference = testing::ReferenceScores(geometry, spec, input);
      auto scores = testing::ScoreLayer(geometry, spec, input);
      ASSERT_TRUE(scores.ok()) << scores.status();
      for (int head = 0; head < 2; ++head) {
        for (int64_t j = 0; j < 301; ++j) {
          ASSERT_NEAR((*scores)[head][j], reference[head][j], 1e-6 * std::abs(reference[head][j]))
              << GroupReductionName(reduction) << " G=" << group << " head " << head << " " << j;
        }
      }
      const int64_t n = 77;
      auto result = testing::CompressLayer(geometry, spec, input, n);
      ASSERT_TRUE(result.ok()) << result.status();
      for (int head = 0; head < 2; ++head) {
        const auto comparison =
            testing::CompareKept(reference[head], n, testing::KeptOfHead(*result, head));
        EXPECT_TRUE(comparison.ok) << comparison.failure;
      }
    }
  }
}

TEST(ObservedScorerTest, NanRanksLastAndProtectionApplies) {
  const CacheGeometry geometry = Geometry(1, 2);
  LayerInput input = testing::MakeRandomLayer(geometry, 10, 0, 1);
  input.shape.num_score_heads = 2;
  input.scores.assign(20, 0.0f);
  for (int j = 0; j < 10; ++j) {
    input.scores[j] = static_cast<float>(j);       // query head 0
    input.scores[10 + j] = static_cast<float>(j);  // query head 1
  }
  input.scores[9] = NAN;  // token 9: NaN in one member poisons the mean
  MethodSpec spec = ObservedSpec(GroupReduction::kMean);
  spec.protect_sinks = 1;
  auto result = testing::CompressLayer(geometry, spec, input, 3);
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ(testing::KeptOfHead(*result, 0), std::vector<int32_t>({0, 7, 8}));
  spec.observed.group_reduction = GroupReduction::kMax;
  result = testing::CompressLayer(geometry, spec, input, 3);
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ(testing::KeptOfHead(*result, 0), std::vector<int32_t>({0, 7, 8}));
}

TEST(ObservedScorerTest, RejectsMissingOrMisshapenScores) {
  const CacheGeometry geometry = Geometry(2, 4);
  LayerInput input = testing::MakeRandomLayer(geometry, 20, 0, 1);
  auto missing = testing::CompressLayer(geometry, ObservedSpec(GroupReduction::kMean), input, 5);
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(missing.status().message().find("needs client scores"), std::string::npos)
      << missing.status();
  testing::AddRandomScores(input, 4, 1);
  auto misshapen = testing::CompressLayer(geometry, ObservedSpec(GroupReduction::kMean), input, 5);
  EXPECT_EQ(misshapen.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(misshapen.status().message().find("num_score_heads 4"), std::string::npos)
      << misshapen.status();
}

}  // namespace
}  // namespace kvcompress
