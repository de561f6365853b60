// The cuda_ipc transport (same node, GPU-direct): a client's device memory, exported with
// cudaIpcGetMemHandle and registered on a channel (channel_registry.h), is opened once per
// region in kvcd's address space and compressed in place.
//
// MakeCudaIpcResources gives a channel its ChannelResources: OpenRegion maps the client's
// device (by UUID, else PCI bus id, else ordinal) to kvcd's ordinal, requires it to be the
// CUDA backend's device, and calls cudaIpcOpenMemHandle with cudaIpcMemLazyEnablePeerAccess;
// Release closes every handle (cudaIpcCloseMemHandle). CompressDeviceLayer runs one layer whose
// tensors lie in device memory through the CUDA backend's own CudaCompressor (the device
// pointer path) and copies the result to the host, giving the LayerResult the inline
// transport gives for the same tensors; the device memory the call takes from the backend's
// pool (scratch and results) is released before it returns, on success and on failure.
//
// Without CUDA in the build, MakeCudaIpcResources answers UNIMPLEMENTED and CudaIpcCompiled
// is false. FAILED_PRECONDITION when the backend is not the CUDA backend.
//
// Thread safety: the functions are thread-safe; resources are used under the channel's lock.
#ifndef KVCOMPRESS_SERVICE_CUDA_IPC_TRANSPORT_H_
#define KVCOMPRESS_SERVICE_CUDA_IPC_TRANSPORT_H_

#include <cstddef>
#include <cstdint>
#include <memory>

#include "absl/status/statusor.h"
#include "kernels/backend.h"
#include "kernels/cache_geometry.h"
#include "kernels/layer_result.h"
#include "kernels/method_spec.h"
#include "service/channel_registry.h"

namespace kvcompress {

// Whether this build contains the cuda_ipc transport.
bool CudaIpcCompiled();

// A cudaIpcMemHandle_t is 64 bytes.
inline constexpr size_t kCudaIpcHandleBytes = 64;

// Resources for a new cuda_ipc channel whose regions `backend` (the CUDA backend) reads.
absl::StatusOr<std::unique_ptr<ChannelResources>> MakeCudaIpcResources(Backend& backend);

// One layer of one sequence in device memory (addresses inside opened regions).
struct DeviceLayerInput {
  int sequence = 0;
  int layer = 0;
  SequenceShape shape;
  const std::byte* keys = nullptr;
  const std::byte* values = nullptr;
  const std::byte* queries = nullptr;  // null when shape.num_window_queries == 0
  const float* scores = nullptr;       // null when shape.num_score_heads == 0
  // cuda_ipc output slice (LayerReady.output): where the result goes; null: inline.
  std::byte* output = nullptr;
  uint64_t output_capacity = 0;
};

// Where the tensors of a result of `rows` rows lie in an output slice: keys at 0, values and
// positions each at the next multiple of 16 bytes (LayerReady.output).
struct OutputRegionLayout {
  uint64_t keys_offset = 0, values_offset = 0, positions_offset = 0, total_bytes = 0;
};
OutputRegionLayout OutputLayoutFor(uint64_t rows, uint64_t row_bytes);

// Compresses `input` on `backend` (the CUDA backend), `tokens_per_head` and `keep_all` as
// CompressionPipeline decides them for the layer. With input.output set, the result is
// written there (OutputLayoutFor) and comes back with in_output_region and empty tensors;
// INVALID_ARGUMENT when it does not fit. Errors as CudaCompressor::Compress.
absl::StatusOr<LayerResult> CompressDeviceLayer(Backend& backend, const CacheGeometry& geometry,
                                                const MethodSpec& spec,
                                                const DeviceLayerInput& input,
                                                int64_t tokens_per_head, bool keep_all);

}  // namespace kvcompress

#endif  // KVCOMPRESS_SERVICE_CUDA_IPC_TRANSPORT_H_
