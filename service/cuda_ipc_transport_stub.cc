// The cuda_ipc transport in a build without CUDA.
#include "service/cuda_ipc_transport.h"
#include "service/nccl_transport.h"

namespace kvcompress {
namespace {

absl::Status NotBuilt() {
  return absl::UnimplementedError(
      "transport cuda_ipc is not part of this build of kvcd (built without CUDA; configure with "
      "a CUDA toolkit and KVC_ENABLE_CUDA=ON); use TRANSPORT_INLINE");
}

}  // namespace

bool CudaIpcCompiled() { return false; }

absl::StatusOr<std::unique_ptr<ChannelResources>> MakeCudaIpcResources(Backend& backend) {
  (void)backend;
  return NotBuilt();
}

absl::StatusOr<std::vector<LayerResult>> CompressDeviceLayers(
    Backend& backend, const CacheGeometry& geometry, const MethodSpec& spec,
    std::span<const DeviceLayerTask> tasks, const ForwardContext* forward) {
  (void)backend, (void)geometry, (void)spec, (void)tasks, (void)forward;
  return NotBuilt();
}

}  // namespace kvcompress
