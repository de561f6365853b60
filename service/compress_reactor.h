// CompressReactor: one Compress stream (callback API), from the header to the summary.
//
// The reactor reads continuously: the header is validated at once (header_validation.h),
// chunks go to a StreamAssembler, and every completed layer becomes a job on the shared
// LayerScheduler. The worker that finishes a job encodes its results and hands them back;
// the reactor writes them (one write in flight, an outgoing queue behind it) as soon as they
// are final, then, after half-close and the last layer, the CompressSummary with OK.
//
// The reactor never blocks and never waits for compression. Reading pauses (no new
// StartRead) while the input bytes this stream holds — partial layers plus queued or running
// layers — exceed the stream buffer and a job in flight will release some of them.
//
// Errors (validation, malformed chunks, limits, backend failures), cancellation and the
// deadline end the stream with one Finish carrying the mapped status: reading stops, queued
// jobs of the stream are skipped, running jobs' results are dropped, and Finish is called
// only once no job of the stream is queued or running and no write is in flight, so no
// worker touches a deleted reactor. OnDone deletes the reactor; every buffer is released
// by then.
//
// Thread safety: gRPC callbacks and worker callbacks may run concurrently; shared state is
// guarded by mu_. All gRPC operations (StartRead/StartWrite/Finish) are started with mu_
// held, so the decision and the call are one step.
#ifndef KVCOMPRESS_SERVICE_COMPRESS_REACTOR_H_
#define KVCOMPRESS_SERVICE_COMPRESS_REACTOR_H_

#include <grpcpp/grpcpp.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <deque>
#include <memory>
#include <optional>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/functional/any_invocable.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "kernels/backend.h"
#include "kvcompress/v1/kvcompress.grpc.pb.h"
#include "service/backend_router.h"
#include "service/call_authenticator.h"
#include "service/channel_rpcs.h"
#include "service/cuda_ipc_transport.h"
#include "service/header_validation.h"
#include "service/internal/encoded_layer_result.h"
#include "service/internal/service_metrics.h"
#include "service/layer_ready_assembler.h"
#include "service/layer_scheduler.h"
#include "service/memory_budget.h"
#include "service/nccl_transport.h"
#include "service/server_limits.h"
#include "service/stream_assembler.h"
#include "service/structured_log.h"

