#include "kernels/method_spec.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>

#include "absl/strings/str_cat.h"

namespace kvcompress {
namespace {

constexpr int kMaxKernelSize = 1023;

absl::string_view AsAbsl(std::string_view text) { return {text.data(), text.size()}; }

absl::Status OutOfRange(std::string_view field, double value, std::string_view expected) {
  return absl::InvalidArgumentError(
      absl::StrCat(AsAbsl(field), ": ", value, " is out of range; expected ", AsAbsl(expected)));
}

bool KnownScorer(ScorerKind kind) {
  switch (kind) {
    case ScorerKind::kSnapKv:
    case ScorerKind::kKnorm:
    case ScorerKind::kStreaming:
    case ScorerKind::kObserved:
    case ScorerKind::kTova:
    case ScorerKind::kKeyDiff:
      return true;
  }
  return false;
}

// Whether `reduction` names one of the enumerators (a cast int may not).
bool KnownGroupReduction(GroupReduction reduction) {
  return reduction == GroupReduction::kMean || reduction == GroupReduction::kMax ||
         reduction == GroupReduction::kSum;
}

absl::Status ValidateEnums(const MethodSpec& spec) {
  if (!KnownScorer(spec.scorer)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "method.scorer: ", static_cast<int>(spec.scorer),
        " is not a known scorer; expected snapkv, knorm, streaming, observed, tova or keydiff"));
  }
  if (spec.snapkv.pooling != Pooling::kAvg && spec.snapkv.pooling != Pooling::kMax) {
    return absl::InvalidArgumentError(
        absl::StrCat("method.snapkv.pooling: ", static_cast<int>(spec.snapkv.pooling),
                     " is not a known pooling; expected avg or max"));
  }
  if (!KnownGroupReduction(spec.snapkv.group_reduction)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "method.snapkv.group_reduction: ", static_cast<int>(spec.snapkv.group_reduction),
        " is not a known group reduction; expected mean, max or sum"));
  }
  if (!KnownGroupReduction(spec.observed.group_reduction)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "method.observed.group_reduction: ", static_cast<int>(spec.observed.group_reduction),
        " is not a known group reduction; expected mean, max or sum"));
  }
  if (spec.layer_budget != LayerBudgetKind::kUniform &&
      spec.layer_budget != LayerBudgetKind::kPyramid &&
      spec.layer_budget != LayerBudgetKind::kDynamic) {
    return absl::InvalidArgumentError(
        absl::StrCat("method.layer_budget: ", static_cast<int>(spec.layer_budget),
                     " is not a known layer budget; expected uniform, pyramid or dynamic"));
  }
  if (spec.head_budget != HeadBudgetKind::kUniform &&
      spec.head_budget != HeadBudgetKind::kAdaptive) {
    return absl::InvalidArgumentError(
        absl::StrCat("method.head_budget: ", static_cast<int>(spec.head_budget),
                     " is not a known head budget; expected uniform or adaptive"));
  }
  if (spec.reducer != ReducerKind::kDrop && spec.reducer != ReducerKind::kMergeSimilar &&
      spec.reducer != ReducerKind::kMergeNearest) {
    return absl::InvalidArgumentError(
        absl::StrCat("method.reducer: ", static_cast<int>(spec.reducer),
                     " is not a known reducer; expected drop, merge_similar or merge_nearest"));
  }
  return absl::OkStatus();
}

absl::Status ValidateScorerOptions(const MethodSpec& spec) {
  const SnapKvOptions& snapkv = spec.snapkv;
  if (snapkv.window_size < 1) {
    return OutOfRange("method.snapkv.window_size", snapkv.window_size, ">= 1");
  }
  if (snapkv.kernel_size < 1 || snapkv.kernel_size > kMaxKernelSize) {
    return OutOfRange("method.snapkv.kernel_size", snapkv.kernel_size,
                      absl::StrCat("an odd size between 1 and ", kMaxKernelSize));
  }
  if (snapkv.kernel_size % 2 == 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "method.snapkv.kernel_size: ", snapkv.kernel_size, " is even; expected an odd size >= 1"));
  }
  if (spec.streaming.sinks < 0) {
    return OutOfRange("method.streaming.sinks", spec.streaming.sinks, ">= 0");
  }
  return absl::OkStatus();
}

