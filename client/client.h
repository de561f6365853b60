// The kvcompress C++ SDK: a client of the kvcompress.v1.KvCompress gRPC service.
//
//   auto client = kvcompress::Client::Connect("localhost:50051");
//   auto info = (*client)->GetServerInfo();
//
// One call for a whole cache (streams every layer, collects every result):
//
//   kvcompress::CacheRequest request;
//   *request.header.mutable_geometry() = ...;   // geometry, sequences, method, output
//   request.tensors = {{{keys0, values0, queries0}, {keys1, values1, queries1}, ...}};
//   absl::StatusOr<kvcompress::CompressedCache> result = (*client)->CompressCache(request);
//
// Or a session that sends layer by layer while a reader thread collects results as the
// server finishes them (compression overlaps prefill):
//
//   auto session = (*client)->StartCompress(header, {.on_layer = [](CompressedLayer l) {...}});
//   for (layer ...) (*session)->SendLayer(0, layer, {keys, values, queries});
//   absl::StatusOr<v1::CompressSummary> summary = (*session)->Finish();
//
// GPU transports (client/cuda_ipc_channel.h, client/nccl_channel.h in kvc_client_cuda) keep
// this call shape: SendLayerReady / SendLayerAnnouncement instead of SendLayer. A header with
// forward_channel_id sends the results to a decode worker's channel instead (the session then
// yields no layers, only the summary); the decode worker listens with ReceiveForwarded.
//
// Errors: gRPC failures come back as absl::Status with the same code and message. The SDK
// also checks what the server sends (a result for an unknown layer, sizes that do not add
// up, a missing summary) and reports INTERNAL or DATA_LOSS instead of trusting it: a bad
// server never crashes the client. Every call carries a deadline.
//
// Thread safety: Client is thread-safe; one Client may run many sessions at once.
// CompressSession::SendLayer may be called from several threads (chunks of different
// layers may interleave, which the protocol allows); Finish, NextResult and Cancel may be
// called from any thread. This header talks proto, not kernels types.
#ifndef KVCOMPRESS_CLIENT_CLIENT_H_
#define KVCOMPRESS_CLIENT_CLIENT_H_

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/functional/function_ref.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "kvcompress/v1/kvcompress.grpc.pb.h"
#include "kvcompress/v1/kvcompress.pb.h"

namespace grpc {
class Channel;
class ChannelCredentials;
class ClientContext;
}  // namespace grpc

namespace kvcompress {

// The largest tensor payload of one chunk: 4 MiB − 1 KiB (proto file comment).
inline constexpr size_t kDefaultMaxChunkBytes = 4 * 1024 * 1024 - 1024;

// TLS for Client::Connect, from PEM files. TLS is on when `enabled` is set or any file is.
struct TlsOptions {
  bool enabled = false;
  // CA certificates that sign the server's certificate; empty: the system's trusted roots.
  std::string root_ca_file;
  // mTLS: this client's certificate chain and its unencrypted private key; both or neither.
  std::string cert_file;
  std::string key_file;
  // The name the server's certificate must carry, instead of the target's host (for targets
  // given by IP or through a proxy, and tests). Empty: the target's host.
  std::string server_name;

