// The nccl transport (any node, GPU-direct where the fabric allows) and forwarding.
//
// A channel of this transport is a 2-rank NCCL communicator between kvcd (rank 1, on its cuda
// backend's device) and one client (rank 0), formed from the ncclUniqueId the client sends in
// OpenChannel. kvcd joins with a non-blocking communicator, so OpenChannel returns at once and
// no NCCL call can block a thread past its deadline (nccl_link.h).
//
//  - TO_KVCD channels carry caches in: for each LayerReady of a TRANSPORT_NCCL stream,
//    ReceiveDeviceLayer takes pooled device memory from the cuda backend and enqueues the
//    receives of the layer's tensors (keys, values, queries, scores); the compression job
//    waits for them and compresses in place.
//  - FROM_KVCD channels carry compressed caches out (forwarding): CompressDeviceLayers
//    (cuda_ipc_transport.h) with a ForwardContext compresses device-resident layers and sends
//    the results straight from device memory;
//    ForwardHostLayer stages a host result (the inline transport, the CPU backend) through
//    pooled device memory. Forwarded layers are ragged: keys, values [Σ kept, D], positions
//    int32 [Σ kept], merged counts int32 [Σ kept] when the result has them.
//
// Without CUDA or NCCL in the build, NcclCompiled is false and every function answers
// UNIMPLEMENTED.
#ifndef KVCOMPRESS_SERVICE_NCCL_TRANSPORT_H_
#define KVCOMPRESS_SERVICE_NCCL_TRANSPORT_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "kernels/backend.h"
#include "kernels/cache_geometry.h"
#include "kernels/layer_result.h"
#include "kernels/method_spec.h"
#include "kvcompress/v1/kvcompress.pb.h"
#include "service/channel_registry.h"
#include "service/cuda_ipc_transport.h"
#include "service/forward_outbox.h"
#include "service/nccl_link.h"

namespace kvcompress {

// Whether this build contains the nccl transport.
bool NcclCompiled();

// An ncclUniqueId is 128 bytes.
inline constexpr size_t kNcclUniqueIdBytes = 128;

// kvcd's end of a new communicator: joins `unique_id` as rank 1 of 2 on `backend`'s device
// (the CUDA backend; FAILED_PRECONDITION otherwise). INVALID_ARGUMENT for an id of the wrong
// size; INTERNAL when NCCL refuses to start joining.
absl::StatusOr<std::unique_ptr<NcclLink>> MakeNcclLink(Backend& backend,
                                                       absl::string_view unique_id,
                                                       ChannelDirection direction);

// The channel resources holding `link` (and, for FROM_KVCD, the ForwardOutbox over it).
// Regions cannot be registered on them; Release aborts the link. CUDA-free.
std::unique_ptr<ChannelResources> MakeNcclChannelResources(std::unique_ptr<NcclLink> link);

// One layer being received into pooled device memory; `input`'s pointers are valid once
// `transfer` completed and while this object lives.
struct ReceivedDeviceLayer {
  DeviceLayerInput input;
  std::shared_ptr<NcclTransfer> transfer;  // also owns the device memory
  uint64_t device_bytes = 0;               // the memory it holds
};

// Allocates the layer's tensors from `backend`'s pool and enqueues their receives on `link`
// (keys, values, then queries and scores when the shape has them). RESOURCE_EXHAUSTED over
// the device memory budget; the link's errors.
absl::StatusOr<ReceivedDeviceLayer> ReceiveDeviceLayer(Backend& backend, NcclLink& link,
                                                       const CacheGeometry& geometry,
                                                       const DeviceLayerInput& layer,
                                                       absl::Time deadline);

// What a forwarded layer needs besides its tensors.
struct ForwardContext {
  ForwardOutbox* outbox = nullptr;
  std::string request_id;
  const v1::CacheGeometry* geometry = nullptr;  // the request's, echoed in the notices
  const std::vector<v1::SequenceShape>* sequence_shapes = nullptr;  // the request's, by index
  absl::Time deadline = absl::InfiniteFuture();
};

// Forwards a host-resident result through `device_backend`'s pool (the CUDA backend).
absl::Status ForwardHostLayer(Backend& device_backend, const CacheGeometry& geometry,
                              const LayerResult& result, const ForwardContext& forward);

// The notice announcing `result` (tensors: keys, values, positions, merged when present).
v1::ForwardNotice ForwardNoticeFor(const LayerResult& result, size_t row_bytes,
                                   const ForwardContext& forward);

}  // namespace kvcompress

#endif  // KVCOMPRESS_SERVICE_NCCL_TRANSPORT_H_
