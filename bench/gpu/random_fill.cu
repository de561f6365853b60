// Fills device buffers with pseudo-random bf16/fp16/fp32 values (about normal, none zero) for
// the GPU benchmark, so that timing never runs on zeros.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "bench/gpu/random_fill.h"

namespace kvcompress::bench {
namespace {

__device__ __forceinline__ uint64_t Mix(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

__global__ void FillKernel(void* data, size_t count, int element_size, uint64_t seed, float scale) {
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < count;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    const uint64_t bits = Mix(seed * 0x9e3779b97f4a7c15ull + i);
    // Sum of four uniforms: roughly normal, mean 0, variance 1/3 · 4 → scale to 1.
    float sum = 0.0f;
    for (int k = 0; k < 4; ++k) sum += static_cast<float>((bits >> (16 * k)) & 0xffff) / 65535.0f;
    float value = (sum - 2.0f) * 1.7320508f * scale;
    if (value == 0.0f) value = 0.5f * scale;
    if (element_size == 4) {
      static_cast<float*>(data)[i] = value;
    } else if (element_size == 2) {
      static_cast<__nv_bfloat16*>(data)[i] = __float2bfloat16(value);
    } else {
      static_cast<__half*>(data)[i] = __float2half(value);
    }
  }
}

}  // namespace

cudaError_t FillRandom(void* data, size_t count, DType dtype, uint64_t seed, float scale) {
  const int element_size = dtype == DType::kFloat32 ? 4 : (dtype == DType::kBFloat16 ? 2 : 3);
  FillKernel<<<4096, 256>>>(data, count, element_size, seed, scale);
  return cudaGetLastError();
}

}  // namespace kvcompress::bench
