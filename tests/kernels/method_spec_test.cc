#include "kernels/method_spec.h"

#include <cmath>
#include <functional>
#include <string>

#include "gtest/gtest.h"

namespace kvcompress {
namespace {

CacheGeometry Geometry() {
  CacheGeometry geometry;
  geometry.num_layers = 32;
  geometry.num_kv_heads = 8;
  geometry.num_query_heads = 32;
  geometry.head_dim = 128;
  return geometry;
}

// Expects `status` to have `code` and a message containing `substring`.
void ExpectStatus(const absl::Status& status, absl::StatusCode code, const std::string& substring) {
  EXPECT_EQ(status.code(), code) << status;
  EXPECT_NE(status.message().find(substring), std::string::npos)
      << "message \"" << status.message() << "\" lacks \"" << substring << "\"";
}

TEST(MethodSpecTest, Names) {
  EXPECT_EQ(ScorerName(ScorerKind::kSnapKv), "snapkv");
  EXPECT_EQ(ScorerName(ScorerKind::kKnorm), "knorm");
  EXPECT_EQ(ScorerName(ScorerKind::kStreaming), "streaming");
  EXPECT_EQ(ScorerName(ScorerKind::kObserved), "observed");
  EXPECT_EQ(ScorerName(ScorerKind::kTova), "tova");
  EXPECT_EQ(ScorerName(ScorerKind::kKeyDiff), "keydiff");
  EXPECT_EQ(LayerBudgetName(LayerBudgetKind::kUniform), "uniform");
  EXPECT_EQ(LayerBudgetName(LayerBudgetKind::kPyramid), "pyramid");
  EXPECT_EQ(LayerBudgetName(LayerBudgetKind::kDynamic), "dynamic");
  EXPECT_EQ(HeadBudgetName(HeadBudgetKind::kUniform), "uniform");
  EXPECT_EQ(HeadBudgetName(HeadBudgetKind::kAdaptive), "adaptive");
  EXPECT_EQ(ReducerName(ReducerKind::kDrop), "drop");
  EXPECT_EQ(ReducerName(ReducerKind::kMergeSimilar), "merge_similar");
  EXPECT_EQ(ReducerName(ReducerKind::kMergeNearest), "merge_nearest");
  EXPECT_EQ(PoolingName(Pooling::kAvg), "avg");
  EXPECT_EQ(PoolingName(Pooling::kMax), "max");
  EXPECT_EQ(GroupReductionName(GroupReduction::kMean), "mean");
  EXPECT_EQ(GroupReductionName(GroupReduction::kMax), "max");
  EXPECT_EQ(GroupReductionName(GroupReduction::kSum), "sum");
}

TEST(ValidateGeometryTest, AcceptsAndRejects) {
  EXPECT_TRUE(ValidateGeometry(Geometry()).ok());
  const auto with = [](std::function<void(CacheGeometry&)> change) {
    CacheGeometry geometry = Geometry();
    change(geometry);
    return ValidateGeometry(geometry);
  };
  const auto invalid = absl::StatusCode::kInvalidArgument;
  ExpectStatus(with([](CacheGeometry& g) { g.num_query_heads = 30; }), invalid,
               "geometry.num_query_heads: 30 is not a multiple of num_kv_heads 8");
  ExpectStatus(with([](CacheGeometry& g) { g.num_layers = 0; }), invalid,
               "geometry.num_layers: 0 is out of range");
  ExpectStatus(with([](CacheGeometry& g) { g.num_layers = 4097; }), invalid,
               "geometry.num_layers: 4097");
  ExpectStatus(with([](CacheGeometry& g) { g.num_kv_heads = 0; }), invalid,
               "geometry.num_kv_heads: 0");
  ExpectStatus(with([](CacheGeometry& g) { g.num_query_heads = -8; }), invalid,
               "geometry.num_query_heads: -8");
  ExpectStatus(with([](CacheGeometry& g) { g.head_dim = 0; }), invalid, "geometry.head_dim: 0");
  ExpectStatus(with([](CacheGeometry& g) { g.head_dim = 1025; }), invalid,
               "geometry.head_dim: 1025 is out of range; expected 1 <= head_dim <= 1024");
  EXPECT_TRUE(with([](CacheGeometry& g) {
                g.head_dim = 1024;
                g.num_layers = 4096;
              }).ok());
}

TEST(ValidateMethodSpecTest, DefaultsAreValid) {
  EXPECT_TRUE(ValidateMethodSpec(MethodSpec{}, Geometry()).ok());
}

TEST(ValidateMethodSpecTest, RejectsEachOutOfRangeField) {
  const auto with = [](std::function<void(MethodSpec&)> change) {
    MethodSpec spec;
    change(spec);
    return ValidateMethodSpec(spec, Geometry());
  };
  const auto invalid = absl::StatusCode::kInvalidArgument;
  ExpectStatus(with([](MethodSpec& s) { s.budget.keep_ratio = 0; }), invalid,
               "method.budget.keep_ratio: 0 is out of range");
  ExpectStatus(with([](MethodSpec& s) { s.budget.keep_ratio = 1.01; }), invalid,
               "method.budget.keep_ratio: 1.01");
  ExpectStatus(with([](MethodSpec& s) { s.budget.keep_ratio = NAN; }), invalid,
               "method.budget.keep_ratio");
  EXPECT_TRUE(with([](MethodSpec& s) { s.budget.keep_ratio = 1.0; }).ok());
  ExpectStatus(with([](MethodSpec& s) {
                 s.budget.use_ratio = false;
                 s.budget.keep_tokens = 0;
               }),
               invalid, "method.budget.keep_tokens: 0");
  EXPECT_TRUE(with([](MethodSpec& s) {
                s.budget.use_ratio = false;
                s.budget.keep_tokens = 1;
              }).ok());
  ExpectStatus(with([](MethodSpec& s) { s.snapkv.window_size = 0; }), invalid,
               "method.snapkv.window_size: 0");
  ExpectStatus(with([](MethodSpec& s) { s.snapkv.kernel_size = 4; }), invalid,
               "method.snapkv.kernel_size: 4 is even; expected an odd size >= 1");
  ExpectStatus(with([](MethodSpec& s) { s.snapkv.kernel_size = 0; }), invalid,
               "method.snapkv.kernel_size: 0");
  ExpectStatus(with([](MethodSpec& s) { s.snapkv.kernel_size = 1025; }), invalid,
               "method.snapkv.kernel_size: 1025");
  EXPECT_TRUE(with([](MethodSpec& s) { s.snapkv.kernel_size = 1023; }).ok());
  EXPECT_TRUE(with([](MethodSpec& s) { s.snapkv.kernel_size = 1; }).ok());
  ExpectStatus(with([](MethodSpec& s) { s.streaming.sinks = -1; }), invalid,
               "method.streaming.sinks: -1");
  EXPECT_TRUE(with([](MethodSpec& s) { s.streaming.sinks = 0; }).ok());
  ExpectStatus(with([](MethodSpec& s) {
                 s.skip_layers = {0, 31, 32};
               }),
               invalid, "method.skip_layers[2]: 32 is out of range");
  ExpectStatus(with([](MethodSpec& s) { s.skip_layers = {-1}; }), invalid,
               "method.skip_layers[0]: -1");
  ExpectStatus(with([](MethodSpec& s) { s.protect_sinks = -1; }), invalid,
               "method.protect_sinks: -1");
  ExpectStatus(with([](MethodSpec& s) { s.protect_recent = -2; }), invalid,
               "method.protect_recent: -2");
  ExpectStatus(with([](MethodSpec& s) { s.pyramid.beta = 0; }), invalid, "method.pyramid.beta: 0");
  ExpectStatus(with([](MethodSpec& s) { s.dynamic.r_max = 0.5; }), invalid,
               "method.dynamic.r_max: 0.5");
  ExpectStatus(with([](MethodSpec& s) { s.dynamic.update_interval = 0; }), invalid,
               "method.dynamic.update_interval: 0");
  ExpectStatus(with([](MethodSpec& s) { s.adaptive.alpha = 1.5; }), invalid,
               "method.adaptive.alpha: 1.5");
  EXPECT_TRUE(with([](MethodSpec& s) { s.adaptive.alpha = 0; }).ok());
  ExpectStatus(with([](MethodSpec& s) { s.merge_similar.similarity_threshold = -1.5; }), invalid,
               "method.merge_similar.similarity_threshold: -1.5");
  ExpectStatus(with([](MethodSpec& s) { s.merge_similar.sigma = 0; }), invalid,
               "method.merge_similar.sigma: 0");
  ExpectStatus(with([](MethodSpec& s) { s.merge_similar.protect_fraction = 1.1; }), invalid,
               "method.merge_similar.protect_fraction: 1.1");
  ExpectStatus(with([](MethodSpec& s) { s.scorer = static_cast<ScorerKind>(42); }), invalid,
               "method.scorer: 42");
}

TEST(CheckMethodImplementedTest, ImplementedStagesPass) {
  for (ScorerKind scorer : {ScorerKind::kSnapKv, ScorerKind::kKnorm, ScorerKind::kStreaming,
                            ScorerKind::kObserved, ScorerKind::kTova, ScorerKind::kKeyDiff}) {
    MethodSpec spec;
    spec.scorer = scorer;
    spec.skip_layers = {0, 1};
    spec.protect_sinks = 4;
    spec.protect_recent = 8;
    EXPECT_TRUE(CheckMethodImplemented(spec).ok()) << ScorerName(scorer);
  }
  for (Pooling pooling : {Pooling::kAvg, Pooling::kMax}) {
    for (GroupReduction reduction :
         {GroupReduction::kMean, GroupReduction::kMax, GroupReduction::kSum}) {
      MethodSpec spec;
      spec.snapkv.pooling = pooling;
      spec.snapkv.group_reduction = reduction;
      EXPECT_TRUE(CheckMethodImplemented(spec).ok());
    }
  }
}

TEST(CheckMethodImplementedTest, EveryCombinationOfStagesIsImplemented) {
  for (ScorerKind scorer : {ScorerKind::kSnapKv, ScorerKind::kKnorm, ScorerKind::kStreaming,
                            ScorerKind::kObserved, ScorerKind::kTova, ScorerKind::kKeyDiff}) {
    for (LayerBudgetKind layer :
         {LayerBudgetKind::kUniform, LayerBudgetKind::kPyramid, LayerBudgetKind::kDynamic}) {
      for (HeadBudgetKind head : {HeadBudgetKind::kUniform, HeadBudgetKind::kAdaptive}) {
        for (ReducerKind reducer :
             {ReducerKind::kDrop, ReducerKind::kMergeSimilar, ReducerKind::kMergeNearest}) {
          MethodSpec spec;
          spec.scorer = scorer;
          spec.layer_budget = layer;
          spec.head_budget = head;
          spec.reducer = reducer;
          EXPECT_TRUE(CheckMethodImplemented(spec).ok())
              << ScorerName(scorer) << " " << LayerBudgetName(layer) << " " << HeadBudgetName(head)
              << " " << ReducerName(reducer);
        }
      }
    }
  }
}

TEST(ValidateSequenceForMethodTest, ChecksWhatTheMethodNeeds) {
  const CacheGeometry geometry = Geometry();
  const auto invalid = absl::StatusCode::kInvalidArgument;
  MethodSpec snapkv;
  MethodSpec knorm;
  knorm.scorer = ScorerKind::kKnorm;
  EXPECT_TRUE(ValidateSequenceForMethod(snapkv, geometry, {100, 64, 0}, 0).ok());
  EXPECT_TRUE(ValidateSequenceForMethod(snapkv, geometry, {1, 1, 0}, 0).ok());
  EXPECT_TRUE(ValidateSequenceForMethod(knorm, geometry, {100, 0, 0}, 0).ok());
  EXPECT_TRUE(ValidateSequenceForMethod(knorm, geometry, {100, 0, 8}, 0).ok());
  EXPECT_TRUE(ValidateSequenceForMethod(knorm, geometry, {100, 0, 32}, 0).ok());

  ExpectStatus(ValidateSequenceForMethod(knorm, geometry, {0, 0, 0}, 3), invalid,
               "sequences[3].num_tokens: 0");
  ExpectStatus(ValidateSequenceForMethod(knorm, geometry, {10, 11, 0}, 1), invalid,
               "sequences[1].num_window_queries: 11 exceeds num_tokens 10");
  const absl::Status no_queries = ValidateSequenceForMethod(snapkv, geometry, {100, 0, 0}, 2);
  ExpectStatus(no_queries, invalid, "sequences[2].num_window_queries");
  ExpectStatus(no_queries, invalid, "last W post-RoPE queries");
  ExpectStatus(ValidateSequenceForMethod(knorm, geometry, {100, 0, 4}, 0), invalid,
               "sequences[0].num_score_heads: 4 is invalid; expected 0, num_kv_heads 8 or "
               "num_query_heads 32");
}

TEST(TokensToKeepTest, RatioFloorsWithAGuardAndClamps) {
  TokenBudget ratio;
  ratio.keep_ratio = 0.29;
  EXPECT_EQ(TokensToKeep(ratio, 100), 29);  // 0.29 · 100 = 28.999999999999996 in binary
  ratio.keep_ratio = 0.5;
  EXPECT_EQ(TokensToKeep(ratio, 733), 366);
  EXPECT_EQ(TokensToKeep(ratio, 1), 1);  // floor 0 → at least 1
  ratio.keep_ratio = 0.1;
  EXPECT_EQ(TokensToKeep(ratio, 1000), 100);
  EXPECT_EQ(TokensToKeep(ratio, 9), 1);
  ratio.keep_ratio = 1.0;
  EXPECT_EQ(TokensToKeep(ratio, 4099), 4099);
  ratio.keep_ratio = 0.7;
  EXPECT_EQ(TokensToKeep(ratio, 10), 7);

  TokenBudget tokens;
  tokens.use_ratio = false;
  tokens.keep_tokens = 128;
  EXPECT_EQ(TokensToKeep(tokens, 1000), 128);
  EXPECT_EQ(TokensToKeep(tokens, 100), 100);  // at most T
  tokens.keep_tokens = 1;
  EXPECT_EQ(TokensToKeep(tokens, 100), 1);
}

TEST(IsSkippedLayerTest, LooksUpTheList) {
  MethodSpec spec;
  spec.skip_layers = {0, 1, 31};
  EXPECT_TRUE(IsSkippedLayer(spec, 0));
  EXPECT_TRUE(IsSkippedLayer(spec, 31));
  EXPECT_FALSE(IsSkippedLayer(spec, 2));
  EXPECT_FALSE(IsSkippedLayer(MethodSpec{}, 0));
}

}  // namespace
}  // namespace kvcompress
