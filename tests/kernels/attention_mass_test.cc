#include "kernels/cpu/internal/attention_mass.h"

#include <algorithm>
#include <numeric>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/backend.h"
#include "kernels/cpu/internal/snapkv_scorer.h"
#include "tests/kernels/test_layers.h"

namespace kvcompress {
namespace {

CacheGeometry Geometry(int group, DType dtype, Layout layout) {
  CacheGeometry geometry;
  geometry.num_layers = 1;
  geometry.num_kv_heads = 2;
  geometry.num_query_heads = 2 * group;
  geometry.head_dim = 64;
  geometry.dtype = dtype;
  geometry.layout = layout;
  return geometry;
}

// Every other position, plus a few at the end.
std::vector<int32_t> SomePositions(int64_t tokens, int head) {
  std::vector<int32_t> kept;
  for (int64_t j = head; j < tokens; j += 2) kept.push_back(static_cast<int32_t>(j));
  return kept;
}

TEST(SumKeptAttentionTest, MatchesTheReferenceWithAndWithoutNormalizers) {
  for (int group : {1, 4}) {
    for (int64_t tokens : {1, 5, 64, 200}) {
      const int sent = static_cast<int>(std::min<int64_t>(tokens, 16));
      const CacheGeometry geometry = Geometry(group, DType::kBFloat16, Layout::kNHD);
      const LayerInput input = testing::MakeRandomLayer(geometry, tokens, sent, 31);
      for (int window : {1, sent}) {
        std::vector<std::vector<int32_t>> kept = {SomePositions(tokens, 0),
                                                  SomePositions(tokens, 1)};
        const double expected = testing::ReferenceAttentionMass(geometry, input, window, kept);
        double without = 0;
        double with = 0;
        for (int head = 0; head < 2; ++head) {
          const cpu::HeadKeys keys = cpu::LoadHeadKeys(geometry, input.view(), head);
          const cpu::GroupQueries queries =
              cpu::LoadGroupQueries(geometry, input.view(), head, window);
          without += cpu::SumKeptAttention(keys, queries, kept[head], nullptr);
          // The snapkv scorer's normalizers give the same answer without recomputing.
          std::vector<float> scores(tokens);
          std::vector<cpu::SoftmaxNormalizer> normalizers;
          cpu::ScoreSnapKvHead(SnapKvOptions{}, keys, queries, scores, &normalizers);
          with += cpu::SumKeptAttention(keys, queries, kept[head], &normalizers);
        }
        const double denominator = static_cast<double>(geometry.num_query_heads) * window;
        EXPECT_NEAR(without / denominator, expected, 1e-12) << tokens << " " << window;
        EXPECT_NEAR(with / denominator, expected, 1e-12) << tokens << " " << window;
        EXPECT_GT(expected, 0.0);
        EXPECT_LT(expected, 1.0 + 1e-12);
      }
    }
  }
}

TEST(SumKeptAttentionTest, KeepingEverythingKeepsAllTheMass) {
  const CacheGeometry geometry = Geometry(4, DType::kFloat32, Layout::kHND);
  const LayerInput input = testing::MakeRandomLayer(geometry, 77, 9, 4);
  std::vector<int32_t> all(77);
  std::iota(all.begin(), all.end(), 0);
  const cpu::HeadKeys keys = cpu::LoadHeadKeys(geometry, input.view(), 1);
  const cpu::GroupQueries queries = cpu::LoadGroupQueries(geometry, input.view(), 1, 9);
  EXPECT_NEAR(cpu::SumKeptAttention(keys, queries, all, nullptr), 4 * 9, 1e-12);
  EXPECT_EQ(cpu::SumKeptAttention(keys, queries, {}, nullptr), 0.0);
}

// LayerResult::attention_mass_kept from the backend: W_eff queries for snapkv, every query
// sent for other scorers, 1 for layers kept whole, −1 without queries.
TEST(AttentionMassKeptTest, BackendReportsTheReferenceMass) {
  auto backend = MakeCpuBackend(2);
  const CacheGeometry geometry = Geometry(4, DType::kFloat16, Layout::kHND);
  const LayerInput input = testing::MakeRandomLayer(geometry, 300, 24, 12);
  for (ScorerKind scorer : {ScorerKind::kSnapKv, ScorerKind::kKnorm, ScorerKind::kStreaming}) {
    MethodSpec spec;
    spec.scorer = scorer;
    spec.snapkv.window_size = 16;  // of the 24 sent
    LayerJob job;
    job.input = input.view();
    job.tokens_per_head = 90;
    LayerResult result;
    ASSERT_TRUE(backend->CompressLayers(geometry, spec, {&job, 1}, {&result, 1}).ok());
    const int window = scorer == ScorerKind::kSnapKv ? 16 : 24;
    const std::vector<std::vector<int32_t>> kept = {testing::KeptOfHead(result, 0),
                                                    testing::KeptOfHead(result, 1)};
    const double expected = testing::ReferenceAttentionMass(geometry, input, window, kept);
    EXPECT_NEAR(result.attention_mass_kept, expected, 1e-12) << ScorerName(scorer);
    EXPECT_GT(result.attention_mass_kept, 0.1);
    EXPECT_LT(result.attention_mass_kept, 1.0);

    job.keep_all = true;
    ASSERT_TRUE(backend->CompressLayers(geometry, spec, {&job, 1}, {&result, 1}).ok());
    EXPECT_EQ(result.attention_mass_kept, 1.0);
  }
  const LayerInput no_queries = testing::MakeRandomLayer(geometry, 300, 0, 12);
  MethodSpec knorm;
  knorm.scorer = ScorerKind::kKnorm;
  LayerJob job;
  job.input = no_queries.view();
  job.tokens_per_head = 90;
  LayerResult result;
  ASSERT_TRUE(backend->CompressLayers(geometry, knorm, {&job, 1}, {&result, 1}).ok());
  EXPECT_EQ(result.attention_mass_kept, -1.0);
  job.keep_all = true;
  ASSERT_TRUE(backend->CompressLayers(geometry, knorm, {&job, 1}, {&result, 1}).ok());
  EXPECT_EQ(result.attention_mass_kept, -1.0);
}

}  // namespace
}  // namespace kvcompress
