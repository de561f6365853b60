#include "client/nccl_channel.h"

#include <algorithm>
#include <chrono>
#include <thread>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"

namespace kvcompress {
namespace {

static_assert(sizeof(ncclUniqueId) == 128, "the proto's NcclEndpoint.unique_id is 128 bytes");

// kvcd is rank 1 of every channel's communicator; the client is rank 0.
constexpr int kPeer = 1;
// Finalising a healthy communicator waits for kvcd's side; past this it is aborted instead.
constexpr absl::Duration kCloseTimeout = absl::Seconds(10);

absl::Status NcclError(ncclResult_t result, ncclComm_t comm, absl::string_view what) {
  const char* last = comm != nullptr ? ncclGetLastError(comm) : ncclGetLastError(nullptr);
  return absl::InternalError(absl::StrCat(what, ": ", ncclGetErrorString(result),
                                          last != nullptr && *last != '\0' ? "; " : "",
                                          last != nullptr ? last : ""));
}

absl::Status CudaError(cudaError_t error, absl::string_view what) {
  (void)cudaGetLastError();
  return absl::InternalError(absl::StrCat(what, ": ", cudaGetErrorString(error)));
}

// Between polls: spins (yielding) for the first two milliseconds — each layer's transfer is
// tens of microseconds on NVLink, and a sleep costs more than that in timer slack — then
// sleeps 50 microseconds at a time, so a long wait does not hold a core.
class Backoff {
 public:
  void Wait() {
    if (std::chrono::steady_clock::now() - started_ < std::chrono::milliseconds(2)) {
      std::this_thread::yield();
    } else {
      std::this_thread::sleep_for(std::chrono::microseconds(50));
    }
  }

 private:
  const std::chrono::steady_clock::time_point started_ = std::chrono::steady_clock::now();
};

// Polls the communicator until it is no longer ncclInProgress or `deadline` passes; returns
// its state (ncclInProgress on timeout).
ncclResult_t PollComm(ncclComm_t comm, absl::Time deadline) {
  Backoff backoff;
  for (;;) {
    ncclResult_t state = ncclSuccess;
    if (ncclResult_t result = ncclCommGetAsyncError(comm, &state); result != ncclSuccess) {
      return result;
    }
    if (state != ncclInProgress || absl::Now() >= deadline) return state;
    backoff.Wait();
  }
}

}  // namespace

absl::StatusOr<std::unique_ptr<NcclChannel>> OpenNcclChannel(Client& client,
                                                             v1::ChannelDirection direction,
                                                             const NcclChannelOptions& options) {
  if (direction == v1::CHANNEL_DIRECTION_UNSPECIFIED) direction = v1::CHANNEL_DIRECTION_TO_KVCD;
  if (direction != v1::CHANNEL_DIRECTION_TO_KVCD && direction != v1::CHANNEL_DIRECTION_FROM_KVCD) {
    return absl::InvalidArgumentError(
        absl::StrCat("OpenNcclChannel: direction ", static_cast<int>(direction),
                     ", expected CHANNEL_DIRECTION_TO_KVCD or CHANNEL_DIRECTION_FROM_KVCD"));
  }
  if (options.connect_timeout <= absl::ZeroDuration()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "NcclChannelOptions.connect_timeout = ", absl::FormatDuration(options.connect_timeout),
        ", expected > 0"));
  }
  int device = 0;
  if (cudaError_t error = cudaGetDevice(&device); error != cudaSuccess) {
    return CudaError(error, "OpenNcclChannel: cudaGetDevice");
  }
  ncclUniqueId unique_id;
  if (ncclResult_t result = ncclGetUniqueId(&unique_id); result != ncclSuccess) {
    return NcclError(result, nullptr, "OpenNcclChannel: ncclGetUniqueId");
  }

  v1::OpenChannelRequest request;
  request.set_transport(v1::TRANSPORT_NCCL);
  request.set_idle_timeout_seconds(
      static_cast<uint32_t>(absl::ToInt64Seconds(options.idle_timeout)));
  request.mutable_nccl()->set_unique_id(unique_id.internal, sizeof(unique_id.internal));
  request.mutable_nccl()->set_direction(direction);
  absl::StatusOr<v1::OpenChannelResponse> response = client.OpenChannel(request);
  if (!response.ok()) return response.status();
  const std::string id = response->channel_id();
  auto fail = [&](ncclComm_t comm, absl::Status status) {
    if (comm != nullptr) ncclCommAbort(comm);
    client.CloseChannel(id, kCloseTimeout).IgnoreError();
    return status;
  };

  // Non-blocking, so that a kvcd that never joins costs connect_timeout and not a hang.
  ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
  config.blocking = 0;
  ncclComm_t comm = nullptr;
  const absl::Time deadline = absl::Now() + options.connect_timeout;
  ncclResult_t result = ncclCommInitRankConfig(&comm, 2, unique_id, 0, &config);
  if (result != ncclSuccess && result != ncclInProgress) {
    return fail(comm,
                NcclError(result, comm, absl::StrCat("channel ", id, ": ncclCommInitRankConfig")));
  }
  if (comm == nullptr) {
    return fail(comm, absl::InternalError(absl::StrCat(
                          "channel ", id, ": ncclCommInitRankConfig returned no communicator")));
  }
  result = PollComm(comm, deadline);
  if (result == ncclInProgress) {
    return fail(comm, absl::DeadlineExceededError(absl::StrCat(
                          "channel ", id, ": kvcd did not join the nccl communicator within ",
                          absl::FormatDuration(options.connect_timeout),
                          " (NcclChannelOptions.connect_timeout)")));
  }
  if (result != ncclSuccess) {
    return fail(
        comm, NcclError(result, comm, absl::StrCat("channel ", id, ": forming the communicator")));
  }
  return std::unique_ptr<NcclChannel>(
      new NcclChannel(client, id, direction, device, comm, options));
}

