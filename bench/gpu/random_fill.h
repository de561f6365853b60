// Device-side random fill for the GPU benchmark.
#ifndef KVCOMPRESS_BENCH_GPU_RANDOM_FILL_H_
#define KVCOMPRESS_BENCH_GPU_RANDOM_FILL_H_

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "kernels/dtype.h"

namespace kvcompress::bench {

// `count` elements of `dtype` at `data`, about normal(0, scale²), none zero; default stream.
cudaError_t FillRandom(void* data, size_t count, DType dtype, uint64_t seed, float scale);

}  // namespace kvcompress::bench

#endif  // KVCOMPRESS_BENCH_GPU_RANDOM_FILL_H_
