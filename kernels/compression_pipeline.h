// CompressionPipeline: runs one request's method over its layers as they arrive.
//
// The pipeline owns what crosses layers: layer budgets (uniform, pyramid, dynamic) and the
// decision of when a layer's result is final. Layers may arrive in any order and from
// several threads; each call returns the results that became final with it (for uniform
// and pyramid budgets: the layer just added; for cross-layer policies possibly none, then
// several at once).
//
// Dynamic (DynamicKV) budgets need every layer of a sequence before any of its layers is
// final: AddLayer scores the layer (Backend::ScoreLayers, snapkv scores), keeps the input
// and returns nothing, until the sequence's last non-skipped layer arrives; that call
// decides the budgets (kernels/internal/dynamic_budget.h), compresses all of the
// sequence's held layers in one backend batch and returns them, `deferred` set on all but
// its own. The pipeline then holds a sequence's inputs (K, V, queries, scores) until it is
// complete. Skipped layers and sequences whose budget leaves nothing to allocate (n ≥ T, or
// n ≤ W: uniform n) are compressed at once.
//
// Thread safety: AddLayer may be called concurrently; scoring and compression run outside
// the lock. The backend must outlive the pipeline.
#ifndef KVCOMPRESS_KERNELS_COMPRESSION_PIPELINE_H_
#define KVCOMPRESS_KERNELS_COMPRESSION_PIPELINE_H_

#include <memory>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "kernels/backend.h"
#include "kernels/cache_geometry.h"
#include "kernels/layer_result.h"
#include "kernels/method_spec.h"

namespace kvcompress {

class CompressionPipeline final {
 public:
  // Validates geometry, spec and every sequence against the spec; INVALID_ARGUMENT or
  // UNIMPLEMENTED as those checks say.
  static absl::StatusOr<std::unique_ptr<CompressionPipeline>> Create(
      Backend* backend, const CacheGeometry& geometry, const MethodSpec& spec,
      std::vector<SequenceShape> sequences);

  CompressionPipeline(const CompressionPipeline&) = delete;
  CompressionPipeline& operator=(const CompressionPipeline&) = delete;

  // Compresses one complete layer of one sequence. The input's shape must match the
  // sequence declared at creation (INVALID_ARGUMENT otherwise) and each (sequence, layer)
  // may be added once. Returns the results that became final (possibly none). On a backend
  // error nothing is consumed: the layer may be added again, and the layers held for its
  // sequence stay held.
  absl::StatusOr<std::vector<LayerResult>> AddLayer(LayerInput input);

  // Tokens each head of `layer` keeps for a sequence of `shape` (before head budgets), in
  // [1, T]; T for a skipped layer. Uniform: n. Pyramid: PyramidTokenBudget with the window
  // W = min(window_size, num_window_queries), or window_size when no queries are sent.
  // Dynamic: the uniform n here; the final per-layer budgets are known only once all of a
  // sequence's layers arrived (see AddLayer).
  int64_t LayerTokenBudget(int layer, const SequenceShape& shape) const;
  // The same for a sequence that sends no window queries.
  int64_t LayerTokenBudget(int layer, int64_t num_tokens) const;

  const CacheGeometry& geometry() const { return geometry_; }
  const MethodSpec& spec() const { return spec_; }
  const std::vector<SequenceShape>& sequences() const { return sequences_; }

 private:
  // A layer a cross-layer budget holds back until its sequence is complete.
  struct HeldLayer {
    LayerInput input;
    std::vector<float> scores;  // [H_kv, T] from Backend::ScoreLayers with allocation_spec_
  };

  CompressionPipeline(Backend* backend, const CacheGeometry& geometry, const MethodSpec& spec,
                      std::vector<SequenceShape> sequences);

  // Compresses layers whose budgets are decided; marks results deferred but `current`.
  absl::StatusOr<std::vector<LayerResult>> Compress(std::vector<LayerJob> jobs, int current_layer);

  // Whether layers of `sequence` wait for the dynamic allocation.
  bool HoldsLayers(int sequence, int layer) const;

  // Holds the layer (dynamic budgets); once the sequence is complete, compresses all of it.
  absl::StatusOr<std::vector<LayerResult>> HoldOrFinish(LayerInput input);

  Backend* const backend_;
  const CacheGeometry geometry_;
  const MethodSpec spec_;
  const std::vector<SequenceShape> sequences_;

  // The spec whose scores allocate dynamic budgets: spec_ with the snapkv scorer.
  const MethodSpec allocation_spec_;
  const int num_participating_layers_;  // layers not in skip_layers

  absl::Mutex mu_;
  // [sequence][layer]: whether that layer was added.
  std::vector<std::vector<bool>> added_ ABSL_GUARDED_BY(mu_);
  // [sequence][layer]: layers held for the dynamic allocation, and their count per sequence.
  std::vector<std::vector<std::unique_ptr<HeldLayer>>> held_ ABSL_GUARDED_BY(mu_);
  std::vector<int> num_held_ ABSL_GUARDED_BY(mu_);
};

}  // namespace kvcompress

#endif  // KVCOMPRESS_KERNELS_COMPRESSION_PIPELINE_H_
