// Device helpers shared by the kernels of kernels/cuda: element types, PTX wrappers
// (cp.async, ldmatrix, mma.sync, ex2), swizzled shared-memory tiles and block scans.
#ifndef KVCOMPRESS_KERNELS_CUDA_INTERNAL_DEVICE_UTILS_CUH_
#define KVCOMPRESS_KERNELS_CUDA_INTERNAL_DEVICE_UTILS_CUH_

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/cache_geometry.h"
#include "kernels/dtype.h"
#include "kernels/selection_order.h"

namespace kvcompress::cuda {

template <DType kDType>
struct ElementTraits;
template <>
struct ElementTraits<DType::kFloat16> {
  static constexpr int kSize = 2;
  static constexpr bool kIsFloat32 = false;
  static constexpr bool kIsBFloat16 = false;
};
template <>
struct ElementTraits<DType::kBFloat16> {
  static constexpr int kSize = 2;
  static constexpr bool kIsFloat32 = false;
  static constexpr bool kIsBFloat16 = true;
};
template <>
struct ElementTraits<DType::kFloat32> {
  static constexpr int kSize = 4;
  static constexpr bool kIsFloat32 = true;
  static constexpr bool kIsBFloat16 = false;
};

__device__ __forceinline__ float Exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ uint32_t SharedAddress(const void* pointer) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(pointer));
}

// Copies 16 bytes global → shared asynchronously; src_bytes = 0 writes 16 zero bytes.
__device__ __forceinline__ void CpAsync16(void* shared, const void* global, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(SharedAddress(shared)),
               "l"(global), "r"(src_bytes));
}
__device__ __forceinline__ void CpAsyncCommit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int kPending>
__device__ __forceinline__ void CpAsyncWait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
}

__device__ __forceinline__ void LdMatrixX4(uint32_t (&r)[4], const void* shared) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(SharedAddress(shared)));
}

// d += a · b for one m16n8k16 tile, fp32 accumulate; a, b bf16 or fp16.
template <bool kBFloat16>
__device__ __forceinline__ void Mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                         uint32_t b1) {
  if constexpr (kBFloat16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// A shared-memory tile of rows of kChunks 16-byte chunks, the chunk index XOR-swizzled with
// the row so that 8 consecutive rows read at one logical chunk hit 8 distinct bank groups.
// Requires kChunks ≥ 8.
template <int kChunks>
struct SwizzledTile {
  static_assert(kChunks >= 8, "rows must span at least 128 bytes");
  __device__ __forceinline__ static int Offset(int row, int chunk) {
    return row * kChunks + (chunk ^ (row & 7));
  }
};

// The element offset of row (head, token) of a K or V tensor.
__device__ __forceinline__ size_t RowElementOffset(Layout layout, int num_kv_heads,
                                                   int64_t num_tokens, int head_dim, int head,
                                                   int64_t token) {
  return KeyValueRowOffset(layout, num_kv_heads, num_tokens, head_dim, head, token);
}

// The key that orders tokens for selection as unsigned integers: smaller is better (higher
// score first). NaN ranks as −inf; −0 ties with +0, as the CPU's float comparison has it.
__device__ __forceinline__ uint32_t SelectionKey(float score) {
  float value = SelectionScore(score);
  if (value == 0.0f) value = 0.0f;
  const uint32_t bits = __float_as_uint(value);
  const uint32_t ascending = (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
  return ~ascending;
}

// Exclusive scan of `value` over the block (blockDim.x a multiple of 32, ≤ 1024); `total`
// receives the block's sum. Uses `scratch` (≥ 33 entries of shared memory); ends synced.
template <typename T>
__device__ T BlockExclusiveScan(T value, T* scratch, T& total) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int num_warps = blockDim.x >> 5;
  T inclusive = value;
#pragma unroll
  for (int offset = 1; offset < 32; offset <<= 1) {
    const T other = __shfl_up_sync(0xffffffffu, inclusive, offset);
    if (lane >= offset) inclusive += other;
  }
  if (lane == 31) scratch[warp] = inclusive;
  __syncthreads();
  if (warp == 0) {
    T warp_total = lane < num_warps ? scratch[lane] : T(0);
    T warp_inclusive = warp_total;
#pragma unroll
    for (int offset = 1; offset < 32; offset <<= 1) {
      const T other = __shfl_up_sync(0xffffffffu, warp_inclusive, offset);
      if (lane >= offset) warp_inclusive += other;
    }
    if (lane < num_warps) scratch[lane] = warp_inclusive - warp_total;
    if (lane == 31) scratch[32] = warp_inclusive;
  }
  __syncthreads();
  const T result = scratch[warp] + inclusive - value;
  total = scratch[32];
  __syncthreads();
  return result;
}

template <typename T>
__device__ T BlockSum(T value, T* scratch) {
  T total;
  BlockExclusiveScan(value, scratch, total);
  return total;
}

}  // namespace kvcompress::cuda

#endif  // KVCOMPRESS_KERNELS_CUDA_INTERNAL_DEVICE_UTILS_CUH_
