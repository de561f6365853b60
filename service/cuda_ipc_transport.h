// The cuda_ipc transport (same node, GPU-direct): a client's device memory, exported with
// cudaIpcGetMemHandle and registered on a channel (channel_registry.h), is opened once per
// region in kvcd's address space and compressed in place.
//
// MakeCudaIpcResources gives a channel its ChannelResources: OpenRegion maps the client's
// device (by UUID, else PCI bus id, else ordinal) to kvcd's ordinal, requires it to be the
// CUDA backend's device, and calls cudaIpcOpenMemHandle with cudaIpcMemLazyEnablePeerAccess;
// Release closes every handle (cudaIpcCloseMemHandle). CompressDeviceLayers runs layers whose
// tensors lie in device memory (opened regions, or nccl receive buffers) through the CUDA
// backend's own CudaCompressor (the device pointer path) and copies the results to the host —
// the LayerResults the inline transport gives for the same tensors — or into the client's
// output slices, or forwards them; the device memory the call takes from the backend's pool
// (scratch and results) is released before it returns, on success and on failure.
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
#include <span>
#include <vector>

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

struct ForwardContext;  // nccl_transport.h

// One device-resident layer to compress, with the token budget and keep_all that
// CompressionPipeline decides for it.
struct DeviceLayerTask {
  DeviceLayerInput input;
  int64_t tokens_per_head = 0;
  bool keep_all = false;
};

// Compresses `tasks` on `backend` (the CUDA backend) in one CudaCompressor call — one launch
// sequence for all of them, which is what makes a stream's ready layers cheap together — and
// returns one result per task, in order:
//  - forward null, input.output null: the tensors copied to the host (the inline answer);
//  - input.output set: the tensors written there (OutputLayoutFor), in_output_region set,
//    INVALID_ARGUMENT when a result does not fit its slice;
//  - forward set: every result sent from device memory to the forward channel, all in one
//    ForwardOutbox::DeliverAll (one NCCL group); the results carry counts, no tensors.
// The device memory the call takes from the backend's pool is released before it returns,
// on success and on failure. Errors as CudaCompressor::Compress.
absl::StatusOr<std::vector<LayerResult>> CompressDeviceLayers(
    Backend& backend, const CacheGeometry& geometry, const MethodSpec& spec,
    std::span<const DeviceLayerTask> tasks, const ForwardContext* forward);

}  // namespace kvcompress

#endif  // KVCOMPRESS_SERVICE_CUDA_IPC_TRANSPORT_H_
