#include "service/spec_conversion.h"

#include <string>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace kvcompress {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;

v1::MethodSpec SnapKvSpec() {
  v1::MethodSpec spec;
  spec.mutable_scorer()->mutable_snapkv();
  spec.set_keep_ratio(0.25);
  return spec;
}

v1::CacheGeometry ValidGeometry() {
  v1::CacheGeometry geometry;
  geometry.set_num_layers(32);
  geometry.set_num_kv_heads(8);
  geometry.set_num_query_heads(32);
  geometry.set_head_dim(128);
  geometry.set_dtype(v1::DTYPE_BFLOAT16);
  geometry.set_layout(v1::LAYOUT_NHD);
  return geometry;
}

TEST(SpecConversionTest, UnsetStagesAndZeroOptionsTakeDefaults) {
  auto spec = MethodSpecFromProto(SnapKvSpec());
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_EQ(spec->scorer, ScorerKind::kSnapKv);
  EXPECT_EQ(spec->snapkv.window_size, 64);
  EXPECT_EQ(spec->snapkv.kernel_size, 5);
  EXPECT_EQ(spec->snapkv.pooling, Pooling::kAvg);
  EXPECT_EQ(spec->snapkv.group_reduction, GroupReduction::kMean);
  EXPECT_EQ(spec->layer_budget, LayerBudgetKind::kUniform);
  EXPECT_EQ(spec->head_budget, HeadBudgetKind::kUniform);
  EXPECT_EQ(spec->reducer, ReducerKind::kDrop);
  EXPECT_TRUE(spec->budget.use_ratio);
  EXPECT_DOUBLE_EQ(spec->budget.keep_ratio, 0.25);
  EXPECT_TRUE(spec->skip_layers.empty());
  EXPECT_EQ(spec->protect_sinks, 0);
  EXPECT_EQ(spec->protect_recent, 0);
}

TEST(SpecConversionTest, ZeroOptionsOfEveryStageTakeDefaults) {
  v1::MethodSpec proto = SnapKvSpec();
  proto.mutable_layer_budget()->mutable_pyramid();
  proto.mutable_head_budget()->mutable_adaptive();
  proto.mutable_reducer()->mutable_merge_similar();
  auto spec = MethodSpecFromProto(proto);
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_EQ(spec->layer_budget, LayerBudgetKind::kPyramid);
  EXPECT_DOUBLE_EQ(spec->pyramid.beta, 20.0);
  EXPECT_EQ(spec->head_budget, HeadBudgetKind::kAdaptive);
  EXPECT_DOUBLE_EQ(spec->adaptive.alpha, 0.2);
  EXPECT_EQ(spec->reducer, ReducerKind::kMergeSimilar);
  EXPECT_DOUBLE_EQ(spec->merge_similar.similarity_threshold, 0.75);
  EXPECT_DOUBLE_EQ(spec->merge_similar.sigma, 5.0);
  EXPECT_FALSE(spec->merge_similar.auto_sigma);
  EXPECT_FALSE(spec->merge_similar.scale_values_by_set_size);

  proto.mutable_layer_budget()->mutable_dynamic();
  proto.mutable_scorer()->mutable_streaming();
  spec = MethodSpecFromProto(proto);
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_EQ(spec->layer_budget, LayerBudgetKind::kDynamic);
  EXPECT_DOUBLE_EQ(spec->dynamic.r_max, 10.0);
  EXPECT_EQ(spec->dynamic.update_interval, 4);
  EXPECT_EQ(spec->scorer, ScorerKind::kStreaming);
  EXPECT_EQ(spec->streaming.sinks, 4);
}