NcclChannel::NcclChannel(Client& client, std::string id, v1::ChannelDirection direction, int device,
                         ncclComm_t comm, const NcclChannelOptions& options)
    : client_(client),
      id_(std::move(id)),
      direction_(direction),
      device_(device),
      options_(options),
      comm_(comm) {}

NcclChannel::~NcclChannel() { Close().IgnoreError(); }

void NcclChannel::Attach(v1::CompressHeader& header) const {
  header.set_transport(v1::TRANSPORT_NCCL);
  header.set_channel_id(id_);
}

bool NcclChannel::broken() const {
  absl::MutexLock lock(&mu_);
  return broken_;
}

absl::Status NcclChannel::Abort(absl::Status status) {
  if (comm_ != nullptr) {
    ncclCommAbort(comm_);
    comm_ = nullptr;
  }
  broken_ = true;
  return status;
}

absl::Status NcclChannel::Settle(ncclResult_t result, const std::string& what) {
  if (result == ncclInProgress) {
    result = PollComm(comm_, absl::Now() + options_.connect_timeout);
  }
  if (result == ncclSuccess) return absl::OkStatus();
  // Close the group first: an open group would capture this thread's next NCCL calls, and
  // after the abort the communicator is gone.
  ncclGroupEnd();
  if (result == ncclInProgress) {
    return Abort(absl::DeadlineExceededError(
        absl::StrCat("channel ", id_, ": ", what, " did not complete within ",
                     absl::FormatDuration(options_.connect_timeout), "; aborted")));
  }
  return Abort(NcclError(result, comm_, absl::StrCat("channel ", id_, ": ", what)));
}

absl::Status NcclChannel::AwaitComm(const std::string& what) {
  const ncclResult_t state = PollComm(comm_, absl::Now() + options_.connect_timeout);
  if (state == ncclSuccess) return absl::OkStatus();
  if (state == ncclInProgress) {
    return Abort(absl::DeadlineExceededError(
        absl::StrCat("channel ", id_, ": ", what, " did not complete within ",
                     absl::FormatDuration(options_.connect_timeout),
                     " (is kvcd taking part?); the communicator was aborted")));
  }
  absl::Status status = NcclError(state, comm_, absl::StrCat("channel ", id_, ": ", what));
  return Abort(std::move(status));
}

absl::Status NcclChannel::Usable(v1::ChannelDirection wanted, const char* what) const {
  if (direction_ != wanted) {
    return absl::FailedPreconditionError(absl::StrCat(
        what, ": channel ", id_, " has direction ", v1::ChannelDirection_Name(direction_),
        ", this needs ", v1::ChannelDirection_Name(wanted)));
  }
  if (closed_) {
    return absl::FailedPreconditionError(absl::StrCat(what, ": channel ", id_, " is closed"));
  }
  if (broken_ || comm_ == nullptr) {
    return absl::FailedPreconditionError(
        absl::StrCat(what, ": channel ", id_,
                     " is broken (an earlier error or timeout aborted its communicator); open a "
                     "new channel"));
  }
  return absl::OkStatus();
}

