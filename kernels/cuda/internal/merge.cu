// The merging reducers (merge_similar, merge_nearest) on the device; see merge_params.h for the
// passes. Every fp64 operation is an explicitly rounded intrinsic (__dadd_rn, __dmul_rn, …)
// in the CPU reference's order, so that nvcc contracts nothing into an FMA and sums match the
// reference bit for bit; exp is the one function whose last fp64 bit may differ.
#include <cub/device/device_radix_sort.cuh>

#include "kernels/cuda/internal/device_utils.cuh"
#include "kernels/cuda/internal/merge_params.h"

namespace kvcompress::cuda {
namespace {

constexpr int kSetsThreads = 512;
constexpr int kAssignThreads = 128;
constexpr uint8_t kProtected = 1;
constexpr uint8_t kSurvives = 2;

__device__ __forceinline__ float LoadAsFloat(const std::byte* tensor, size_t element, DType dtype) {
  if (dtype == DType::kFloat32) return reinterpret_cast<const float*>(tensor)[element];
  const uint16_t bits = reinterpret_cast<const uint16_t*>(tensor)[element];
  return dtype == DType::kBFloat16 ? BFloat16ToFloat(bits) : Float16ToFloat(bits);
}

__device__ __forceinline__ void StoreFromFloat(std::byte* tensor, size_t element, float value,
                                               DType dtype) {
  if (dtype == DType::kFloat32) {
    reinterpret_cast<float*>(tensor)[element] = value;
    return;
  }
  reinterpret_cast<uint16_t*>(tensor)[element] =
      dtype == DType::kBFloat16 ? FloatToBFloat16(value) : FloatToFloat16(value);
}

// The element offset of row (head, token) of the job's K or V tensor.
__device__ __forceinline__ size_t RowStart(const BatchShape& shape, int64_t num_tokens, int head,
                                           int64_t token) {
  return RowElementOffset(shape.layout, shape.num_kv_heads, num_tokens, shape.head_dim, head,
                          token);
}

// Σ_d a[d]·b[d] in fp64, d ascending, as the CPU's Dot.
__device__ double RowDot(const std::byte* tensor, size_t a, size_t b, int dim, DType dtype) {
  double sum = 0;
  for (int d = 0; d < dim; ++d) {
    const double x = LoadAsFloat(tensor, a + d, dtype);
    const double y = LoadAsFloat(tensor, b + d, dtype);
    sum = __dadd_rn(sum, __dmul_rn(x, y));
  }
  return sum;
}

// Copies one row of `row_bytes` (a multiple of 16) with the lanes of a warp.
__device__ __forceinline__ void CopyRowWarp(const std::byte* source, std::byte* target,
                                            int row_bytes, int lane) {
  for (int offset = lane * 16; offset < row_bytes; offset += 32 * 16) {
    *reinterpret_cast<uint4*>(target + offset) =
        __ldg(reinterpret_cast<const uint4*>(source + offset));
  }
}

// Σ over the job's query blocks of the column sums at (head, position): the attention the
// window gives that key, as the compaction adds it.
__device__ double KeyMass(const MergeParams& params, const MergeHead& merge_head,
                          int64_t position) {
  const DeviceJob& job = params.jobs[merge_head.job];
  const int num_qblocks = params.shape.group_size * job.qblocks_per_member;
  const int64_t num_tokens = merge_head.num_tokens;
  const float* key_sums = params.colsum + job.colsum_offset +
                          static_cast<int64_t>(merge_head.head) * num_qblocks * num_tokens;
  double sum = 0.0;
  for (int qb = 0; qb < num_qblocks; ++qb) sum += key_sums[qb * num_tokens + position];
  return sum;
}

__global__ void FillOnesKernel(int32_t* values, int64_t count) {
  const int64_t index = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (index < count) values[index] = 1;
}

// merge_similar pass 1: sort keys and links between adjacent keys.
__global__ void __launch_bounds__(kMergeThreads) SimilarLinksKernel(const MergeParams params) {
  const MergeHead merge_head = params.heads[blockIdx.y];
  const int64_t token = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t num_tokens = merge_head.num_tokens;
  if (token >= num_tokens) return;
  const int64_t index = merge_head.token_base + token;
  params.sort_keys[index] = (static_cast<uint64_t>(blockIdx.y) << 32) |
                            SelectionKey(params.scores[merge_head.score_offset + token]);
  params.sort_values[index] = static_cast<int32_t>(token);
  uint8_t similar = 0;
  if (token + 1 < num_tokens) {
    const BatchShape& shape = params.shape;
    const std::byte* keys = params.jobs[merge_head.job].keys;
    const size_t a = RowStart(shape, num_tokens, merge_head.head, token);
    const size_t b = RowStart(shape, num_tokens, merge_head.head, token + 1);
    const double norm_a = __dsqrt_rn(RowDot(keys, a, a, shape.head_dim, shape.dtype));
    const double norm_b = __dsqrt_rn(RowDot(keys, b, b, shape.head_dim, shape.dtype));
    const double denominator = __dmul_rn(norm_a, norm_b);
    if (denominator > 0) {
      const double cosine = __ddiv_rn(RowDot(keys, a, b, shape.head_dim, shape.dtype), denominator);
      similar = cosine > params.similarity_threshold ? 1 : 0;
    }
  }
  params.similar_next[index] = similar;
}

__global__ void RanksKernel(const MergeParams params, int64_t num_items) {
  const int64_t index = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (index >= num_items) return;
  const int head_index = static_cast<int>(params.sorted_keys[index] >> 32);
  const int64_t base = params.heads[head_index].token_base;
  params.ranks[base + params.sorted_values[index]] = static_cast<int32_t>(index - base);
}

// merge_similar pass 3, a block per head: see merge_similar.h for the rules it follows.
__global__ void __launch_bounds__(kSetsThreads) SimilarSetsKernel(const MergeParams params) {
  __shared__ int32_t scan_scratch[33];
  __shared__ int64_t sum_scratch[33];
  const MergeHead merge_head = params.heads[blockIdx.x];
  const int64_t num_tokens = merge_head.num_tokens;
  const int64_t base = merge_head.token_base;
  const int num_kv_heads = params.shape.num_kv_heads;
  int64_t budget =
      merge_head.adaptive
          ? params
                .head_counts[static_cast<int64_t>(merge_head.job) * num_kv_heads + merge_head.head]
          : merge_head.need;
  budget = budget < 0 ? 0 : budget;
  int32_t* slot_positions = params.slot_positions + merge_head.slot_row;
  int32_t* slot_first = params.slot_first + merge_head.slot_row;
  int32_t* slot_last = params.slot_last + merge_head.slot_row;
  uint8_t* flags = params.flags + base;
  int32_t* set_first = params.set_first + base;
  int32_t* set_last = params.set_last + base;
  const int32_t* ranks = params.ranks + base;
  const uint8_t* similar = params.similar_next + base;

  // A budget covering every token keeps the head whole.
  if (budget >= num_tokens) {
    const int64_t rows =
        num_tokens < merge_head.slot_capacity ? num_tokens : merge_head.slot_capacity;
    for (int64_t j = threadIdx.x; j < rows; j += blockDim.x) {
      slot_positions[j] = static_cast<int32_t>(j);
      slot_first[j] = static_cast<int32_t>(j);
      slot_last[j] = static_cast<int32_t>(j);
    }
    if (threadIdx.x == 0) params.merge_counts[blockIdx.x] = static_cast<int32_t>(rows);
    return;
  }

  // Protected: the p best tokens in selection order.
  const float* scores = params.scores + merge_head.score_offset;
  int64_t infinite = 0;
  for (int64_t j = threadIdx.x; j < num_tokens; j += blockDim.x) {
    infinite += SelectionScore(scores[j]) == INFINITY ? 1 : 0;
  }
  const int64_t num_infinite = BlockSum<int64_t>(infinite, sum_scratch);
  const int64_t by_fraction =
      static_cast<int64_t>(floor(__dmul_rn(params.protect_fraction, static_cast<double>(budget))));
  const int64_t larger = by_fraction > num_infinite ? by_fraction : num_infinite;
  const int64_t num_protected = budget < larger ? budget : larger;
  for (int64_t j = threadIdx.x; j < num_tokens; j += blockDim.x) {
    flags[j] = ranks[j] < num_protected ? kProtected : 0;
    set_first[j] = -1;
  }
  __syncthreads();

  // Merging sets: maximal runs of unprotected tokens whose adjacent keys are similar. The
  // thread that finds a run's lowest token walks it and marks its pivot (its best rank).
  for (int64_t j = threadIdx.x; j < num_tokens; j += blockDim.x) {
    if (flags[j] & kProtected) continue;
    if (j > 0 && !(flags[j - 1] & kProtected) && similar[j - 1]) continue;  // not the lowest
    int64_t last = j;
    int64_t pivot = j;
    int32_t pivot_rank = ranks[j];
    while (last + 1 < num_tokens && !(flags[last + 1] & kProtected) && similar[last]) {
      ++last;
      if (ranks[last] < pivot_rank) {
        pivot_rank = ranks[last];
        pivot = last;
      }
    }
    set_first[pivot] = static_cast<int32_t>(j);
    set_last[pivot] = static_cast<int32_t>(last);
  }
  __syncthreads();

  // Every row counts against the budget: the sets with the best pivots survive.
  const int64_t set_slots = budget - num_protected;
  const int32_t* order = params.sorted_values + base;
  int64_t pivots_before = 0;
  for (int64_t tile = 0; tile < num_tokens && pivots_before < set_slots; tile += blockDim.x) {
    const int64_t rank = tile + threadIdx.x;
    const int32_t position = rank < num_tokens ? order[rank] : 0;
    const bool is_pivot = rank < num_tokens && set_first[position] >= 0;
    int32_t tile_pivots = 0;
    const int32_t before = BlockExclusiveScan<int32_t>(is_pivot ? 1 : 0, scan_scratch, tile_pivots);
    if (is_pivot && pivots_before + before < set_slots) flags[position] |= kSurvives;
    pivots_before += tile_pivots;
  }
  __syncthreads();

  // Rows in position order: protected tokens and surviving pivots.
  int64_t rows_before = 0;
  for (int64_t tile = 0; tile < num_tokens; tile += blockDim.x) {
    const int64_t j = tile + threadIdx.x;
    const uint8_t flag = j < num_tokens ? flags[j] : 0;
    const bool kept = flag != 0;
    int32_t tile_rows = 0;
    const int32_t before = BlockExclusiveScan<int32_t>(kept ? 1 : 0, scan_scratch, tile_rows);
    const int64_t row = rows_before + before;
    if (kept && row < merge_head.slot_capacity) {
      const bool is_protected = (flag & kProtected) != 0;
      slot_positions[row] = static_cast<int32_t>(j);
      slot_first[row] = is_protected ? static_cast<int32_t>(j) : set_first[j];
      slot_last[row] = is_protected ? static_cast<int32_t>(j) : set_last[j];
    }
    rows_before += tile_rows;
  }
  if (threadIdx.x == 0) {
    params.merge_counts[blockIdx.x] = static_cast<int32_t>(
        rows_before < merge_head.slot_capacity ? rows_before : merge_head.slot_capacity);
  }
}

// Where each head's rows start in the packed output (heads of a job follow each other), and
// how many it has. merge_similar also publishes its counts and restarts the job's mass.
__global__ void MergeHeadRowsKernel(const MergeParams params, MergeRowsSource source) {
  const int index = blockIdx.x * blockDim.x + threadIdx.x;
  if (index >= params.num_heads) return;
  const MergeHead merge_head = params.heads[index];
  const int num_kv_heads = params.shape.num_kv_heads;
  const auto rows_of = [&](int k) -> int64_t {
    if (source == MergeRowsSource::kMergeCounts) return params.merge_counts[k];
    const MergeHead& other = params.heads[k];
    return other.adaptive
               ? params.head_counts[static_cast<int64_t>(other.job) * num_kv_heads + other.head]
               : other.need;
  };
  int64_t offset = 0;
  for (int k = index - merge_head.head; k < index; ++k) offset += rows_of(k);
  const int64_t rows = rows_of(index);
  params.head_first_row[index] = merge_head.layer_first_row + offset;
  params.head_rows[index] = static_cast<int32_t>(rows);
  if (source == MergeRowsSource::kMergeCounts) {
    params.head_counts[static_cast<int64_t>(merge_head.job) * num_kv_heads + merge_head.head] =
        static_cast<int32_t>(rows);
    if (merge_head.head == 0 && merge_head.has_attention) params.mass[merge_head.job] = 0.0;
  }
}

// merge_similar pass 5, a warp per row of a head.
__global__ void __launch_bounds__(kMergeThreads) SimilarRowsKernel(const MergeParams params) {
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kMergeRowsPerBlock + (threadIdx.x >> 5);
  const MergeHead merge_head = params.heads[blockIdx.y];
  if (row >= params.head_rows[blockIdx.y]) return;  // the whole warp
  const BatchShape& shape = params.shape;
  const DType dtype = shape.dtype;
  const int dim = shape.head_dim;
  const int row_bytes = dim * static_cast<int>(DTypeSize(dtype));
  const DeviceJob& job = params.jobs[merge_head.job];
  const int64_t num_tokens = merge_head.num_tokens;
  const int64_t slot = merge_head.slot_row + row;
  const int64_t position = params.slot_positions[slot];
  const int64_t first = params.slot_first[slot];
  const int64_t last = params.slot_last[slot];
  const int64_t out = params.head_first_row[blockIdx.y] + row;
  const int64_t size = last - first + 1;
  if (lane == 0) {
    params.positions[out] = static_cast<int32_t>(position);
    params.merged[out] = static_cast<int32_t>(size);
    if (merge_head.has_attention) {
      atomicAdd(&params.mass[merge_head.job], KeyMass(params, merge_head, position));
    }
  }
  std::byte* key_out = params.out_keys + out * row_bytes;
  std::byte* value_out = params.out_values + out * row_bytes;
  const size_t element_size = DTypeSize(dtype);
  const size_t pivot_row = RowStart(shape, num_tokens, merge_head.head, position);
  if (size == 1) {
    CopyRowWarp(job.keys + pivot_row * element_size, key_out, row_bytes, lane);
    CopyRowWarp(job.values + pivot_row * element_size, value_out, row_bytes, lane);
    return;
  }

  // Members in the CPU's order: m = 0 … size − 1 is position last − m.
  double* weights = params.member_weights + merge_head.token_base;
  for (int64_t m = lane; m < size; m += 32) {
    const int64_t token = last - m;
    const size_t member_row = RowStart(shape, num_tokens, merge_head.head, token);
    double sum = 0;
    for (int d = 0; d < dim; ++d) {
      const double diff =
          __dsub_rn(static_cast<double>(LoadAsFloat(job.keys, member_row + d, dtype)),
                    static_cast<double>(LoadAsFloat(job.keys, pivot_row + d, dtype)));
      sum = __dadd_rn(sum, __dmul_rn(diff, diff));
    }
    weights[token] = sum;  // the squared distance, until it becomes the weight
  }
  __syncwarp();
  double two_sigma_squared = params.fixed_two_sigma_squared;
  if (params.auto_sigma) {
    double sum_squared = 0;
    if (lane == 0) {
      for (int64_t m = 0; m < size; ++m) sum_squared = __dadd_rn(sum_squared, weights[last - m]);
    }
    sum_squared = __shfl_sync(0xffffffffu, sum_squared, 0);
    two_sigma_squared = __ddiv_rn(sum_squared, static_cast<double>(size - 1));
  }
  for (int64_t m = lane; m < size; m += 32) {
    const int64_t token = last - m;
    weights[token] =
        two_sigma_squared > 0 ? exp(__ddiv_rn(-weights[token], two_sigma_squared)) : 1.0;
  }
  __syncwarp();
  double weight_sum = 0;
  if (lane == 0) {
    for (int64_t m = 0; m < size; ++m) weight_sum = __dadd_rn(weight_sum, weights[last - m]);
  }
  weight_sum = __shfl_sync(0xffffffffu, weight_sum, 0);
  const double value_scale = params.scale_values_by_set_size ? static_cast<double>(size) : 1.0;
  for (int d = lane; d < dim; d += 32) {
    double key_sum = 0;
    double value_sum = 0;
    for (int64_t m = 0; m < size; ++m) {
      const int64_t token = last - m;
      const double weight = __ddiv_rn(weights[token], weight_sum);
      const size_t member = RowStart(shape, num_tokens, merge_head.head, token) + d;
      key_sum = __dadd_rn(key_sum, __dmul_rn(weight, LoadAsFloat(job.keys, member, dtype)));
      value_sum = __dadd_rn(value_sum, __dmul_rn(weight, LoadAsFloat(job.values, member, dtype)));
    }
    StoreFromFloat(key_out, d, __double2float_rn(key_sum), dtype);
    StoreFromFloat(value_out, d, __double2float_rn(__dmul_rn(value_sum, value_scale)), dtype);
  }
}

// merge_nearest pass 2: marks the kept tokens and computes their keys' norms.
__global__ void __launch_bounds__(kMergeThreads) NearestKeptKernel(const MergeParams params) {
  const MergeHead merge_head = params.heads[blockIdx.y];
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row >= params.head_rows[blockIdx.y]) return;
  const int64_t out = params.head_first_row[blockIdx.y] + row;
  const int64_t num_tokens = merge_head.num_tokens;
  int64_t position = params.positions[out];
  position = position < 0 ? 0 : (position >= num_tokens ? num_tokens - 1 : position);
  params.flags[merge_head.token_base + position] = 1;
  const BatchShape& shape = params.shape;
  const size_t start = RowStart(shape, num_tokens, merge_head.head, position);
  params.kept_norms[out] = __dsqrt_rn(
      RowDot(params.jobs[merge_head.job].keys, start, start, shape.head_dim, shape.dtype));
}

// merge_nearest pass 3, a thread per token: the kept row whose key is most cosine-similar
// (the first of equals, i.e. the lowest position), as the sort key (head, row).
__global__ void __launch_bounds__(kAssignThreads) NearestAssignKernel(const MergeParams params) {
  const MergeHead merge_head = params.heads[blockIdx.y];
  const int64_t token = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t num_tokens = merge_head.num_tokens;
  if (token >= num_tokens) return;
  const int64_t index = merge_head.token_base + token;
  const uint64_t head_bits = static_cast<uint64_t>(blockIdx.y) << 32;
  params.sort_values[index] = static_cast<int32_t>(token);
  if (params.flags[index] != 0) {
    params.sort_keys[index] = head_bits | 0xffffffffu;  // kept: after every row's tokens
    return;
  }
  const BatchShape& shape = params.shape;
  const int dim = shape.head_dim;
  const DType dtype = shape.dtype;
  const std::byte* keys = params.jobs[merge_head.job].keys;
  const size_t own = RowStart(shape, num_tokens, merge_head.head, token);
  const double norm = __dsqrt_rn(RowDot(keys, own, own, dim, dtype));
  const int32_t rows = params.head_rows[blockIdx.y];
  const int64_t first_row = params.head_first_row[blockIdx.y];
  int32_t best = 0;
  double best_similarity = -INFINITY;
  for (int32_t row = 0; row < rows; ++row) {
    int64_t position = params.positions[first_row + row];
    position = position < 0 ? 0 : (position >= num_tokens ? num_tokens - 1 : position);
    const double denominator = __dmul_rn(norm, params.kept_norms[first_row + row]);
    double similarity = 0.0;
    if (denominator > 0) {
      const size_t kept = RowStart(shape, num_tokens, merge_head.head, position);
      similarity = __ddiv_rn(RowDot(keys, own, kept, dim, dtype), denominator);
    }
    if (similarity > best_similarity) {  // strict: ties keep the lower position
      best_similarity = similarity;
      best = row;
    }
  }
  params.sort_keys[index] = head_bits | static_cast<uint32_t>(best);
}

// The first index in [begin, end) whose key's low 32 bits are ≥ `row` (keys ascending).
__device__ int64_t LowerBound(const uint64_t* keys, int64_t begin, int64_t end, uint32_t row) {
  while (begin < end) {
    const int64_t middle = begin + (end - begin) / 2;
    if (static_cast<uint32_t>(keys[middle]) < row) {
      begin = middle + 1;
    } else {
      end = middle;
    }
  }
  return begin;
}

// merge_nearest pass 5, a warp per kept row: its merged count and averaged value.
__global__ void __launch_bounds__(kMergeThreads) NearestValuesKernel(const MergeParams params) {
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kMergeRowsPerBlock + (threadIdx.x >> 5);
  const MergeHead merge_head = params.heads[blockIdx.y];
  if (row >= params.head_rows[blockIdx.y]) return;  // the whole warp
  const int64_t out = params.head_first_row[blockIdx.y] + row;
  const int64_t begin = merge_head.token_base;
  const int64_t end = begin + merge_head.num_tokens;
  const int64_t first = LowerBound(params.sorted_keys, begin, end, static_cast<uint32_t>(row));
  const int64_t last = LowerBound(params.sorted_keys, first, end, static_cast<uint32_t>(row + 1));
  const int64_t merged = 1 + (last - first);
  if (lane == 0) params.merged[out] = static_cast<int32_t>(merged);
  if (merged == 1) return;
  const BatchShape& shape = params.shape;
  const DType dtype = shape.dtype;
  const int dim = shape.head_dim;
  const int64_t num_tokens = merge_head.num_tokens;
  const std::byte* values = params.jobs[merge_head.job].values;
  int64_t position = params.positions[out];
  position = position < 0 ? 0 : (position >= num_tokens ? num_tokens - 1 : position);
  const size_t kept_row = RowStart(shape, num_tokens, merge_head.head, position);
  std::byte* value_out = params.out_values + out * dim * DTypeSize(dtype);
  for (int d = lane; d < dim; d += 32) {
    double sum = LoadAsFloat(values, kept_row + d, dtype);
    for (int64_t i = first; i < last; ++i) {
      const int64_t token = params.sorted_values[i];
      sum = __dadd_rn(sum,
                      static_cast<double>(LoadAsFloat(
                          values, RowStart(shape, num_tokens, merge_head.head, token) + d, dtype)));
    }
    StoreFromFloat(value_out, d, __double2float_rn(__ddiv_rn(sum, static_cast<double>(merged))),
                   dtype);
  }
}

unsigned BlocksFor(int64_t count, int per_block) {
  return static_cast<unsigned>((count + per_block - 1) / per_block);
}

}  // namespace