TEST(SpecConversionTest, ExplicitOptionsAreKept) {
  v1::MethodSpec proto;
  v1::SnapKvScorer* snapkv = proto.mutable_scorer()->mutable_snapkv();
  snapkv->set_window_size(32);
  snapkv->set_kernel_size(7);
  snapkv->set_pooling(v1::POOLING_MAX);
  snapkv->set_group_reduction(v1::GROUP_REDUCTION_SUM);
  proto.mutable_layer_budget()->mutable_dynamic()->set_r_max(3.5);
  proto.mutable_layer_budget()->mutable_dynamic()->set_update_interval(2);
  proto.mutable_head_budget()->mutable_adaptive()->set_alpha(0.5);
  v1::MergeSimilarReducer* merge = proto.mutable_reducer()->mutable_merge_similar();
  merge->set_similarity_threshold(0.9);
  merge->set_sigma(2);
  merge->set_auto_sigma(true);
  merge->set_protect_fraction(0.25);
  merge->set_scale_values_by_set_size(true);
  proto.set_keep_tokens(128);
  proto.add_skip_layers(0);
  proto.add_skip_layers(1);
  proto.set_protect_sinks(4);
  proto.set_protect_recent(16);

  auto spec = MethodSpecFromProto(proto);
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_EQ(spec->snapkv.window_size, 32);
  EXPECT_EQ(spec->snapkv.kernel_size, 7);
  EXPECT_EQ(spec->snapkv.pooling, Pooling::kMax);
  EXPECT_EQ(spec->snapkv.group_reduction, GroupReduction::kSum);
  EXPECT_DOUBLE_EQ(spec->dynamic.r_max, 3.5);
  EXPECT_EQ(spec->dynamic.update_interval, 2);
  EXPECT_DOUBLE_EQ(spec->adaptive.alpha, 0.5);
  EXPECT_DOUBLE_EQ(spec->merge_similar.similarity_threshold, 0.9);
  EXPECT_DOUBLE_EQ(spec->merge_similar.sigma, 2.0);
  EXPECT_TRUE(spec->merge_similar.auto_sigma);
  EXPECT_DOUBLE_EQ(spec->merge_similar.protect_fraction, 0.25);
  EXPECT_TRUE(spec->merge_similar.scale_values_by_set_size);
  EXPECT_FALSE(spec->budget.use_ratio);
  EXPECT_EQ(spec->budget.keep_tokens, 128);
  EXPECT_THAT(spec->skip_layers, ElementsAre(0, 1));
  EXPECT_EQ(spec->protect_sinks, 4);
  EXPECT_EQ(spec->protect_recent, 16);
}

TEST(SpecConversionTest, EveryScorerMaps) {
  struct Case {
    void (*set)(v1::Scorer&);
    ScorerKind kind;
  };
  const Case cases[] = {
      {[](v1::Scorer& s) { s.mutable_knorm(); }, ScorerKind::kKnorm},
      {[](v1::Scorer& s) { s.mutable_observed()->set_group_reduction(v1::GROUP_REDUCTION_MAX); },
       ScorerKind::kObserved},
      {[](v1::Scorer& s) { s.mutable_tova(); }, ScorerKind::kTova},
      {[](v1::Scorer& s) { s.mutable_keydiff(); }, ScorerKind::kKeyDiff},
      {[](v1::Scorer& s) { s.mutable_streaming()->set_sinks(8); }, ScorerKind::kStreaming},
  };
  for (const Case& c : cases) {
    v1::MethodSpec proto = SnapKvSpec();
    c.set(*proto.mutable_scorer());
    auto spec = MethodSpecFromProto(proto);
    ASSERT_TRUE(spec.ok()) << spec.status();
    EXPECT_EQ(spec->scorer, c.kind);
  }
  v1::MethodSpec observed = SnapKvSpec();
  observed.mutable_scorer()->mutable_observed()->set_group_reduction(v1::GROUP_REDUCTION_MAX);
  EXPECT_EQ(MethodSpecFromProto(observed)->observed.group_reduction, GroupReduction::kMax);
  v1::MethodSpec streaming = SnapKvSpec();
  streaming.mutable_scorer()->mutable_streaming()->set_sinks(8);
  EXPECT_EQ(MethodSpecFromProto(streaming)->streaming.sinks, 8);
  v1::MethodSpec merge_nearest = SnapKvSpec();
  merge_nearest.mutable_reducer()->mutable_merge_nearest();
  EXPECT_EQ(MethodSpecFromProto(merge_nearest)->reducer, ReducerKind::kMergeNearest);
}

