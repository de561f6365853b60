// CudaIpcChannel: the client side of kvcd's cuda_ipc transport (same node, GPU-direct). Part
// of kvc_client_cuda, a library built only with CUDA, so that the plain SDK (kvc_client)
// never needs the CUDA toolkit.
//
//   auto channel = kvcompress::OpenCudaIpcChannel(*client);       // OpenChannel
//   auto region = (*channel)->RegisterRegion(d_cache, cache_bytes); // cudaIpcGetMemHandle
//   v1::CompressHeader header = ...;
//   (*channel)->Attach(header);                  // transport cuda_ipc + channel_id
//   auto session = client->StartCompress(header);
//   (*session)->SendLayerReady(0, layer, {.keys = (*channel)->Slice(*region, d_keys, n), ...});
//   (*session)->Finish();                       // results arrive inline, as with SendLayer
//
// Registered memory must be the start of a cudaMalloc allocation (IPC handles name whole
// allocations) and must stay allocated while the channel is open; slices must start at a
// multiple of 16 bytes from it. Destroying the channel closes it on the server
// (CloseChannel); kvcd also closes channels idle for their timeout.
//
// Thread safety: RegisterRegion and Slice may be called from several threads.
#ifndef KVCOMPRESS_CLIENT_CUDA_IPC_CHANNEL_H_
#define KVCOMPRESS_CLIENT_CUDA_IPC_CHANNEL_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "client/client.h"

namespace kvcompress {

struct CudaIpcChannelOptions {
  // Seconds of idleness after which kvcd closes the channel; zero: the server's default.
  absl::Duration idle_timeout = absl::ZeroDuration();
};

class CudaIpcChannel final {
 public:
  ~CudaIpcChannel();
  CudaIpcChannel(const CudaIpcChannel&) = delete;
  CudaIpcChannel& operator=(const CudaIpcChannel&) = delete;

  const std::string& id() const { return id_; }

  // Registers [device_ptr, device_ptr + bytes) — the start of a cudaMalloc allocation — and
  // returns its region id. INVALID_ARGUMENT for host or foreign pointers; the server's status
  // otherwise.
  absl::StatusOr<uint32_t> RegisterRegion(const void* device_ptr, size_t bytes);

  // The slice of `region` for [ptr, ptr + bytes); INVALID_ARGUMENT when it lies outside the
  // registered memory.
  absl::StatusOr<RegionSlice> Slice(uint32_t region, const void* ptr, uint64_t bytes) const;

  // Sets the header's transport to cuda_ipc and its channel_id to this channel.
  void Attach(v1::CompressHeader& header) const;

  // Closes the channel now (the destructor then does nothing). Idempotent.
  absl::Status Close();

 private:
  friend absl::StatusOr<std::unique_ptr<CudaIpcChannel>> OpenCudaIpcChannel(
      Client& client, const CudaIpcChannelOptions& options);
  CudaIpcChannel(Client& client, std::string id) : client_(client), id_(std::move(id)) {}

  struct Registered {
    const std::byte* base;
    uint64_t bytes;
  };

  Client& client_;
  const std::string id_;
  mutable absl::Mutex mu_;
  std::vector<Registered> regions_ ABSL_GUARDED_BY(mu_);  // by region id
  bool closed_ ABSL_GUARDED_BY(mu_) = false;
};

// Opens a cuda_ipc channel on the kvcd `client` talks to; `client` must outlive it.
absl::StatusOr<std::unique_ptr<CudaIpcChannel>> OpenCudaIpcChannel(
    Client& client, const CudaIpcChannelOptions& options = {});

}  // namespace kvcompress

#endif  // KVCOMPRESS_CLIENT_CUDA_IPC_CHANNEL_H_
