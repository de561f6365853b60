// NcclChannel: the client side of kvcd's nccl transport, a 2-rank NCCL communicator between
// this process (rank 0) and kvcd (rank 1, on its cuda backend's device). Part of
// kvc_client_cuda, built only with CUDA and NCCL (KVC_HAVE_NCCL), so that the plain SDK
// (kvc_client) never needs either.
//
// Prefill side (CHANNEL_DIRECTION_TO_KVCD), caches sent over NVLink / the network instead of
// gRPC:
//
//   auto channel = kvcompress::OpenNcclChannel(*client, v1::CHANNEL_DIRECTION_TO_KVCD);
//   v1::CompressHeader header = ...;
//   (*channel)->Attach(header);                    // transport nccl + channel_id
//   auto session = client->StartCompress(header);
//   for (layer ...) (*channel)->SendLayer(**session, 0, layer, {d_keys, d_values, d_q}, stream);
//   (*channel)->Synchronize(stream, absl::Seconds(60));  // the sends are done
//   (*session)->Finish();                          // results inline, or forwarded
//
// Decode side (CHANNEL_DIRECTION_FROM_KVCD), receiving what prefill clients forward here
// (their header's forward_channel_id = this channel's id):
//
//   auto channel = kvcompress::OpenNcclChannel(*client, v1::CHANNEL_DIRECTION_FROM_KVCD);
//   auto listener = client->ReceiveForwarded((*channel)->id(), absl::InfiniteDuration());
//   while (auto notice = (*listener)->Next(); notice.ok() && notice->has_value()) {
//     if ((*notice)->has_layer()) {
//       // allocate by (*notice)->layer().result().{keys,values,positions,merged}_bytes
//       (*channel)->ReceiveLayer((*notice)->layer(), {d_keys, d_values, d_pos, d_merged}, stream);
//       (*channel)->Synchronize(stream, absl::Seconds(60));
//     }
//   }
//
// Failure: NCCL has no timeouts of its own, so every wait here has one. A transfer that does
// not finish in time, or an asynchronous NCCL error, aborts the communicator (ncclCommAbort):
// the channel is then broken, later transfers fail with FAILED_PRECONDITION, and the caller
// opens a new channel. A dead kvcd never hangs the client. After a failed transfer the
// caller's stream may still hold aborted NCCL work: synchronise it before freeing buffers.
//
// The channel uses the CUDA device current when it was opened; streams passed in must belong
// to it. Thread safety: all methods may be called from several threads; transfers are
// serialised (one communicator, one order of operations).
#ifndef KVCOMPRESS_CLIENT_NCCL_CHANNEL_H_
#define KVCOMPRESS_CLIENT_NCCL_CHANNEL_H_

#include <cuda_runtime_api.h>
#include <nccl.h>

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "client/client.h"

namespace kvcompress {

struct NcclChannelOptions {
  // Idleness after which kvcd closes the channel; zero (the default): the server's default.
  absl::Duration idle_timeout = absl::ZeroDuration();
  // How long forming the communicator may take after OpenChannel (kvcd joins at once), and
  // how long one enqueue may wait for the peer's side of the group. Default 60 s.
  absl::Duration connect_timeout = absl::Seconds(60);
};

// One layer of one sequence in the caller's device memory, for SendLayer. Sizes come from the
// session's header (ExpectedLayerBytes).
struct DeviceLayerTensors {
  const void* keys = nullptr;     // [H_kv, T, D] or [T, H_kv, D] per geometry.layout
  const void* values = nullptr;   // same shape as keys
  const void* queries = nullptr;  // [H_q, W, D]; exactly when the sequence has W > 0
  const void* scores = nullptr;   // [score_heads, T] fp32; exactly when it has score heads
};

// Where ReceiveLayer puts one forwarded layer: device buffers of at least the notice's
// result.{keys,values,positions,merged}_bytes.
struct ForwardedLayerBuffers {
  void* keys = nullptr;
  void* values = nullptr;
  int32_t* positions = nullptr;
  int32_t* merged = nullptr;  // needed when result.merged_bytes > 0, ignored otherwise
};

class NcclChannel final {
 public:
  ~NcclChannel();
  NcclChannel(const NcclChannel&) = delete;
  NcclChannel& operator=(const NcclChannel&) = delete;

  const std::string& id() const { return id_; }
  v1::ChannelDirection direction() const { return direction_; }
  int device() const { return device_; }

  // Sets the header's transport to nccl and its channel_id to this channel (TO_KVCD
  // channels; a FROM_KVCD channel's id goes into prefill clients' forward_channel_id instead).
  void Attach(v1::CompressHeader& header) const;

