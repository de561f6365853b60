// The compression method of a request: scorer → layer budget → head budget → selection →
// reducer (DESIGN §3, docs/methods.md), as plain C++ values with the published defaults.
//
// A MethodSpec is a value type: copy it freely. Validation is separate from construction so
// that the service can report every bad field with a precise message.
#ifndef KVCOMPRESS_KERNELS_METHOD_SPEC_H_
#define KVCOMPRESS_KERNELS_METHOD_SPEC_H_

#include <cstdint>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "kernels/cache_geometry.h"

namespace kvcompress {

enum class ScorerKind { kSnapKv, kKnorm, kStreaming, kObserved, kTova, kKeyDiff };
enum class Pooling { kAvg, kMax };
enum class GroupReduction { kMean, kMax, kSum };
enum class LayerBudgetKind { kUniform, kPyramid, kDynamic };
enum class HeadBudgetKind { kUniform, kAdaptive };
enum class ReducerKind { kDrop, kMergeSimilar, kMergeNearest };

struct SnapKvOptions {
  int window_size = 64;  // effective window: min(window_size, queries sent)
  int kernel_size = 5;   // odd, ≥ 1
  Pooling pooling = Pooling::kAvg;
  GroupReduction group_reduction = GroupReduction::kMean;
};

struct StreamingOptions {
  int sinks = 4;
};

struct ObservedOptions {
  GroupReduction group_reduction = GroupReduction::kMean;
};

struct PyramidOptions {
  double beta = 20.0;
};

struct DynamicOptions {
  double r_max = 10.0;
  int update_interval = 4;
};

struct AdaptiveOptions {
  double alpha = 0.2;
};

struct MergeSimilarOptions {
  double similarity_threshold = 0.75;
  double sigma = 5.0;
  bool auto_sigma = false;
  double protect_fraction = 0.5;
  bool scale_values_by_set_size = false;
};

// How many tokens a head keeps: floor(T · keep_ratio) or keep_tokens.
struct TokenBudget {
  bool use_ratio = true;
  double keep_ratio = 0.5;  // (0, 1]
  int64_t keep_tokens = 0;  // ≥ 1 when !use_ratio
};

struct MethodSpec {
  ScorerKind scorer = ScorerKind::kSnapKv;
  SnapKvOptions snapkv;
  StreamingOptions streaming;
  ObservedOptions observed;

  LayerBudgetKind layer_budget = LayerBudgetKind::kUniform;
  PyramidOptions pyramid;
  DynamicOptions dynamic;

  HeadBudgetKind head_budget = HeadBudgetKind::kUniform;
  AdaptiveOptions adaptive;

  ReducerKind reducer = ReducerKind::kDrop;
  MergeSimilarOptions merge_similar;

  TokenBudget budget;
  std::vector<int> skip_layers;  // layers returned whole
  int protect_sinks = 0;         // first tokens always kept
  int protect_recent = 0;        // most recent tokens always kept
};

std::string_view ScorerName(ScorerKind kind);                   // "snapkv", "knorm", ...
std::string_view LayerBudgetName(LayerBudgetKind kind);         // "uniform", "pyramid", "dynamic"
std::string_view HeadBudgetName(HeadBudgetKind kind);           // "uniform", "adaptive"
std::string_view ReducerName(ReducerKind kind);                 // "drop", "merge_similar", ...
std::string_view PoolingName(Pooling pooling);                  // "avg", "max"
std::string_view GroupReductionName(GroupReduction reduction);  // "mean", "max", "sum"

// Checks every parameter's range against the geometry. INVALID_ARGUMENT names the field,
// the value and the accepted range.
absl::Status ValidateMethodSpec(const MethodSpec& spec, const CacheGeometry& geometry);

// UNIMPLEMENTED naming the first stage of `spec` this build cannot run yet. This build runs
// every stage of DESIGN §3, so it answers OK for any spec that passed ValidateMethodSpec.
absl::Status CheckMethodImplemented(const MethodSpec& spec);

// Checks that a sequence supplies what the method needs (window queries for attention
// scorers, client scores for `observed`, W ≤ T). INVALID_ARGUMENT naming `sequence_index`.
absl::Status ValidateSequenceForMethod(const MethodSpec& spec, const CacheGeometry& geometry,
                                       const SequenceShape& shape, int sequence_index);

// n for a head of a sequence of `num_tokens` tokens: floor(T · ratio) (with a 1e-9 guard
// against binary rounding, so 0.29·100 keeps 29) or keep_tokens; at least 1; at most T.
int64_t TokensToKeep(const TokenBudget& budget, int64_t num_tokens);

// Whether `layer` is in skip_layers.
bool IsSkippedLayer(const MethodSpec& spec, int layer);

}  // namespace kvcompress

#endif  // KVCOMPRESS_KERNELS_METHOD_SPEC_H_
