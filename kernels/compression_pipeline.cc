#include "kernels/compression_pipeline.h"

#include <algorithm>
#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "kernels/budget_math.h"
#include "kernels/internal/dynamic_budget.h"
#include "kernels/snapkv_window.h"
#include "kernels/status_macros.h"

namespace kvcompress {
namespace {

std::string ShapeText(const SequenceShape& shape) {
  return absl::StrCat("{num_tokens ", shape.num_tokens, ", num_window_queries ",
                      shape.num_window_queries, ", num_score_heads ", shape.num_score_heads, "}");
}

absl::string_view DTypeText(DType dtype) {
  const std::string_view name = DTypeName(dtype);
  return {name.data(), name.size()};
}

// `what` of layer `where`: expected `expected_bytes` (described by `elements`), got `got`.
absl::Status CheckBytes(absl::string_view where, absl::string_view what, size_t got,
                        size_t expected_bytes, absl::string_view elements) {
  if (got == expected_bytes) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat(where, " ", what, ": expected ", elements, " (",
                                                 expected_bytes, " bytes), got ", got, " bytes"));
}

MethodSpec AllocationSpec(const MethodSpec& spec) {
  MethodSpec allocation = spec;
  allocation.scorer = ScorerKind::kSnapKv;
  return allocation;
}

int CountParticipatingLayers(const MethodSpec& spec, int num_layers) {
  int count = 0;
  for (int layer = 0; layer < num_layers; ++layer) count += IsSkippedLayer(spec, layer) ? 0 : 1;
  return count;
}

// W of the dynamic allocation: snapkv's effective window.
int DynamicWindow(const MethodSpec& spec, const SequenceShape& shape) {
  return EffectiveWindowSize(spec.snapkv.window_size, shape.num_window_queries);
}

}  // namespace

absl::StatusOr<std::unique_ptr<CompressionPipeline>> CompressionPipeline::Create(
    Backend* backend, const CacheGeometry& geometry, const MethodSpec& spec,
    std::vector<SequenceShape> sequences) {
  if (backend == nullptr)
    return absl::InvalidArgumentError("backend: expected a backend, got null");
  KVC_RETURN_IF_ERROR(ValidateGeometry(geometry));
  KVC_RETURN_IF_ERROR(ValidateMethodSpec(spec, geometry));
  KVC_RETURN_IF_ERROR(CheckMethodImplemented(spec));
  if (sequences.empty()) {
    return absl::InvalidArgumentError("sequences: expected at least one sequence, got none");
  }
  for (size_t i = 0; i < sequences.size(); ++i) {
    KVC_RETURN_IF_ERROR(
        ValidateSequenceForMethod(spec, geometry, sequences[i], static_cast<int>(i)));
  }
  return std::unique_ptr<CompressionPipeline>(
      new CompressionPipeline(backend, geometry, spec, std::move(sequences)));
}

CompressionPipeline::CompressionPipeline(Backend* backend, const CacheGeometry& geometry,
                                         const MethodSpec& spec,
                                         std::vector<SequenceShape> sequences)
    : backend_(backend),
      geometry_(geometry),
      spec_(spec),
      sequences_(std::move(sequences)),
      allocation_spec_(AllocationSpec(spec)),
      num_participating_layers_(CountParticipatingLayers(spec, geometry.num_layers)) {
  added_.assign(sequences_.size(), std::vector<bool>(geometry_.num_layers, false));
  held_.resize(sequences_.size());
  for (auto& layers : held_) layers.resize(geometry_.num_layers);
  num_held_.assign(sequences_.size(), 0);
}

bool CompressionPipeline::HoldsLayers(int sequence, int layer) const {
  if (spec_.layer_budget != LayerBudgetKind::kDynamic || IsSkippedLayer(spec_, layer)) {
    return false;
  }
  const SequenceShape& shape = sequences_[sequence];
  const int64_t uniform = TokensToKeep(spec_.budget, shape.num_tokens);
  return uniform < shape.num_tokens && uniform > DynamicWindow(spec_, shape);
}

int64_t CompressionPipeline::LayerTokenBudget(int layer, int64_t num_tokens) const {
  SequenceShape shape;
  shape.num_tokens = num_tokens;
  return LayerTokenBudget(layer, shape);
}