cudaError_t LaunchFillOnes(int32_t* values, int64_t count, cudaStream_t stream) {
  if (count == 0) return cudaSuccess;
  FillOnesKernel<<<BlocksFor(count, kMergeThreads), kMergeThreads, 0, stream>>>(values, count);
  return cudaGetLastError();
}

cudaError_t LaunchSimilarLinks(const MergeParams& params, int64_t max_tokens, cudaStream_t stream) {
  if (params.num_heads == 0 || max_tokens == 0) return cudaSuccess;
  const dim3 grid(BlocksFor(max_tokens, kMergeThreads), static_cast<unsigned>(params.num_heads));
  SimilarLinksKernel<<<grid, kMergeThreads, 0, stream>>>(params);
  return cudaGetLastError();
}

cudaError_t MergeSortTempBytes(int64_t num_items, int end_bit, size_t* bytes) {
  *bytes = 0;
  return cub::DeviceRadixSort::SortPairs(
      nullptr, *bytes, static_cast<const uint64_t*>(nullptr), static_cast<uint64_t*>(nullptr),
      static_cast<const int32_t*>(nullptr), static_cast<int32_t*>(nullptr),
      static_cast<int>(num_items), 0, end_bit);
}

cudaError_t LaunchMergeSort(const MergeParams& params, void* temp, size_t temp_bytes,
                            int64_t num_items, int end_bit, cudaStream_t stream) {
  if (num_items == 0) return cudaSuccess;
  const cudaError_t error = cub::DeviceRadixSort::SortPairs(
      temp, temp_bytes, params.sort_keys, const_cast<uint64_t*>(params.sorted_keys),
      params.sort_values, const_cast<int32_t*>(params.sorted_values), static_cast<int>(num_items),
      0, end_bit, stream);
  if (error != cudaSuccess) return error;
  return cudaGetLastError();
}

