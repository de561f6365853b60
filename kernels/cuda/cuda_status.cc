#include "kernels/cuda/cuda_status.h"

#include "absl/strings/str_cat.h"

namespace kvcompress::cuda {

absl::Status CudaErrorToStatus(cudaError_t error, const char* expression, const char* file,
                               int line) {
  (void)cudaGetLastError();
  return absl::InternalError(absl::StrCat(expression, " failed at ", file, ":", line, ": ",
                                          cudaGetErrorName(error), ": ",
                                          cudaGetErrorString(error)));
}

}  // namespace kvcompress::cuda
