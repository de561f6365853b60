// HostRegions: ChannelResources over host memory, so that the channel rules (registry, RPCs,
// LayerReady assembly, the channel server) are tested without a GPU. Each opened region is a
// fresh host allocation of the region's size, freed with the resources.
#ifndef KVCOMPRESS_TESTS_SERVICE_HOST_REGIONS_H_
#define KVCOMPRESS_TESTS_SERVICE_HOST_REGIONS_H_

#include <atomic>
#include <cstddef>
#include <memory>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "service/channel_registry.h"

namespace kvcompress::testing {

class HostRegions final : public ChannelResources {
 public:
  // `released` (optional) counts Release calls; with `require_ipc_handle`, a handle that is
  // not 64 bytes (a cudaIpcMemHandle_t) is refused, as the CUDA transport refuses it.
  explicit HostRegions(std::atomic<int>* released = nullptr, bool require_ipc_handle = false)
      : released_(released), require_ipc_handle_(require_ipc_handle) {}

  absl::StatusOr<std::byte*> OpenRegion(const RegionDescriptor& region) override {
    if (require_ipc_handle_ && region.ipc_handle.size() != 64) {
      return absl::InvalidArgumentError("ipc_handle: 64 bytes");
    }
    memory_.emplace_back(std::make_unique<std::byte[]>(region.size_bytes));
    return memory_.back().get();
  }
  void Release() override {
    if (released_ != nullptr) ++*released_;
  }

 private:
  std::atomic<int>* const released_;
  const bool require_ipc_handle_;
  std::vector<std::unique_ptr<std::byte[]>> memory_;
};

}  // namespace kvcompress::testing

#endif  // KVCOMPRESS_TESTS_SERVICE_HOST_REGIONS_H_