absl::Status ValidateBudgetOptions(const MethodSpec& spec) {
  // Written as !(in range) so that NaN is rejected too.
  if (!(spec.pyramid.beta > 0) || std::isinf(spec.pyramid.beta)) {
    return OutOfRange("method.pyramid.beta", spec.pyramid.beta, "a finite value > 0");
  }
  if (!(spec.dynamic.r_max >= 1) || std::isinf(spec.dynamic.r_max)) {
    return OutOfRange("method.dynamic.r_max", spec.dynamic.r_max, "a finite value >= 1");
  }
  if (spec.dynamic.update_interval < 1) {
    return OutOfRange("method.dynamic.update_interval", spec.dynamic.update_interval, ">= 1");
  }
  if (!(spec.adaptive.alpha >= 0 && spec.adaptive.alpha <= 1)) {
    return OutOfRange("method.adaptive.alpha", spec.adaptive.alpha, "0 <= alpha <= 1");
  }
  return absl::OkStatus();
}

absl::Status ValidateReducerOptions(const MethodSpec& spec) {
  const MergeSimilarOptions& merge = spec.merge_similar;
  if (!(merge.similarity_threshold >= -1 && merge.similarity_threshold <= 1)) {
    return OutOfRange("method.merge_similar.similarity_threshold", merge.similarity_threshold,
                      "-1 <= similarity_threshold <= 1");
  }
  if (!(merge.sigma > 0) || std::isinf(merge.sigma)) {
    return OutOfRange("method.merge_similar.sigma", merge.sigma, "a finite value > 0");
  }
  if (!(merge.protect_fraction >= 0 && merge.protect_fraction <= 1)) {
    return OutOfRange("method.merge_similar.protect_fraction", merge.protect_fraction,
                      "0 <= protect_fraction <= 1");
  }
  return absl::OkStatus();
}

absl::Status ValidateTokenBudget(const TokenBudget& budget) {
  if (budget.use_ratio) {
    if (!(budget.keep_ratio > 0 && budget.keep_ratio <= 1)) {
      return OutOfRange("method.budget.keep_ratio", budget.keep_ratio, "0 < keep_ratio <= 1");
    }
  } else if (budget.keep_tokens < 1) {
    return OutOfRange("method.budget.keep_tokens", static_cast<double>(budget.keep_tokens), ">= 1");
  }
  return absl::OkStatus();
}

absl::Status ValidateLayerOptions(const MethodSpec& spec, const CacheGeometry& geometry) {
  for (size_t i = 0; i < spec.skip_layers.size(); ++i) {
    const int layer = spec.skip_layers[i];
    if (layer < 0 || layer >= geometry.num_layers) {
      return absl::InvalidArgumentError(absl::StrCat("method.skip_layers[", i, "]: ", layer,
                                                     " is out of range; expected 0 <= layer < ",
                                                     geometry.num_layers, " (num_layers)"));
    }
  }
  if (spec.protect_sinks < 0) {
    return OutOfRange("method.protect_sinks", spec.protect_sinks, ">= 0");
  }
  if (spec.protect_recent < 0) {
    return OutOfRange("method.protect_recent", spec.protect_recent, ">= 0");
  }
  return absl::OkStatus();
}

// Whether the method scores with window attention (and so needs window queries).
bool NeedsWindowQueries(const MethodSpec& spec) {
  return spec.scorer == ScorerKind::kSnapKv || spec.scorer == ScorerKind::kTova ||
         spec.layer_budget == LayerBudgetKind::kDynamic;
}

}  // namespace

std::string_view ScorerName(ScorerKind kind) {
  switch (kind) {
    case ScorerKind::kSnapKv:
      return "snapkv";
    case ScorerKind::kKnorm:
      return "knorm";
    case ScorerKind::kStreaming:
      return "streaming";
    case ScorerKind::kObserved:
      return "observed";
    case ScorerKind::kTova:
      return "tova";
    case ScorerKind::kKeyDiff:
      return "keydiff";
  }
  return "unknown";
}

std::string_view LayerBudgetName(LayerBudgetKind kind) {
  switch (kind) {
    case LayerBudgetKind::kUniform:
      return "uniform";
    case LayerBudgetKind::kPyramid:
      return "pyramid";
    case LayerBudgetKind::kDynamic:
      return "dynamic";
  }
  return "unknown";
}

std::string_view HeadBudgetName(HeadBudgetKind kind) {
  switch (kind) {
    case HeadBudgetKind::kUniform:
      return "uniform";
    case HeadBudgetKind::kAdaptive:
      return "adaptive";
  }
  return "unknown";
}

std::string_view ReducerName(ReducerKind kind) {
  switch (kind) {
    case ReducerKind::kDrop:
      return "drop";
    case ReducerKind::kMergeSimilar:
      return "merge_similar";
    case ReducerKind::kMergeNearest:
      return "merge_nearest";
  }
  return "unknown";
}

