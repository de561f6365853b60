#include "client/device_cache_sender.h"

#include <array>
#include <optional>
#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"

#if KVC_HAVE_NCCL
#include "client/nccl_channel.h"
#endif

namespace kvcompress {
namespace {

constexpr uint64_t kAlignment = 256;

uint64_t Aligned(uint64_t bytes) { return (bytes + kAlignment - 1) / kAlignment * kAlignment; }

absl::Status CudaError(cudaError_t error, absl::string_view what) {
  (void)cudaGetLastError();
  return absl::InternalError(absl::StrCat(what, ": ", cudaGetErrorString(error)));
}

}  // namespace

absl::StatusOr<std::unique_ptr<DeviceCacheSender>> DeviceCacheSender::Create(
    Client& client, std::span<const LayerTensors> layers, const DeviceCacheSenderOptions& options) {
  if (options.transport != v1::TRANSPORT_CUDA_IPC && options.transport != v1::TRANSPORT_NCCL) {
    return absl::InvalidArgumentError(
        absl::StrCat("DeviceCacheSender: transport ", v1::Transport_Name(options.transport),
                     ", expected TRANSPORT_CUDA_IPC or TRANSPORT_NCCL"));
  }
#if !KVC_HAVE_NCCL
  if (options.transport == v1::TRANSPORT_NCCL) {
    return absl::UnimplementedError(
        "DeviceCacheSender: transport nccl needs a build with NCCL (this one has cuda_ipc only)");
  }
#endif
  if (layers.empty()) return absl::InvalidArgumentError("DeviceCacheSender: no layers");
  auto sender = std::unique_ptr<DeviceCacheSender>(new DeviceCacheSender(client, options));

  // Layout: per layer keys, values, queries, scores, each 256-byte aligned.
  uint64_t total = 0;
  std::vector<std::array<uint64_t, 4>> offsets;
  for (const LayerTensors& layer : layers) {
    std::array<uint64_t, 4> at{};
    const std::span<const std::byte> tensors[] = {layer.keys, layer.values, layer.queries,
                                                  layer.scores};
    for (int t = 0; t < 4; ++t) {
      at[t] = total;
      total += Aligned(tensors[t].size());
    }
    offsets.push_back(at);
  }
  const absl::Time start = absl::Now();
  if (cudaError_t error = cudaMalloc(&sender->device_, total); error != cudaSuccess) {
    sender->device_ = nullptr;
    return CudaError(error, absl::StrCat("DeviceCacheSender: cudaMalloc of ", total, " bytes"));
  }
  sender->device_bytes_ = total;
  auto* base = static_cast<std::byte*>(sender->device_);
  for (size_t l = 0; l < layers.size(); ++l) {
    const LayerTensors& layer = layers[l];
    const std::span<const std::byte> tensors[] = {layer.keys, layer.values, layer.queries,
                                                  layer.scores};
    const std::byte* device[4] = {};
    for (int t = 0; t < 4; ++t) {
      if (tensors[t].empty()) continue;
      device[t] = base + offsets[l][t];
      if (cudaError_t error = cudaMemcpy(base + offsets[l][t], tensors[t].data(), tensors[t].size(),
                                         cudaMemcpyHostToDevice);
          error != cudaSuccess) {
        return CudaError(error, absl::StrCat("DeviceCacheSender: copying layer ", l));
      }
    }
    sender->layers_.push_back(DeviceLayer{device[0], device[1], device[2], device[3],
                                          layer.keys.size(), layer.queries.size(),
                                          layer.scores.size()});
  }
  sender->upload_time_ = absl::Now() - start;

  if (options.transport == v1::TRANSPORT_CUDA_IPC) {
    absl::StatusOr<std::unique_ptr<CudaIpcChannel>> channel = OpenCudaIpcChannel(client);
    if (!channel.ok()) return channel.status();
    sender->ipc_channel_ = *std::move(channel);
    absl::StatusOr<uint32_t> region = sender->ipc_channel_->RegisterRegion(sender->device_, total);
    if (!region.ok()) return region.status();
    sender->region_ = *region;
    return sender;
  }
#if KVC_HAVE_NCCL
  if (cudaError_t error = cudaStreamCreateWithFlags(&sender->stream_, cudaStreamNonBlocking);
      error != cudaSuccess) {
    sender->stream_ = nullptr;
    return CudaError(error, "DeviceCacheSender: cudaStreamCreateWithFlags");
  }
  NcclChannelOptions nccl_options;
  nccl_options.connect_timeout = options.connect_timeout;
  absl::StatusOr<std::unique_ptr<NcclChannel>> channel =
      OpenNcclChannel(client, v1::CHANNEL_DIRECTION_TO_KVCD, nccl_options);
  if (!channel.ok()) return channel.status();
  sender->nccl_channel_ = *std::move(channel);
#endif
  return sender;
}

DeviceCacheSender::DeviceCacheSender(Client& client, const DeviceCacheSenderOptions& options)
    : client_(client), options_(options) {}

DeviceCacheSender::~DeviceCacheSender() {
#if KVC_HAVE_NCCL
  if (nccl_channel_ != nullptr && stream_ != nullptr) {
    // Bounded: a stuck transfer aborts the communicator, after which the stream drains.
    nccl_channel_->Synchronize(stream_, options_.transfer_timeout).IgnoreError();
  }
  nccl_channel_.reset();
#endif
  if (stream_ != nullptr) {
    cudaStreamSynchronize(stream_);
    cudaStreamDestroy(stream_);
  }
  ipc_channel_.reset();
  if (device_ != nullptr) cudaFree(device_);
}

const std::string& DeviceCacheSender::channel_id() const {
#if KVC_HAVE_NCCL
  if (nccl_channel_ != nullptr) return nccl_channel_->id();
#endif
  return ipc_channel_->id();
}

void DeviceCacheSender::Attach(v1::CompressHeader& header) const {
#if KVC_HAVE_NCCL
  if (nccl_channel_ != nullptr) {
    nccl_channel_->Attach(header);
    return;
  }
#endif
  ipc_channel_->Attach(header);
}

absl::Status DeviceCacheSender::SendLayer(CompressSession& session, uint32_t layer) {
  if (layer >= layers_.size()) {
    return absl::InvalidArgumentError(absl::StrCat("DeviceCacheSender::SendLayer: layer ", layer,
                                                   " of ", layers_.size(), " uploaded"));
  }
  const DeviceLayer& d = layers_[layer];
#if KVC_HAVE_NCCL
  if (nccl_channel_ != nullptr) {
    return nccl_channel_->SendLayer(session, 0, layer, {d.keys, d.values, d.queries, d.scores},
                                    stream_);
  }
#endif
  LayerRegions regions;
  auto slice = [&](const std::byte* ptr, uint64_t bytes,
                   std::optional<RegionSlice>& out) -> absl::Status {
    if (ptr == nullptr) return absl::OkStatus();
    absl::StatusOr<RegionSlice> s = ipc_channel_->Slice(region_, ptr, bytes);
    if (!s.ok()) return s.status();
    out = *s;
    return absl::OkStatus();
  };
  if (absl::Status s = slice(d.keys, d.keys_bytes, regions.keys); !s.ok()) return s;
  if (absl::Status s = slice(d.values, d.keys_bytes, regions.values); !s.ok()) return s;
  if (absl::Status s = slice(d.queries, d.queries_bytes, regions.queries); !s.ok()) return s;
  if (absl::Status s = slice(d.scores, d.scores_bytes, regions.scores); !s.ok()) return s;
  return session.SendLayerReady(0, layer, regions);
}

absl::Status DeviceCacheSender::WaitForSends() {
#if KVC_HAVE_NCCL
  if (nccl_channel_ != nullptr)
    return nccl_channel_->Synchronize(stream_, options_.transfer_timeout);
#endif
  return absl::OkStatus();
}

}  // namespace kvcompress
