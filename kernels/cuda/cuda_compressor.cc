#include "kernels/cuda/cuda_compressor.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <utility>

#include "absl/strings/str_cat.h"
#include "kernels/budget_math.h"
#include "kernels/cuda/cuda_status.h"
#include "kernels/cuda/internal/dispatch.h"
#include "kernels/cuda/internal/kernel_params.h"
#include "kernels/cuda/internal/merge_params.h"
#include "kernels/cuda_backend.h"
#include "kernels/snapkv_window.h"
#include "kernels/status_macros.h"

namespace kvcompress {
namespace {

using cuda::AttentionItem;
using cuda::AttentionTiling;
using cuda::BatchShape;
using cuda::DeviceJob;
using cuda::JobHead;
using cuda::PartialStats;
using cuda::RowStats;
using cuda::Segment;
using cuda::SegmentKind;
using cuda::SelectState;
using cuda::SliceCounts;
using cuda::SliceItem;

// Streaming's kept set is two ranges only while float(position) is exact, i.e. no two
// positions tie: T ≤ 2^24.
constexpr int64_t kMaxRangesTokens = int64_t{1} << 24;
constexpr int kMaxGridY = 65535;
constexpr int64_t kMaxChunkKeys = 4096;

// Lays buffers out back to back, each 256-byte aligned.
struct ArenaLayout {
  size_t size = 0;
  size_t Add(size_t bytes) {
    size = (size + 255) / 256 * 256;
    const size_t offset = size;
    size += bytes;
    return offset;
  }
};

bool Aligned16(const void* pointer) { return reinterpret_cast<uintptr_t>(pointer) % 16 == 0; }

absl::Status ValidateJob(const CacheGeometry& geometry, const MethodSpec& spec,
                         const DeviceLayerJob& job, size_t index, bool keep_all) {
  const auto error = [&](auto&&... parts) {
    return absl::InvalidArgumentError(absl::StrCat("jobs[", index, "] (sequence ", job.sequence,
                                                   " layer ", job.layer, "): ", parts...));
  };
  const SequenceShape& shape = job.input.shape;
  if (shape.num_tokens < 1 || shape.num_tokens > std::numeric_limits<int32_t>::max()) {
    return error("num_tokens ", shape.num_tokens, " is out of range; expected 1 <= T <= 2^31-1");
  }
  if (job.input.keys == nullptr || job.input.values == nullptr) {
    return error("keys and values are required");
  }
  if (!Aligned16(job.input.keys) || !Aligned16(job.input.values) || !Aligned16(job.input.queries)) {
    return error("device keys, values and queries must be 16-byte aligned");
  }
  if (shape.num_window_queries < 0 || shape.num_window_queries > shape.num_tokens) {
    return error("num_window_queries ", shape.num_window_queries,
                 " is out of range; expected 0 <= W <= num_tokens ", shape.num_tokens);
  }
  if (shape.num_window_queries > 0 && job.input.queries == nullptr) {
    return error("num_window_queries is ", shape.num_window_queries, " but no queries were given");
  }
  if ((spec.scorer == ScorerKind::kSnapKv || spec.scorer == ScorerKind::kTova) &&
      shape.num_window_queries < 1 && !keep_all) {
    return error("the ", spec.scorer == ScorerKind::kTova ? "tova" : "snapkv",
                 " scorer needs window queries; got none");
  }
  if (spec.scorer == ScorerKind::kObserved && !keep_all) {
    if (job.input.scores == nullptr)
      return error("the observed scorer needs client scores; got none");
    if (shape.num_score_heads != geometry.num_kv_heads &&
        shape.num_score_heads != geometry.num_query_heads) {
      return error("num_score_heads ", shape.num_score_heads, " is invalid; expected num_kv_heads ",
                   geometry.num_kv_heads, " or num_query_heads ", geometry.num_query_heads);
    }
  }
  return absl::OkStatus();
}

// What the planner decided for one job.
struct JobPlan {
  int64_t num_tokens = 0;
  int num_sent = 0;
  bool keep_all = false;
  int64_t need = 0;
  int window = 0;          // attention window
  bool attention = false;  // runs the two attention passes
  bool needs_scores = false;
  SegmentKind kind = SegmentKind::kSelect;
  // Adaptive head budgets: one layer-wide selection of H_kv·need tokens after each head's own
  // top `safeguard`.
  bool adaptive = false;
  int64_t safeguard = 0;
  int64_t range_first_end = 0;
  int64_t range_second_begin = 0;
  int num_rows = 0;  // G · window
  int num_chunks = 0;
  int qblock_rows = 0;
  int qblocks_per_member = 0;
  int qblocks_per_item = 0;
};

// Streaming's kept set as [0, first_end) ∪ [second_begin, second_begin + need − first_end):
// the +inf tokens (sinks, protected) first by position, then the most recent others.
void PlanStreamingRanges(const MethodSpec& spec, JobPlan& plan) {
  const int64_t num_tokens = plan.num_tokens;
  const int64_t sinks = std::min<int64_t>(
      num_tokens, std::max<int64_t>(std::max(spec.streaming.sinks, spec.protect_sinks), 0));
  const int64_t recent = std::min<int64_t>(num_tokens, std::max(spec.protect_recent, 0));
  const int64_t need = plan.need;
  if (sinks >= num_tokens - recent || need <= sinks) {
    plan.range_first_end = need;
    plan.range_second_begin = num_tokens;
    return;
  }
  plan.range_first_end = sinks;
  plan.range_second_begin =
      need <= sinks + recent ? num_tokens - recent : num_tokens - recent - (need - sinks - recent);
}

template <typename T>
void CopyTable(std::vector<std::byte>& host, size_t offset, const std::vector<T>& table) {
  if (!table.empty()) std::memcpy(host.data() + offset, table.data(), table.size() * sizeof(T));
}

// What the merge stage needs to know of a job.
struct MergeJob {
  const JobPlan* plan = nullptr;
  int64_t score_offset = 0;
  int64_t first_row = 0;
};

// Enqueues the merging reducer of `spec` over the batch's selected rows (stage 5, see
// kernels/cuda/internal/merge_params.h): every job whose heads keep fewer than all their
// tokens gets a MergeHead per KV head; every other row keeps merged = 1.
absl::Status EnqueueMerge(cuda::DeviceMemoryPool& pool, const MethodSpec& spec,
                          const cuda::BatchShape& shape, std::span<const MergeJob> jobs,
                          const cuda::DeviceJob* device_jobs, const float* scores,
                          const float* colsum, DeviceBatchResult& result, cudaStream_t stream) {
  const bool similar = spec.reducer == ReducerKind::kMergeSimilar;
  const int num_heads = shape.num_kv_heads;
  std::vector<cuda::MergeHead> heads;
  int64_t total_tokens = 0;
  int64_t total_slots = 0;
  int64_t max_tokens = 0;
  int64_t max_rows = 0;
  for (size_t i = 0; i < jobs.size(); ++i) {
    const JobPlan& plan = *jobs[i].plan;
    // Heads kept whole merge nothing. merge_similar re-selects from the scores, so it needs a
    // selection's scores; merge_nearest works from any selection's rows (streaming ranges too).
    const bool merges =
        similar ? plan.kind == SegmentKind::kSelect : plan.kind != SegmentKind::kKeepAll;
    if (!merges) continue;
    // A head's rows (merge_nearest) or budget (merge_similar): n, or with adaptive head
    // budgets anything up to min(T, H·n).
    const int64_t head_rows =
        plan.adaptive ? std::min(plan.num_tokens, num_heads * plan.need) : plan.need;
    for (int h = 0; h < num_heads; ++h) {
      cuda::MergeHead head;
      head.job = static_cast<int32_t>(i);
      head.head = h;
      head.num_tokens = plan.num_tokens;
      head.token_base = total_tokens;
      head.score_offset = jobs[i].score_offset + h * plan.num_tokens;
      head.need = plan.need;
      head.adaptive = plan.adaptive ? 1 : 0;
      head.has_attention = plan.attention ? 1 : 0;
      head.layer_first_row = jobs[i].first_row;
      head.slot_row = total_slots;
      head.slot_capacity = similar ? head_rows : 0;
      heads.push_back(head);
      total_tokens += plan.num_tokens;
      total_slots += head.slot_capacity;
    }
    max_tokens = std::max(max_tokens, plan.num_tokens);
    max_rows = std::max(max_rows, head_rows);
  }
  KVC_CUDA_RETURN_IF_ERROR(cuda::LaunchFillOnes(result.merged, result.total_rows, stream));
  if (heads.empty()) return absl::OkStatus();
  if (total_tokens > std::numeric_limits<int32_t>::max()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "jobs: ", total_tokens, " tokens over the merged heads exceed 2^31-1 per call for the ",
        std::string(ReducerName(spec.reducer)), " reducer; split the batch"));
  }
  const int num_merge_heads = static_cast<int>(heads.size());
  int end_bit = 32;
  while ((int64_t{1} << (end_bit - 32)) < num_merge_heads) ++end_bit;
  size_t sort_bytes = 0;
  KVC_CUDA_RETURN_IF_ERROR(cuda::MergeSortTempBytes(total_tokens, end_bit, &sort_bytes));

