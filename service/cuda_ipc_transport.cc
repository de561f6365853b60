// The cuda_ipc transport with CUDA: see cuda_ipc_transport.h.
#include "service/cuda_ipc_transport.h"

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "kernels/cuda/cuda_compressor.h"
#include "kernels/cuda/cuda_status.h"
#include "kernels/cuda/device_uuid.h"
#include "kernels/cuda_backend.h"
#include "kernels/status_macros.h"
#include "service/nccl_transport.h"

namespace kvcompress {
namespace {

// kvcd's ordinal of the client's device.
absl::StatusOr<int> LocalOrdinal(const RegionDescriptor& region) {
  int count = 0;
  KVC_CUDA_RETURN_IF_ERROR(cudaGetDeviceCount(&count));
  if (!region.device_uuid.empty()) {
    const std::string wanted = absl::AsciiStrToLower(region.device_uuid);
    for (int ordinal = 0; ordinal < count; ++ordinal) {
      cudaDeviceProp properties{};
      KVC_CUDA_RETURN_IF_ERROR(cudaGetDeviceProperties(&properties, ordinal));
      // Compared in lower case, with or without nvidia-smi's "GPU-" prefix.
      const std::string uuid = absl::AsciiStrToLower(cuda::DeviceUuidString(properties.uuid));
      if (wanted == uuid || wanted == uuid.substr(4)) return ordinal;
    }
    return absl::FailedPreconditionError(absl::StrCat("region device_uuid ", region.device_uuid,
                                                      ": no such device is visible to kvcd"));
  }
  if (!region.pci_bus_id.empty()) {
    int ordinal = -1;
    if (cudaDeviceGetByPCIBusId(&ordinal, region.pci_bus_id.c_str()) != cudaSuccess) {
      (void)cudaGetLastError();
      return absl::FailedPreconditionError(absl::StrCat("region pci_bus_id ", region.pci_bus_id,
                                                        ": no such device is visible to kvcd"));
    }
    return ordinal;
  }
  if (region.device_ordinal < 0 || region.device_ordinal >= count) {
    return absl::InvalidArgumentError(
        absl::StrCat("region device: give device_uuid or pci_bus_id (or a device_ordinal in [0, ",
                     count, ")), got ordinal ", region.device_ordinal));
  }
  return region.device_ordinal;
}

class CudaIpcResources final : public ChannelResources {
 public:
  explicit CudaIpcResources(int device) : device_(device) {}
  ~CudaIpcResources() override { Release(); }

  absl::StatusOr<std::byte*> OpenRegion(const RegionDescriptor& region) override {
    if (region.ipc_handle.size() != sizeof(cudaIpcMemHandle_t)) {
      return absl::InvalidArgumentError(
          absl::StrCat("region ipc_handle: expected ", sizeof(cudaIpcMemHandle_t),
                       " bytes (a cudaIpcMemHandle_t), got ", region.ipc_handle.size()));
    }
    KVC_ASSIGN_OR_RETURN(const int ordinal, LocalOrdinal(region));
    if (ordinal != device_) {
      return absl::FailedPreconditionError(absl::StrCat(
          "region device: the region lies on kvcd's device ", ordinal,
          ", but kvcd's cuda backend runs on device ", device_,
          "; register memory of that device or start kvcd with --cuda_device=", ordinal));
    }
    cudaIpcMemHandle_t handle;
    std::memcpy(&handle, region.ipc_handle.data(), sizeof(handle));
    KVC_CUDA_RETURN_IF_ERROR(cudaSetDevice(device_));
    void* base = nullptr;
    const cudaError_t error = cudaIpcOpenMemHandle(&base, handle, cudaIpcMemLazyEnablePeerAccess);
    if (error != cudaSuccess) {
      (void)cudaGetLastError();
      return absl::InvalidArgumentError(absl::StrCat(
          "region ipc_handle: cudaIpcOpenMemHandle failed (", cudaGetErrorString(error),
          "); the handle must come from cudaIpcGetMemHandle in a live process on "
          "this node, for memory allocated with cudaMalloc"));
    }
    opened_.push_back(base);
    return static_cast<std::byte*>(base);
  }

  void Release() override {
    if (opened_.empty()) return;
    cudaSetDevice(device_);
    // Work reading the regions has finished: streams end their requests synchronised.
    for (void* base : opened_) cudaIpcCloseMemHandle(base);
    (void)cudaGetLastError();
    opened_.clear();
  }