  // TO_KVCD: enqueues on `stream` one ncclSend per tensor of the layer (keys, values, then
  // queries and scores when the sequence has them; one group) and announces the layer on
  // `session` (SendLayerAnnouncement), in that order, so kvcd receives layers in the order
  // of their announcements. Returns once enqueued: the memory must stay valid and unchanged
  // until `stream` has passed the sends (Synchronize). FAILED_PRECONDITION for a FROM_KVCD
  // or broken channel, or a session not attached to this channel; INVALID_ARGUMENT, before
  // anything is enqueued, for an unknown or repeated layer and for a missing tensor or one the
  // header does not declare; INTERNAL for an NCCL error and DEADLINE_EXCEEDED when the peer
  // does not take part within connect_timeout (both abort the communicator). When the
  // announcement cannot be written after the sends were enqueued (the stream failed), the
  // stream's status comes back and the channel is broken.
  absl::Status SendLayer(CompressSession& session, uint32_t sequence, uint32_t layer,
                         const DeviceLayerTensors& tensors, cudaStream_t stream);

  // FROM_KVCD: enqueues on `stream` the receives of one forwarded layer, in the order kvcd
  // sends it (keys, values, positions, then merged when merged_bytes > 0), and returns once
  // enqueued; Synchronize waits for the bytes. Call it for every layer notice, in the order
  // of the notices. FAILED_PRECONDITION for a TO_KVCD or broken channel; INVALID_ARGUMENT for
  // a missing buffer or a notice ValidateForwardedLayer rejects; INTERNAL / DEADLINE_EXCEEDED
  // as for SendLayer.
  absl::Status ReceiveLayer(const v1::ForwardedLayer& layer, const ForwardedLayerBuffers& out,
                            cudaStream_t stream);
  // The same for several notices at once (in notice order, out[i] for layers[i]), as one NCCL
  // group: a decode worker that has several notices queued receives them with one group
  // launch instead of one per layer.
  absl::Status ReceiveLayers(std::span<const v1::ForwardedLayer* const> layers,
                             std::span<const ForwardedLayerBuffers> out, cudaStream_t stream);

  // Waits until `stream` has finished the work enqueued on it, polling the stream and the
  // communicator. OK when done; INTERNAL on an asynchronous NCCL or CUDA error and
  // DEADLINE_EXCEEDED after `timeout`, both after aborting the communicator.
  absl::Status Synchronize(cudaStream_t stream, absl::Duration timeout);

  // Whether an error or a timeout has aborted the communicator.
  bool broken() const;

  // Closes the channel on kvcd (CloseChannel) and frees the communicator: finalised and
  // destroyed (within connect_timeout) when healthy, aborted when broken. Transfers must be
  // synchronised first. Returns the first error; the channel is closed either way. Idempotent;
  // the destructor calls it.
  absl::Status Close();

 private:
  friend absl::StatusOr<std::unique_ptr<NcclChannel>> OpenNcclChannel(
      Client& client, v1::ChannelDirection direction, const NcclChannelOptions& options);
  NcclChannel(Client& client, std::string id, v1::ChannelDirection direction, int device,
              ncclComm_t comm, const NcclChannelOptions& options);

  // Aborts the communicator and marks the channel broken; returns `status`.
  absl::Status Abort(absl::Status status) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Waits while the communicator reports ncclInProgress (up to connect_timeout); an error
  // or the timeout aborts it. `what` names the call for messages.
  absl::Status AwaitComm(const std::string& what) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The result of an ncclSend / ncclRecv inside a group: ncclInProgress is awaited, an error
  // ends the group and aborts.
  absl::Status Settle(ncclResult_t result, const std::string& what)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status Usable(v1::ChannelDirection wanted, const char* what) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  Client& client_;
  const std::string id_;
  const v1::ChannelDirection direction_;
  const int device_;
  const NcclChannelOptions options_;

  mutable absl::Mutex mu_;
  ncclComm_t comm_ ABSL_GUARDED_BY(mu_);  // null once freed
  bool broken_ ABSL_GUARDED_BY(mu_) = false;
  bool closed_ ABSL_GUARDED_BY(mu_) = false;
};

// Opens an nccl channel on the kvcd `client` talks to and forms its communicator on the
// current CUDA device: ncclGetUniqueId, OpenChannel (transport nccl with the id and the
// direction), then joins as rank 0 of 2 with a non-blocking communicator. `client` must
// outlive the channel. The server's status when it refuses (UNIMPLEMENTED without the nccl
// transport, ...); DEADLINE_EXCEEDED when kvcd does not join within connect_timeout and
// INTERNAL for NCCL or CUDA errors, both after closing the channel again.
absl::StatusOr<std::unique_ptr<NcclChannel>> OpenNcclChannel(
    Client& client, v1::ChannelDirection direction, const NcclChannelOptions& options = {});

}  // namespace kvcompress

#endif  // KVCOMPRESS_CLIENT_NCCL_CHANNEL_H_
