// Per-head top-n selection with the CPU's exact order (higher score, then lower position; NaN
// as −inf) and the fused compaction into ascending positions.
//
// Scores map to 32-bit keys that order like (score desc); a three-pass radix select (12, 12
// and 8 bits, MSB first) finds each segment's threshold key u* and the count of tokens strictly
// better. Tokens below u* are kept; among tokens equal to u* the lowest positions fill what is
// left, which the compaction resolves with a block scan in position order — so positions
// break every tie exactly as the CPU does. Each pass spreads a segment over slices (blocks);
// the last block of a segment to finish (atomic ticket) picks the digit for the next pass.
#include "kernels/cuda/internal/device_utils.cuh"
#include "kernels/cuda/internal/kernel_params.h"

namespace kvcompress::cuda {
namespace {

constexpr int kSelectThreads = 256;

__device__ __forceinline__ int RadixShift(int pass) { return pass == 0 ? 20 : (pass == 1 ? 8 : 0); }
__device__ __forceinline__ int RadixBits(int pass) { return pass == 2 ? 8 : 12; }

__device__ __forceinline__ const float* SegmentScores(const float* scores, const Segment& segment) {
  return scores + segment.score_offset + static_cast<int64_t>(segment.head) * segment.num_tokens;
}

// The selection key of `token` in `segment`: a flat segment's safeguarded tokens take key 0,
// which no score reaches (+inf maps to 0x007fffff), so they rank before every score.
__device__ __forceinline__ uint32_t SegmentKey(const Segment& segment, const float* scores,
                                               const uint8_t* tiers, int64_t token) {
  if (segment.tokens_per_head > 0 && segment.tier_offset >= 0 &&
      tiers[segment.tier_offset + token] != 0) {
    return 0u;
  }
  return SelectionKey(scores[token]);
}

__global__ void __launch_bounds__(kSelectThreads) RadixSelectPassKernel(const SelectParams params) {
  __shared__ uint32_t histogram[kRadixBins];
  __shared__ int64_t scan_scratch[33];
  __shared__ bool is_last;
  const SliceItem item = params.slices[blockIdx.x];
  const Segment& segment = params.segments[item.segment];
  if (segment.kind != SegmentKind::kSelect) return;
  SelectState* state = params.states + item.segment;
  const int shift = RadixShift(params.pass);
  const int bins = 1 << RadixBits(params.pass);
  const uint32_t digit_mask = static_cast<uint32_t>(bins - 1);
  const uint32_t prefix = state->prefix;
  const uint32_t mask = state->mask;

  for (int bin = threadIdx.x; bin < bins; bin += blockDim.x) histogram[bin] = 0;
  __syncthreads();
  const float* scores = SegmentScores(params.scores, segment);
  // Warp-aggregated counting: scores crowd into few bins (the first pass sees only sign,
  // exponent and 3 mantissa bits), so lanes with the same digit add once, through a leader.
  const int lane = threadIdx.x & 31;
  for (int64_t tile = item.begin; tile < item.end; tile += blockDim.x) {
    const int64_t token = tile + threadIdx.x;
    const uint32_t key = token < item.end ? SegmentKey(segment, scores, params.tiers, token) : 0u;
    const bool counted = token < item.end && (key & mask) == prefix;
    const uint32_t digit = counted ? (key >> shift) & digit_mask : 0xffffffffu;
    const unsigned peers = __match_any_sync(0xffffffffu, digit);
    if (counted && lane == __ffs(peers) - 1) atomicAdd(&histogram[digit], __popc(peers));
  }
  __syncthreads();
  uint32_t* global_histogram = params.histograms + static_cast<int64_t>(item.segment) * kRadixBins;
  for (int bin = threadIdx.x; bin < bins; bin += blockDim.x) {
    if (histogram[bin] != 0) atomicAdd(&global_histogram[bin], histogram[bin]);
  }
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) {
    is_last = atomicAdd(&state->ticket, 1u) == static_cast<uint32_t>(segment.num_slices - 1);
  }
  __syncthreads();
  if (!is_last) return;
  __threadfence();