cudaError_t LaunchRanks(const MergeParams& params, int64_t num_items, cudaStream_t stream) {
  if (num_items == 0) return cudaSuccess;
  RanksKernel<<<BlocksFor(num_items, kMergeThreads), kMergeThreads, 0, stream>>>(params, num_items);
  return cudaGetLastError();
}

cudaError_t LaunchSimilarSets(const MergeParams& params, cudaStream_t stream) {
  if (params.num_heads == 0) return cudaSuccess;
  SimilarSetsKernel<<<params.num_heads, kSetsThreads, 0, stream>>>(params);
  return cudaGetLastError();
}

cudaError_t LaunchMergeHeadRows(const MergeParams& params, MergeRowsSource source,
                                cudaStream_t stream) {
  if (params.num_heads == 0) return cudaSuccess;
  MergeHeadRowsKernel<<<BlocksFor(params.num_heads, kMergeThreads), kMergeThreads, 0, stream>>>(
      params, source);
  return cudaGetLastError();
}

cudaError_t LaunchSimilarRows(const MergeParams& params, int64_t max_rows, cudaStream_t stream) {
  if (params.num_heads == 0 || max_rows == 0) return cudaSuccess;
  const dim3 grid(BlocksFor(max_rows, kMergeRowsPerBlock), static_cast<unsigned>(params.num_heads));
  SimilarRowsKernel<<<grid, kMergeThreads, 0, stream>>>(params);
  return cudaGetLastError();
}

