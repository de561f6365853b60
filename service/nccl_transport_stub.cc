// The nccl transport in a build without CUDA or NCCL.
#include "service/nccl_transport.h"

namespace kvcompress {
namespace {

absl::Status NotBuilt() {
  return absl::UnimplementedError(
      "transport nccl is not part of this build of kvcd (built without CUDA or NCCL); use "
      "TRANSPORT_CUDA_IPC on the same node or TRANSPORT_INLINE");
}

}  // namespace

bool NcclCompiled() { return false; }

absl::StatusOr<std::unique_ptr<NcclLink>> MakeNcclLink(Backend& backend,
                                                       absl::string_view unique_id,
                                                       ChannelDirection direction) {
  (void)backend, (void)unique_id, (void)direction;
  return NotBuilt();
}

absl::StatusOr<ReceivedDeviceLayer> ReceiveDeviceLayer(Backend& backend, NcclLink& link,
                                                       const CacheGeometry& geometry,
                                                       const DeviceLayerInput& layer,
                                                       absl::Time deadline) {
  (void)backend, (void)link, (void)geometry, (void)layer, (void)deadline;
  return NotBuilt();
}

absl::Status ForwardHostLayer(Backend& device_backend, const CacheGeometry& geometry,
                              const LayerResult& result, const ForwardContext& forward) {
  (void)device_backend, (void)geometry, (void)result, (void)forward;
  return NotBuilt();
}

}  // namespace kvcompress