  // The last block: find the digit holding the rank-th smallest key among those matching.
  const int64_t rank = segment.need - state->less;  // 1-based
  const int per_thread = bins / blockDim.x;
  const int first_bin = threadIdx.x * per_thread;
  int64_t local = 0;
  for (int k = 0; k < per_thread; ++k) local += __ldcg(&global_histogram[first_bin + k]);
  int64_t total = 0;
  const int64_t before = BlockExclusiveScan(local, scan_scratch, total);
  if (before < rank && rank <= before + local) {
    int64_t cumulative = before;
    for (int k = 0; k < per_thread; ++k) {
      const int64_t count = __ldcg(&global_histogram[first_bin + k]);
      if (cumulative + count >= rank) {
        const uint32_t digit = static_cast<uint32_t>(first_bin + k);
        state->prefix = prefix | (digit << shift);
        state->mask = mask | (digit_mask << shift);
        state->less += cumulative;
        break;
      }
      cumulative += count;
    }
  }
  __syncthreads();
  for (int bin = threadIdx.x; bin < bins; bin += blockDim.x) global_histogram[bin] = 0;
  if (threadIdx.x == 0) state->ticket = 0;
}

__global__ void __launch_bounds__(kSelectThreads) SliceCountsKernel(const SelectParams params) {
  __shared__ int64_t scratch[33];
  const SliceItem item = params.slices[blockIdx.x];
  const Segment& segment = params.segments[item.segment];
  if (segment.kind != SegmentKind::kSelect) return;
  const uint32_t threshold = params.states[item.segment].prefix;
  const float* scores = SegmentScores(params.scores, segment);
  int64_t less = 0;
  int64_t equal = 0;
  for (int64_t token = item.begin + threadIdx.x; token < item.end; token += blockDim.x) {
    const uint32_t key = SegmentKey(segment, scores, params.tiers, token);
    less += key < threshold;
    equal += key == threshold;
  }
  // Pack both counts (each < 2^31) into one 64-bit sum.
  const int64_t packed = BlockSum<int64_t>(less | (equal << 32), scratch);
  if (threadIdx.x == 0) {
    params.slice_counts[blockIdx.x] =
        SliceCounts{static_cast<int32_t>(packed & 0xffffffff), static_cast<int32_t>(packed >> 32)};
  }
}

__global__ void __launch_bounds__(kSelectThreads) CompactKernel(const CompactParams params) {
  __shared__ int32_t scan_scratch[33];
  __shared__ double mass_scratch[33];
  const SliceItem item = params.slices[blockIdx.x];
  const Segment& segment = params.segments[item.segment];
  int32_t* out = params.positions + segment.out_row;
  const bool add_mass = segment.has_attention != 0;
  const bool flat = segment.tokens_per_head > 0;
  // A flat segment's token is head·T + position; a per-head segment's is the position.
  const int64_t head_tokens = flat ? segment.tokens_per_head : segment.num_tokens;
  const float* job_sums = nullptr;
  int num_qblocks = 0;
  if (add_mass) {
    const DeviceJob& job = params.jobs[segment.job];
    num_qblocks = params.shape.group_size * job.qblocks_per_member;
    job_sums = params.colsum + job.colsum_offset;
  }
  const auto key_mass = [&](int64_t head, int64_t position) {
    const float* key_sums = job_sums + head * num_qblocks * head_tokens;
    double sum = 0.0;
    for (int qb = 0; qb < num_qblocks; ++qb) sum += key_sums[qb * head_tokens + position];
    return sum;
  };
  // Writes the kept `token` to output row `index`.
  const auto keep = [&](int64_t index, int64_t token) {
    int64_t head = segment.head;
    int64_t position = token;
    if (flat) {
      head = token / head_tokens;
      position = token - head * head_tokens;
      params.row_heads[segment.out_row + index] = static_cast<int32_t>(head);
    }
    out[index] = static_cast<int32_t>(position);
    return add_mass ? key_mass(head, position) : 0.0;
  };
  double mass = 0.0;

  if (segment.kind == SegmentKind::kKeepAll) {
    for (int64_t token = item.begin + threadIdx.x; token < item.end; token += blockDim.x) {
      mass += keep(token, token);
    }
  } else if (segment.kind == SegmentKind::kRanges) {
    const int64_t first_end = segment.range_first_end;
    const int64_t second_begin = segment.range_second_begin;
    const int64_t second_end = second_begin + (segment.need - first_end);
    for (int64_t token = item.begin + threadIdx.x; token < item.end; token += blockDim.x) {
      int64_t index = -1;
      if (token < first_end) {
        index = token;
      } else if (token >= second_begin && token < second_end) {
        index = first_end + (token - second_begin);
      }
      if (index >= 0) mass += keep(index, token);
    }
  } else {
    int64_t less_before = 0;
    int64_t equal_before = 0;
    for (int slice = segment.first_slice; slice < static_cast<int>(blockIdx.x); ++slice) {
      less_before += params.slice_counts[slice].less;
      equal_before += params.slice_counts[slice].equal;
    }
    const SelectState state = params.states[item.segment];
    const uint32_t threshold = state.prefix;
    const int64_t equal_wanted = segment.need - state.less;
    const float* scores = SegmentScores(params.scores, segment);
    for (int64_t tile = item.begin; tile < item.end; tile += blockDim.x) {
      const int64_t token = tile + threadIdx.x;
      const bool valid = token < item.end;
      const uint32_t key = valid ? SegmentKey(segment, scores, params.tiers, token) : 0xffffffffu;
      const bool is_less = valid && key < threshold;
      const bool is_equal = valid && key == threshold;
      const int32_t flags = (is_less ? 1 : 0) | (is_equal ? (1 << 16) : 0);
      int32_t tile_total = 0;
      const int32_t exclusive = BlockExclusiveScan(flags, scan_scratch, tile_total);
      const int64_t my_less = less_before + (exclusive & 0xffff);
      const int64_t my_equal = equal_before + (exclusive >> 16);
      const bool kept = is_less || (is_equal && my_equal < equal_wanted);
      if (kept) {
        const int64_t index = my_less + (my_equal < equal_wanted ? my_equal : equal_wanted);
        mass += keep(index, token);
      }
      if (flat) {
        // Kept rows per head, one atomic per (warp, head): a tile's tokens mostly share a head.
        const int head = kept ? static_cast<int>(token / head_tokens) : -1;
        const unsigned peers = __match_any_sync(0xffffffffu, head);
        if (kept && (threadIdx.x & 31) == __ffs(peers) - 1) {
          atomicAdd(
              &params.head_counts[static_cast<int64_t>(segment.job) * params.shape.num_kv_heads +
                                  head],
              __popc(peers));
        }
      }
      less_before += tile_total & 0xffff;
      equal_before += tile_total >> 16;
    }
  }
  if (add_mass) {
    const double total = BlockSum<double>(mass, mass_scratch);
    if (threadIdx.x == 0) atomicAdd(&params.mass[segment.job], total);
  }
}

constexpr int kMarkThreads = 256;

__global__ void __launch_bounds__(kMarkThreads) MarkTiersKernel(const MarkTiersParams params) {
  const Segment& segment = params.segments[blockIdx.y];
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kMarkThreads + threadIdx.x;
  if (row >= segment.need) return;
  const int64_t position = params.positions[segment.out_row + row];
  params.tiers[segment.tier_offset + static_cast<int64_t>(segment.head) * segment.num_tokens +
               position] = 1;
}

}  // namespace