absl::Status NcclChannel::SendLayer(CompressSession& session, uint32_t sequence, uint32_t layer,
                                    const DeviceLayerTensors& tensors, cudaStream_t stream) {
  const v1::CompressHeader& header = session.header();
  if (header.transport() != v1::TRANSPORT_NCCL || header.channel_id() != id_) {
    return absl::FailedPreconditionError(absl::StrCat(
        "NcclChannel::SendLayer: the session's header has transport ",
        v1::Transport_Name(header.transport()), " and channel_id \"", header.channel_id(),
        "\"; Attach this channel (", id_, ") to the header before StartCompress"));
  }
  const std::string where = absl::StrCat("sequence ", sequence, " layer ", layer);
  if (sequence >= static_cast<uint32_t>(header.sequences_size()) ||
      layer >= header.geometry().num_layers()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "NcclChannel::SendLayer(", where, "): the header has ", header.sequences_size(),
        " sequences of ", header.geometry().num_layers(), " layers"));
  }
  const LayerTensorBytes expected = ExpectedLayerBytes(header, static_cast<int>(sequence));
  struct Tensor {
    const char* name;
    const void* data;
    uint64_t bytes;
  };
  const Tensor all[] = {{"keys", tensors.keys, expected.keys},
                        {"values", tensors.values, expected.keys},
                        {"queries", tensors.queries, expected.queries},
                        {"scores", tensors.scores, expected.scores}};
  for (const Tensor& tensor : all) {
    if ((tensor.data != nullptr) != (tensor.bytes > 0)) {
      return absl::InvalidArgumentError(absl::StrCat(
          where, " ", tensor.name, ": ",
          tensor.bytes > 0
              ? absl::StrCat("missing; the header's shape needs ", tensor.bytes, " bytes")
              : std::string("given, but the header's sequence declares none")));
    }
  }

  absl::MutexLock lock(&mu_);
  if (absl::Status status = Usable(v1::CHANNEL_DIRECTION_TO_KVCD, "NcclChannel::SendLayer");
      !status.ok()) {
    return status;
  }
  bool enqueued = false;
  absl::Status status = session.SendLayerAnnouncement(
      sequence, layer, [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) -> absl::Status {
        if (ncclResult_t result = ncclGroupStart(); result != ncclSuccess) {
          return Abort(NcclError(result, comm_, absl::StrCat(where, ": ncclGroupStart")));
        }
        for (const Tensor& tensor : all) {
          if (tensor.bytes == 0) continue;
          const ncclResult_t result =
              ncclSend(tensor.data, tensor.bytes, ncclUint8, kPeer, comm_, stream);
          if (absl::Status s = Settle(result, absl::StrCat(where, " ", tensor.name, ": ncclSend"));
              !s.ok()) {
            return s;
          }
        }
        const ncclResult_t result = ncclGroupEnd();
        if (result != ncclSuccess && result != ncclInProgress) {
          return Abort(NcclError(result, comm_, absl::StrCat(where, ": ncclGroupEnd")));
        }
        enqueued = true;
        return absl::OkStatus();
      });
  if (!status.ok()) {
    // Sends without their announcement would never be received: only an abort ends them.
    if (enqueued) return Abort(std::move(status));
    return status;
  }
  // The group may still be connecting to kvcd, which takes part once it reads the
  // announcement written above; the next NCCL call has to wait for it.
  return AwaitComm(absl::StrCat("enqueueing the sends of ", where));
}

absl::Status NcclChannel::ReceiveLayer(const v1::ForwardedLayer& layer,
                                       const ForwardedLayerBuffers& out, cudaStream_t stream) {
  const v1::ForwardedLayer* layers[] = {&layer};
  return ReceiveLayers(layers, std::span<const ForwardedLayerBuffers>(&out, 1), stream);
}