int64_t CompressionPipeline::LayerTokenBudget(int layer, const SequenceShape& shape) const {
  const int64_t num_tokens = shape.num_tokens;
  if (IsSkippedLayer(spec_, layer)) return num_tokens;
  const int64_t uniform = TokensToKeep(spec_.budget, num_tokens);
  if (spec_.layer_budget != LayerBudgetKind::kPyramid || uniform >= num_tokens) return uniform;
  const int window = shape.num_window_queries > 0
                         ? EffectiveWindowSize(spec_.snapkv.window_size, shape.num_window_queries)
                         : spec_.snapkv.window_size;
  // kvpress uses T·(1 − compression_ratio) unfloored; keep_tokens stands for it as given.
  const double average_keep = spec_.budget.use_ratio
                                  ? static_cast<double>(num_tokens) * spec_.budget.keep_ratio
                                  : static_cast<double>(spec_.budget.keep_tokens);
  const int64_t budget = PyramidTokenBudget(average_keep, num_tokens, window, layer,
                                            geometry_.num_layers, spec_.pyramid.beta);
  return std::clamp<int64_t>(budget, 1, num_tokens);
}

absl::StatusOr<std::vector<LayerResult>> CompressionPipeline::AddLayer(LayerInput input) {
  if (input.sequence < 0 || static_cast<size_t>(input.sequence) >= sequences_.size()) {
    return absl::InvalidArgumentError(absl::StrCat("sequence ", input.sequence,
                                                   ": out of range; the request declared ",
                                                   sequences_.size(), " sequences"));
  }
  const std::string where = absl::StrCat("sequence ", input.sequence, " layer ", input.layer);
  if (input.layer < 0 || input.layer >= geometry_.num_layers) {
    return absl::InvalidArgumentError(
        absl::StrCat(where, ": out of range; the model has ", geometry_.num_layers, " layers"));
  }
  const SequenceShape& declared = sequences_[input.sequence];
  if (input.shape.num_tokens != declared.num_tokens ||
      input.shape.num_window_queries != declared.num_window_queries ||
      input.shape.num_score_heads != declared.num_score_heads) {
    return absl::InvalidArgumentError(absl::StrCat(where, ": shape ", ShapeText(input.shape),
                                                   " does not match the declared ",
                                                   ShapeText(declared)));
  }
  const int64_t num_tokens = declared.num_tokens;
  const std::string kv_elements =
      absl::StrCat(geometry_.num_kv_heads, "*", num_tokens, "*", geometry_.head_dim, " ",
                   DTypeText(geometry_.dtype), " elements");
  KVC_RETURN_IF_ERROR(CheckBytes(where, "keys", input.keys.size(),
                                 geometry_.KeyValueBytes(num_tokens), kv_elements));
  KVC_RETURN_IF_ERROR(CheckBytes(where, "values", input.values.size(),
                                 geometry_.KeyValueBytes(num_tokens), kv_elements));
  KVC_RETURN_IF_ERROR(CheckBytes(
      where, "queries", input.queries.size(), geometry_.QueryBytes(declared.num_window_queries),
      absl::StrCat(geometry_.num_query_heads, "*", declared.num_window_queries, "*",
                   geometry_.head_dim, " ", DTypeText(geometry_.dtype), " elements")));
  KVC_RETURN_IF_ERROR(
      CheckBytes(where, "scores", input.scores.size() * sizeof(float),
                 CacheGeometry::ScoreBytes(declared.num_score_heads, num_tokens),
                 absl::StrCat(declared.num_score_heads, "*", num_tokens, " float32 elements")));

  {
    absl::MutexLock lock(&mu_);
    std::vector<bool>::reference added = added_[input.sequence][input.layer];
    if (added) return absl::InvalidArgumentError(absl::StrCat(where, ": added twice"));
    added = true;
  }

  if (HoldsLayers(input.sequence, input.layer)) return HoldOrFinish(std::move(input));

  LayerJob job;
  job.sequence = input.sequence;
  job.layer = input.layer;
  job.input = input.view();
  job.tokens_per_head = LayerTokenBudget(input.layer, declared);
  job.keep_all = IsSkippedLayer(spec_, input.layer) || job.tokens_per_head >= num_tokens;
  absl::StatusOr<std::vector<LayerResult>> results = Compress({job}, input.layer);
  if (!results.ok()) {
    // The layer was not consumed; let the caller retry it.
    absl::MutexLock lock(&mu_);
    added_[input.sequence][input.layer] = false;
  }
  return results;
}