  bool on() const {
    return enabled || !root_ca_file.empty() || !cert_file.empty() || !key_file.empty();
  }
};

struct ClientOptions {
  // Deadline of a call that names none. Default 300 s.
  absl::Duration default_deadline = absl::Seconds(300);
  // Channel credentials for Connect; null means `tls`, or plaintext when TLS is off. Set
  // either this or `tls`, not both.
  std::shared_ptr<grpc::ChannelCredentials> credentials;
  TlsOptions tls;
  // Bearer token sent as the metadata "authorization: Bearer <token>" on every call, for a
  // kvcd started with --auth_token_file; or the file to read it from (trailing whitespace
  // is dropped). At most one of the two. Without TLS the token crosses the network in
  // plaintext: use it on plaintext channels only inside a trusted network or mesh.
  std::string auth_token;
  std::string auth_token_file;
  // Tensor bytes per TensorChunk, in [1, kDefaultMaxChunkBytes]. Default the maximum.
  size_t max_chunk_bytes = kDefaultMaxChunkBytes;
};

// One layer of one sequence, viewed: the caller keeps the bytes alive until SendLayer (or
// CompressCache) returns. Sizes must match the header's geometry and sequence shape.
struct LayerTensors {
  std::span<const std::byte> keys;     // [H_kv, T, D] or [T, H_kv, D] per geometry.layout
  std::span<const std::byte> values;   // same shape as keys
  std::span<const std::byte> queries;  // [H_q, W, D]; empty when W == 0
  std::span<const std::byte> scores;   // [score_heads, T] fp32 little-endian; or empty
};

// Bytes [offset, offset + bytes) of a region registered on a cuda_ipc channel (see
// client/cuda_ipc_channel.h, which registers device memory and computes slices).
struct RegionSlice {
  uint32_t region = 0;
  uint64_t offset = 0;  // a multiple of 16
  uint64_t bytes = 0;
};

// One layer of one sequence lying in registered device memory (cuda_ipc): the same tensors
// as LayerTensors. The memory must stay valid and unchanged until the layer's result arrives.
struct LayerRegions {
  std::optional<RegionSlice> keys;
  std::optional<RegionSlice> values;
  std::optional<RegionSlice> queries;  // exactly when W > 0
  std::optional<RegionSlice> scores;   // exactly when the sequence has score heads
  // Optional: where kvcd writes this layer's result instead of sending it (ragged sessions
  // only; LayerReady.output gives the layout). The result then arrives with
  // in_output_region set and empty tensors.
  std::optional<RegionSlice> output;
};

// The compressed cache of one layer of one sequence, as the server returned it.
// RAGGED: keys/values [Σ kept, D], positions/merged [Σ kept], heads in order.
// PADDED: keys/values [H_kv, max_kept, D], positions/merged [H_kv, max_kept] (−1 / 0 past
// a head's count).
struct CompressedLayer {
  uint32_t sequence = 0;
  uint32_t layer = 0;
  v1::OutputFormat format = v1::OUTPUT_FORMAT_RAGGED;
  std::vector<int32_t> kept;  // [H_kv]
  uint32_t max_kept = 0;      // PADDED only
  std::vector<std::byte> keys;
  std::vector<std::byte> values;
  std::vector<int32_t> positions;
  std::vector<int32_t> merged;  // empty when the server sent no merged counts
  // Fraction of the window queries' attention on kept tokens; −1 when not computed.
  double attention_mass_kept = -1.0;
  // The tensors were written into the layer's output slice (cuda_ipc); keys, values and
  // positions are empty here.
  bool in_output_region = false;

  int64_t total_kept() const;
  // Tensor bytes of this result (keys + values + positions + merged).
  uint64_t tensor_bytes() const;
};

// A whole-cache request for Client::CompressCache.
struct CacheRequest {
  // Geometry, sequences, method, output spec; request_id may be empty (the SDK makes one).
  v1::CompressHeader header;
  // [sequence][layer]: header.sequences_size() × geometry.num_layers entries.
  std::vector<std::vector<LayerTensors>> tensors;
  // Zero: ClientOptions::default_deadline.
  absl::Duration deadline = absl::ZeroDuration();
};

struct CompressedCache {
  std::string request_id;
  std::vector<std::vector<CompressedLayer>> layers;  // [sequence][layer]
  v1::CompressSummary summary;
};

struct SessionOptions {
  // Zero: ClientOptions::default_deadline. The deadline covers the whole stream.
  absl::Duration deadline = absl::ZeroDuration();
  // Called on the session's reader thread for every finished layer, in arrival order.
  // When set, NextResult never yields layers. A slow callback slows the stream down
  // (flow control), it loses nothing. Must not call Finish or the destructor.
  std::function<void(CompressedLayer)> on_layer;
};

// One Compress stream. Create with Client::StartCompress. Destroying an unfinished
// session cancels it.
class CompressSession final {
 public:
  ~CompressSession();
  CompressSession(const CompressSession&) = delete;
  CompressSession& operator=(const CompressSession&) = delete;

  // Sends one layer of one sequence as chunks (keys, values, then queries and scores when
  // the shape has them). INVALID_ARGUMENT, before anything is sent, for an unknown
  // sequence or layer, a layer sent twice or sizes that do not match the header. When the
  // stream has failed, returns the stream's final status (as Finish would).
  // FAILED_PRECONDITION on sessions of a GPU transport (cuda_ipc, nccl).
  absl::Status SendLayer(uint32_t sequence, uint32_t layer, const LayerTensors& tensors);

