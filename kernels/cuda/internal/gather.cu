// Gathers the kept K and V rows of every segment into the ragged output, byte for byte.
#include "kernels/cuda/internal/device_utils.cuh"
#include "kernels/cuda/internal/kernel_params.h"

namespace kvcompress::cuda {
namespace {

constexpr int kGatherThreads = 256;

__global__ void __launch_bounds__(kGatherThreads) GatherKernel(const GatherParams params) {
  const Segment& segment = params.segments[blockIdx.y];
  const int64_t first_row = static_cast<int64_t>(blockIdx.x) * kGatherRowsPerBlock;
  if (first_row >= segment.need) return;
  const DeviceJob& job = params.jobs[segment.job];
  const BatchShape shape = params.shape;
  const int element_size = static_cast<int>(DTypeSize(shape.dtype));
  const int row_bytes = shape.head_dim * element_size;
  const int chunk_shift = __ffs(row_bytes / 16) - 1;  // row_bytes / 16 is a power of two
  const int chunks = 1 << chunk_shift;
  const int64_t remaining = segment.need - first_row;
  const int rows =
      remaining < kGatherRowsPerBlock ? static_cast<int>(remaining) : kGatherRowsPerBlock;
  const int32_t* positions = params.positions + segment.out_row + first_row;
  // A flat segment (adaptive head budgets) spans every head; each row names its own.
  const bool flat = segment.tokens_per_head > 0;
  const int64_t num_tokens = flat ? segment.tokens_per_head : segment.num_tokens;
  const int32_t* row_heads = flat ? params.row_heads + segment.out_row + first_row : nullptr;
  for (int index = threadIdx.x; index < rows * chunks; index += blockDim.x) {
    const int row = index >> chunk_shift;
    const int chunk = index & (chunks - 1);
    // Positions and heads come from the compaction; clamping keeps a selection bug from
    // reading out of bounds (the tests compare every row with the input row at its position).
    const int64_t position =
        min(max(static_cast<int64_t>(positions[row]), int64_t{0}), num_tokens - 1);
    const int head = flat ? min(max(row_heads[row], 0), shape.num_kv_heads - 1) : segment.head;
    const size_t source = RowElementOffset(shape.layout, shape.num_kv_heads, num_tokens,
                                           shape.head_dim, head, position) *
                              element_size +
                          static_cast<size_t>(chunk) * 16;
    const size_t target =
        static_cast<size_t>(segment.out_row + first_row + row) * row_bytes + chunk * 16;
    const uint4 key = __ldg(reinterpret_cast<const uint4*>(job.keys + source));
    const uint4 value = __ldg(reinterpret_cast<const uint4*>(job.values + source));
    *reinterpret_cast<uint4*>(params.out_keys + target) = key;
    *reinterpret_cast<uint4*>(params.out_values + target) = value;
  }
}

}  // namespace

cudaError_t LaunchGather(const GatherParams& params, int num_segments, int64_t max_need,
                         cudaStream_t stream) {
  if (num_segments == 0 || max_need == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>((max_need + kGatherRowsPerBlock - 1) / kGatherRowsPerBlock),
                  static_cast<unsigned>(num_segments));
  GatherKernel<<<grid, kGatherThreads, 0, stream>>>(params);
  return cudaGetLastError();
}

}  // namespace kvcompress::cuda
