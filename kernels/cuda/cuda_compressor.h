// CudaCompressor: the device-level entry of the CUDA backend. It compresses a batch of layers
// whose K, V and window queries are already in device memory (a backend's own copies, or a
// prefill worker's cache reached through CUDA IPC or received over NCCL) and leaves the
// ragged results in device memory, so that a GPU transport can forward them without a trip
// through the host.
//
// One call is one launch sequence for the whole batch — every layer, head and sequence —
// enqueued on the caller's stream: window-attention statistics and column sums (snapkv, and
// the attention mass of every scorer), scores, a segmented radix select, compaction into
// ascending positions, the gather of kept rows and, for the merging reducers, the merge
// (kernels/cuda/internal/merge_params.h). Scratch and results come from a DeviceMemoryPool
// with a byte budget (RESOURCE_EXHAUSTED when a batch does not fit).
//
// Thread safety: Compress and Score may be called concurrently (on different streams).
#ifndef KVCOMPRESS_KERNELS_CUDA_CUDA_COMPRESSOR_H_
#define KVCOMPRESS_KERNELS_CUDA_CUDA_COMPRESSOR_H_

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kernels/cache_geometry.h"
#include "kernels/cuda/device_memory_pool.h"
#include "kernels/method_spec.h"

namespace kvcompress {

// One layer of one sequence in device memory: the shapes of LayerView, device pointers, each
// 16-byte aligned.
struct DeviceLayerView {
  const std::byte* keys = nullptr;     // [H_kv, T, D] (HND) or [T, H_kv, D] (NHD)
  const std::byte* values = nullptr;   // same shape as keys
  const std::byte* queries = nullptr;  // [H_q, W, D] or null when W == 0
  const float* scores = nullptr;       // client scores [shape.num_score_heads, T] or null
  SequenceShape shape;
};

// A LayerJob over device memory (see kernels/backend.h for the fields' meaning).
struct DeviceLayerJob {
  int sequence = 0;
  int layer = 0;
  DeviceLayerView input;
  int64_t tokens_per_head = 0;
  bool keep_all = false;
};

// Where one job's result lies in its DeviceBatchResult.
struct DeviceLayerResult {
  int sequence = 0;
  int layer = 0;
  int32_t kept_per_head = 0;  // uniform head budgets: every head keeps as many
  // Adaptive head budgets, and merge_similar (whose sets decide how many rows a head keeps):
  // heads keep different counts, which the device writes to DeviceBatchResult::head_counts
  // [i·H_kv + h] (kept_per_head is then the budget n).
  bool ragged_heads = false;
  // merge_similar: num_rows is a capacity, and the heads' rows (Σ head_counts) may be fewer.
  bool rows_upper_bound = false;
  int64_t first_row = 0;  // rows [first_row, first_row + num_rows) of the batch buffers
  int64_t num_rows = 0;   // H_kv · kept_per_head; heads' rows follow each other in order
  // attention_mass_kept = mass_sums[i] · mass_scale when mass_scale > 0; else the fixed
  // value mass_fixed (−1: no window queries; 1: the layer was kept whole).
  double mass_scale = 0;
  double mass_fixed = -1;
};

// The device-resident results of one batch; owns their memory (freed in stream order when
// destroyed). Rows of every job and head are concatenated: keys/values [rows, D] in the input
// dtype, positions int32 [rows] ascending within a head.
struct DeviceBatchResult {
  std::vector<DeviceLayerResult> layers;
  cuda::DeviceBuffer buffer;
  std::byte* keys = nullptr;
  std::byte* values = nullptr;
  int32_t* positions = nullptr;
  // Merging reducers: [rows] original tokens folded into each row (1: the row as it was);
  // null for drop.
  int32_t* merged = nullptr;
  double* mass_sums = nullptr;     // [layers]
  int32_t* head_counts = nullptr;  // [layers, H_kv]: kept rows per head of ragged layers
  int64_t total_rows = 0;
  size_t row_bytes = 0;
};

// Device-resident scores of one batch: job i's [H_kv, T] fp32 scores start at offsets[i].
struct DeviceBatchScores {
  cuda::DeviceBuffer buffer;
  const float* scores = nullptr;
  std::vector<int64_t> offsets;
};

// Events Compress records on its stream after each stage, when set (for stage timings).
struct StageEvents {
  cudaEvent_t scored = nullptr;
  cudaEvent_t selected = nullptr;
  cudaEvent_t gathered = nullptr;
};

struct CudaCompressorOptions {
  int device = 0;
  // See CudaBackendOptions::memory_budget_bytes. 0: 90% of the free device memory.
  size_t memory_budget_bytes = 0;
};

class CudaCompressor final {
 public:
  // FAILED_PRECONDITION when there is no such CUDA device; INTERNAL on runtime errors.
  static absl::StatusOr<std::unique_ptr<CudaCompressor>> Create(
      const CudaCompressorOptions& options);

  CudaCompressor(const CudaCompressor&) = delete;
  CudaCompressor& operator=(const CudaCompressor&) = delete;

  // Enqueues the batch on `stream` and returns without waiting for it; the result is valid
  // once the stream reaches this point. Input memory must stay valid and unchanged until then.
  // INVALID_ARGUMENT for bad jobs (naming the job and field), UNIMPLEMENTED for methods or
  // head dims the backend does not run (CheckCudaMethodSupported), RESOURCE_EXHAUSTED over
  // the memory budget, INTERNAL on device errors.
  //
  // The merging reducers leave per-row merged counts (DeviceBatchResult::merged) and, for
  // merge_similar, fewer rows than num_rows (DeviceLayerResult::rows_upper_bound); only a
  // caller that reads both may ask for them, by `reads_merged_rows`. Without it they answer
  // UNIMPLEMENTED, so that no caller passes on merged rows without their counts.
  absl::StatusOr<DeviceBatchResult> Compress(const CacheGeometry& geometry, const MethodSpec& spec,
                                             std::span<const DeviceLayerJob> jobs,
                                             cudaStream_t stream,
                                             const StageEvents* events = nullptr,
                                             bool reads_merged_rows = false);

  // Scores only ([H_kv, T] per job, keep_all ignored), as Backend::ScoreLayers.
  absl::StatusOr<DeviceBatchScores> Score(const CacheGeometry& geometry, const MethodSpec& spec,
                                          std::span<const DeviceLayerJob> jobs,
                                          cudaStream_t stream);

  int device() const { return device_; }
  int num_multiprocessors() const { return num_multiprocessors_; }
  cuda::DeviceMemoryPool& memory_pool() { return *pool_; }
  const cuda::DeviceMemoryPool& memory_pool() const { return *pool_; }

 private:
  CudaCompressor(int device, int num_multiprocessors, int max_shared_bytes,
                 std::unique_ptr<cuda::DeviceMemoryPool> pool)
      : device_(device),
        num_multiprocessors_(num_multiprocessors),
        max_shared_bytes_(max_shared_bytes),
        pool_(std::move(pool)) {}

  absl::Status Run(const CacheGeometry& geometry, const MethodSpec& spec,
                   std::span<const DeviceLayerJob> jobs, cudaStream_t stream, bool scores_only,
                   bool reads_merged_rows, const StageEvents* events, DeviceBatchResult* result,
                   DeviceBatchScores* scores);

  const int device_;
  const int num_multiprocessors_;
  const int max_shared_bytes_;  // per block, opt-in
  std::unique_ptr<cuda::DeviceMemoryPool> pool_;
};

}  // namespace kvcompress

#endif  // KVCOMPRESS_KERNELS_CUDA_CUDA_COMPRESSOR_H_
