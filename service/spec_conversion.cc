#include "service/spec_conversion.h"

#include <algorithm>
#include <cstdint>
#include <limits>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "kernels/status_macros.h"

namespace kvcompress {
namespace {

constexpr absl::string_view kScorerNames = "snapkv, knorm, streaming, observed, tova, keydiff";

// Proto carries sizes as uint32; the kernels use int. Values past INT_MAX cannot be meant.
absl::StatusOr<int> CheckedInt(uint32_t value, absl::string_view field) {
  if (value > static_cast<uint32_t>(std::numeric_limits<int>::max())) {
    return absl::InvalidArgumentError(absl::StrCat(field, ": ", value, " exceeds the maximum of ",
                                                   std::numeric_limits<int>::max()));
  }
  return static_cast<int>(value);
}

// Zero means "default" for options proto3 cannot mark as unset.
absl::StatusOr<int> IntOrDefault(uint32_t value, int default_value, absl::string_view field) {
  if (value == 0) return default_value;
  return CheckedInt(value, field);
}

double DoubleOrDefault(double value, double default_value) {
  return value == 0.0 ? default_value : value;
}

absl::StatusOr<Pooling> PoolingFromProto(v1::Pooling pooling, absl::string_view field) {
  switch (pooling) {
    case v1::POOLING_UNSPECIFIED:
    case v1::POOLING_AVG:
      return Pooling::kAvg;
    case v1::POOLING_MAX:
      return Pooling::kMax;
    default:
      return absl::InvalidArgumentError(absl::StrCat(field, ": unknown value ",
                                                     static_cast<int>(pooling),
                                                     "; expected POOLING_AVG or POOLING_MAX"));
  }
}

absl::StatusOr<GroupReduction> GroupReductionFromProto(v1::GroupReduction reduction,
                                                       absl::string_view field) {
  switch (reduction) {
    case v1::GROUP_REDUCTION_UNSPECIFIED:
    case v1::GROUP_REDUCTION_MEAN:
      return GroupReduction::kMean;
    case v1::GROUP_REDUCTION_MAX:
      return GroupReduction::kMax;
    case v1::GROUP_REDUCTION_SUM:
      return GroupReduction::kSum;
    default:
      return absl::InvalidArgumentError(absl::StrCat(
          field, ": unknown value ", static_cast<int>(reduction),
          "; expected GROUP_REDUCTION_MEAN, GROUP_REDUCTION_MAX or GROUP_REDUCTION_SUM"));
  }
}

absl::Status ScorerFromProto(const v1::Scorer& scorer, MethodSpec& spec) {
  const MethodSpec defaults;
  switch (scorer.kind_case()) {
    case v1::Scorer::kSnapkv: {
      const v1::SnapKvScorer& snapkv = scorer.snapkv();
      spec.scorer = ScorerKind::kSnapKv;
      KVC_ASSIGN_OR_RETURN(spec.snapkv.window_size,
                           IntOrDefault(snapkv.window_size(), defaults.snapkv.window_size,
                                        "method.scorer.snapkv.window_size"));
      KVC_ASSIGN_OR_RETURN(spec.snapkv.kernel_size,
                           IntOrDefault(snapkv.kernel_size(), defaults.snapkv.kernel_size,
                                        "method.scorer.snapkv.kernel_size"));
      KVC_ASSIGN_OR_RETURN(spec.snapkv.pooling,
                           PoolingFromProto(snapkv.pooling(), "method.scorer.snapkv.pooling"));
      KVC_ASSIGN_OR_RETURN(spec.snapkv.group_reduction,
                           GroupReductionFromProto(snapkv.group_reduction(),
                                                   "method.scorer.snapkv.group_reduction"));
      return absl::OkStatus();
    }
    case v1::Scorer::kKnorm:
      spec.scorer = ScorerKind::kKnorm;
      return absl::OkStatus();
    case v1::Scorer::kStreaming: {
      spec.scorer = ScorerKind::kStreaming;
      KVC_ASSIGN_OR_RETURN(spec.streaming.sinks,
                           IntOrDefault(scorer.streaming().sinks(), defaults.streaming.sinks,
                                        "method.scorer.streaming.sinks"));
      return absl::OkStatus();
    }
    case v1::Scorer::kObserved: {
      spec.scorer = ScorerKind::kObserved;
      KVC_ASSIGN_OR_RETURN(spec.observed.group_reduction,
                           GroupReductionFromProto(scorer.observed().group_reduction(),
                                                   "method.scorer.observed.group_reduction"));
      return absl::OkStatus();
    }
    case v1::Scorer::kTova:
      spec.scorer = ScorerKind::kTova;
      return absl::OkStatus();
    case v1::Scorer::kKeydiff:
      spec.scorer = ScorerKind::kKeyDiff;
      return absl::OkStatus();
    case v1::Scorer::KIND_NOT_SET:
      break;
  }
  return absl::InvalidArgumentError(
      absl::StrCat("method.scorer: not set; expected one of ", kScorerNames));
}

absl::Status LayerBudgetFromProto(const v1::LayerBudget& budget, MethodSpec& spec) {
  const MethodSpec defaults;
  switch (budget.kind_case()) {
    case v1::LayerBudget::KIND_NOT_SET:
    case v1::LayerBudget::kUniform:
      spec.layer_budget = LayerBudgetKind::kUniform;
      return absl::OkStatus();
    case v1::LayerBudget::kPyramid:
      spec.layer_budget = LayerBudgetKind::kPyramid;
      spec.pyramid.beta = DoubleOrDefault(budget.pyramid().beta(), defaults.pyramid.beta);
      return absl::OkStatus();
    case v1::LayerBudget::kDynamic: {
      spec.layer_budget = LayerBudgetKind::kDynamic;
      spec.dynamic.r_max = DoubleOrDefault(budget.dynamic().r_max(), defaults.dynamic.r_max);
      KVC_ASSIGN_OR_RETURN(
          spec.dynamic.update_interval,
          IntOrDefault(budget.dynamic().update_interval(), defaults.dynamic.update_interval,
                       "method.layer_budget.dynamic.update_interval"));
      return absl::OkStatus();
    }
  }
  return absl::InternalError("method.layer_budget: unhandled oneof case");
}

absl::Status HeadBudgetFromProto(const v1::HeadBudget& budget, MethodSpec& spec) {
  const MethodSpec defaults;
  switch (budget.kind_case()) {
    case v1::HeadBudget::KIND_NOT_SET:
    case v1::HeadBudget::kUniform:
      spec.head_budget = HeadBudgetKind::kUniform;
      return absl::OkStatus();
    case v1::HeadBudget::kAdaptive:
      spec.head_budget = HeadBudgetKind::kAdaptive;
      spec.adaptive.alpha = DoubleOrDefault(budget.adaptive().alpha(), defaults.adaptive.alpha);
      return absl::OkStatus();
  }
  return absl::InternalError("method.head_budget: unhandled oneof case");
}

absl::Status ReducerFromProto(const v1::Reducer& reducer, MethodSpec& spec) {
  const MethodSpec defaults;
  switch (reducer.kind_case()) {
    case v1::Reducer::KIND_NOT_SET:
    case v1::Reducer::kDrop:
      spec.reducer = ReducerKind::kDrop;
      return absl::OkStatus();
    case v1::Reducer::kMergeSimilar: {
      const v1::MergeSimilarReducer& merge = reducer.merge_similar();
      const MergeSimilarOptions& fallback = defaults.merge_similar;
      spec.reducer = ReducerKind::kMergeSimilar;
      spec.merge_similar.similarity_threshold =
          DoubleOrDefault(merge.similarity_threshold(), fallback.similarity_threshold);
      spec.merge_similar.sigma = DoubleOrDefault(merge.sigma(), fallback.sigma);
      spec.merge_similar.auto_sigma = merge.auto_sigma();
      spec.merge_similar.protect_fraction =
          DoubleOrDefault(merge.protect_fraction(), fallback.protect_fraction);
      spec.merge_similar.scale_values_by_set_size = merge.scale_values_by_set_size();
      return absl::OkStatus();
    }
    case v1::Reducer::kMergeNearest:
      spec.reducer = ReducerKind::kMergeNearest;
      return absl::OkStatus();
  }
  return absl::InternalError("method.reducer: unhandled oneof case");
}

}  // namespace

absl::StatusOr<DType> DTypeFromProto(v1::DType dtype) {
  switch (dtype) {
    case v1::DTYPE_FLOAT16:
      return DType::kFloat16;
    case v1::DTYPE_BFLOAT16:
      return DType::kBFloat16;
    case v1::DTYPE_FLOAT32:
      return DType::kFloat32;
    default:
      break;
  }
  const std::string received = v1::DType_IsValid(dtype)
                                   ? std::string(v1::DType_Name(dtype))
                                   : absl::StrCat("unknown value ", static_cast<int>(dtype));
  return absl::InvalidArgumentError(absl::StrCat(
      "dtype: ", received, "; expected DTYPE_FLOAT16, DTYPE_BFLOAT16 or DTYPE_FLOAT32"));
}

v1::DType DTypeToProto(DType dtype) {
  switch (dtype) {
    case DType::kFloat16:
      return v1::DTYPE_FLOAT16;
    case DType::kBFloat16:
      return v1::DTYPE_BFLOAT16;
    case DType::kFloat32:
      return v1::DTYPE_FLOAT32;
  }
  return v1::DTYPE_UNSPECIFIED;
}

absl::StatusOr<Layout> LayoutFromProto(v1::Layout layout) {
  switch (layout) {
    case v1::LAYOUT_HND:
      return Layout::kHND;
    case v1::LAYOUT_NHD:
      return Layout::kNHD;
    default:
      break;
  }
  const std::string received = v1::Layout_IsValid(layout)
                                   ? std::string(v1::Layout_Name(layout))
                                   : absl::StrCat("unknown value ", static_cast<int>(layout));
  return absl::InvalidArgumentError(
      absl::StrCat("layout: ", received, "; expected LAYOUT_HND or LAYOUT_NHD"));
}

v1::Layout LayoutToProto(Layout layout) {
  switch (layout) {
    case Layout::kHND:
      return v1::LAYOUT_HND;
    case Layout::kNHD:
      return v1::LAYOUT_NHD;
  }
  return v1::LAYOUT_UNSPECIFIED;
}

absl::StatusOr<CacheGeometry> GeometryFromProto(const v1::CacheGeometry& geometry) {
  CacheGeometry result;
  KVC_ASSIGN_OR_RETURN(result.num_layers, CheckedInt(geometry.num_layers(), "geometry.num_layers"));
  KVC_ASSIGN_OR_RETURN(result.num_kv_heads,
                       CheckedInt(geometry.num_kv_heads(), "geometry.num_kv_heads"));
  KVC_ASSIGN_OR_RETURN(result.num_query_heads,
                       CheckedInt(geometry.num_query_heads(), "geometry.num_query_heads"));
  KVC_ASSIGN_OR_RETURN(result.head_dim, CheckedInt(geometry.head_dim(), "geometry.head_dim"));
  absl::StatusOr<DType> dtype = DTypeFromProto(geometry.dtype());
  if (!dtype.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("geometry.", dtype.status().message()));
  }
  result.dtype = *dtype;
  absl::StatusOr<Layout> layout = LayoutFromProto(geometry.layout());
  if (!layout.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("geometry.", layout.status().message()));
  }
  result.layout = *layout;
  KVC_RETURN_IF_ERROR(ValidateGeometry(result));
  return result;
}