  // cuda_ipc sessions (header transport TRANSPORT_CUDA_IPC with a channel_id): announces
  // that one layer lies in the channel's regions; the server reads it in place. Same checks
  // as SendLayer (sizes against the header, each layer once); the server checks the regions'
  // bounds and alignment. nccl sessions may call it with no slices at all (the same as
  // SendLayerAnnouncement); slices on an nccl session are INVALID_ARGUMENT.
  absl::Status SendLayerReady(uint32_t sequence, uint32_t layer, const LayerRegions& regions);

  // nccl sessions (header transport TRANSPORT_NCCL with a channel_id): announces one layer
  // whose tensors travel over the channel's communicator (LayerReady without slices). Most
  // callers use NcclChannel::SendLayer (client/nccl_channel.h), which enqueues the transfers
  // and calls this. `enqueue_transfers` runs after the checks (sequence and layer in range, not
  // sent before, stream still open) and before the message is written, under the session's
  // write lock, so that transfers enqueued there keep the order of their announcements; when it
  // fails nothing is written and the layer counts as not sent. FAILED_PRECONDITION for a
  // session of another transport; INVALID_ARGUMENT for an unknown or repeated layer; the
  // stream's final status when it has failed (the transfers may then have been enqueued with
  // no receiver: see NcclChannel).
  absl::Status SendLayerAnnouncement(uint32_t sequence, uint32_t layer);
  absl::Status SendLayerAnnouncement(uint32_t sequence, uint32_t layer,
                                     absl::FunctionRef<absl::Status()> enqueue_transfers);

  // The next finished layer, blocking until one arrives; nullopt once the summary has
  // arrived and every result was handed out; the stream's error when it failed.
  // Not for sessions with an on_layer callback (FAILED_PRECONDITION).
  absl::StatusOr<std::optional<CompressedLayer>> NextResult();

  // Half-closes the stream, waits for the remaining results (delivered to on_layer or kept
  // for NextResult) and returns the summary, or the first error: the server's status, a
  // protocol violation the SDK detected, DATA_LOSS when the stream ended without a
  // summary, CANCELLED after Cancel. Idempotent. Forwarded sessions (header
  // forward_channel_id) receive no layers; their summary counts the layers delivered to the
  // decode worker (forwarded_layers, which must be every layer of every sequence).
  absl::StatusOr<v1::CompressSummary> Finish();

  // Cancels the stream; pending and later calls fail with CANCELLED.
  void Cancel();

  const std::string& request_id() const { return request_id_; }
  // The header as sent (with the request id the SDK chose when it was empty).
  const v1::CompressHeader& header() const { return header_; }
  // Whether the header names a forward_channel_id (results go to a decode worker).
  bool forwarded() const { return forwarded_; }
  // Tensor bytes written to / received from the stream so far.
  uint64_t bytes_sent() const { return bytes_sent_.load(std::memory_order_relaxed); }
  uint64_t bytes_received() const { return bytes_received_.load(std::memory_order_relaxed); }
  // Layers received complete so far, and the number expected (0 for forwarded sessions).
  int layers_received() const { return layers_received_.load(std::memory_order_relaxed); }
  int layers_expected() const { return layers_expected_; }

 private:
  friend class Client;
  struct PendingLayer;
  using Stream = grpc::ClientReaderWriter<v1::CompressRequest, v1::CompressResponse>;