 private:
  const int device_;
  std::vector<void*> opened_;
};

// A stream for the duration of one call.
class ScopedStream {
 public:
  ScopedStream() = default;
  ~ScopedStream() {
    if (stream_ != nullptr) {
      cudaStreamSynchronize(stream_);
      cudaStreamDestroy(stream_);
      (void)cudaGetLastError();
    }
  }
  ScopedStream(const ScopedStream&) = delete;
  ScopedStream& operator=(const ScopedStream&) = delete;
  absl::Status Create() {
    KVC_CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
    return absl::OkStatus();
  }
  cudaStream_t get() const { return stream_; }

 private:
  cudaStream_t stream_ = nullptr;
};

}  // namespace

bool CudaIpcCompiled() { return true; }

absl::StatusOr<std::unique_ptr<ChannelResources>> MakeCudaIpcResources(Backend& backend) {
  CudaCompressor* compressor = CudaCompressorOf(backend);
  if (compressor == nullptr) {
    return absl::FailedPreconditionError(
        "transport cuda_ipc needs kvcd's cuda backend (start kvcd with --backend=cuda on a GPU "
        "machine); this kvcd runs the cpu backend");
  }
  return std::unique_ptr<ChannelResources>(new CudaIpcResources(compressor->device()));
}

namespace {

// Device-resident layers compressed on `stream`, their results still in device memory, and
// their metadata (kept per head, offsets, attention mass) on the host.
struct DeviceBatchOutcome {
  DeviceBatchResult out;
  std::vector<LayerResult> metadata;  // tensors empty
};

absl::StatusOr<DeviceBatchOutcome> RunDeviceLayers(CudaCompressor& compressor,
                                                   const CacheGeometry& geometry,
                                                   const MethodSpec& spec,
                                                   std::span<const DeviceLayerTask> tasks,
                                                   cudaStream_t stream) {
  std::vector<DeviceLayerJob> jobs(tasks.size());
  for (size_t i = 0; i < tasks.size(); ++i) {
    const DeviceLayerInput& input = tasks[i].input;
    DeviceLayerJob& job = jobs[i];
    job.sequence = input.sequence;
    job.layer = input.layer;
    job.input.keys = input.keys;
    job.input.values = input.values;
    job.input.queries = input.queries;
    job.input.scores = input.scores;
    job.input.shape = input.shape;
    job.tokens_per_head = tasks[i].tokens_per_head;
    job.keep_all = tasks[i].keep_all;
  }
  DeviceBatchOutcome outcome;
  KVC_ASSIGN_OR_RETURN(outcome.out, compressor.Compress(geometry, spec, jobs, stream));
  const DeviceBatchResult& out = outcome.out;
  const size_t num_layers = tasks.size();
  const int num_heads = geometry.num_kv_heads;
  std::vector<double> mass_sums(num_layers);
  std::vector<int32_t> head_counts;
  KVC_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(mass_sums.data(), out.mass_sums,
                                           num_layers * sizeof(double), cudaMemcpyDeviceToHost,
                                           stream));
  const bool any_ragged = std::any_of(out.layers.begin(), out.layers.end(),
                                      [](const DeviceLayerResult& l) { return l.ragged_heads; });
  if (any_ragged) {
    head_counts.resize(num_layers * num_heads);
    KVC_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(head_counts.data(), out.head_counts,
                                             head_counts.size() * sizeof(int32_t),
                                             cudaMemcpyDeviceToHost, stream));
  }
  KVC_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream));
  outcome.metadata.resize(num_layers);
  for (size_t i = 0; i < num_layers; ++i) {
    const DeviceLayerResult& layer = out.layers.at(i);
    LayerResult& result = outcome.metadata[i];
    result.sequence = layer.sequence;
    result.layer = layer.layer;
    result.kept.assign(num_heads, layer.kept_per_head);
    if (layer.ragged_heads) {
      std::copy_n(head_counts.begin() + i * num_heads, num_heads, result.kept.begin());
    }
    result.offsets.resize(num_heads + 1);
    int64_t offset = 0;
    for (int h = 0; h < num_heads; ++h) {
      result.offsets[h] = static_cast<int32_t>(offset);
      offset += result.kept[h];
    }
    result.offsets[num_heads] = static_cast<int32_t>(offset);
    if (offset != layer.num_rows) {
      return absl::InternalError(absl::StrCat("sequence ", result.sequence, " layer ", result.layer,
                                              ": heads kept ", offset, " rows in all, expected ",
                                              layer.num_rows));
    }
    result.attention_mass_kept =
        layer.mass_scale > 0 ? mass_sums[i] * layer.mass_scale : layer.mass_fixed;
  }
  return outcome;
}

}  // namespace