SequenceShape SequenceShapeFromProto(const v1::SequenceShape& shape) {
  // Counts past INT_MAX saturate: they then fail the range checks that follow
  // (ValidateSequenceForMethod, the server's limits) instead of wrapping negative.
  constexpr uint32_t kIntMax = static_cast<uint32_t>(std::numeric_limits<int>::max());
  SequenceShape result;
  result.num_tokens = shape.num_tokens();
  result.num_window_queries = static_cast<int>(std::min(shape.num_window_queries(), kIntMax));
  result.num_score_heads = static_cast<int>(std::min(shape.num_score_heads(), kIntMax));
  return result;
}

absl::StatusOr<MethodSpec> MethodSpecFromProto(const v1::MethodSpec& spec) {
  MethodSpec result;
  KVC_RETURN_IF_ERROR(ScorerFromProto(spec.scorer(), result));
  KVC_RETURN_IF_ERROR(LayerBudgetFromProto(spec.layer_budget(), result));
  KVC_RETURN_IF_ERROR(HeadBudgetFromProto(spec.head_budget(), result));
  KVC_RETURN_IF_ERROR(ReducerFromProto(spec.reducer(), result));

  switch (spec.budget_case()) {
    case v1::MethodSpec::kKeepRatio:
      result.budget.use_ratio = true;
      result.budget.keep_ratio = spec.keep_ratio();
      result.budget.keep_tokens = 0;
      break;
    case v1::MethodSpec::kKeepTokens:
      result.budget.use_ratio = false;
      result.budget.keep_tokens = spec.keep_tokens();
      break;
    case v1::MethodSpec::BUDGET_NOT_SET:
      return absl::InvalidArgumentError("method: set keep_ratio in (0, 1] or keep_tokens >= 1");
  }

  result.skip_layers.reserve(spec.skip_layers_size());
  for (int i = 0; i < spec.skip_layers_size(); ++i) {
    KVC_ASSIGN_OR_RETURN(
        int layer, CheckedInt(spec.skip_layers(i), absl::StrCat("method.skip_layers[", i, "]")));
    result.skip_layers.push_back(layer);
  }
  KVC_ASSIGN_OR_RETURN(result.protect_sinks,
                       CheckedInt(spec.protect_sinks(), "method.protect_sinks"));
  KVC_ASSIGN_OR_RETURN(result.protect_recent,
                       CheckedInt(spec.protect_recent(), "method.protect_recent"));
  return result;
}

}  // namespace kvcompress
