// Plain structs shared by the host planner (cuda_compressor.cc) and the kernels: per-job
// descriptors, work items and launcher parameters. No CUDA or absl types beyond
// cudaStream_t at the launcher declarations, so that host C++ and nvcc agree on every layout.
//
// A batch is a list of jobs (layers of sequences) that share one geometry and one method. The
// planner lays every job's scratch out in one workspace and lists the work items of each pass;
// kernels read their item by blockIdx.x (or a (job, head) pair by blockIdx.y).
#ifndef KVCOMPRESS_KERNELS_CUDA_INTERNAL_KERNEL_PARAMS_H_
#define KVCOMPRESS_KERNELS_CUDA_INTERNAL_KERNEL_PARAMS_H_

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "kernels/dtype.h"
#include "kernels/method_spec.h"

namespace kvcompress::cuda {

// Geometry every job of a batch shares.
struct BatchShape {
  int num_kv_heads = 0;
  int group_size = 0;  // G = H_q / H_kv
  int head_dim = 0;
  Layout layout = Layout::kHND;
  DType dtype = DType::kBFloat16;
};

// One layer of one sequence, as the kernels see it. Offsets are element offsets into the
// batch-wide buffers named in each field's comment.
struct DeviceJob {
  const std::byte* keys = nullptr;       // [H_kv, T, D] (HND) or [T, H_kv, D] (NHD)
  const std::byte* values = nullptr;     // same shape as keys
  const std::byte* queries = nullptr;    // [H_q, num_sent, D]
  const float* client_scores = nullptr;  // observed scorer: [num_score_heads, T]
  int64_t num_tokens = 0;                // T
  int64_t prefix = 0;                    // P = T − window
  int32_t num_sent = 0;                  // window queries sent
  int32_t window = 0;                    // attention window (0: no attention pass)
  int64_t score_offset = 0;              // scores: [H_kv, T] fp32
  int64_t stats_offset = 0;              // final softmax stats: [H_kv, G·window] float2
  int64_t partial_offset = 0;            // partial stats: [H_kv, G·window, num_chunks] float2
  int32_t num_chunks = 0;                // key chunks of the first attention pass, per head
  int32_t qblock_rows = 0;               // queries per query block (a multiple of query_multiple)
  int32_t qblocks_per_member = 0;        // ceil(window / qblock_rows)
  int32_t num_score_heads = 0;           // rows of client_scores: H_kv, or H_q (group-reduced)
  int64_t colsum_offset = 0;             // column sums: [H_kv, G·qblocks_per_member, T] fp32
  int64_t tova_offset = 0;  // TOVA: the last query's attention summed over a group, [H_kv, T] fp64
};

// A (job, KV head) pair.
struct JobHead {
  int32_t job = 0;
  int32_t head = 0;
};

// A work item of the attention passes: one head, a range of keys and a range of rows
// (first pass: query rows g·window + i; second pass: query blocks).
struct AttentionItem {
  int32_t job = 0;
  int32_t head = 0;
  int32_t row_begin = 0;  // first pass: first query row; second pass: first query block
  int32_t row_end = 0;    // exclusive
  int64_t key_begin = 0;
  int64_t key_end = 0;  // exclusive, ≤ T
  int32_t chunk = 0;    // index of the key chunk (first pass)
  int32_t pad = 0;
};

// Float values of the softmax of one query row over all its visible keys, in log2 units of
// the scaled logit (x = q·k · log2(e)/√D): max_x and 1 / Σ 2^(x − max_x).
struct RowStats {
  float max_x = 0;
  float inv_sum = 0;
};

struct PartialStats {
  float max_x = 0;
  float sum = 0;  // Σ 2^(x − max_x) over the chunk's visible keys; 0 when none
};

struct WindowStatsParams {
  const DeviceJob* jobs = nullptr;
  const AttentionItem* items = nullptr;
  int num_items = 0;
  // 0: the default tiling; 1: one m16 row tile per warp (128 rows per block), fewer registers
  // and three blocks per SM (16-bit inputs). Items must use the matching rows per block.
  int row_tiles = 0;
  PartialStats* partial = nullptr;
  BatchShape shape;
  float scale_log2 = 0;  // log2(e) / √D
};

struct StatsCombineParams {
  const DeviceJob* jobs = nullptr;
  const JobHead* job_heads = nullptr;  // blockIdx.y
  const PartialStats* partial = nullptr;
  RowStats* stats = nullptr;
  BatchShape shape;
};

struct ColumnSumParams {
  const DeviceJob* jobs = nullptr;
  const AttentionItem* items = nullptr;
  int num_items = 0;
  const RowStats* stats = nullptr;
  float* colsum = nullptr;
  BatchShape shape;
  float scale_log2 = 0;
  int query_capacity = 0;  // padded query rows the kernel's shared memory holds
  size_t shared_bytes = 0;
};

// Tokens at +inf whatever the scorer says: the first `sinks` and the last `recent`.
struct Protection {
  int32_t sinks = 0;
  int32_t recent = 0;
};

struct SnapKvFinalizeParams {
  const DeviceJob* jobs = nullptr;
  const JobHead* job_heads = nullptr;  // blockIdx.y
  const float* colsum = nullptr;
  float* scores = nullptr;
  BatchShape shape;
  int kernel_size = 5;
  Pooling pooling = Pooling::kAvg;
  GroupReduction group_reduction = GroupReduction::kMean;
  Protection protection;
};

struct KnormParams {
  const DeviceJob* jobs = nullptr;
  const JobHead* job_heads = nullptr;  // blockIdx.y
  float* scores = nullptr;
  BatchShape shape;
  Protection protection;
};

// TOVA: the last window query's softmax over all T keys (its statistics from the first
// attention pass), summed over each KV head's group (TovaGroupSums, blockIdx.y over attention
// heads), then over the KV heads and divided by H_q into one row every head shares
// (TovaCombine, blockIdx.y over jobs).
struct TovaParams {
  const DeviceJob* jobs = nullptr;
  const JobHead* job_heads = nullptr;  // blockIdx.y
  const RowStats* stats = nullptr;
  double* group_sums = nullptr;
  float* scores = nullptr;
  BatchShape shape;
  float scale_log2 = 0;
  Protection protection;
};

// Observed (H2O): the client's scores, per KV head or group-reduced from per query head.
struct ObservedScoreParams {
  const DeviceJob* jobs = nullptr;
  const JobHead* job_heads = nullptr;  // blockIdx.y
  float* scores = nullptr;
  BatchShape shape;
  GroupReduction group_reduction = GroupReduction::kMean;
  Protection protection;
};

// KeyDiff: anchor_sums [job_heads, D] fp64, zeroed, indexed by blockIdx.y.
struct KeyDiffParams {
  const DeviceJob* jobs = nullptr;
  const JobHead* job_heads = nullptr;  // blockIdx.y
  double* anchor_sums = nullptr;
  float* scores = nullptr;
  BatchShape shape;
  Protection protection;
};

struct StreamingScoreParams {
  const DeviceJob* jobs = nullptr;
  const JobHead* job_heads = nullptr;  // blockIdx.y
  float* scores = nullptr;
  int sinks = 4;
  Protection protection;
};

// How a head's kept positions are found.
enum class SegmentKind : int32_t {
  kSelect = 0,   // top-`need` of the scores (radix select)
  kKeepAll = 1,  // every token, in order
  kRanges = 2,   // [0, range_first_end) ∪ [range_second_begin, …) (streaming, T ≤ 2^24)
};

// One (job, head): the tokens competing for `need` output rows.
struct Segment {
  int32_t job = 0;
  int32_t head = 0;
  SegmentKind kind = SegmentKind::kSelect;
  int32_t first_slice = 0;  // index of its first slice item
  int32_t num_slices = 0;
  int32_t has_attention = 0;  // add the kept keys' attention to the job's mass
  int64_t num_tokens = 0;
  int64_t need = 0;  // rows kept
  int64_t score_offset = 0;
  int64_t out_row = 0;  // first output row
  int64_t range_first_end = 0;
  int64_t range_second_begin = 0;
  // > 0: a layer-wide segment of adaptive head budgets over the job's H_kv·T scores as one
  // flat array (token = head·T + position, so ties fall to the lower head, then the lower
  // position); this is T. Its kept rows are ragged per head (CompactParams::row_heads).
  int64_t tokens_per_head = 0;
  // ≥ 0: offset of the job's [H_kv, T] safeguard tiers (AdaKV): a flat segment ranks tokens
  // whose tier is set before every score; a per-head safeguard segment marks its kept tokens
  // there (MarkTiers).
  int64_t tier_offset = -1;
};

// A slice of one segment's tokens.
struct SliceItem {
  int32_t segment = 0;
  int32_t pad = 0;
  int64_t begin = 0;
  int64_t end = 0;
};

// Radix-select state of one segment (zeroed before the first pass). After the last pass the
// threshold key is `prefix`; `less` tokens have a smaller key.
struct SelectState {
  uint32_t prefix = 0;
  uint32_t mask = 0;
  int64_t less = 0;
  uint32_t ticket = 0;
  uint32_t pad = 0;
};

struct SliceCounts {
  int32_t less = 0;
  int32_t equal = 0;
};

inline constexpr int kRadixBins = 4096;
inline constexpr int kRadixPasses = 3;

struct SelectParams {
  const Segment* segments = nullptr;
  const SliceItem* slices = nullptr;
  int num_slices = 0;
  const float* scores = nullptr;
  const uint8_t* tiers = nullptr;  // safeguard tiers of flat segments
  SelectState* states = nullptr;
  uint32_t* histograms = nullptr;  // [segments, kRadixBins], zeroed
  SliceCounts* slice_counts = nullptr;
  int pass = 0;
};

struct CompactParams {
  const Segment* segments = nullptr;
  const SliceItem* slices = nullptr;
  int num_slices = 0;
  const float* scores = nullptr;
  const SelectState* states = nullptr;
  const SliceCounts* slice_counts = nullptr;
  const uint8_t* tiers = nullptr;
  int32_t* positions = nullptr;  // [Σ need]
  // Flat segments: the KV head of each output row, and kept rows per (job, head), counted up.
  int32_t* row_heads = nullptr;    // [Σ need]
  int32_t* head_counts = nullptr;  // [jobs, H_kv], zeroed
  // Attention mass of kept keys: Σ over query blocks of the column sums, per job.
  const DeviceJob* jobs = nullptr;
  const float* colsum = nullptr;
  double* mass = nullptr;  // [jobs], zeroed
  BatchShape shape;
};

struct GatherParams {
  const Segment* segments = nullptr;
  const DeviceJob* jobs = nullptr;
  const int32_t* positions = nullptr;
  const int32_t* row_heads = nullptr;  // flat segments: the KV head of each output row
  std::byte* out_keys = nullptr;       // [Σ need, D]
  std::byte* out_values = nullptr;     // [Σ need, D]
  BatchShape shape;
};

inline constexpr int kGatherRowsPerBlock = 32;

// Sets the safeguard tier of every token the per-head safeguard segments kept.
struct MarkTiersParams {
  const Segment* segments = nullptr;   // safeguard segments (tier_offset ≥ 0)
  const int32_t* positions = nullptr;  // their kept positions
  uint8_t* tiers = nullptr;
};

// Launchers: enqueue one kernel on `stream`. Template arguments are compile-time dtype and
// head_dim; KVC_DISPATCH_* (dispatch.h) turns runtime values into them.
template <DType kDType, int kHeadDim>
cudaError_t LaunchWindowStats(const WindowStatsParams& params, cudaStream_t stream);
template <DType kDType, int kHeadDim>
cudaError_t LaunchColumnSums(const ColumnSumParams& params, cudaStream_t stream);
template <DType kDType, int kHeadDim>
cudaError_t LaunchKnormScores(const KnormParams& params, int num_job_heads, int64_t max_tokens,
                              cudaStream_t stream);
template <DType kDType, int kHeadDim>
cudaError_t LaunchKeyDiffScores(const KeyDiffParams& params, int num_job_heads, int64_t max_tokens,
                                cudaStream_t stream);

cudaError_t LaunchStatsCombine(const StatsCombineParams& params, int num_job_heads, int max_rows,
                               cudaStream_t stream);
cudaError_t LaunchSnapKvFinalize(const SnapKvFinalizeParams& params, int num_job_heads,
                                 int64_t max_tokens, cudaStream_t stream);
template <DType kDType, int kHeadDim>
cudaError_t LaunchTovaGroupSums(const TovaParams& params, int num_job_heads, int64_t max_tokens,
                                cudaStream_t stream);
cudaError_t LaunchTovaCombine(const TovaParams& params, int num_jobs, int64_t max_tokens,
                              cudaStream_t stream);
cudaError_t LaunchObservedScores(const ObservedScoreParams& params, int num_job_heads,
                                 int64_t max_tokens, cudaStream_t stream);
cudaError_t LaunchStreamingScores(const StreamingScoreParams& params, int num_job_heads,
                                  int64_t max_tokens, cudaStream_t stream);
cudaError_t LaunchRadixSelectPass(const SelectParams& params, cudaStream_t stream);
cudaError_t LaunchSliceCounts(const SelectParams& params, cudaStream_t stream);
cudaError_t LaunchCompact(const CompactParams& params, cudaStream_t stream);
cudaError_t LaunchGather(const GatherParams& params, int num_segments, int64_t max_need,
                         cudaStream_t stream);
cudaError_t LaunchMarkTiers(const MarkTiersParams& params, int num_segments, int64_t max_need,
                            cudaStream_t stream);

// Tiling constants of the attention passes for (dtype, head_dim), shared by the planner and
// the kernels so that chunk boundaries line up with tiles.
struct AttentionTiling {
  int rows_per_warp;   // first pass: query rows per warp; second pass: keys per warp
  int rows_per_block;  // 8 warps
  int keys_per_tile;   // first pass K tile
  int stages;          // first pass K tile ring depth
  int n_tiles;         // n8 tiles a warp computes at once (independent mma chains)
  int query_multiple;  // second pass: query blocks are padded to a multiple of this
};

constexpr AttentionTiling AttentionTilingFor(DType dtype, int head_dim) {
  const bool is_float32 = dtype == DType::kFloat32;
  const int rows_per_warp = is_float32 ? 16 : 16 * (256 / head_dim);
  const int element_size = is_float32 ? 4 : 2;
  return AttentionTiling{rows_per_warp,
                         rows_per_warp * 8,
                         16384 / (head_dim * element_size),
                         is_float32 ? 2 : 4,
                         is_float32 ? 1 : (head_dim == 64 ? 1 : 4),
                         is_float32 ? 8 : (head_dim == 64 ? 8 : 32)};
}

inline constexpr int kAttentionThreads = 256;
// Keys the second pass takes per round (8 warps × 16 keys); chunks are multiples of it.
inline constexpr int kColumnSumRoundKeys = 128;

// Shared memory of the first pass with `rows_per_block` query rows.
constexpr size_t WindowStatsSharedBytes(DType dtype, int head_dim, int rows_per_block) {
  const AttentionTiling tiling = AttentionTilingFor(dtype, head_dim);
  const size_t element_size = dtype == DType::kFloat32 ? 4 : 2;
  const size_t query_bytes = static_cast<size_t>(rows_per_block) * head_dim * element_size;
  const size_t ring_bytes = static_cast<size_t>(tiling.stages) * 16384;
  // 16-bit types move queries into registers and reuse the space for the key ring.
  return dtype == DType::kFloat32 ? query_bytes + ring_bytes
                                  : (query_bytes > ring_bytes ? query_bytes : ring_bytes);
}

// Shared memory of the second pass holding `query_rows` padded query rows.
constexpr size_t ColumnSumSharedBytes(DType dtype, int head_dim, int query_rows) {
  const size_t element_size = dtype == DType::kFloat32 ? 4 : 2;
  const size_t key_bytes = static_cast<size_t>(kColumnSumRoundKeys) * head_dim * element_size;
  const size_t query_bytes = static_cast<size_t>(query_rows) * head_dim * element_size;
  const size_t row_info_bytes = static_cast<size_t>(query_rows) * 12;  // max_x, inv_sum, index
  return key_bytes + query_bytes + row_info_bytes;
}

}  // namespace kvcompress::cuda

#endif  // KVCOMPRESS_KERNELS_CUDA_INTERNAL_KERNEL_PARAMS_H_
