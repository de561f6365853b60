// CUDA runtime errors as absl::Status, at the edge of kernels/cuda.
//
// Launchers and CUDA runtime calls return cudaError_t; KVC_CUDA_RETURN_IF_ERROR is the one
// place that turns a failure into absl::InternalError naming the call, its site and the
// runtime's message. Thread-safe.
#ifndef KVCOMPRESS_KERNELS_CUDA_CUDA_STATUS_H_
#define KVCOMPRESS_KERNELS_CUDA_CUDA_STATUS_H_

#include <cuda_runtime_api.h>

#include "absl/status/status.h"

namespace kvcompress::cuda {

// INTERNAL: "<expression> failed at <file>:<line>: <cudaGetErrorName>: <cudaGetErrorString>".
// Also clears the runtime's last (non-sticky) error so that later calls start clean.
absl::Status CudaErrorToStatus(cudaError_t error, const char* expression, const char* file,
                               int line);

}  // namespace kvcompress::cuda

// Returns absl::InternalError from the enclosing function when `expr` is not cudaSuccess.
#define KVC_CUDA_RETURN_IF_ERROR(expr)                                                   \
  do {                                                                                   \
    const cudaError_t kvc_cuda_error = (expr);                                           \
    if (kvc_cuda_error != cudaSuccess) {                                                 \
      return ::kvcompress::cuda::CudaErrorToStatus(kvc_cuda_error, #expr, __FILE__, __LINE__); \
    }                                                                                    \
  } while (false)

#endif  // KVCOMPRESS_KERNELS_CUDA_CUDA_STATUS_H_