namespace kvcompress {

// Server-lifetime objects every Compress stream uses; all must outlive the reactors.
struct CompressEnvironment {
  const BackendRouter* backends = nullptr;
  LayerScheduler* scheduler = nullptr;
  MemoryBudget* memory = nullptr;
  ServiceMetrics* metrics = nullptr;  // may be null
  ServerLimits limits;
  // Bytes one stream may hold before it stops reading (default 512 MiB).
  uint64_t stream_buffer_bytes = uint64_t{512} << 20;
  // Who may call (kvcompress_service.cc checks every call with it); null: everybody.
  const CallAuthenticator* authenticator = nullptr;
  // Receives one "compress" event per finished stream; may be null.
  StructuredLog* log = nullptr;
  // Data-plane channels of GPU transports (cuda_ipc streams lease theirs).
  ChannelEnvironment channels;
};

class CompressReactor final
    : public grpc::ServerBidiReactor<v1::CompressRequest, v1::CompressResponse> {
 public:
  // `admission` not OK refuses the stream at once with that status (concurrency limit,
  // draining). `on_done` runs in OnDone, just before the reactor deletes itself.
  // `identity` is what CallAuthenticator established about the caller.
  CompressReactor(grpc::CallbackServerContext* context, const CompressEnvironment& environment,
                  absl::Status admission, absl::AnyInvocable<void()> on_done,
                  CallIdentity identity = {});

  // Whether the caller proved who it is (bearer token or verified client certificate).
  // Transports that give a peer access to device memory (CUDA IPC, NCCL channels) must
  // refuse streams for which this is false; inline streams do not need it.
  bool peer_authenticated() const { return identity_.authenticated; }

  void OnReadDone(bool ok) override;
  void OnWriteDone(bool ok) override;
  void OnCancel() override;
  void OnDone() override;

 private:
  using Clock = std::chrono::steady_clock;

  ~CompressReactor() override = default;

  // Runs on a worker: compresses one layer (unless the stream already ended), encodes its
  // results outside the lock and hands them back.
  void RunLayerJob(AssembledLayer layer, Clock::time_point enqueued);

  void Enqueue(AssembledLayer layer) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // cuda_ipc / nccl header: leases the channel the header names and checks the request runs
  // on the cuda backend with a per-layer budget (read path).
  absl::Status StartDeviceTransport(const v1::CompressHeader& header,
                                    const ValidatedHeader& validated);
  // Header with forward_channel_id: leases the decode worker's channel (read path).
  absl::Status StartForward(const v1::CompressHeader& header, const ValidatedHeader& validated);
  // nccl: enqueues the receives of an announced layer into pooled device memory (read path,
  // so that receives keep the order of the layer_ready messages).
  absl::Status ReceiveNcclLayer(AssembledLayer& layer);
  // A device-resident layer waiting for a batch job, and when it was enqueued.
  struct PendingDeviceLayer {
    AssembledLayer layer;
    Clock::time_point enqueued;
  };
  // Runs on a worker: compresses the stream's pending device layers in batches until none is
  // left.
  void RunDeviceBatches();
  // One batch through the cuda backend's device path (waiting for the nccl receives first),
  // forwarded when the stream forwards.
  absl::StatusOr<std::vector<LayerResult>> CompressDeviceBatch(
      std::vector<PendingDeviceLayer>& batch);
  // The accounting and hand-over of a job's results (`layers` input layers).
  void CompleteJob(absl::StatusOr<std::vector<LayerResult>> results, uint64_t input_bytes,
                   int64_t layers, Clock::time_point started, Clock::time_point enqueued,
                   bool skip);
  // Runs on a worker: forwards host-resident results (inline input); their tensors are
  // released.
  absl::Status ForwardHostResults(std::vector<LayerResult>& results);
  // What CompressDeviceLayers / ForwardHostLayer need to forward this stream's layers.
  ForwardContext ForwardContextFor() const;
  // The deadline of one NCCL wait: the stream's, capped by --nccl_timeout from now.
  absl::Time NcclDeadline() const;
  // Tells the forward channel's listener that this request ended (once).
  void PostForwardEnd(const absl::Status& status) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Ends the stream with `status` (first error wins; `reason` labels kvcompress_errors_total);
  // Continue finishes once it is safe.
  void Fail(absl::Status status, ErrorReason reason) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The one place that starts reads, writes and Finish, according to the state.
  void Continue() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  bool ReadsPaused() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Counts (and logs a fallback of) the backend the header chose.
  void NoteBackendRoute() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void FillSummary(v1::CompressSummary& summary) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void RecordOutcome(const absl::Status& status) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  // The "compress" log event of the finished stream (OnDone).
  nlohmann::json LogFields() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  grpc::CallbackServerContext* const context_;
  const CompressEnvironment environment_;
  absl::AnyInvocable<void()> on_done_;
  const Clock::time_point opened_ = Clock::now();
  const CallIdentity identity_;
  const std::string peer_;  // "ipv4:10.0.0.7:51234", for logs
  // The header's request_id as the client sent it, even when the header was rejected (read
  // path only; OnDone reads it after the last read completed).
  std::string client_request_id_;

  // Owned by the read path: one read is in flight at a time and its callback alone touches
  // request_ and assembler_.
  v1::CompressRequest request_;
  std::unique_ptr<StreamAssembler> assembler_;
  // cuda_ipc streams: the channel, leased until the reactor is deleted (after every job has
  // ended), and the assembler of its LayerReady messages (read path).
  ChannelLease channel_;
  std::unique_ptr<LayerReadyAssembler> ready_assembler_;
  uint64_t device_bytes_announced_ = 0;
  // nccl streams: the channel's communicator. Set on the read path, read by Fail on any
  // thread (which aborts it so that receives in flight return at once).
  std::atomic<NcclLink*> nccl_link_{nullptr};
  // Forwarding streams: the decode worker's channel, leased until the reactor is deleted;
  // written on the read path before the first job exists, read-only afterwards.
  ChannelLease forward_channel_;
  ForwardOutbox* forward_outbox_ = nullptr;
  v1::CacheGeometry forward_geometry_;
  std::vector<v1::SequenceShape> forward_shapes_;

  // Written once, under mu_, when the header is accepted (before the first job exists);
  // immutable afterwards, so workers read it without the lock.
  std::unique_ptr<const ValidatedHeader> header_;

  absl::Mutex mu_;
  // Ended by an error or cancellation: stop reading, skip jobs, drop results.
  bool terminal_ ABSL_GUARDED_BY(mu_) = false;
  absl::Status status_ ABSL_GUARDED_BY(mu_);
  ErrorReason error_reason_ ABSL_GUARDED_BY(mu_) = ErrorReason::kInternal;
  bool finish_called_ ABSL_GUARDED_BY(mu_) = false;
  bool read_in_flight_ ABSL_GUARDED_BY(mu_) = false;
  bool reads_done_ ABSL_GUARDED_BY(mu_) = false;  // half-close seen and every layer received
  bool write_in_flight_ ABSL_GUARDED_BY(mu_) = false;
  // Layers queued or running, plus running batch jobs.
  int64_t jobs_in_flight_ ABSL_GUARDED_BY(mu_) = 0;
  std::deque<PendingDeviceLayer> device_pending_ ABSL_GUARDED_BY(mu_);
  int device_batch_jobs_ ABSL_GUARDED_BY(mu_) = 0;  // scheduled or running
  std::deque<EncodedLayerResult> outgoing_ ABSL_GUARDED_BY(mu_);
  v1::CompressResponse response_ ABSL_GUARDED_BY(mu_);  // the message being written

  // Input bytes this stream holds, for read pausing.
  uint64_t partial_bytes_ ABSL_GUARDED_BY(mu_) = 0;  // layers being assembled
  uint64_t job_bytes_ ABSL_GUARDED_BY(mu_) = 0;      // layers queued or compressing

  // Accounting for the summary and metrics.
  std::string method_label_ ABSL_GUARDED_BY(mu_) = "unknown";
  std::string transport_label_ ABSL_GUARDED_BY(mu_) = "inline";  // from the header
  Clock::time_point header_time_ ABSL_GUARDED_BY(mu_);
  Clock::time_point receive_end_ ABSL_GUARDED_BY(mu_);
  Clock::time_point write_started_ ABSL_GUARDED_BY(mu_);
  uint64_t bytes_in_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t bytes_out_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t tokens_in_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t tokens_kept_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t layers_final_ ABSL_GUARDED_BY(mu_) = 0;
  uint32_t deferred_layers_ ABSL_GUARDED_BY(mu_) = 0;
  uint32_t forwarded_layers_ ABSL_GUARDED_BY(mu_) = 0;
  bool forward_end_posted_ ABSL_GUARDED_BY(mu_) = false;
  double queue_seconds_ ABSL_GUARDED_BY(mu_) = 0;
  double score_seconds_ ABSL_GUARDED_BY(mu_) = 0;
  double select_seconds_ ABSL_GUARDED_BY(mu_) = 0;
  double gather_seconds_ ABSL_GUARDED_BY(mu_) = 0;
  double send_seconds_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace kvcompress

#endif  // KVCOMPRESS_SERVICE_COMPRESS_REACTOR_H_