  CompressSession(v1::CompressHeader header, size_t max_chunk_bytes, SessionOptions options);
  // `authorization`: the metadata value to send, or empty.
  absl::Status Start(v1::KvCompress::Stub* stub, absl::Duration deadline,
                     const std::string& authorization);
  void ReadLoop();
  // Handles one response; a non-OK status is a protocol violation.
  absl::Status HandleResponse(v1::CompressResponse& response);
  absl::Status HandleLayerResult(const v1::LayerResult& result);
  absl::Status HandleChunk(const v1::TensorChunk& chunk);
  absl::Status CompleteLayer(PendingLayer& pending);
  absl::Status SendTensor(uint32_t sequence, uint32_t layer, v1::TensorKind kind,
                          std::span<const std::byte> bytes);
  // Writes one LayerReady after the size checks of its caller; `before_write` as in
  // SendLayerAnnouncement (null: nothing to run).
  absl::Status WriteLayerReady(v1::CompressRequest& request,
                               absl::FunctionRef<absl::Status()>* before_write);
  // Waits for the reader thread and returns the final status.
  absl::Status WaitForEnd();
  absl::Status FinalStatus() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const v1::CompressHeader header_;
  const std::string request_id_;
  const size_t max_chunk_bytes_;
  SessionOptions options_;
  // From the header, for size checks.
  int num_layers_ = 0;
  size_t element_bytes_ = 0;
  bool padded_ = false;
  bool forwarded_ = false;
  const int layers_expected_;

  std::unique_ptr<grpc::ClientContext> context_;
  std::unique_ptr<Stream> stream_;
  std::thread reader_;

  // Serialises writes, WritesDone and Finish on the stream.
  absl::Mutex write_mu_;
  bool writes_closed_ ABSL_GUARDED_BY(write_mu_) = false;
  std::vector<std::vector<bool>> sent_ ABSL_GUARDED_BY(write_mu_);  // [sequence][layer]

  // Reader-thread state (only the reader touches it while it runs).
  std::vector<std::unique_ptr<PendingLayer>> pending_;  // [sequence · L + layer]
  std::vector<bool> done_;                              // [sequence · L + layer]
  bool summary_seen_ = false;

  absl::Mutex mu_;
  std::deque<CompressedLayer> results_ ABSL_GUARDED_BY(mu_);
  bool reader_done_ ABSL_GUARDED_BY(mu_) = false;
  bool cancelled_ ABSL_GUARDED_BY(mu_) = false;
  absl::Status protocol_error_ ABSL_GUARDED_BY(mu_);
  absl::Status grpc_status_ ABSL_GUARDED_BY(mu_);
  std::optional<v1::CompressSummary> summary_ ABSL_GUARDED_BY(mu_);
  absl::Mutex join_mu_;  // serialises joining the reader thread
  bool joined_ ABSL_GUARDED_BY(join_mu_) = false;

  std::atomic<uint64_t> bytes_sent_{0};
  std::atomic<uint64_t> bytes_received_{0};
  std::atomic<int> layers_received_{0};
};

// The listener's side of forwarding: the ForwardNotice stream of Client::ReceiveForwarded.
// Next is for one thread at a time; Cancel may be called from any thread. Destroying an
// unfinished stream cancels it.
class ForwardStream final {
 public:
  ~ForwardStream();
  ForwardStream(const ForwardStream&) = delete;
  ForwardStream& operator=(const ForwardStream&) = delete;

  // The next notice, blocking until one arrives; nullopt when the server ended the stream
  // with OK (the channel was closed). Layer notices are checked (ValidateForwardedLayer): a
  // bad one cancels the stream and returns INTERNAL. Otherwise the stream's status: the
  // server's (ALREADY_EXISTS for a second listener, FAILED_PRECONDITION for an unknown
  // channel, ...), DEADLINE_EXCEEDED, or CANCELLED after Cancel. Once it has returned an
  // error or nullopt it keeps returning the same.
  absl::StatusOr<std::optional<v1::ForwardNotice>> Next();

  // Cancels the stream; a blocked Next returns CANCELLED.
  void Cancel();

  const std::string& channel_id() const { return channel_id_; }

 private:
  friend class Client;
  explicit ForwardStream(std::string channel_id) : channel_id_(std::move(channel_id)) {}
  // Ends the call (after Read returned false or a cancel) and records its status.
  absl::Status End();