cudaError_t LaunchMarkTiers(const MarkTiersParams& params, int num_segments, int64_t max_need,
                            cudaStream_t stream) {
  if (num_segments == 0 || max_need == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>((max_need + kMarkThreads - 1) / kMarkThreads),
                  static_cast<unsigned>(num_segments));
  MarkTiersKernel<<<grid, kMarkThreads, 0, stream>>>(params);
  return cudaGetLastError();
}

cudaError_t LaunchRadixSelectPass(const SelectParams& params, cudaStream_t stream) {
  if (params.num_slices == 0) return cudaSuccess;
  RadixSelectPassKernel<<<params.num_slices, kSelectThreads, 0, stream>>>(params);
  return cudaGetLastError();
}

cudaError_t LaunchSliceCounts(const SelectParams& params, cudaStream_t stream) {
  if (params.num_slices == 0) return cudaSuccess;
  SliceCountsKernel<<<params.num_slices, kSelectThreads, 0, stream>>>(params);
  return cudaGetLastError();
}

cudaError_t LaunchCompact(const CompactParams& params, cudaStream_t stream) {
  if (params.num_slices == 0) return cudaSuccess;
  CompactKernel<<<params.num_slices, kSelectThreads, 0, stream>>>(params);
  return cudaGetLastError();
}

}  // namespace kvcompress::cuda
