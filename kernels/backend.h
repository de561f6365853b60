// Backend: the seam between the method pipeline and the hardware that runs the math.
//
// A backend compresses a batch of independent layer jobs whose token budgets are already
// decided (layer budgets are the pipeline's business, see compression_pipeline.h); head
// budgets (uniform, adaptive), selection and reducers (drop, merge_similar, merge_nearest)
// run inside the backend. The CPU backend is the reference oracle; the CUDA backend must give
// identical kept sets.
//
// Thread safety: CompressLayers may be called concurrently from several threads.
#ifndef KVCOMPRESS_KERNELS_BACKEND_H_
#define KVCOMPRESS_KERNELS_BACKEND_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kernels/cache_geometry.h"
#include "kernels/layer_result.h"
#include "kernels/method_spec.h"

namespace kvcompress {

// One layer of one sequence to compress.
struct LayerJob {
  int sequence = 0;
  int layer = 0;
  LayerView input;
  // Tokens each head keeps before head budgets redistribute them (n of DESIGN §3), already
  // clamped to [1, T]. keep_all returns the layer whole (n ≥ T or a skipped layer).
  int64_t tokens_per_head = 0;
  bool keep_all = false;
  // Optional: this layer's scores as ScoreLayers returned them for the same geometry and
  // spec ([H_kv, T] fp32), so that a layer scored once for a cross-layer budget is not scored
  // again. Null: the backend scores. The caller keeps them alive for the call.
  const float* precomputed_scores = nullptr;
};

// One accelerator a backend runs on, and its memory as the backend sees it now.
struct BackendDevice {
  int ordinal = 0;
  std::string name;                // "NVIDIA H100 80GB HBM3"
  std::string compute_capability;  // "9.0"
  size_t total_memory_bytes = 0;   // the device's memory
  size_t budget_bytes = 0;         // what the backend may hold at once
  size_t in_use_bytes = 0;         // what it holds now (inputs, scratch, results in flight)
};

// Per-head importance scores of one layer: [H_kv, T] fp32, higher = more important;
// window tokens and protected tokens score +inf.
struct LayerScores {
  int sequence = 0;
  int layer = 0;
  std::vector<float> scores;
};

class Backend {
 public:
  virtual ~Backend() = default;

  // "cpu" or "cuda".
  virtual std::string_view name() const = 0;

  // OK when this backend runs `spec` on head_dim `head_dim` itself; UNIMPLEMENTED naming the
  // first stage it does not run. Callers route such requests to another backend (kvcd falls
  // back to the CPU reference). The default: every stage CheckMethodImplemented accepts.
  virtual absl::Status Supports(const MethodSpec& spec, int head_dim) const;

  // The devices this backend runs on (empty for the CPU backend), with memory use at the time
  // of the call. Thread-safe.
  virtual std::vector<BackendDevice> Devices() const { return {}; }

  // Scores, selects, gathers and reduces each job; results[i] receives jobs[i]'s result:
  // ragged per head (adaptive head budgets give heads different counts; merge_similar may
  // keep fewer rows than the budget), `merged` filled by merging reducers. Requires
  // results.size() == jobs.size() and a spec that passed ValidateMethodSpec and
  // CheckMethodImplemented. INVALID_ARGUMENT for a job that lacks what the spec needs
  // (window queries for snapkv and tova, client scores for observed); UNIMPLEMENTED for
  // stages a backend does not run; INTERNAL on device errors. Results are then undefined.
  virtual absl::Status CompressLayers(const CacheGeometry& geometry, const MethodSpec& spec,
                                      std::span<const LayerJob> jobs,
                                      std::span<LayerResult> results) = 0;

  // Whether CompressLayers honours LayerJob::precomputed_scores. A backend that does not
  // (the default) may reject jobs that carry them; callers then leave them null.
  virtual bool AcceptsPrecomputedScores() const { return false; }

  // Scores only (for cross-layer budget policies); scores[i] receives jobs[i]'s scores, the
  // final ones selection would use (tova: the shared row repeated per head). keep_all and
  // precomputed_scores are ignored.
  virtual absl::Status ScoreLayers(const CacheGeometry& geometry, const MethodSpec& spec,
                                   std::span<const LayerJob> jobs,
                                   std::span<LayerScores> scores) = 0;
};

// The input checks every backend makes of jobs[index]: 1 <= T <= 2^31-1, keys and values
// present, 0 <= W <= T, and queries present when W > 0. INVALID_ARGUMENT naming the job
// ("jobs[3] (sequence 0 layer 7): ...") otherwise.
absl::Status ValidateLayerJobInput(const LayerJob& job, size_t index);

// The CPU reference backend with `num_threads` workers (0: hardware concurrency).
std::unique_ptr<Backend> MakeCpuBackend(int num_threads);

}  // namespace kvcompress

#endif  // KVCOMPRESS_KERNELS_BACKEND_H_