cudaError_t LaunchNearestKept(const MergeParams& params, int64_t max_rows, cudaStream_t stream) {
  if (params.num_heads == 0 || max_rows == 0) return cudaSuccess;
  const dim3 grid(BlocksFor(max_rows, kMergeThreads), static_cast<unsigned>(params.num_heads));
  NearestKeptKernel<<<grid, kMergeThreads, 0, stream>>>(params);
  return cudaGetLastError();
}

cudaError_t LaunchNearestAssign(const MergeParams& params, int64_t max_tokens,
                                cudaStream_t stream) {
  if (params.num_heads == 0 || max_tokens == 0) return cudaSuccess;
  const dim3 grid(BlocksFor(max_tokens, kAssignThreads), static_cast<unsigned>(params.num_heads));
  NearestAssignKernel<<<grid, kAssignThreads, 0, stream>>>(params);
  return cudaGetLastError();
}

cudaError_t LaunchNearestValues(const MergeParams& params, int64_t max_rows, cudaStream_t stream) {
  if (params.num_heads == 0 || max_rows == 0) return cudaSuccess;
  const dim3 grid(BlocksFor(max_rows, kMergeRowsPerBlock), static_cast<unsigned>(params.num_heads));
  NearestValuesKernel<<<grid, kMergeThreads, 0, stream>>>(params);
  return cudaGetLastError();
}

}  // namespace kvcompress::cuda
