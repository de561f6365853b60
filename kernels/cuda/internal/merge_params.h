// The merging reducers on the device (merge_similar, merge_nearest): the per-head table the
// planner builds, one parameter struct all their kernels share, and the launchers. Plain
// structs, as kernel_params.h, so that host C++ and nvcc agree on every layout.
//
// Both reducers run after the drop pipeline (selection, compaction, gather) has written its
// rows, and rewrite the rows of the heads they merge. Their arithmetic is the CPU reference's
// (kernels/cpu/internal/merge_*.cc), operation for operation: fp64 sums in the same order,
// with explicitly rounded intrinsics so that nvcc contracts nothing into an FMA.
//
// merge_similar, per head (MergeHead), in stream order:
//   1. SimilarLinks: whether each key is cosine-similar to the next one, and the sort keys
//      (head, selection key of the score) with the position as value.
//   2. MergeSort (a stable radix sort): every head's tokens in selection order; Ranks inverts it.
//   3. SimilarSets (a block per head): the protected tokens, the contiguous merging sets and
//      their pivots, the sets that survive the budget, and the head's rows in position order,
//      written to the head's slot (position, first and last member).
//   4. MergeHeadRows: per-head counts into DeviceBatchResult::head_counts, and where each
//      head's rows start in the packed output.
//   5. SimilarRows (a warp per row): positions, merged counts and rows (a byte copy, or the
//      Gaussian-weighted average of the set's members), and the layer's attention mass.
// merge_nearest, per head, over the rows the selection kept:
//   1. MergeHeadRows: where the head's kept rows lie and how many there are.
//   2. NearestKept: marks kept tokens and computes the kept keys' norms.
//   3. NearestAssign (a thread per token): each evicted token's most cosine-similar kept row,
//      as a sort key (head, row); kept tokens sort last.
//   4. MergeSort: each row's evicted tokens, ascending by position.
//   5. NearestValues (a warp per kept row): merged counts and averaged values.
#ifndef KVCOMPRESS_KERNELS_CUDA_INTERNAL_MERGE_PARAMS_H_
#define KVCOMPRESS_KERNELS_CUDA_INTERNAL_MERGE_PARAMS_H_

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "kernels/cuda/internal/kernel_params.h"

namespace kvcompress::cuda {

// One KV head of one job a merging reducer works on. Heads of a job are consecutive in the
// table, in head order.
struct MergeHead {
  int32_t job = 0;
  int32_t head = 0;
  int64_t num_tokens = 0;    // T
  int64_t token_base = 0;    // first of the head's T entries in the per-token scratch arrays
  int64_t score_offset = 0;  // the head's [T] fp32 scores (merge_similar)
  int64_t need = 0;          // the uniform budget n
  // Adaptive head budgets: the head's budget (merge_similar) or its kept rows (merge_nearest)
  // are the compaction's DeviceBatchResult::head_counts, not `need`.
  int32_t adaptive = 0;
  int32_t has_attention = 0;    // the job's mass is summed from the column sums
  int64_t layer_first_row = 0;  // the job's first output row
  int64_t slot_row = 0;         // merge_similar: first row of the head's slot
  int64_t slot_capacity = 0;    // merge_similar: rows the slot holds (≥ the head's budget)
};

enum class MergeRowsSource : int32_t {
  kSelection = 0,    // merge_nearest: the selection's rows (need, or the adaptive head counts)
  kMergeCounts = 1,  // merge_similar: the rows SimilarSets wrote (merge_counts)
};

struct MergeParams {
  const MergeHead* heads = nullptr;  // [num_heads]
  int num_heads = 0;
  const DeviceJob* jobs = nullptr;
  BatchShape shape;
  const float* scores = nullptr;

  // Per-token scratch, [Σ T] over the table's heads.
  uint8_t* flags = nullptr;         // merge_similar: protected / pivot marks; nearest: kept
  uint8_t* similar_next = nullptr;  // merge_similar: cos(k_j, k_{j+1}) > threshold
  uint64_t* sort_keys = nullptr;    // (head index << 32) | 32-bit key
  int32_t* sort_values = nullptr;   // the position
  const uint64_t* sorted_keys = nullptr;
  const int32_t* sorted_values = nullptr;
  int32_t* ranks = nullptr;          // merge_similar: the position's rank in selection order
  int32_t* set_first = nullptr;      // merge_similar, at each pivot: its set's lowest position
  int32_t* set_last = nullptr;       // merge_similar, at each pivot: its set's highest position
  double* member_weights = nullptr;  // merge_similar: distances, then Gaussian weights

  // merge_similar slots: [Σ slot_capacity].
  int32_t* slot_positions = nullptr;
  int32_t* slot_first = nullptr;
  int32_t* slot_last = nullptr;
  int32_t* merge_counts = nullptr;  // [num_heads]

  int64_t* head_first_row = nullptr;  // [num_heads]: the head's first packed output row
  int32_t* head_rows = nullptr;       // [num_heads]: its rows
  double* kept_norms = nullptr;       // merge_nearest: [output rows]

  // The batch's outputs.
  int32_t* positions = nullptr;
  int32_t* merged = nullptr;
  int32_t* head_counts = nullptr;  // [jobs, H_kv]
  std::byte* out_keys = nullptr;
  std::byte* out_values = nullptr;
  const float* colsum = nullptr;
  double* mass = nullptr;  // [jobs]

  // merge_similar options.
  double similarity_threshold = 0.75;
  double protect_fraction = 0.5;
  double fixed_two_sigma_squared = 50.0;  // 2σ², computed on the host as the CPU does
  int32_t auto_sigma = 0;
  int32_t scale_values_by_set_size = 0;
};

inline constexpr int kMergeThreads = 256;
inline constexpr int kMergeRowsPerBlock = kMergeThreads / 32;  // a warp per row

// Sets `count` ints to 1.
cudaError_t LaunchFillOnes(int32_t* values, int64_t count, cudaStream_t stream);
cudaError_t LaunchSimilarLinks(const MergeParams& params, int64_t max_tokens, cudaStream_t stream);
// Bytes of temporary storage LaunchMergeSort needs for `num_items` (≤ 2^31 − 1) keys.
cudaError_t MergeSortTempBytes(int64_t num_items, int end_bit, size_t* bytes);
// Stable ascending sort of (sort_keys, sort_values) into (sorted_keys, sorted_values) by
// bits [0, end_bit) of the keys.
cudaError_t LaunchMergeSort(const MergeParams& params, void* temp, size_t temp_bytes,
                            int64_t num_items, int end_bit, cudaStream_t stream);
cudaError_t LaunchRanks(const MergeParams& params, int64_t num_items, cudaStream_t stream);
cudaError_t LaunchSimilarSets(const MergeParams& params, cudaStream_t stream);
cudaError_t LaunchMergeHeadRows(const MergeParams& params, MergeRowsSource source,
                                cudaStream_t stream);
cudaError_t LaunchSimilarRows(const MergeParams& params, int64_t max_rows, cudaStream_t stream);
cudaError_t LaunchNearestKept(const MergeParams& params, int64_t max_rows, cudaStream_t stream);
cudaError_t LaunchNearestAssign(const MergeParams& params, int64_t max_tokens, cudaStream_t stream);
cudaError_t LaunchNearestValues(const MergeParams& params, int64_t max_rows, cudaStream_t stream);

}  // namespace kvcompress::cuda

#endif  // KVCOMPRESS_KERNELS_CUDA_INTERNAL_MERGE_PARAMS_H_
