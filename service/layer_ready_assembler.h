// LayerReadyAssembler: the cuda_ipc (and nccl) counterpart of StreamAssembler. It turns the
// LayerReady messages of one Compress stream into device layers, checking each against the header
// and the stream's channel: the sequence and layer exist and arrive once; keys and values are
// present, queries exactly when the sequence declares window queries, scores exactly when it
// declares score heads; every slice has the tensor's size from the header geometry, a
// 16-byte-aligned offset and lies inside a region registered on the channel
// (Channel::ResolveSlice). No byte is copied: the layer holds addresses inside the regions.
//
// Errors are INVALID_ARGUMENT naming the sequence, layer and tensor ("sequence 0 layer 3
// keys: ..."), the value received and what was expected. After an error the assembler must
// not be used further.
//
// Thread safety: none; one stream feeds one assembler. No CUDA and no gRPC inside.
#ifndef KVCOMPRESS_SERVICE_LAYER_READY_ASSEMBLER_H_
#define KVCOMPRESS_SERVICE_LAYER_READY_ASSEMBLER_H_

#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kernels/cache_geometry.h"
#include "kvcompress/v1/kvcompress.pb.h"
#include "service/channel_registry.h"
#include "service/cuda_ipc_transport.h"

namespace kvcompress {

class LayerReadyAssembler final {
 public:
  // Requirements on geometry and sequences as StreamAssembler's. `channel` (cuda_ipc) must
  // outlive the assembler (the stream holds its lease). A null channel is an nccl stream:
  // layer_ready messages must then carry no slices, and the layers come back with null
  // tensor pointers (the tensors arrive over the communicator).
  LayerReadyAssembler(const CacheGeometry& geometry, std::vector<SequenceShape> sequences,
                      const Channel* channel);
  LayerReadyAssembler(const LayerReadyAssembler&) = delete;
  LayerReadyAssembler& operator=(const LayerReadyAssembler&) = delete;

  // Accepts one message after the header: a layer_ready. Chunks, a second header or an empty
  // message are INVALID_ARGUMENT.
  absl::StatusOr<DeviceLayerInput> AddRequest(const v1::CompressRequest& request);
  absl::StatusOr<DeviceLayerInput> AddLayerReady(const v1::LayerReady& ready);

  // At half-close: OK when every layer of every sequence was announced, else INVALID_ARGUMENT
  // naming the first missing one.
  absl::Status CheckComplete() const;

  int64_t layers_completed() const { return layers_completed_; }
  // Tensor bytes the announced layers hold (for the byte counters).
  uint64_t bytes_received() const { return bytes_received_; }

 private:
  const CacheGeometry geometry_;
  const std::vector<SequenceShape> sequences_;
  const char* TransportName() const;

  const Channel* channel_;       // null: nccl
  std::vector<bool> announced_;  // [sequence * num_layers + layer]
  int64_t layers_completed_ = 0;
  uint64_t bytes_received_ = 0;
};

}  // namespace kvcompress

#endif  // KVCOMPRESS_SERVICE_LAYER_READY_ASSEMBLER_H_
