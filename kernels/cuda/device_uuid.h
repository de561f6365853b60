// A CUDA device's UUID as nvidia-smi prints it ("GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx").
// CUDA IPC clients name their device by it (ordinals differ between processes) and kvcd
// finds its own ordinal for that device by it. Header-only: the client's CUDA library and
// kvcd's transport share it without linking the kernels.
#ifndef KVCOMPRESS_KERNELS_CUDA_DEVICE_UUID_H_
#define KVCOMPRESS_KERNELS_CUDA_DEVICE_UUID_H_

#include <cuda_runtime_api.h>

#include <string>

#include "absl/strings/str_format.h"

namespace kvcompress::cuda {

inline std::string DeviceUuidString(const cudaUUID_t& uuid) {
  const auto* b = reinterpret_cast<const unsigned char*>(uuid.bytes);
  return absl::StrFormat("GPU-%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x",
                         b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7], b[8], b[9], b[10], b[11],
                         b[12], b[13], b[14], b[15]);
}

}  // namespace kvcompress::cuda

#endif  // KVCOMPRESS_KERNELS_CUDA_DEVICE_UUID_H_
