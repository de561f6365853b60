#include "client/cuda_ipc_channel.h"

#include <cuda_runtime_api.h>

#include <utility>

#include "absl/strings/str_cat.h"
#include "kernels/cuda/device_uuid.h"

namespace kvcompress {
namespace {

absl::Status CudaError(cudaError_t error, const char* what) {
  (void)cudaGetLastError();
  return absl::InvalidArgumentError(absl::StrCat(what, ": ", cudaGetErrorString(error)));
}

}  // namespace

absl::StatusOr<std::unique_ptr<CudaIpcChannel>> OpenCudaIpcChannel(
    Client& client, const CudaIpcChannelOptions& options) {
  v1::OpenChannelRequest request;
  request.set_transport(v1::TRANSPORT_CUDA_IPC);
  request.set_idle_timeout_seconds(
      static_cast<uint32_t>(absl::ToInt64Seconds(options.idle_timeout)));
  absl::StatusOr<v1::OpenChannelResponse> response = client.OpenChannel(request);
  if (!response.ok()) return response.status();
  return std::unique_ptr<CudaIpcChannel>(new CudaIpcChannel(client, response->channel_id()));
}

CudaIpcChannel::~CudaIpcChannel() { Close().IgnoreError(); }

absl::Status CudaIpcChannel::Close() {
  {
    absl::MutexLock lock(&mu_);
    if (closed_) return absl::OkStatus();
    closed_ = true;
  }
  return client_.CloseChannel(id_);
}

absl::StatusOr<uint32_t> CudaIpcChannel::RegisterRegion(const void* device_ptr, size_t bytes) {
  cudaPointerAttributes attributes{};
  if (cudaError_t error = cudaPointerGetAttributes(&attributes, device_ptr); error != cudaSuccess) {
    return CudaError(error, "RegisterRegion: cudaPointerGetAttributes");
  }
  if (attributes.type != cudaMemoryTypeDevice) {
    return absl::InvalidArgumentError(
        "RegisterRegion: the pointer is not device memory (cudaMalloc); cuda_ipc shares device "
        "allocations only");
  }
  cudaIpcMemHandle_t handle;
  if (cudaError_t error = cudaIpcGetMemHandle(&handle, const_cast<void*>(device_ptr));
      error != cudaSuccess) {
    return CudaError(error, "RegisterRegion: cudaIpcGetMemHandle");
  }
  cudaDeviceProp properties{};
  if (cudaError_t error = cudaGetDeviceProperties(&properties, attributes.device);
      error != cudaSuccess) {
    return CudaError(error, "RegisterRegion: cudaGetDeviceProperties");
  }
  char bus_id[32] = {};
  if (cudaError_t error = cudaDeviceGetPCIBusId(bus_id, sizeof(bus_id), attributes.device);
      error != cudaSuccess) {
    return CudaError(error, "RegisterRegion: cudaDeviceGetPCIBusId");
  }
  v1::RegisterRegionRequest request;
  request.set_channel_id(id_);
  v1::CudaIpcRegion& region = *request.mutable_region();
  region.set_ipc_handle(reinterpret_cast<const char*>(&handle), sizeof(handle));
  region.set_size_bytes(bytes);
  region.set_device_uuid(cuda::DeviceUuidString(properties.uuid));
  region.set_pci_bus_id(bus_id);
  region.set_device_ordinal(attributes.device);
  absl::StatusOr<v1::RegisterRegionResponse> response = client_.RegisterRegion(request);
  if (!response.ok()) return response.status();
  absl::MutexLock lock(&mu_);
  if (regions_.size() <= response->region_id()) regions_.resize(response->region_id() + 1);
  regions_[response->region_id()] =
      Registered{static_cast<const std::byte*>(device_ptr), static_cast<uint64_t>(bytes)};
  return response->region_id();
}

absl::StatusOr<RegionSlice> CudaIpcChannel::Slice(uint32_t region, const void* ptr,
                                                  uint64_t bytes) const {
  absl::MutexLock lock(&mu_);
  if (region >= regions_.size() || regions_[region].base == nullptr) {
    return absl::InvalidArgumentError(
        absl::StrCat("Slice: region ", region, " was not registered through this channel"));
  }
  const Registered& registered = regions_[region];
  const auto* address = static_cast<const std::byte*>(ptr);
  if (address < registered.base || address > registered.base + registered.bytes ||
      bytes > static_cast<uint64_t>(registered.base + registered.bytes - address)) {
    return absl::InvalidArgumentError(absl::StrCat("Slice: ", bytes,
                                                   " bytes at the pointer lie outside region ",
                                                   region, " (", registered.bytes, " bytes)"));
  }
  return RegionSlice{region, static_cast<uint64_t>(address - registered.base), bytes};
}

void CudaIpcChannel::Attach(v1::CompressHeader& header) const {
  header.set_transport(v1::TRANSPORT_CUDA_IPC);
  header.set_channel_id(id_);
}

}  // namespace kvcompress