absl::Status NcclChannel::ReceiveLayers(std::span<const v1::ForwardedLayer* const> layers,
                                        std::span<const ForwardedLayerBuffers> out,
                                        cudaStream_t stream) {
  if (layers.size() != out.size() || layers.empty()) {
    return absl::InvalidArgumentError(absl::StrCat("NcclChannel::ReceiveLayers: ", layers.size(),
                                                   " layers, ", out.size(),
                                                   " buffer sets; expected as many, at least one"));
  }
  struct Tensor {
    const char* name;
    void* data;
    uint64_t bytes;
  };
  std::vector<Tensor> tensors;
  std::string where;
  for (size_t i = 0; i < layers.size(); ++i) {
    const v1::ForwardedLayer& layer = *layers[i];
    if (absl::Status status = ValidateForwardedLayer(layer); !status.ok()) {
      return absl::InvalidArgumentError(status.message());
    }
    const v1::LayerResult& result = layer.result();
    where = absl::StrCat("request ", layer.request_id(), " sequence ", result.sequence(), " layer ",
                         result.layer());
    const Tensor all[] = {{"keys", out[i].keys, result.keys_bytes()},
                          {"values", out[i].values, result.values_bytes()},
                          {"positions", out[i].positions, result.positions_bytes()},
                          {"merged", out[i].merged, result.merged_bytes()}};
    for (const Tensor& tensor : all) {
      if (tensor.bytes == 0) continue;
      if (tensor.data == nullptr) {
        return absl::InvalidArgumentError(absl::StrCat(
            where, " ", tensor.name, ": no buffer for the announced ", tensor.bytes, " bytes"));
      }
      tensors.push_back(tensor);
    }
  }
  if (layers.size() > 1) where = absl::StrCat(layers.size(), " layers up to ", where);

  absl::MutexLock lock(&mu_);
  if (absl::Status status = Usable(v1::CHANNEL_DIRECTION_FROM_KVCD, "NcclChannel::ReceiveLayers");
      !status.ok()) {
    return status;
  }
  // One group for every layer given: a group of a non-blocking communicator is launched from
  // a helper thread, so one per layer would cost that launch per layer.
  if (ncclResult_t r = ncclGroupStart(); r != ncclSuccess) {
    return Abort(NcclError(r, comm_, absl::StrCat(where, ": ncclGroupStart")));
  }
  for (const Tensor& tensor : tensors) {
    const ncclResult_t r = ncclRecv(tensor.data, tensor.bytes, ncclUint8, kPeer, comm_, stream);
    if (absl::Status s = Settle(r, absl::StrCat(where, " ", tensor.name, ": ncclRecv")); !s.ok()) {
      return s;
    }
  }
  if (ncclResult_t r = ncclGroupEnd(); r != ncclSuccess && r != ncclInProgress) {
    return Abort(NcclError(r, comm_, absl::StrCat(where, ": ncclGroupEnd")));
  }
  return AwaitComm(absl::StrCat("enqueueing the receives of ", where));
}

absl::Status NcclChannel::Synchronize(cudaStream_t stream, absl::Duration timeout) {
  const absl::Time deadline = absl::Now() + timeout;
  Backoff backoff;
  for (;;) {
    const cudaError_t query = cudaStreamQuery(stream);
    absl::ReleasableMutexLock lock(&mu_);
    if (closed_) {
      return absl::FailedPreconditionError(
          absl::StrCat("NcclChannel::Synchronize: channel ", id_, " is closed"));
    }
    if (comm_ != nullptr) {
      ncclResult_t state = ncclSuccess;
      ncclResult_t result = ncclCommGetAsyncError(comm_, &state);
      if (result == ncclSuccess) result = state;
      if (result != ncclSuccess && result != ncclInProgress) {
        return Abort(NcclError(result, comm_, absl::StrCat("channel ", id_, ": transfer failed")));
      }
    }
    if (query == cudaSuccess) {
      if (broken_) {
        return absl::FailedPreconditionError(absl::StrCat(
            "channel ", id_, " is broken: an earlier error or timeout aborted its transfers"));
      }
      return absl::OkStatus();
    }
    if (query != cudaErrorNotReady) {
      return Abort(CudaError(query, absl::StrCat("channel ", id_, ": cudaStreamQuery")));
    }
    if (absl::Now() >= deadline) {
      return Abort(absl::DeadlineExceededError(absl::StrCat(
          "channel ", id_, ": transfers not finished after ", absl::FormatDuration(timeout),
          " (kvcd gone or stuck?); the communicator was aborted")));
    }
    lock.Release();
    backoff.Wait();
  }
}

absl::Status NcclChannel::Close() {
  ncclComm_t comm;
  bool broken;
  {
    absl::MutexLock lock(&mu_);
    if (closed_) return absl::OkStatus();
    closed_ = true;
    comm = comm_;
    broken = broken_;
    comm_ = nullptr;
  }
  // kvcd first, so that it tears down its side of the communicator while this one finalises.
  absl::Status status = client_.CloseChannel(id_, kCloseTimeout);
  if (comm == nullptr) return status;
  if (broken) {
    ncclCommAbort(comm);
    return status;
  }
  ncclResult_t result = ncclCommFinalize(comm);
  if (result == ncclSuccess || result == ncclInProgress) {
    result = PollComm(comm, absl::Now() + std::min(options_.connect_timeout, kCloseTimeout));
  }
  if (result != ncclSuccess) {
    if (status.ok()) {
      status = result == ncclInProgress
                   ? absl::DeadlineExceededError(absl::StrCat(
                         "channel ", id_, ": the communicator did not finalise; aborted"))
                   : NcclError(result, comm, absl::StrCat("channel ", id_, ": ncclCommFinalize"));
    }
    ncclCommAbort(comm);
    return status;
  }
  if (result = ncclCommDestroy(comm); result != ncclSuccess && status.ok()) {
    status = NcclError(result, nullptr, absl::StrCat("channel ", id_, ": ncclCommDestroy"));
  }
  return status;
}

}  // namespace kvcompress
