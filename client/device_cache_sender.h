// DeviceCacheSender: one sequence's KV cache copied into the current GPU's memory and sent to
// kvcd through a GPU transport, cuda_ipc (kvcd reads it in place) or nccl (ncclSend per
// tensor). The engine of `kvc compress --transport=cuda_ipc|nccl` and kvc_prefill_example; a
// prefill engine whose cache already lives on the GPU uses CudaIpcChannel or NcclChannel
// directly.
//
//   auto sender = kvcompress::DeviceCacheSender::Create(*client, layers, {.transport = ...});
//   (*sender)->Attach(header);                        // transport + channel_id
//   auto session = client->StartCompress(header);
//   for (layer ...) (*sender)->SendLayer(**session, layer);
//   (*sender)->WaitForSends();                        // nccl: the bytes have left
//   (*session)->Finish();
//
// The device copy is one cudaMalloc allocation (tensors 256-byte aligned), kept until the
// sender is destroyed: cuda_ipc results are computed from it while the stream runs, so destroy
// the sender after Finish (or Cancel). Not thread-safe: one thread drives a sender.
#ifndef KVCOMPRESS_CLIENT_DEVICE_CACHE_SENDER_H_
#define KVCOMPRESS_CLIENT_DEVICE_CACHE_SENDER_H_

#include <cuda_runtime_api.h>

#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "client/client.h"
#include "client/cuda_ipc_channel.h"

namespace kvcompress {

class NcclChannel;

struct DeviceCacheSenderOptions {
  // TRANSPORT_CUDA_IPC (the default) or TRANSPORT_NCCL (builds with NCCL only).
  v1::Transport transport = v1::TRANSPORT_CUDA_IPC;
  // nccl: forming the communicator, and one enqueue waiting for kvcd. Default 60 s.
  absl::Duration connect_timeout = absl::Seconds(60);
  // nccl: WaitForSends, and the destructor's wait for sends still in flight. Default 60 s.
  absl::Duration transfer_timeout = absl::Seconds(60);
};

class DeviceCacheSender final {
 public:
  // Copies `layers` (sequence 0, layer l at index l; sizes as the header will declare them) to
  // one allocation on the current device and opens a channel of options.transport on
  // `client`'s kvcd (cuda_ipc: the allocation registered as one region). `client` must
  // outlive the sender. INVALID_ARGUMENT for another transport or no layers; UNIMPLEMENTED for
  // nccl in a build without NCCL; INTERNAL for CUDA errors; the server's status when it
  // refuses the channel.
  static absl::StatusOr<std::unique_ptr<DeviceCacheSender>> Create(
      Client& client, std::span<const LayerTensors> layers,
      const DeviceCacheSenderOptions& options = {});

  // Waits for sends in flight (nccl, up to transfer_timeout, aborting after), closes the
  // channel and frees the device copy.
  ~DeviceCacheSender();
  DeviceCacheSender(const DeviceCacheSender&) = delete;
  DeviceCacheSender& operator=(const DeviceCacheSender&) = delete;

  // Sets the header's transport and channel_id.
  void Attach(v1::CompressHeader& header) const;

  // Sends layer `layer` of sequence 0 on `session` (a session of a header passed to Attach):
  // cuda_ipc: SendLayerReady with the layer's slices; nccl: NcclChannel::SendLayer. The
  // session's and the channel's errors.
  absl::Status SendLayer(CompressSession& session, uint32_t layer);

  // nccl: waits until every send enqueued so far has completed (transfer_timeout; a timeout or
  // an NCCL error aborts the communicator: DEADLINE_EXCEEDED / INTERNAL). cuda_ipc: OK at
  // once (kvcd reads in place; the memory stays until the sender is destroyed).
  absl::Status WaitForSends();

  v1::Transport transport() const { return options_.transport; }
  const std::string& channel_id() const;
  uint64_t device_bytes() const { return device_bytes_; }
  // Host-to-device copy time of Create.
  absl::Duration upload_time() const { return upload_time_; }

 private:
  DeviceCacheSender(Client& client, const DeviceCacheSenderOptions& options);

  // Device pointers of one layer's tensors; null where the layer has none.
  struct DeviceLayer {
    const std::byte* keys = nullptr;
    const std::byte* values = nullptr;
    const std::byte* queries = nullptr;
    const std::byte* scores = nullptr;
    uint64_t keys_bytes = 0, queries_bytes = 0, scores_bytes = 0;
  };

  Client& client_;
  const DeviceCacheSenderOptions options_;
  void* device_ = nullptr;
  uint64_t device_bytes_ = 0;
  absl::Duration upload_time_;
  std::vector<DeviceLayer> layers_;
  std::unique_ptr<CudaIpcChannel> ipc_channel_;
  uint32_t region_ = 0;
  std::unique_ptr<NcclChannel> nccl_channel_;
  cudaStream_t stream_ = nullptr;  // nccl sends
};

}  // namespace kvcompress

#endif  // KVCOMPRESS_CLIENT_DEVICE_CACHE_SENDER_H_