  const auto tokens = static_cast<size_t>(total_tokens);
  const auto slots = static_cast<size_t>(total_slots);
  ArenaLayout arena;
  const size_t heads_at = arena.Add(heads.size() * sizeof(cuda::MergeHead));
  const size_t flags_at = arena.Add(tokens * sizeof(uint8_t));
  const size_t similar_at = arena.Add(similar ? tokens * sizeof(uint8_t) : 0);
  const size_t keys_at = arena.Add(tokens * sizeof(uint64_t));
  const size_t sorted_keys_at = arena.Add(tokens * sizeof(uint64_t));
  const size_t values_at = arena.Add(tokens * sizeof(int32_t));
  const size_t sorted_values_at = arena.Add(tokens * sizeof(int32_t));
  const size_t ranks_at = arena.Add(similar ? tokens * sizeof(int32_t) : 0);
  const size_t set_first_at = arena.Add(similar ? tokens * sizeof(int32_t) : 0);
  const size_t set_last_at = arena.Add(similar ? tokens * sizeof(int32_t) : 0);
  const size_t weights_at = arena.Add(similar ? tokens * sizeof(double) : 0);
  const size_t slot_positions_at = arena.Add(slots * sizeof(int32_t));
  const size_t slot_first_at = arena.Add(slots * sizeof(int32_t));
  const size_t slot_last_at = arena.Add(slots * sizeof(int32_t));
  const size_t merge_counts_at = arena.Add(heads.size() * sizeof(int32_t));
  const size_t head_first_at = arena.Add(heads.size() * sizeof(int64_t));
  const size_t head_rows_at = arena.Add(heads.size() * sizeof(int32_t));
  const size_t norms_at =
      arena.Add(similar ? 0 : static_cast<size_t>(result.total_rows) * sizeof(double));
  const size_t sort_temp_at = arena.Add(sort_bytes);
  KVC_ASSIGN_OR_RETURN(cuda::DeviceBuffer workspace, pool.Allocate(arena.size, stream));
  std::byte* base = workspace.data();
  // Pageable source: the copy has consumed it when the call returns.
  KVC_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(base + heads_at, heads.data(),
                                           heads.size() * sizeof(cuda::MergeHead),
                                           cudaMemcpyHostToDevice, stream));
  KVC_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(base + flags_at, 0, tokens, stream));

  cuda::MergeParams params;
  params.heads = reinterpret_cast<const cuda::MergeHead*>(base + heads_at);
  params.num_heads = num_merge_heads;
  params.jobs = device_jobs;
  params.shape = shape;
  params.scores = scores;
  params.flags = reinterpret_cast<uint8_t*>(base + flags_at);
  params.similar_next = reinterpret_cast<uint8_t*>(base + similar_at);
  params.sort_keys = reinterpret_cast<uint64_t*>(base + keys_at);
  params.sort_values = reinterpret_cast<int32_t*>(base + values_at);
  params.sorted_keys = reinterpret_cast<const uint64_t*>(base + sorted_keys_at);
  params.sorted_values = reinterpret_cast<const int32_t*>(base + sorted_values_at);
  params.ranks = reinterpret_cast<int32_t*>(base + ranks_at);
  params.set_first = reinterpret_cast<int32_t*>(base + set_first_at);
  params.set_last = reinterpret_cast<int32_t*>(base + set_last_at);
  params.member_weights = reinterpret_cast<double*>(base + weights_at);
  params.slot_positions = reinterpret_cast<int32_t*>(base + slot_positions_at);
  params.slot_first = reinterpret_cast<int32_t*>(base + slot_first_at);
  params.slot_last = reinterpret_cast<int32_t*>(base + slot_last_at);
  params.merge_counts = reinterpret_cast<int32_t*>(base + merge_counts_at);
  params.head_first_row = reinterpret_cast<int64_t*>(base + head_first_at);
  params.head_rows = reinterpret_cast<int32_t*>(base + head_rows_at);
  params.kept_norms = reinterpret_cast<double*>(base + norms_at);
  params.positions = result.positions;
  params.merged = result.merged;
  params.head_counts = result.head_counts;
  params.out_keys = result.keys;
  params.out_values = result.values;
  params.colsum = colsum;
  params.mass = result.mass_sums;
  params.similarity_threshold = spec.merge_similar.similarity_threshold;
  params.protect_fraction = spec.merge_similar.protect_fraction;
  // The CPU reference's expression, evaluated the same way.
  params.fixed_two_sigma_squared = 2 * spec.merge_similar.sigma * spec.merge_similar.sigma;
  params.auto_sigma = spec.merge_similar.auto_sigma ? 1 : 0;
  params.scale_values_by_set_size = spec.merge_similar.scale_values_by_set_size ? 1 : 0;
  void* sort_temp = base + sort_temp_at;

  if (similar) {
    KVC_CUDA_RETURN_IF_ERROR(cuda::LaunchSimilarLinks(params, max_tokens, stream));
    KVC_CUDA_RETURN_IF_ERROR(
        cuda::LaunchMergeSort(params, sort_temp, sort_bytes, total_tokens, end_bit, stream));
    KVC_CUDA_RETURN_IF_ERROR(cuda::LaunchRanks(params, total_tokens, stream));
    KVC_CUDA_RETURN_IF_ERROR(cuda::LaunchSimilarSets(params, stream));
    KVC_CUDA_RETURN_IF_ERROR(
        cuda::LaunchMergeHeadRows(params, cuda::MergeRowsSource::kMergeCounts, stream));
    KVC_CUDA_RETURN_IF_ERROR(cuda::LaunchSimilarRows(params, max_rows, stream));
  } else {
    KVC_CUDA_RETURN_IF_ERROR(
        cuda::LaunchMergeHeadRows(params, cuda::MergeRowsSource::kSelection, stream));
    KVC_CUDA_RETURN_IF_ERROR(cuda::LaunchNearestKept(params, max_rows, stream));
    KVC_CUDA_RETURN_IF_ERROR(cuda::LaunchNearestAssign(params, max_tokens, stream));
    KVC_CUDA_RETURN_IF_ERROR(
        cuda::LaunchMergeSort(params, sort_temp, sort_bytes, total_tokens, end_bit, stream));
    KVC_CUDA_RETURN_IF_ERROR(cuda::LaunchNearestValues(params, max_rows, stream));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::unique_ptr<CudaCompressor>> CudaCompressor::Create(
    const CudaCompressorOptions& options) {
  int count = 0;
  if (const cudaError_t error = cudaGetDeviceCount(&count); error != cudaSuccess || count == 0) {
    (void)cudaGetLastError();
    return absl::FailedPreconditionError(absl::StrCat("no CUDA device: cudaGetDeviceCount reports ",
                                                      count, " devices (",
                                                      cudaGetErrorString(error), ")"));
  }
  if (options.device < 0 || options.device >= count) {
    return absl::FailedPreconditionError(
        absl::StrCat("no CUDA device ", options.device, ": expected 0 <= device < ", count));
  }
  KVC_CUDA_RETURN_IF_ERROR(cudaSetDevice(options.device));
  int num_multiprocessors = 0;
  int max_shared_bytes = 0;
  KVC_CUDA_RETURN_IF_ERROR(
      cudaDeviceGetAttribute(&num_multiprocessors, cudaDevAttrMultiProcessorCount, options.device));
  KVC_CUDA_RETURN_IF_ERROR(cudaDeviceGetAttribute(
      &max_shared_bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, options.device));
  size_t budget = options.memory_budget_bytes;
  if (budget == 0) {
    size_t free_bytes = 0;
    size_t total_bytes = 0;
    KVC_CUDA_RETURN_IF_ERROR(cudaMemGetInfo(&free_bytes, &total_bytes));
    budget = free_bytes / 10 * 9;
  }
  KVC_ASSIGN_OR_RETURN(std::unique_ptr<cuda::DeviceMemoryPool> pool,
                       cuda::DeviceMemoryPool::Create(options.device, budget));
  return std::unique_ptr<CudaCompressor>(
      new CudaCompressor(options.device, num_multiprocessors, max_shared_bytes, std::move(pool)));
}

absl::StatusOr<DeviceBatchResult> CudaCompressor::Compress(
    const CacheGeometry& geometry, const MethodSpec& spec, std::span<const DeviceLayerJob> jobs,
    cudaStream_t stream, const StageEvents* events, bool reads_merged_rows) {
  DeviceBatchResult result;
  KVC_RETURN_IF_ERROR(Run(geometry, spec, jobs, stream, /*scores_only=*/false, reads_merged_rows,
                          events, &result, nullptr));
  return result;
}

absl::StatusOr<DeviceBatchScores> CudaCompressor::Score(const CacheGeometry& geometry,
                                                        const MethodSpec& spec,
                                                        std::span<const DeviceLayerJob> jobs,
                                                        cudaStream_t stream) {
  DeviceBatchScores scores;
  KVC_RETURN_IF_ERROR(Run(geometry, spec, jobs, stream, /*scores_only=*/true,
                          /*reads_merged_rows=*/false, nullptr, nullptr, &scores));
  return scores;
}

absl::Status CudaCompressor::Run(const CacheGeometry& geometry, const MethodSpec& spec,
                                 std::span<const DeviceLayerJob> jobs, cudaStream_t stream,
                                 bool scores_only, bool reads_merged_rows,
                                 const StageEvents* events, DeviceBatchResult* result,
                                 DeviceBatchScores* scores_out) {
  KVC_RETURN_IF_ERROR(ValidateGeometry(geometry));
  KVC_RETURN_IF_ERROR(CheckCudaMethodSupported(spec, geometry.head_dim));
  const bool is_merging = spec.reducer != ReducerKind::kDrop;
  if (is_merging && !scores_only && !reads_merged_rows) {
    return absl::UnimplementedError(absl::StrCat(
        "reducer ", std::string(ReducerName(spec.reducer)),
        ": this caller of CudaCompressor::Compress does not read merged rows (merged counts, "
        "per-head row counts); it runs the drop reducer"));
  }
  if (jobs.empty()) return absl::OkStatus();
  for (size_t i = 0; i < jobs.size(); ++i) {
    KVC_RETURN_IF_ERROR(ValidateJob(geometry, spec, jobs[i], i, !scores_only && jobs[i].keep_all));
  }
  const int num_heads = geometry.num_kv_heads;
  if (static_cast<int64_t>(jobs.size()) * num_heads > kMaxGridY) {
    return absl::InvalidArgumentError(
        absl::StrCat("jobs: ", jobs.size(), " layers of ", num_heads, " KV heads exceed ",
                     kMaxGridY, " (layer, head) pairs per call; split the batch"));
  }
  KVC_CUDA_RETURN_IF_ERROR(cudaSetDevice(device_));

  const int group_size = geometry.group_size();
  const int head_dim = geometry.head_dim;
  const size_t element_size = DTypeSize(geometry.dtype);
  const size_t row_bytes = static_cast<size_t>(head_dim) * element_size;
  const AttentionTiling tiling = cuda::AttentionTilingFor(geometry.dtype, head_dim);
  const bool is_snapkv = spec.scorer == ScorerKind::kSnapKv;
  const bool is_tova = spec.scorer == ScorerKind::kTova;
  const bool is_streaming = spec.scorer == ScorerKind::kStreaming;
  const bool is_adaptive = spec.head_budget == HeadBudgetKind::kAdaptive;
  const bool is_merge_similar = spec.reducer == ReducerKind::kMergeSimilar;
  // First-pass tiling: KVC_CUDA_STATS_ROW_TILES=1 selects one row tile per warp (16-bit
  // inputs whose default holds more), a benchmarking switch.
  static const int stats_row_tiles = [] {
    const char* value = std::getenv("KVC_CUDA_STATS_ROW_TILES");
    return value != nullptr && std::string(value) == "1" ? 1 : 0;
  }();
  const int row_tiles =
      geometry.dtype != DType::kFloat32 && tiling.rows_per_warp > 16 ? stats_row_tiles : 0;
  const int stats_rows_per_block = row_tiles == 1 ? 128 : tiling.rows_per_block;

  // Query rows the second pass holds in shared memory: as many as leave room for two blocks
  // per SM (latency hiding) when that still holds two query groups, else as many as fit.
  const size_t key_slice_bytes = static_cast<size_t>(cuda::kColumnSumRoundKeys) * row_bytes;
  const size_t query_row_bytes = row_bytes + 12;
  constexpr size_t kTwoBlockSharedBytes = 110 * 1024;
  size_t query_budget = 0;
  if (key_slice_bytes + 2 * tiling.query_multiple * query_row_bytes <= kTwoBlockSharedBytes) {
    query_budget = kTwoBlockSharedBytes - key_slice_bytes;
  } else if (static_cast<size_t>(max_shared_bytes_) > key_slice_bytes) {
    query_budget = max_shared_bytes_ - key_slice_bytes;
  }
  int query_capacity = static_cast<int>(query_budget / query_row_bytes);
  query_capacity = std::min(query_capacity, 1024) / tiling.query_multiple * tiling.query_multiple;
  if (query_capacity < tiling.query_multiple) {
    return absl::UnimplementedError(absl::StrCat(
        "head_dim ", head_dim, " ", std::string(DTypeName(geometry.dtype)), ": the device's ",
        max_shared_bytes_, " bytes of shared memory per block are too few for the cuda backend"));
  }

  // Per-job decisions.
  std::vector<JobPlan> plans(jobs.size());
  for (size_t i = 0; i < jobs.size(); ++i) {
    const DeviceLayerJob& job = jobs[i];
    JobPlan& plan = plans[i];
    plan.num_tokens = job.input.shape.num_tokens;
    plan.num_sent = job.input.shape.num_window_queries;
    plan.keep_all = !scores_only && job.keep_all;
    plan.need = plan.keep_all ? plan.num_tokens
                              : std::clamp<int64_t>(job.tokens_per_head, 1, plan.num_tokens);
    plan.window =
        is_snapkv ? EffectiveWindowSize(spec.snapkv.window_size, plan.num_sent) : plan.num_sent;
    // TOVA's scores use the first pass's softmax statistics of the last window query.
    plan.attention = !plan.keep_all && plan.window > 0 && (!scores_only || is_snapkv || is_tova);
    if (plan.keep_all || plan.need >= plan.num_tokens) {
      plan.kind = SegmentKind::kKeepAll;
    } else if (is_streaming && !is_adaptive && !is_merge_similar &&
               plan.num_tokens <= kMaxRangesTokens) {
      // (merge_similar re-ranks every token by its score, so streaming scores it.)
      plan.kind = SegmentKind::kRanges;
      PlanStreamingRanges(spec, plan);
    } else {
      plan.kind = SegmentKind::kSelect;
      plan.adaptive = is_adaptive;
      if (plan.adaptive) {
        plan.safeguard =
            std::min(AdaptiveSafeguardTokens(plan.need, spec.adaptive.alpha), plan.need);
      }
    }
    plan.needs_scores = scores_only || plan.kind == SegmentKind::kSelect;
    if (plan.attention) {
      plan.num_rows = group_size * plan.window;
      const int padded_window =
          (plan.window + tiling.query_multiple - 1) / tiling.query_multiple * tiling.query_multiple;
      plan.qblock_rows = std::min(padded_window, query_capacity);
      plan.qblocks_per_member = (plan.window + plan.qblock_rows - 1) / plan.qblock_rows;
      plan.qblocks_per_item = std::max(1, query_capacity / plan.qblock_rows);
    }
  }

  // Key chunks of the attention passes: the largest multiple of a block's rows (≤ 4096 keys)
  // that still gives every multiprocessor two items.
  const int64_t min_chunk = tiling.rows_per_block;
  const auto count_items = [&](int64_t chunk) {
    int64_t items = 0;
    for (const JobPlan& plan : plans) {
      if (!plan.attention) continue;
      const int64_t row_blocks = (plan.num_rows + stats_rows_per_block - 1) / stats_rows_per_block;
      items += num_heads * row_blocks * ((plan.num_tokens + chunk - 1) / chunk);
    }
    return items;
  };
  int64_t chunk_keys = min_chunk;
  for (int64_t chunk = std::max(kMaxChunkKeys, min_chunk); chunk > min_chunk; chunk /= 2) {
    if (count_items(chunk) >= 2 * num_multiprocessors_) {
      chunk_keys = chunk;
      break;
    }
  }
  // Slices of the selection: the largest of 8192 … 1024 tokens giving two blocks per SM.
  int64_t slice_tokens = 1024;
  if (!scores_only) {
    for (int64_t slice = 8192; slice > 1024; slice /= 2) {
      int64_t count = 0;
      for (const JobPlan& plan : plans)
        count += num_heads * ((plan.num_tokens + slice - 1) / slice);
      if (count >= 2 * num_multiprocessors_) {
        slice_tokens = slice;
        break;
      }
    }
  }

  // Device job table and work items.
  std::vector<DeviceJob> device_jobs(jobs.size());
  std::vector<AttentionItem> stats_items;
  std::vector<AttentionItem> column_items;
  std::vector<JobHead> attention_heads;
  std::vector<JobHead> score_heads;
  std::vector<Segment> segments;
  std::vector<SliceItem> slices;
  std::vector<JobHead> score_jobs;  // (job, 0) for every job that needs scores
  int64_t tova_size = 0;
  // Adaptive head budgets: each head's safeguard selection runs first, on tables of its own.
  std::vector<Segment> safeguard_segments;
  std::vector<SliceItem> safeguard_slices;
  int64_t safeguard_rows = 0;
  int64_t max_safeguard = 0;
  int64_t tiers_size = 0;
  bool any_adaptive = false;
  int64_t scores_size = 0;
  int64_t partial_size = 0;
  int64_t stats_size = 0;
  int64_t colsum_size = 0;
  int64_t output_rows = 0;
  int64_t max_tokens = 0;
  int64_t max_score_tokens = 0;
  int max_rows = 0;
  int max_query_rows = 0;
  int64_t max_need = 0;
  bool any_select = false;
  std::vector<int64_t> score_offsets(jobs.size(), 0);
  for (size_t i = 0; i < jobs.size(); ++i) {
    const DeviceLayerJob& job = jobs[i];
    JobPlan& plan = plans[i];
    DeviceJob& device_job = device_jobs[i];
    device_job.keys = job.input.keys;
    device_job.values = job.input.values;
    device_job.queries = job.input.queries;
    device_job.client_scores = job.input.scores;
    device_job.num_score_heads = job.input.shape.num_score_heads;
    device_job.num_tokens = plan.num_tokens;
    device_job.num_sent = plan.num_sent;
    device_job.window = plan.attention ? plan.window : 0;
    device_job.prefix = plan.num_tokens - device_job.window;
    max_tokens = std::max(max_tokens, plan.num_tokens);
    const int job_index = static_cast<int>(i);
    if (plan.needs_scores) {
      device_job.score_offset = scores_size;
      score_offsets[i] = scores_size;
      scores_size += num_heads * plan.num_tokens;
      max_score_tokens = std::max(max_score_tokens, plan.num_tokens);
      for (int h = 0; h < num_heads; ++h) score_heads.push_back(JobHead{job_index, h});
      score_jobs.push_back(JobHead{job_index, 0});
      if (is_tova) {
        device_job.tova_offset = tova_size;
        tova_size += num_heads * plan.num_tokens;
      }
    }
    if (plan.attention) {
      plan.num_chunks = static_cast<int>((plan.num_tokens + chunk_keys - 1) / chunk_keys);
      device_job.num_chunks = plan.num_chunks;
      device_job.qblock_rows = plan.qblock_rows;
      device_job.qblocks_per_member = plan.qblocks_per_member;
      device_job.stats_offset = stats_size;
      device_job.partial_offset = partial_size;
      device_job.colsum_offset = colsum_size;
      const int num_qblocks = group_size * plan.qblocks_per_member;
      stats_size += static_cast<int64_t>(num_heads) * plan.num_rows;
      partial_size += static_cast<int64_t>(num_heads) * plan.num_rows * plan.num_chunks;
      colsum_size += static_cast<int64_t>(num_heads) * num_qblocks * plan.num_tokens;
      max_rows = std::max(max_rows, plan.num_rows);
      max_query_rows =
          std::max(max_query_rows, std::min(num_qblocks, plan.qblocks_per_item) * plan.qblock_rows);
      for (int h = 0; h < num_heads; ++h) {
        attention_heads.push_back(JobHead{job_index, h});
        for (int c = 0; c < plan.num_chunks; ++c) {
          AttentionItem item;
          item.job = job_index;
          item.head = h;
          item.key_begin = c * chunk_keys;
          item.key_end = std::min(plan.num_tokens, (c + 1) * chunk_keys);
          item.chunk = c;
          for (int row = 0; row < plan.num_rows; row += stats_rows_per_block) {
            item.row_begin = row;
            item.row_end = std::min(plan.num_rows, row + stats_rows_per_block);
            stats_items.push_back(item);
          }
          for (int qb = 0; qb < num_qblocks; qb += plan.qblocks_per_item) {
            item.row_begin = qb;
            item.row_end = std::min(num_qblocks, qb + plan.qblocks_per_item);
            column_items.push_back(item);
          }
        }
      }
    }
    if (!scores_only && plan.adaptive) {
      const int64_t tier_offset = tiers_size;
      tiers_size += num_heads * plan.num_tokens;
      const auto add_slices = [&](std::vector<SliceItem>& table, int32_t segment_index,
                                  int64_t num_tokens) {
        const int32_t count = static_cast<int32_t>((num_tokens + slice_tokens - 1) / slice_tokens);
        for (int32_t k = 0; k < count; ++k) {
          table.push_back(SliceItem{segment_index, 0, k * slice_tokens,
                                    std::min(num_tokens, (k + 1) * slice_tokens)});
        }
        return count;
      };
      if (plan.safeguard > 0) {
        for (int h = 0; h < num_heads; ++h) {
          Segment guard;
          guard.job = job_index;
          guard.head = h;
          guard.kind = SegmentKind::kSelect;
          guard.first_slice = static_cast<int32_t>(safeguard_slices.size());
          guard.num_tokens = plan.num_tokens;
          guard.need = plan.safeguard;
          guard.score_offset = device_job.score_offset;
          guard.out_row = safeguard_rows + h * plan.safeguard;
          guard.tier_offset = tier_offset;
          guard.num_slices = add_slices(
              safeguard_slices, static_cast<int32_t>(safeguard_segments.size()), plan.num_tokens);
          safeguard_segments.push_back(guard);
        }
        safeguard_rows += num_heads * plan.safeguard;
        max_safeguard = std::max(max_safeguard, plan.safeguard);
      }
      Segment layer_wide;
      layer_wide.job = job_index;
      layer_wide.head = 0;
      layer_wide.kind = SegmentKind::kSelect;
      layer_wide.first_slice = static_cast<int32_t>(slices.size());
      layer_wide.has_attention = plan.attention ? 1 : 0;
      layer_wide.num_tokens = num_heads * plan.num_tokens;
      layer_wide.need = num_heads * plan.need;
      layer_wide.score_offset = device_job.score_offset;
      layer_wide.out_row = output_rows;
      layer_wide.tokens_per_head = plan.num_tokens;
      layer_wide.tier_offset = plan.safeguard > 0 ? tier_offset : -1;
      layer_wide.num_slices =
          add_slices(slices, static_cast<int32_t>(segments.size()), layer_wide.num_tokens);
      segments.push_back(layer_wide);
      output_rows += layer_wide.need;
      max_need = std::max(max_need, layer_wide.need);
      any_select = true;
      any_adaptive = true;
    } else if (!scores_only) {
      for (int h = 0; h < num_heads; ++h) {
        Segment segment;
        segment.job = job_index;
        segment.head = h;
        segment.kind = plan.kind;
        segment.first_slice = static_cast<int32_t>(slices.size());
        segment.num_slices =
            static_cast<int32_t>((plan.num_tokens + slice_tokens - 1) / slice_tokens);
        segment.has_attention = plan.attention ? 1 : 0;
        segment.num_tokens = plan.num_tokens;
        segment.need = plan.need;
        segment.score_offset = device_job.score_offset;
        segment.out_row = output_rows + h * plan.need;
        segment.range_first_end = plan.range_first_end;
        segment.range_second_begin = plan.range_second_begin;
        for (int s = 0; s < segment.num_slices; ++s) {
          SliceItem slice;
          slice.segment = static_cast<int32_t>(segments.size());
          slice.begin = s * slice_tokens;
          slice.end = std::min(plan.num_tokens, (s + 1) * slice_tokens);
          slices.push_back(slice);
        }
        segments.push_back(segment);
      }
      output_rows += num_heads * plan.need;
      max_need = std::max(max_need, plan.need);
      any_select = any_select || plan.kind == SegmentKind::kSelect;
    }
  }
  if (slices.size() > static_cast<size_t>(std::numeric_limits<int32_t>::max()) ||
      stats_items.size() > static_cast<size_t>(std::numeric_limits<int32_t>::max()) ||
      column_items.size() > static_cast<size_t>(std::numeric_limits<int32_t>::max())) {
    return absl::InvalidArgumentError("jobs: the batch is too large for one call; split it");
  }

  // Workspace: tables first (one upload), then scratch, then what must start zeroed.
  ArenaLayout arena;
  const size_t jobs_at = arena.Add(device_jobs.size() * sizeof(DeviceJob));
  const size_t stats_items_at = arena.Add(stats_items.size() * sizeof(AttentionItem));
  const size_t column_items_at = arena.Add(column_items.size() * sizeof(AttentionItem));
  const size_t attention_heads_at = arena.Add(attention_heads.size() * sizeof(JobHead));
  const size_t score_heads_at = arena.Add(score_heads.size() * sizeof(JobHead));
  const size_t score_jobs_at = arena.Add(score_jobs.size() * sizeof(JobHead));
  const size_t segments_at = arena.Add(segments.size() * sizeof(Segment));
  const size_t slices_at = arena.Add(slices.size() * sizeof(SliceItem));
  const size_t safeguard_segments_at = arena.Add(safeguard_segments.size() * sizeof(Segment));
  const size_t safeguard_slices_at = arena.Add(safeguard_slices.size() * sizeof(SliceItem));
  const size_t tables_bytes = arena.size;
  const size_t partial_at = arena.Add(partial_size * sizeof(PartialStats));
  const size_t stats_at = arena.Add(stats_size * sizeof(RowStats));
  const size_t colsum_at = arena.Add(colsum_size * sizeof(float));
  const size_t tova_at = arena.Add(tova_size * sizeof(double));
  const size_t scores_at = scores_only ? 0 : arena.Add(scores_size * sizeof(float));
  const size_t slice_counts_at = arena.Add(slices.size() * sizeof(SliceCounts));
  const size_t safeguard_counts_at = arena.Add(safeguard_slices.size() * sizeof(SliceCounts));
  const size_t safeguard_positions_at = arena.Add(safeguard_rows * sizeof(int32_t));
  const size_t row_heads_at = arena.Add((any_adaptive ? output_rows : 0) * sizeof(int32_t));
  const size_t zero_begin = arena.Add(segments.size() * sizeof(SelectState));
  const size_t states_at = zero_begin;
  const size_t histograms_at =
      arena.Add((any_select ? segments.size() : 0) * cuda::kRadixBins * sizeof(uint32_t));
  const size_t safeguard_states_at = arena.Add(safeguard_segments.size() * sizeof(SelectState));
  const size_t safeguard_histograms_at =
      arena.Add(safeguard_segments.size() * cuda::kRadixBins * sizeof(uint32_t));
  const size_t tiers_at = arena.Add(tiers_size * sizeof(uint8_t));
  const bool is_keydiff = spec.scorer == ScorerKind::kKeyDiff;
  const size_t anchors_at =
      arena.Add((is_keydiff ? score_heads.size() * head_dim : 0) * sizeof(double));
  const size_t zero_bytes = arena.size - zero_begin;

  KVC_ASSIGN_OR_RETURN(cuda::DeviceBuffer workspace, pool_->Allocate(arena.size, stream));
  std::byte* base = workspace.data();

  float* scores = nullptr;
  if (scores_only) {
    KVC_ASSIGN_OR_RETURN(
        scores_out->buffer,
        pool_->Allocate(std::max<int64_t>(scores_size, 1) * sizeof(float), stream));
    scores = reinterpret_cast<float*>(scores_out->buffer.data());
    scores_out->scores = scores;
    scores_out->offsets = score_offsets;
  } else {
    scores = reinterpret_cast<float*>(base + scores_at);
    ArenaLayout output;
    const size_t keys_at = output.Add(output_rows * row_bytes);
    const size_t values_at = output.Add(output_rows * row_bytes);
    const size_t positions_at = output.Add(output_rows * sizeof(int32_t));
    const size_t mass_at = output.Add(jobs.size() * sizeof(double));
    const size_t head_counts_at = output.Add(jobs.size() * num_heads * sizeof(int32_t));
    const size_t merged_at = output.Add(is_merging ? output_rows * sizeof(int32_t) : 0);
    KVC_ASSIGN_OR_RETURN(result->buffer, pool_->Allocate(output.size, stream));
    std::byte* out = result->buffer.data();
    result->keys = out + keys_at;
    result->values = out + values_at;
    result->positions = reinterpret_cast<int32_t*>(out + positions_at);
    result->mass_sums = reinterpret_cast<double*>(out + mass_at);
    result->head_counts = reinterpret_cast<int32_t*>(out + head_counts_at);
    result->merged = is_merging ? reinterpret_cast<int32_t*>(out + merged_at) : nullptr;
    result->total_rows = output_rows;
    result->row_bytes = row_bytes;
    // Mass sums and head counts are adjacent; both start at zero.
    KVC_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(out + mass_at, 0, output.size - mass_at, stream));
    result->layers.resize(jobs.size());
    int64_t row = 0;
    for (size_t i = 0; i < jobs.size(); ++i) {
      const JobPlan& plan = plans[i];
      DeviceLayerResult& layer = result->layers[i];
      layer.sequence = jobs[i].sequence;
      layer.layer = jobs[i].layer;
      layer.kept_per_head = static_cast<int32_t>(plan.need);
      // merge_similar's sets decide how many rows each head keeps, up to its budget.
      layer.rows_upper_bound = is_merge_similar && plan.kind == SegmentKind::kSelect;
      layer.ragged_heads = plan.adaptive || layer.rows_upper_bound;
      layer.first_row = row;
      layer.num_rows = num_heads * plan.need;
      row += layer.num_rows;
      if (plan.num_sent == 0) {
        layer.mass_fixed = -1.0;
      } else if (plan.keep_all) {
        layer.mass_fixed = 1.0;
      } else {
        layer.mass_scale = 1.0 / (static_cast<double>(geometry.num_query_heads) * plan.window);
      }
    }
  }

  // Upload the tables (pageable source: the copy has consumed it when the call returns).
  std::vector<std::byte> host_tables(tables_bytes);
  CopyTable(host_tables, jobs_at, device_jobs);
  CopyTable(host_tables, stats_items_at, stats_items);
  CopyTable(host_tables, column_items_at, column_items);
  CopyTable(host_tables, attention_heads_at, attention_heads);
  CopyTable(host_tables, score_heads_at, score_heads);
  CopyTable(host_tables, score_jobs_at, score_jobs);
  CopyTable(host_tables, segments_at, segments);
  CopyTable(host_tables, slices_at, slices);
  CopyTable(host_tables, safeguard_segments_at, safeguard_segments);
  CopyTable(host_tables, safeguard_slices_at, safeguard_slices);
  if (tables_bytes > 0) {
    KVC_CUDA_RETURN_IF_ERROR(
        cudaMemcpyAsync(base, host_tables.data(), tables_bytes, cudaMemcpyHostToDevice, stream));
  }
  if (zero_bytes > 0) {
    KVC_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(base + zero_begin, 0, zero_bytes, stream));
  }

  const auto* device_job_table = reinterpret_cast<const DeviceJob*>(base + jobs_at);
  BatchShape shape;
  shape.num_kv_heads = num_heads;
  shape.group_size = group_size;
  shape.head_dim = head_dim;
  shape.layout = geometry.layout;
  shape.dtype = geometry.dtype;
  const float scale_log2 =
      static_cast<float>(1.4426950408889634 / std::sqrt(static_cast<double>(head_dim)));
  auto* partial = reinterpret_cast<PartialStats*>(base + partial_at);
  auto* row_stats = reinterpret_cast<RowStats*>(base + stats_at);
  auto* colsum = reinterpret_cast<float*>(base + colsum_at);

  // 1. Window attention: statistics, then column sums.
  if (!stats_items.empty()) {
    cuda::WindowStatsParams stats_params;
    stats_params.jobs = device_job_table;
    stats_params.items = reinterpret_cast<const AttentionItem*>(base + stats_items_at);
    stats_params.num_items = static_cast<int>(stats_items.size());
    stats_params.row_tiles = row_tiles;
    stats_params.partial = partial;
    stats_params.shape = shape;
    stats_params.scale_log2 = scale_log2;
    cuda::StatsCombineParams combine_params;
    combine_params.jobs = device_job_table;
    combine_params.job_heads = reinterpret_cast<const JobHead*>(base + attention_heads_at);
    combine_params.partial = partial;
    combine_params.stats = row_stats;
    combine_params.shape = shape;
    cuda::ColumnSumParams column_params;
    column_params.jobs = device_job_table;
    column_params.items = reinterpret_cast<const AttentionItem*>(base + column_items_at);
    column_params.num_items = static_cast<int>(column_items.size());
    column_params.stats = row_stats;
    column_params.colsum = colsum;
    column_params.shape = shape;
    column_params.scale_log2 = scale_log2;
    column_params.query_capacity = max_query_rows;
    column_params.shared_bytes =
        cuda::ColumnSumSharedBytes(geometry.dtype, head_dim, max_query_rows);
    KVC_DISPATCH_DTYPE(geometry.dtype, kDType, {
      KVC_DISPATCH_HEAD_DIM(head_dim, kHeadDim, {
        KVC_CUDA_RETURN_IF_ERROR((cuda::LaunchWindowStats<kDType, kHeadDim>(stats_params, stream)));
      });
    });
    KVC_CUDA_RETURN_IF_ERROR(cuda::LaunchStatsCombine(
        combine_params, static_cast<int>(attention_heads.size()), max_rows, stream));
    KVC_DISPATCH_DTYPE(geometry.dtype, kDType, {
      KVC_DISPATCH_HEAD_DIM(head_dim, kHeadDim, {
        KVC_CUDA_RETURN_IF_ERROR((cuda::LaunchColumnSums<kDType, kHeadDim>(column_params, stream)));
      });
    });
  }

  // 2. Scores.
  const auto* score_head_table = reinterpret_cast<const JobHead*>(base + score_heads_at);
  const int num_score_heads = static_cast<int>(score_heads.size());
  cuda::Protection protection;
  protection.sinks = spec.protect_sinks;
  protection.recent = spec.protect_recent;
  if (num_score_heads > 0) {
    switch (spec.scorer) {
      case ScorerKind::kSnapKv: {
        cuda::SnapKvFinalizeParams params;
        params.jobs = device_job_table;
        params.job_heads = score_head_table;
        params.colsum = colsum;
        params.scores = scores;
        params.shape = shape;
        params.kernel_size = spec.snapkv.kernel_size;
        params.pooling = spec.snapkv.pooling;
        params.group_reduction = spec.snapkv.group_reduction;
        params.protection = protection;
        KVC_CUDA_RETURN_IF_ERROR(
            cuda::LaunchSnapKvFinalize(params, num_score_heads, max_score_tokens, stream));
        break;
      }
      case ScorerKind::kKnorm: {
        cuda::KnormParams params;
        params.jobs = device_job_table;
        params.job_heads = score_head_table;
        params.scores = scores;
        params.shape = shape;
        params.protection = protection;
        KVC_DISPATCH_DTYPE(geometry.dtype, kDType, {
          KVC_DISPATCH_HEAD_DIM(head_dim, kHeadDim, {
            KVC_CUDA_RETURN_IF_ERROR((cuda::LaunchKnormScores<kDType, kHeadDim>(
                params, num_score_heads, max_score_tokens, stream)));
          });
        });
        break;
      }
      case ScorerKind::kTova: {
        cuda::TovaParams params;
        params.jobs = device_job_table;
        params.job_heads = score_head_table;
        params.stats = row_stats;
        params.group_sums = reinterpret_cast<double*>(base + tova_at);
        params.scores = scores;
        params.shape = shape;
        params.scale_log2 = scale_log2;
        params.protection = protection;
        KVC_DISPATCH_DTYPE(geometry.dtype, kDType, {
          KVC_DISPATCH_HEAD_DIM(head_dim, kHeadDim, {
            KVC_CUDA_RETURN_IF_ERROR((cuda::LaunchTovaGroupSums<kDType, kHeadDim>(
                params, num_score_heads, max_score_tokens, stream)));
          });
        });
        params.job_heads = reinterpret_cast<const JobHead*>(base + score_jobs_at);
        KVC_CUDA_RETURN_IF_ERROR(cuda::LaunchTovaCombine(
            params, static_cast<int>(score_jobs.size()), max_score_tokens, stream));
        break;
      }
      case ScorerKind::kObserved: {
        cuda::ObservedScoreParams params;
        params.jobs = device_job_table;
        params.job_heads = score_head_table;
        params.scores = scores;
        params.shape = shape;
        params.group_reduction = spec.observed.group_reduction;
        params.protection = protection;
        KVC_CUDA_RETURN_IF_ERROR(
            cuda::LaunchObservedScores(params, num_score_heads, max_score_tokens, stream));
        break;
      }
      case ScorerKind::kKeyDiff: {
        cuda::KeyDiffParams params;
        params.jobs = device_job_table;
        params.job_heads = score_head_table;
        params.anchor_sums = reinterpret_cast<double*>(base + anchors_at);
        params.scores = scores;
        params.shape = shape;
        params.protection = protection;
        KVC_DISPATCH_DTYPE(geometry.dtype, kDType, {
          KVC_DISPATCH_HEAD_DIM(head_dim, kHeadDim, {
            KVC_CUDA_RETURN_IF_ERROR((cuda::LaunchKeyDiffScores<kDType, kHeadDim>(
                params, num_score_heads, max_score_tokens, stream)));
          });
        });
        break;
      }
      case ScorerKind::kStreaming: {
        cuda::StreamingScoreParams params;
        params.jobs = device_job_table;
        params.job_heads = score_head_table;
        params.scores = scores;
        params.sinks = spec.streaming.sinks;
        params.protection = protection;
        KVC_CUDA_RETURN_IF_ERROR(
            cuda::LaunchStreamingScores(params, num_score_heads, max_score_tokens, stream));
        break;
      }
      default:
        return absl::UnimplementedError(absl::StrCat("scorer ",
                                                     std::string(ScorerName(spec.scorer)),
                                                     " is not implemented by the cuda backend"));
    }
  }
  if (events != nullptr && events->scored != nullptr) {
    KVC_CUDA_RETURN_IF_ERROR(cudaEventRecord(events->scored, stream));
  }
  if (scores_only) return absl::OkStatus();

  // 3. Selection and compaction. Adaptive head budgets first pick each head's safeguard and
  // mark it in the tiers, which the layer-wide selection then ranks first.
  auto* tiers = reinterpret_cast<uint8_t*>(base + tiers_at);
  auto* row_heads = reinterpret_cast<int32_t*>(base + row_heads_at);
  if (!safeguard_segments.empty()) {
    cuda::SelectParams guard_params;
    guard_params.segments = reinterpret_cast<const Segment*>(base + safeguard_segments_at);
    guard_params.slices = reinterpret_cast<const SliceItem*>(base + safeguard_slices_at);
    guard_params.num_slices = static_cast<int>(safeguard_slices.size());
    guard_params.scores = scores;
    guard_params.states = reinterpret_cast<SelectState*>(base + safeguard_states_at);
    guard_params.histograms = reinterpret_cast<uint32_t*>(base + safeguard_histograms_at);
    guard_params.slice_counts = reinterpret_cast<SliceCounts*>(base + safeguard_counts_at);
    for (int pass = 0; pass < cuda::kRadixPasses; ++pass) {
      guard_params.pass = pass;
      KVC_CUDA_RETURN_IF_ERROR(cuda::LaunchRadixSelectPass(guard_params, stream));
    }
    KVC_CUDA_RETURN_IF_ERROR(cuda::LaunchSliceCounts(guard_params, stream));
    auto* guard_positions = reinterpret_cast<int32_t*>(base + safeguard_positions_at);
    cuda::CompactParams guard_compact;
    guard_compact.segments = guard_params.segments;
    guard_compact.slices = guard_params.slices;
    guard_compact.num_slices = guard_params.num_slices;
    guard_compact.scores = scores;
    guard_compact.states = guard_params.states;
    guard_compact.slice_counts = guard_params.slice_counts;
    guard_compact.positions = guard_positions;
    guard_compact.jobs = device_job_table;
    guard_compact.shape = shape;
    KVC_CUDA_RETURN_IF_ERROR(cuda::LaunchCompact(guard_compact, stream));
    cuda::MarkTiersParams mark_params;
    mark_params.segments = guard_params.segments;
    mark_params.positions = guard_positions;
    mark_params.tiers = tiers;
    KVC_CUDA_RETURN_IF_ERROR(cuda::LaunchMarkTiers(
        mark_params, static_cast<int>(safeguard_segments.size()), max_safeguard, stream));
  }
  cuda::SelectParams select_params;
  select_params.segments = reinterpret_cast<const Segment*>(base + segments_at);
  select_params.slices = reinterpret_cast<const SliceItem*>(base + slices_at);
  select_params.num_slices = static_cast<int>(slices.size());
  select_params.scores = scores;
  select_params.states = reinterpret_cast<SelectState*>(base + states_at);
  select_params.histograms = reinterpret_cast<uint32_t*>(base + histograms_at);
  select_params.slice_counts = reinterpret_cast<SliceCounts*>(base + slice_counts_at);
  select_params.tiers = tiers;
  if (any_select) {
    for (int pass = 0; pass < cuda::kRadixPasses; ++pass) {
      select_params.pass = pass;
      KVC_CUDA_RETURN_IF_ERROR(cuda::LaunchRadixSelectPass(select_params, stream));
    }
    KVC_CUDA_RETURN_IF_ERROR(cuda::LaunchSliceCounts(select_params, stream));
  }
  cuda::CompactParams compact_params;
  compact_params.segments = select_params.segments;
  compact_params.slices = select_params.slices;
  compact_params.num_slices = select_params.num_slices;
  compact_params.scores = scores;
  compact_params.states = select_params.states;
  compact_params.slice_counts = select_params.slice_counts;
  compact_params.positions = result->positions;
  compact_params.jobs = device_job_table;
  compact_params.colsum = colsum;
  compact_params.mass = result->mass_sums;
  compact_params.tiers = tiers;
  compact_params.row_heads = row_heads;
  compact_params.head_counts = result->head_counts;
  compact_params.shape = shape;
  KVC_CUDA_RETURN_IF_ERROR(cuda::LaunchCompact(compact_params, stream));
  if (events != nullptr && events->selected != nullptr) {
    KVC_CUDA_RETURN_IF_ERROR(cudaEventRecord(events->selected, stream));
  }

  // 4. Gather.
  cuda::GatherParams gather_params;
  gather_params.segments = select_params.segments;
  gather_params.jobs = device_job_table;
  gather_params.positions = result->positions;
  gather_params.row_heads = row_heads;
  gather_params.out_keys = result->keys;
  gather_params.out_values = result->values;
  gather_params.shape = shape;
  KVC_CUDA_RETURN_IF_ERROR(
      cuda::LaunchGather(gather_params, static_cast<int>(segments.size()), max_need, stream));

  // 5. Merging reducers rewrite the rows they merge (timed as gathering, as the CPU does).
  if (is_merging) {
    std::vector<MergeJob> merge_jobs(jobs.size());
    for (size_t i = 0; i < jobs.size(); ++i) {
      merge_jobs[i].plan = &plans[i];
      merge_jobs[i].score_offset = device_jobs[i].score_offset;
      merge_jobs[i].first_row = result->layers[i].first_row;
    }
    KVC_RETURN_IF_ERROR(EnqueueMerge(*pool_, spec, shape, merge_jobs, device_job_table, scores,
                                     colsum, *result, stream));
  }
  if (events != nullptr && events->gathered != nullptr) {
    KVC_CUDA_RETURN_IF_ERROR(cudaEventRecord(events->gathered, stream));
  }
  (void)max_tokens;
  return absl::OkStatus();
}

}  // namespace kvcompress