std::string_view PoolingName(Pooling pooling) {
  switch (pooling) {
    case Pooling::kAvg:
      return "avg";
    case Pooling::kMax:
      return "max";
  }
  return "unknown";
}

std::string_view GroupReductionName(GroupReduction reduction) {
  switch (reduction) {
    case GroupReduction::kMean:
      return "mean";
    case GroupReduction::kMax:
      return "max";
    case GroupReduction::kSum:
      return "sum";
  }
  return "unknown";
}

absl::Status ValidateMethodSpec(const MethodSpec& spec, const CacheGeometry& geometry) {
  // Every field is checked whatever the selected stages: a value that was set is a value the
  // client meant, and the defaults are all valid.
  if (absl::Status status = ValidateEnums(spec); !status.ok()) return status;
  if (absl::Status status = ValidateTokenBudget(spec.budget); !status.ok()) return status;
  if (absl::Status status = ValidateScorerOptions(spec); !status.ok()) return status;
  if (absl::Status status = ValidateBudgetOptions(spec); !status.ok()) return status;
  if (absl::Status status = ValidateReducerOptions(spec); !status.ok()) return status;
  return ValidateLayerOptions(spec, geometry);
}

absl::Status CheckMethodImplemented(const MethodSpec& /*spec*/) {
  // Every stage of DESIGN §3 runs on the CPU reference backend: all scorers (snapkv with both
  // poolings and every group reduction, observed with every group reduction), all layer
  // budgets, both head budgets and all reducers, in any combination. A backend or build that
  // lacks a stage reports it here by name.
  return absl::OkStatus();
}

absl::Status ValidateSequenceForMethod(const MethodSpec& spec, const CacheGeometry& geometry,
                                       const SequenceShape& shape, int sequence_index) {
  const std::string field = absl::StrCat("sequences[", sequence_index, "]");
  if (shape.num_tokens < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat(field, ".num_tokens: ", shape.num_tokens, " is out of range; expected >= 1"));
  }
  if (shape.num_tokens > std::numeric_limits<int32_t>::max()) {
    return absl::InvalidArgumentError(absl::StrCat(
        field, ".num_tokens: ", shape.num_tokens, " is out of range; expected at most ",
        std::numeric_limits<int32_t>::max(), " (positions are int32)"));
  }
  if (shape.num_window_queries < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(field, ".num_window_queries: ", shape.num_window_queries,
                     " is out of range; expected >= 0"));
  }
  if (shape.num_window_queries > shape.num_tokens) {
    return absl::InvalidArgumentError(absl::StrCat(
        field, ".num_window_queries: ", shape.num_window_queries, " exceeds num_tokens ",
        shape.num_tokens, "; expected at most one query per token"));
  }
  if (shape.num_score_heads != 0 && shape.num_score_heads != geometry.num_kv_heads &&
      shape.num_score_heads != geometry.num_query_heads) {
    return absl::InvalidArgumentError(
        absl::StrCat(field, ".num_score_heads: ", shape.num_score_heads,
                     " is invalid; expected 0, num_kv_heads ", geometry.num_kv_heads,
                     " or num_query_heads ", geometry.num_query_heads));
  }
  if (NeedsWindowQueries(spec) && shape.num_window_queries < 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        field, ".num_window_queries: 0, but the ", AsAbsl(ScorerName(spec.scorer)),
        " method needs window queries; send the last W post-RoPE queries of every layer (W = ",
        spec.snapkv.window_size, ", the window size)"));
  }
  if (spec.scorer == ScorerKind::kObserved && shape.num_score_heads < 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        field, ".num_score_heads: 0, but the observed scorer needs client scores; send [",
        geometry.num_kv_heads, " or ", geometry.num_query_heads, ", num_tokens] fp32 scores"));
  }
  return absl::OkStatus();
}

int64_t TokensToKeep(const TokenBudget& budget, int64_t num_tokens) {
  if (num_tokens < 1) return 0;
  if (!budget.use_ratio) return std::clamp<int64_t>(budget.keep_tokens, 1, num_tokens);
  // The guard keeps 0.29 · 100 = 28.999999999999996 at 29. Clamping in double first keeps
  // the conversion defined for any ratio, NaN included (→ 1).
  const double keep = std::floor(static_cast<double>(num_tokens) * budget.keep_ratio + 1e-9);
  if (!(keep >= 1)) return 1;
  if (keep >= static_cast<double>(num_tokens)) return num_tokens;
  return static_cast<int64_t>(keep);
}

bool IsSkippedLayer(const MethodSpec& spec, int layer) {
  return std::find(spec.skip_layers.begin(), spec.skip_layers.end(), layer) !=
         spec.skip_layers.end();
}

}  // namespace kvcompress
