// MakeCudaBackend in a build without CUDA.
#include "kernels/cuda_backend.h"

namespace kvcompress {

bool CudaBackendCompiled() { return false; }

CudaCompressor* CudaCompressorOf(Backend& backend) {
  (void)backend;
  return nullptr;
}

absl::StatusOr<std::unique_ptr<Backend>> MakeCudaBackend(const CudaBackendOptions& options) {
  (void)options;
  return absl::UnimplementedError(
      "the cuda backend is not part of this build (configure with a CUDA toolkit and "
      "KVC_ENABLE_CUDA=ON)");
}

}  // namespace kvcompress