  const std::string channel_id_;
  std::unique_ptr<grpc::ClientContext> context_;
  std::unique_ptr<grpc::ClientReader<v1::ForwardNotice>> reader_;
  std::atomic<bool> cancelled_{false};
  bool ended_ = false;  // only Next's thread (and the destructor) touch these
  absl::Status end_status_;
};

class Client final {
 public:
  // Creates a channel to `target` ("host:port", "unix:/path", ...), with TLS when
  // options.tls is on. The connection is made lazily: an unreachable server, or one whose
  // certificate this client does not trust, shows as UNAVAILABLE on the first call.
  // INVALID_ARGUMENT for an empty target or bad options; NOT_FOUND / PERMISSION_DENIED /
  // INVALID_ARGUMENT naming the option and path when a TLS or token file cannot be used.
  static absl::StatusOr<std::unique_ptr<Client>> Connect(std::string target,
                                                         ClientOptions options = {});
  // Uses an existing channel (in-process servers in tests, custom channel arguments). The
  // channel brings its own credentials: options.tls and options.credentials must be unset.
  static absl::StatusOr<std::unique_ptr<Client>> FromChannel(std::shared_ptr<grpc::Channel> channel,
                                                             ClientOptions options = {});

  Client(const Client&) = delete;
  Client& operator=(const Client&) = delete;

  // Zero deadline: the default.
  absl::StatusOr<v1::ServerInfo> GetServerInfo(absl::Duration deadline = absl::ZeroDuration());

  // Streams every layer of every sequence (layer by layer, sequences interleaved) and
  // collects every result and the summary.
  absl::StatusOr<CompressedCache> CompressCache(const CacheRequest& request);

  // Opens a Compress stream and sends `header`. INVALID_ARGUMENT when the header lacks
  // what the SDK needs to check sizes (geometry, dtype, layout, at least one sequence).
  absl::StatusOr<std::unique_ptr<CompressSession>> StartCompress(v1::CompressHeader header,
                                                                 SessionOptions options = {});

  // Data-plane channels of GPU transports (the RPCs as they are; client/cuda_ipc_channel.h
  // wraps them for cuda_ipc). Zero deadline: the default.
  absl::StatusOr<v1::OpenChannelResponse> OpenChannel(
      const v1::OpenChannelRequest& request, absl::Duration deadline = absl::ZeroDuration());
  absl::Status CloseChannel(const std::string& channel_id,
                            absl::Duration deadline = absl::ZeroDuration());
  absl::StatusOr<v1::RegisterRegionResponse> RegisterRegion(
      const v1::RegisterRegionRequest& request, absl::Duration deadline = absl::ZeroDuration());

  // Listens on an nccl channel this client opened with direction CHANNEL_DIRECTION_FROM_KVCD
  // (client/nccl_channel.h receives the tensors each notice announces). Zero deadline: the
  // default; a listener that waits for requests indefinitely passes absl::InfiniteDuration()
  // and ends with Cancel. INVALID_ARGUMENT for an empty channel id; the server's errors come
  // from Next.
  absl::StatusOr<std::unique_ptr<ForwardStream>> ReceiveForwarded(
      const std::string& channel_id, absl::Duration deadline = absl::ZeroDuration());

  const ClientOptions& options() const { return options_; }

 private:
  Client(std::shared_ptr<grpc::Channel> channel, ClientOptions options, std::string authorization);
  // Checks the options and resolves the token; shared by Connect and FromChannel.
  static absl::StatusOr<std::unique_ptr<Client>> Create(std::shared_ptr<grpc::Channel> channel,
                                                        ClientOptions options);

  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::KvCompress::Stub> stub_;
  ClientOptions options_;
  std::string authorization_;  // "Bearer <token>", or empty
};

// Bytes of one element of `dtype`: 2 for fp16 and bf16, 4 for fp32, 0 for unspecified.
size_t DTypeBytes(v1::DType dtype);

// Expected byte sizes of one layer's tensors for `header`'s geometry and sequence `index`.
struct LayerTensorBytes {
  uint64_t keys = 0;  // also values
  uint64_t queries = 0;
  uint64_t scores = 0;
};
LayerTensorBytes ExpectedLayerBytes(const v1::CompressHeader& header, int sequence);

// Checks a forwarded layer's notice before anyone allocates or receives by it: a known
// dtype, result.sequence < num_sequences, one kept count per KV head, none above the
// sequence's tokens, and keys/values/positions/merged bytes that the kept counts (or
// max_kept, PADDED) imply. INTERNAL naming the field otherwise.
absl::Status ValidateForwardedLayer(const v1::ForwardedLayer& layer);

}  // namespace kvcompress

#endif  // KVCOMPRESS_CLIENT_CLIENT_H_