absl::StatusOr<std::vector<LayerResult>> CompressDeviceLayers(
    Backend& backend, const CacheGeometry& geometry, const MethodSpec& spec,
    std::span<const DeviceLayerTask> tasks, const ForwardContext* forward) {
  CudaCompressor* compressor = CudaCompressorOf(backend);
  if (compressor == nullptr) {
    return absl::FailedPreconditionError("device-resident layers need kvcd's cuda backend");
  }
  if (forward != nullptr && forward->outbox == nullptr) {
    return absl::FailedPreconditionError("forwarding needs the forward channel's outbox");
  }
  if (tasks.empty()) return std::vector<LayerResult>();
  KVC_CUDA_RETURN_IF_ERROR(cudaSetDevice(compressor->device()));
  // Declared before the results, so that their memory is freed in the stream's order and the
  // stream is synchronised and destroyed after it.
  ScopedStream stream;
  KVC_RETURN_IF_ERROR(stream.Create());
  KVC_ASSIGN_OR_RETURN(DeviceBatchOutcome outcome,
                       RunDeviceLayers(*compressor, geometry, spec, tasks, stream.get()));
  // RunDeviceLayers synchronised the stream: the results are in device memory, and stay there
  // (outcome.out owns them) until they are copied or sent.
  const DeviceBatchResult& out = outcome.out;
  std::vector<LayerResult>& results = outcome.metadata;
  std::vector<v1::ForwardNotice> notices;
  std::vector<DeviceSpan> spans;
  for (size_t i = 0; i < tasks.size(); ++i) {
    const DeviceLayerInput& input = tasks[i].input;
    const DeviceLayerResult& layer = out.layers.at(i);
    LayerResult& result = results[i];
    const uint64_t rows = static_cast<uint64_t>(layer.num_rows);
    const uint64_t first = static_cast<uint64_t>(layer.first_row);
    std::byte* keys = out.keys + first * out.row_bytes;
    std::byte* values = out.values + first * out.row_bytes;
    int32_t* positions = out.positions + first;
    if (forward != nullptr) {
      notices.push_back(ForwardNoticeFor(result, out.row_bytes, *forward));
      spans.push_back({keys, rows * out.row_bytes});
      spans.push_back({values, rows * out.row_bytes});
      spans.push_back({reinterpret_cast<std::byte*>(positions), rows * sizeof(int32_t)});
    } else if (input.output != nullptr) {
      const OutputRegionLayout place = OutputLayoutFor(rows, out.row_bytes);
      if (place.total_bytes > input.output_capacity) {
        return absl::InvalidArgumentError(absl::StrCat(
            "sequence ", input.sequence, " layer ", input.layer, " output: the result needs ",
            place.total_bytes, " bytes (", rows,
            " rows: keys, values and positions, each at a multiple of 16 bytes), the slice "
            "holds ",
            input.output_capacity));
      }
      KVC_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(input.output + place.keys_offset, keys,
                                               rows * out.row_bytes, cudaMemcpyDeviceToDevice,
                                               stream.get()));
      KVC_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(input.output + place.values_offset, values,
                                               rows * out.row_bytes, cudaMemcpyDeviceToDevice,
                                               stream.get()));
      KVC_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(input.output + place.positions_offset, positions,
                                               rows * sizeof(int32_t), cudaMemcpyDeviceToDevice,
                                               stream.get()));
      result.in_output_region = true;
    } else {
      result.keys.resize(rows * out.row_bytes);
      result.values.resize(rows * out.row_bytes);
      result.positions.resize(rows);
      KVC_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(result.keys.data(), keys, rows * out.row_bytes,
                                               cudaMemcpyDeviceToHost, stream.get()));
      KVC_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(result.values.data(), values, rows * out.row_bytes,
                                               cudaMemcpyDeviceToHost, stream.get()));
      KVC_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(result.positions.data(), positions,
                                               rows * sizeof(int32_t), cudaMemcpyDeviceToHost,
                                               stream.get()));
    }
  }
  if (forward != nullptr) {
    KVC_RETURN_IF_ERROR(
        forward->outbox->DeliverAll(std::move(notices), std::move(spans), forward->deadline));
  }
  KVC_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream.get()));
  return std::move(results);
}

}  // namespace kvcompress