TEST(SpecConversionTest, ScorerUnsetListsTheScorers) {
  v1::MethodSpec proto;
  proto.set_keep_ratio(0.5);
  auto spec = MethodSpecFromProto(proto);
  ASSERT_FALSE(spec.ok());
  EXPECT_EQ(spec.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(spec.status().message(),
            "method.scorer: not set; expected one of snapkv, knorm, streaming, observed, tova, "
            "keydiff");
}

TEST(SpecConversionTest, BudgetUnset) {
  v1::MethodSpec proto = SnapKvSpec();
  proto.clear_budget();
  auto spec = MethodSpecFromProto(proto);
  ASSERT_FALSE(spec.ok());
  EXPECT_EQ(spec.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(spec.status().message(), "method: set keep_ratio in (0, 1] or keep_tokens >= 1");
}

TEST(SpecConversionTest, UnknownEnumValuesAreRejected) {
  v1::MethodSpec proto = SnapKvSpec();
  proto.mutable_scorer()->mutable_snapkv()->set_pooling(static_cast<v1::Pooling>(9));
  auto spec = MethodSpecFromProto(proto);
  ASSERT_FALSE(spec.ok());
  EXPECT_EQ(spec.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(spec.status().message()),
              HasSubstr("method.scorer.snapkv.pooling: unknown value 9"));
}

TEST(SpecConversionTest, ValuesPastIntMaxAreRejected) {
  v1::MethodSpec proto = SnapKvSpec();
  proto.add_skip_layers(4000000000u);
  auto spec = MethodSpecFromProto(proto);
  ASSERT_FALSE(spec.ok());
  EXPECT_EQ(spec.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(spec.status().message()),
              HasSubstr("method.skip_layers[0]: 4000000000 exceeds the maximum of 2147483647"));
}

TEST(SpecConversionTest, GeometryMaps) {
  auto geometry = GeometryFromProto(ValidGeometry());
  ASSERT_TRUE(geometry.ok()) << geometry.status();
  EXPECT_EQ(geometry->num_layers, 32);
  EXPECT_EQ(geometry->num_kv_heads, 8);
  EXPECT_EQ(geometry->num_query_heads, 32);
  EXPECT_EQ(geometry->head_dim, 128);
  EXPECT_EQ(geometry->dtype, DType::kBFloat16);
  EXPECT_EQ(geometry->layout, Layout::kNHD);
}

TEST(SpecConversionTest, UnspecifiedDtypeAndLayoutNameTheField) {
  v1::CacheGeometry proto = ValidGeometry();
  proto.set_dtype(v1::DTYPE_UNSPECIFIED);
  auto geometry = GeometryFromProto(proto);
  ASSERT_FALSE(geometry.ok());
  EXPECT_EQ(geometry.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(geometry.status().message(),
            "geometry.dtype: DTYPE_UNSPECIFIED; expected DTYPE_FLOAT16, DTYPE_BFLOAT16 or "
            "DTYPE_FLOAT32");

  proto = ValidGeometry();
  proto.set_layout(v1::LAYOUT_UNSPECIFIED);
  geometry = GeometryFromProto(proto);
  ASSERT_FALSE(geometry.ok());
  EXPECT_EQ(geometry.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(geometry.status().message(),
            "geometry.layout: LAYOUT_UNSPECIFIED; expected LAYOUT_HND or LAYOUT_NHD");
}

TEST(SpecConversionTest, GeometryIsValidated) {
  v1::CacheGeometry proto = ValidGeometry();
  proto.set_num_query_heads(12);
  auto geometry = GeometryFromProto(proto);
  ASSERT_FALSE(geometry.ok());
  EXPECT_EQ(geometry.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(geometry.status().message()), HasSubstr("num_query_heads"));

  proto = ValidGeometry();
  proto.set_head_dim(0);
  geometry = GeometryFromProto(proto);
  ASSERT_FALSE(geometry.ok());
  EXPECT_THAT(std::string(geometry.status().message()), HasSubstr("head_dim"));
}

TEST(SpecConversionTest, EnumsRoundTrip) {
  for (DType dtype : {DType::kFloat16, DType::kBFloat16, DType::kFloat32}) {
    EXPECT_EQ(*DTypeFromProto(DTypeToProto(dtype)), dtype);
  }
  for (Layout layout : {Layout::kHND, Layout::kNHD}) {
    EXPECT_EQ(*LayoutFromProto(LayoutToProto(layout)), layout);
  }
  EXPECT_THAT(std::string(DTypeFromProto(static_cast<v1::DType>(17)).status().message()),
              HasSubstr("dtype: unknown value 17"));
}

TEST(SpecConversionTest, SequenceShapeMaps) {
  v1::SequenceShape proto;
  proto.set_num_tokens(4096);
  proto.set_num_window_queries(64);
  proto.set_num_score_heads(8);
  const SequenceShape shape = SequenceShapeFromProto(proto);
  EXPECT_EQ(shape.num_tokens, 4096);
  EXPECT_EQ(shape.num_window_queries, 64);
  EXPECT_EQ(shape.num_score_heads, 8);
  // Counts past INT_MAX saturate rather than wrap negative.
  proto.set_num_window_queries(4000000000u);
  EXPECT_EQ(SequenceShapeFromProto(proto).num_window_queries, 2147483647);
}

}  // namespace
}  // namespace kvcompress