absl::StatusOr<std::vector<LayerResult>> CompressionPipeline::Compress(std::vector<LayerJob> jobs,
                                                                       int current_layer) {
  std::vector<LayerResult> results(jobs.size());
  KVC_RETURN_IF_ERROR(backend_->CompressLayers(geometry_, spec_, jobs, results));
  for (LayerResult& result : results) result.deferred = result.layer != current_layer;
  return results;
}

absl::StatusOr<std::vector<LayerResult>> CompressionPipeline::HoldOrFinish(LayerInput input) {
  const int sequence = input.sequence;
  const int layer = input.layer;
  const SequenceShape& shape = sequences_[sequence];
  const int64_t num_tokens = shape.num_tokens;
  const auto release = [&] {
    absl::MutexLock lock(&mu_);
    added_[sequence][layer] = false;
  };

  auto held = std::make_unique<HeldLayer>();
  {
    LayerJob job;
    job.sequence = sequence;
    job.layer = layer;
    job.input = input.view();
    job.tokens_per_head = num_tokens;
    LayerScores scores;
    const absl::Status status = backend_->ScoreLayers(
        geometry_, allocation_spec_, std::span<const LayerJob>(&job, 1), {&scores, 1});
    if (!status.ok()) {
      release();
      return status;
    }
    held->scores = std::move(scores.scores);
  }
  held->input = std::move(input);

  std::vector<std::unique_ptr<HeldLayer>> complete;
  {
    absl::MutexLock lock(&mu_);
    held_[sequence][layer] = std::move(held);
    if (++num_held_[sequence] < num_participating_layers_) return std::vector<LayerResult>{};
    complete = std::move(held_[sequence]);
    held_[sequence].clear();
    held_[sequence].resize(geometry_.num_layers);
    num_held_[sequence] = 0;
  }

  // The sequence is complete: allocate, then compress all of its layers in one batch.
  const int window = DynamicWindow(spec_, shape);
  internal::DynamicBudgetInput allocation;
  allocation.base = TokensToKeep(spec_.budget, num_tokens) - window;
  allocation.prefix_length = num_tokens - window;
  allocation.num_heads = geometry_.num_kv_heads;
  allocation.r_max = spec_.dynamic.r_max;
  allocation.update_interval = spec_.dynamic.update_interval;
  allocation.row_stride = num_tokens;
  std::vector<LayerJob> jobs;
  for (int l = 0; l < geometry_.num_layers; ++l) {
    if (complete[l] == nullptr) continue;
    allocation.layer_scores.push_back(complete[l]->scores.data());
    LayerJob job;
    job.sequence = sequence;
    job.layer = l;
    job.input = complete[l]->input.view();
    // Scores from the allocation are the scorer's own when the scorer is snapkv.
    if (spec_.scorer == ScorerKind::kSnapKv && backend_->AcceptsPrecomputedScores()) {
      job.precomputed_scores = complete[l]->scores.data();
    }
    jobs.push_back(job);
  }
  const std::vector<int64_t> budgets = internal::DynamicPrefixBudgets(allocation);
  for (size_t i = 0; i < jobs.size(); ++i) {
    jobs[i].tokens_per_head = std::clamp<int64_t>(budgets[i] + window, 1, num_tokens);
    jobs[i].keep_all = jobs[i].tokens_per_head >= num_tokens;
  }
  absl::StatusOr<std::vector<LayerResult>> results = Compress(std::move(jobs), layer);
  if (!results.ok()) {
    // Put the sequence back as it was before this call; this layer may be added again.
    absl::MutexLock lock(&mu_);
    added_[sequence][layer] = false;
    complete[layer].reset();
    for (int l = 0; l < geometry_.num_layers; ++l) {
      if (complete[l] == nullptr) continue;
      held_[sequence][l] = std::move(complete[l]);
      ++num_held_[sequence];
    }
  }
  return results;
}

}  // namespace kvcompress
