#include "service/compress_reactor.h"

#include <optional>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "kernels/status_macros.h"
#include "service/spec_conversion.h"
#include "service/status_conversion.h"

namespace kvcompress {
namespace {

double Seconds(std::chrono::steady_clock::duration duration) {
  return std::chrono::duration<double>(duration).count();
}

// The `transport` label of the byte counters: "inline", "cuda_ipc", "nccl".
std::string TransportLabel(v1::Transport transport) {
  switch (transport) {
    case v1::TRANSPORT_UNSPECIFIED:
    case v1::TRANSPORT_INLINE:
      return "inline";
    case v1::TRANSPORT_CUDA_IPC:
      return "cuda_ipc";
    case v1::TRANSPORT_NCCL:
      return "nccl";
    default:
      return "unknown";
  }
}

// Failures of a header (or of a first message that is none).
ErrorReason HeaderErrorReason(const v1::CompressRequest& request, const absl::Status& status) {
  if (!request.has_header()) return ErrorReason::kMalformedStream;
  switch (status.code()) {
    case absl::StatusCode::kResourceExhausted:
      return ErrorReason::kRequestLimit;
    case absl::StatusCode::kUnimplemented:
      return ErrorReason::kUnimplemented;
    default:
      return ErrorReason::kInvalidHeader;
  }
}

uint64_t LayerBytes(const LayerInput& input) {
  return input.keys.size() + input.values.size() + input.queries.size() +
         input.scores.size() * sizeof(float);
}

}  // namespace

CompressReactor::CompressReactor(grpc::CallbackServerContext* context,
                                 const CompressEnvironment& environment, absl::Status admission,
                                 absl::AnyInvocable<void()> on_done, CallIdentity identity)
    : context_(context),
      environment_(environment),
      on_done_(std::move(on_done)),
      identity_(std::move(identity)),
      peer_(context->peer()) {
  if (environment_.metrics != nullptr) environment_.metrics->requests_in_flight.Add({}, 1);
  absl::MutexLock lock(&mu_);
  header_time_ = receive_end_ = opened_;
  if (!admission.ok()) {
    const ErrorReason reason = admission.code() == absl::StatusCode::kUnavailable
                                   ? ErrorReason::kShuttingDown
                                   : ErrorReason::kStreamLimit;
    Fail(std::move(admission), reason);
  }
  Continue();
}

void CompressReactor::OnReadDone(bool ok) {
  if (!ok) {
    // Half-close, or the call is gone.
    absl::MutexLock lock(&mu_);
    read_in_flight_ = false;
    if (!terminal_) {
      if (context_->IsCancelled()) {
        Fail(absl::CancelledError("the client cancelled the stream"), ErrorReason::kCancelled);
      } else if (header_ == nullptr) {
        Fail(absl::InvalidArgumentError(
                 "stream ended before the header; a Compress stream starts with a header"),
             ErrorReason::kMalformedStream);
      } else if (absl::Status complete = ready_assembler_ != nullptr
                                             ? ready_assembler_->CheckComplete()
                                             : assembler_->CheckComplete();
                 !complete.ok()) {
        Fail(std::move(complete), ErrorReason::kMalformedStream);
      } else {
        reads_done_ = true;
        receive_end_ = Clock::now();
      }
    }
    Continue();
    return;
  }

  {
    absl::MutexLock lock(&mu_);
    if (terminal_) {
      read_in_flight_ = false;
      Continue();
      return;
    }
  }

  // The read path owns request_ and assembler_; only the lock-free part of the work (header
  // validation, copying chunk bytes) happens here.
  absl::Status status;
  ErrorReason reason = ErrorReason::kInternal;
  std::string transport_label;
  std::unique_ptr<ValidatedHeader> new_header;
  std::optional<AssembledLayer> completed;
  uint64_t chunk_bytes = 0;
  std::string method_label;
  if (assembler_ == nullptr) {
    if (request_.has_header()) client_request_id_ = request_.header().request_id();
    // Label metrics by scorer even when the rest of the header is rejected.
    if (request_.has_header()) {
      absl::StatusOr<MethodSpec> spec = MethodSpecFromProto(request_.header().method());
      if (spec.ok()) method_label = std::string(ScorerName(spec->scorer));
    }
    absl::StatusOr<ValidatedHeader> validated =
        ValidateHeader(request_, environment_.limits, *environment_.backends);
    if (validated.ok()) {
      transport_label = TransportLabel(request_.header().transport());
      new_header = std::make_unique<ValidatedHeader>(std::move(validated).value());
      assembler_ = std::make_unique<StreamAssembler>(new_header->geometry, new_header->sequences,
                                                     environment_.memory);
      const v1::Transport transport = request_.header().transport();
      if (transport == v1::TRANSPORT_CUDA_IPC || transport == v1::TRANSPORT_NCCL) {
        status = StartDeviceTransport(request_.header(), *new_header);
      }
      if (status.ok() && !request_.header().forward_channel_id().empty()) {
        status = StartForward(request_.header(), *new_header);
      }
      if (!status.ok()) reason = HeaderErrorReason(request_, status);
    } else {
      status = validated.status();
      reason = HeaderErrorReason(request_, status);
    }
  } else if (ready_assembler_ != nullptr) {
    absl::StatusOr<DeviceLayerInput> ready = ready_assembler_->AddRequest(request_);
    if (ready.ok() && ready->output != nullptr && (header_->padded_output || forward_outbox_)) {
      ready = absl::InvalidArgumentError(absl::StrCat(
          "sequence ", ready->sequence, " layer ", ready->layer, " output: ",
          forward_outbox_ != nullptr
              ? "the request forwards its results (forward_channel_id); give no output slice"
              : "output slices take the ragged format; the request asks for "
                "OUTPUT_FORMAT_PADDED"));
    }
    if (ready.ok()) {
      chunk_bytes = ready_assembler_->bytes_received() - device_bytes_announced_;
      device_bytes_announced_ = ready_assembler_->bytes_received();
      completed.emplace();
      completed->device = *ready;
      if (nccl_link_.load() != nullptr) {
        status = ReceiveNcclLayer(*completed);
        if (!status.ok()) {
          reason = status.code() == absl::StatusCode::kResourceExhausted
                       ? ErrorReason::kDeviceMemoryBudget
                       : ErrorReason::kBackend;
          completed.reset();
        }
      }
    } else {
      status = ready.status();
      reason = ErrorReason::kMalformedStream;
    }
  } else {
    if (request_.has_chunk()) chunk_bytes = request_.chunk().data().size();
    absl::StatusOr<std::optional<AssembledLayer>> added = assembler_->AddRequest(request_);
    if (added.ok()) {
      completed = std::move(added).value();
    } else {
      status = added.status();
      reason = status.code() == absl::StatusCode::kResourceExhausted
                   ? ErrorReason::kMemoryBudget
                   : ErrorReason::kMalformedStream;
      chunk_bytes = 0;
    }
  }
  request_.Clear();

  absl::MutexLock lock(&mu_);
  read_in_flight_ = false;
  if (!method_label.empty()) method_label_ = std::move(method_label);
  if (terminal_) {
    Continue();
    return;  // `completed` releases its buffers on the way out
  }
  if (!status.ok()) {
    Fail(std::move(status), reason);
    Continue();
    return;
  }
  if (new_header != nullptr) {
    transport_label_ = std::move(transport_label);
    header_time_ = Clock::now();
    header_ = std::move(new_header);
    NoteBackendRoute();
  }
  if (chunk_bytes > 0) {
    bytes_in_ += chunk_bytes;
    if (environment_.metrics != nullptr) {
      environment_.metrics->bytes_received.Add({transport_label_},
                                               static_cast<double>(chunk_bytes));
    }
  }
  partial_bytes_ = assembler_->bytes_buffered();
  if (completed.has_value()) Enqueue(std::move(*completed));
  Continue();
}

void CompressReactor::Enqueue(AssembledLayer layer) {
  const uint64_t bytes = LayerBytes(layer.input) + layer.device_bytes;
  ++jobs_in_flight_;
  job_bytes_ += bytes;
  if (layer.device.has_value()) {
    // Device-resident layers are compressed in batches: every layer ready when a batch job
    // starts goes into one CudaCompressor call (and, forwarded, one NCCL group). Two batch
    // jobs at most, so that one compresses while the other's results are in flight.
    device_pending_.push_back(PendingDeviceLayer{std::move(layer), Clock::now()});
    if (device_batch_jobs_ >= 2) return;
    ++device_batch_jobs_;
    ++jobs_in_flight_;  // the batch job itself, so that Finish waits for it
    absl::Status status = environment_.scheduler->Enqueue([this]() mutable { RunDeviceBatches(); });
    if (!status.ok()) {
      --device_batch_jobs_;
      --jobs_in_flight_;
      Fail(std::move(status), ErrorReason::kShuttingDown);
    }
    return;
  }
  absl::Status status = environment_.scheduler->Enqueue(
      [this, layer = std::move(layer), enqueued = Clock::now()]() mutable {
        RunLayerJob(std::move(layer), enqueued);
      });
  if (!status.ok()) {
    --jobs_in_flight_;
    job_bytes_ -= bytes;
    Fail(std::move(status), ErrorReason::kShuttingDown);
  }
}

void CompressReactor::RunLayerJob(AssembledLayer layer, Clock::time_point enqueued) {
  const Clock::time_point started = Clock::now();
  const uint64_t input_bytes = LayerBytes(layer.input) + layer.device_bytes;
  bool skip;
  {
    absl::MutexLock lock(&mu_);
    skip = terminal_;
  }
  absl::StatusOr<std::vector<LayerResult>> results =
      skip ? absl::StatusOr<std::vector<LayerResult>>(absl::CancelledError("stream ended"))
           : header_->pipeline->AddLayer(std::move(layer.input));
  layer.input = LayerInput();
  layer.reservation.Release();
  if (results.ok() && forward_outbox_ != nullptr) {
    if (absl::Status forwarded = ForwardHostResults(*results); !forwarded.ok()) {
      results = forwarded;
    }
  }
  CompleteJob(std::move(results), input_bytes, /*layers=*/1, started, enqueued, skip);
}

void CompressReactor::RunDeviceBatches() {
  while (true) {
    std::vector<PendingDeviceLayer> batch;
    bool skip;
    {
      absl::MutexLock lock(&mu_);
      if (device_pending_.empty()) {
        --device_batch_jobs_;
        --jobs_in_flight_;
        Continue();
        return;
      }
      // Layers received over nccl hold pooled device memory that counts against the stream's
      // buffer: a batch takes at most half of it, so that the next layers are received while
      // this batch compresses (in-place cuda_ipc layers hold none and all go together).
      uint64_t batch_bytes = 0;
      while (!device_pending_.empty() &&
             (batch.empty() || batch_bytes + device_pending_.front().layer.device_bytes <=
                                   environment_.stream_buffer_bytes / 2)) {
        batch_bytes += device_pending_.front().layer.device_bytes;
        batch.push_back(std::move(device_pending_.front()));
        device_pending_.pop_front();
      }
      skip = terminal_;
    }
    const Clock::time_point started = Clock::now();
    uint64_t input_bytes = 0;
    for (const PendingDeviceLayer& pending : batch) input_bytes += pending.layer.device_bytes;
    absl::StatusOr<std::vector<LayerResult>> results =
        skip ? absl::StatusOr<std::vector<LayerResult>>(absl::CancelledError("stream ended"))
             : CompressDeviceBatch(batch);
    const Clock::time_point enqueued = batch.front().enqueued;
    const int64_t layers = static_cast<int64_t>(batch.size());
    batch.clear();  // the received layers' device memory
    CompleteJob(std::move(results), input_bytes, layers, started, enqueued, skip);
  }
}

void CompressReactor::CompleteJob(absl::StatusOr<std::vector<LayerResult>> results,
                                  uint64_t input_bytes, int64_t layers, Clock::time_point started,
                                  Clock::time_point enqueued, bool skip) {
  uint64_t forwarded_bytes = 0;
  if (results.ok() && forward_outbox_ != nullptr) {
    for (const LayerResult& result : *results) {
      forwarded_bytes +=
          static_cast<uint64_t>(result.total_kept()) *
          (2 * header_->geometry.RowBytes() + sizeof(int32_t) * (result.merged.empty() ? 1 : 2));
    }
  }
  const Clock::time_point compressed_at = Clock::now();

  // Per-result accounting and encoding, outside the lock.
  uint64_t tokens_in = 0, tokens_kept = 0;
  uint32_t deferred = 0;
  double score = 0, select = 0, gather = 0;
  std::vector<EncodedLayerResult> encoded;
  if (results.ok()) {
    encoded.reserve(results->size());
    for (LayerResult& result : *results) {
      const SequenceShape& shape = header_->sequences[result.sequence];
      tokens_in += static_cast<uint64_t>(shape.num_tokens) * header_->geometry.num_kv_heads;
      tokens_kept += static_cast<uint64_t>(result.total_kept());
      if (result.deferred) ++deferred;
      score += result.seconds.score;
      select += result.seconds.select;
      gather += result.seconds.gather;
      if (environment_.metrics != nullptr) {
        ServiceMetrics& metrics = *environment_.metrics;
        metrics.layer_stage_duration.Observe({"score"}, result.seconds.score);
        metrics.layer_stage_duration.Observe({"select"}, result.seconds.select);
        metrics.layer_stage_duration.Observe({"gather"}, result.seconds.gather);
        if (result.attention_mass_kept >= 0) {
          metrics.attention_mass_kept.Observe({}, result.attention_mass_kept);
        }
      }
      encoded.emplace_back(std::move(result), header_->geometry, header_->padded_output,
                           header_->return_merged_counts);
    }
  }
  const Clock::time_point encoded_at = Clock::now();
  if (!skip && environment_.metrics != nullptr) {
    environment_.metrics->layer_stage_duration.Observe({"queue"}, Seconds(started - enqueued));
    environment_.metrics->tokens_in.Add({}, static_cast<double>(tokens_in));
    environment_.metrics->tokens_kept.Add({}, static_cast<double>(tokens_kept));
  }

  absl::MutexLock lock(&mu_);
  jobs_in_flight_ -= layers;
  job_bytes_ -= input_bytes;
  if (!skip && !terminal_) {
    queue_seconds_ += Seconds(started - enqueued);
    if (!results.ok()) {
      absl::Status status = results.status();
      if (status.code() == absl::StatusCode::kInternal) {
        // DESIGN §7: the client gets the request id with an internal error, so that the
        // operator can find the stream's "compress" log line, which carries this message.
        status = absl::InternalError(
            absl::StrCat("request ", header_->request_id, ": ", status.message()));
      }
      const ErrorReason reason = status.code() == absl::StatusCode::kResourceExhausted
                                     ? ErrorReason::kDeviceMemoryBudget
                                     : ErrorReason::kBackend;
      Fail(std::move(status), reason);
    } else {
      tokens_in_ += tokens_in;
      tokens_kept_ += tokens_kept;
      deferred_layers_ += deferred;
      score_seconds_ += score;
      select_seconds_ += select;
      gather_seconds_ += gather;
      send_seconds_ += Seconds(encoded_at - compressed_at);  // result serialisation
      if (forward_outbox_ != nullptr) {
        // Delivered to the decode worker already; this stream carries only the summary.
        layers_final_ += static_cast<int64_t>(encoded.size());
        forwarded_layers_ += static_cast<uint32_t>(encoded.size());
        bytes_out_ += forwarded_bytes;
        if (environment_.metrics != nullptr && forwarded_bytes > 0) {
          environment_.metrics->bytes_sent.Add({"nccl"}, static_cast<double>(forwarded_bytes));
        }
      } else {
        for (EncodedLayerResult& result : encoded) {
          outgoing_.push_back(std::move(result));
          ++layers_final_;
        }
      }
    }
  }
  Continue();
}

void CompressReactor::OnWriteDone(bool ok) {
  absl::MutexLock lock(&mu_);
  write_in_flight_ = false;
  send_seconds_ += Seconds(Clock::now() - write_started_);
  if (!ok) {
    Fail(absl::CancelledError("the client stopped receiving results"), ErrorReason::kClientGone);
  }
  Continue();
}

void CompressReactor::OnCancel() {
  absl::MutexLock lock(&mu_);
  if (context_->deadline() <= std::chrono::system_clock::now()) {
    Fail(absl::DeadlineExceededError("the stream's deadline passed"),
         ErrorReason::kDeadlineExceeded);
  } else {
    Fail(absl::CancelledError("the client cancelled the stream"), ErrorReason::kCancelled);
  }
  Continue();
}

void CompressReactor::OnDone() {
  // The thread that called Finish may still be releasing mu_; wait for it. Then nothing
  // changes any more: build the log line under the lock, write it outside.
  nlohmann::json fields;
  {
    absl::MutexLock lock(&mu_);
    if (environment_.log != nullptr) fields = LogFields();
  }
  if (environment_.log != nullptr) environment_.log->Emit("compress", fields);
  if (environment_.metrics != nullptr) environment_.metrics->requests_in_flight.Add({}, -1);
  if (on_done_) std::move(on_done_)();
  delete this;
}

void CompressReactor::Fail(absl::Status status, ErrorReason reason) {
  if (terminal_ || finish_called_) return;
  if (NcclLink* link = nccl_link_.load(); link != nullptr) {
    // The client may have sent tensors kvcd will never receive: the channel's byte stream is
    // lost, so the channel goes (its next use answers FAILED_PRECONDITION). Aborting now also
    // makes receives in flight return at once instead of at their deadline.
    link->Abort(absl::StrCat("a stream on it failed: ", status.message()));
  }
  terminal_ = true;
  status_ = std::move(status);
  error_reason_ = reason;
  outgoing_.clear();
}

bool CompressReactor::ReadsPaused() const {
  // Pause only while a job in flight will release bytes and resume reading. Unsent results
  // do not count: a client may write its whole request before reading any result, and
  // pausing on them would deadlock both sides on flow control.
  return jobs_in_flight_ > 0 && partial_bytes_ + job_bytes_ >= environment_.stream_buffer_bytes;
}

void CompressReactor::Continue() {
  if (finish_called_) return;
  if (terminal_) {
    if (jobs_in_flight_ == 0 && !write_in_flight_) {
      finish_called_ = true;
      PostForwardEnd(status_);
      RecordOutcome(status_);
      Finish(ToGrpcStatus(status_));
    }
    return;
  }
  if (!reads_done_ && !read_in_flight_ && !ReadsPaused()) {
    read_in_flight_ = true;
    StartRead(&request_);
  }
  if (write_in_flight_) return;
  response_.Clear();
  while (!outgoing_.empty()) {
    EncodedLayerResult& front = outgoing_.front();
    const uint64_t pending_before = front.pending_bytes();
    if (front.Next(response_)) {
      const uint64_t sent = pending_before - front.pending_bytes();
      bytes_out_ += sent;
      if (sent > 0 && environment_.metrics != nullptr) {
        environment_.metrics->bytes_sent.Add({transport_label_}, static_cast<double>(sent));
      }
      write_in_flight_ = true;
      write_started_ = Clock::now();
      StartWrite(&response_);
      return;
    }
    outgoing_.pop_front();
  }
  if (reads_done_ && jobs_in_flight_ == 0) {
    const int64_t expected_layers =
        static_cast<int64_t>(header_->sequences.size()) * header_->geometry.num_layers;
    if (layers_final_ != expected_layers) {
      Fail(absl::InternalError(absl::StrCat("request ", header_->request_id, ": the pipeline ",
                                            "produced ", layers_final_, " of ", expected_layers,
                                            " layer results")),
           ErrorReason::kInternal);
      Continue();
      return;
    }
    FillSummary(*response_.mutable_summary());
    finish_called_ = true;
    PostForwardEnd(absl::OkStatus());
    RecordOutcome(absl::OkStatus());
    StartWriteAndFinish(&response_, grpc::WriteOptions(), grpc::Status::OK);
  }
}

absl::Status CompressReactor::StartDeviceTransport(const v1::CompressHeader& header,
                                                   const ValidatedHeader& validated) {
  const char* transport = header.transport() == v1::TRANSPORT_NCCL ? "nccl" : "cuda_ipc";
  absl::StatusOr<ChannelLease> lease =
      AcquireStreamChannel(environment_.channels, identity_, header);
  if (!lease.ok()) return lease.status();
  if (validated.backend != environment_.channels.device_backend) {
    return absl::UnimplementedError(absl::StrCat(
        "transport ", transport, " runs on kvcd's cuda backend, which cannot run this request (",
        validated.backend_passed_over.message(), "); send it with TRANSPORT_INLINE"));
  }
  if (validated.spec.reducer != ReducerKind::kDrop) {
    return absl::UnimplementedError(absl::StrCat(
        "transport ", transport,
        ": the merging reducers are not implemented for device-resident "
        "layers yet (the cuda backend runs them for inline requests); use TRANSPORT_INLINE"));
  }
  if (validated.spec.layer_budget == LayerBudgetKind::kDynamic) {
    return absl::UnimplementedError(absl::StrCat(
        "transport ", transport,
        ": dynamic layer budgets are not implemented for device-resident layers yet; use "
        "uniform or pyramid budgets, or TRANSPORT_INLINE"));
  }
  channel_ = std::move(lease).value();
  if (header.transport() == v1::TRANSPORT_NCCL) {
    nccl_link_ = channel_->resources().nccl_link();
    ready_assembler_ =
        std::make_unique<LayerReadyAssembler>(validated.geometry, validated.sequences, nullptr);
  } else {
    ready_assembler_ = std::make_unique<LayerReadyAssembler>(validated.geometry,
                                                             validated.sequences, channel_.get());
  }
  return absl::OkStatus();
}

absl::Status CompressReactor::StartForward(const v1::CompressHeader& header,
                                           const ValidatedHeader& validated) {
  if (validated.padded_output) {
    return absl::InvalidArgumentError(
        "output.format: forwarded layers are ragged (keys/values [sum kept, D] with positions); "
        "OUTPUT_FORMAT_PADDED cannot be forwarded");
  }
  if (environment_.channels.device_backend == nullptr) {
    return absl::FailedPreconditionError(
        "forward_channel_id: forwarding needs kvcd's cuda backend (start kvcd with "
        "--backend=cuda)");
  }
  absl::StatusOr<ChannelLease> lease =
      AcquireForwardChannel(environment_.channels, identity_, header);
  if (!lease.ok()) return lease.status();
  forward_channel_ = std::move(lease).value();
  forward_outbox_ = forward_channel_->resources().forward_outbox();
  forward_geometry_ = header.geometry();
  forward_shapes_.assign(header.sequences().begin(), header.sequences().end());
  return absl::OkStatus();
}

absl::Time CompressReactor::NcclDeadline() const {
  const absl::Time capped = absl::Now() + environment_.channels.nccl_timeout;
  const absl::Time stream = absl::FromChrono(context_->deadline());
  return std::min(capped, stream);
}

absl::Status CompressReactor::ReceiveNcclLayer(AssembledLayer& layer) {
  absl::StatusOr<ReceivedDeviceLayer> received =
      ReceiveDeviceLayer(*environment_.channels.device_backend, *nccl_link_.load(),
                         header_->geometry, *layer.device, NcclDeadline());
  if (!received.ok()) return received.status();
  layer.device = received->input;
  layer.device_transfer = std::move(received->transfer);
  layer.device_bytes = received->device_bytes;
  return absl::OkStatus();
}

absl::StatusOr<std::vector<LayerResult>> CompressReactor::CompressDeviceBatch(
    std::vector<PendingDeviceLayer>& batch) {
  std::vector<DeviceLayerTask> tasks;
  tasks.reserve(batch.size());
  for (PendingDeviceLayer& pending : batch) {
    if (pending.layer.device_transfer != nullptr) {
      KVC_RETURN_IF_ERROR(pending.layer.device_transfer->Wait(NcclDeadline()));
    }
    DeviceLayerTask& task = tasks.emplace_back();
    task.input = *pending.layer.device;
    task.tokens_per_head = header_->pipeline->LayerTokenBudget(task.input.layer, task.input.shape);
    task.keep_all = IsSkippedLayer(header_->spec, task.input.layer) ||
                    task.tokens_per_head >= task.input.shape.num_tokens;
  }
  if (forward_outbox_ != nullptr) {
    const ForwardContext forward = ForwardContextFor();
    return CompressDeviceLayers(*header_->backend, header_->geometry, header_->spec, tasks,
                                &forward);
  }
  return CompressDeviceLayers(*header_->backend, header_->geometry, header_->spec, tasks, nullptr);
}

absl::Status CompressReactor::ForwardHostResults(std::vector<LayerResult>& results) {
  for (LayerResult& result : results) {
    KVC_RETURN_IF_ERROR(ForwardHostLayer(*environment_.channels.device_backend, header_->geometry,
                                         result, ForwardContextFor()));
    result.keys = {};
    result.values = {};
    result.positions = {};
  }
  return absl::OkStatus();
}

ForwardContext CompressReactor::ForwardContextFor() const {
  ForwardContext forward;
  forward.outbox = forward_outbox_;
  forward.request_id = header_->request_id;
  forward.geometry = &forward_geometry_;
  forward.sequence_shapes = &forward_shapes_;
  forward.deadline = NcclDeadline();
  return forward;
}

void CompressReactor::PostForwardEnd(const absl::Status& status) {
  if (forward_outbox_ == nullptr || forward_end_posted_ || header_ == nullptr) return;
  forward_end_posted_ = true;
  v1::ForwardNotice notice;
  v1::ForwardedRequestEnd& end = *notice.mutable_end();
  end.set_request_id(header_->request_id);
  end.set_status_code(static_cast<int32_t>(status.code()));
  end.set_status_message(std::string(status.message()));
  end.set_forwarded_layers(forwarded_layers_);
  forward_outbox_->Post(std::move(notice));
}

void CompressReactor::NoteBackendRoute() {
  const bool fallback = !header_->backend_passed_over.ok();
  if (environment_.metrics != nullptr) {
    environment_.metrics->backend_requests.Increment(
        {std::string(header_->backend->name()), fallback ? "fallback" : "preferred"});
  }
  if (fallback && environment_.log != nullptr) {
    // One line per request: operators need to see which traffic misses the GPU and why.
    environment_.log->Emit("backend_fallback",
                           {{"request_id", header_->request_id},
                            {"backend", std::string(header_->backend->name())},
                            {"reason", std::string(header_->backend_passed_over.message())}});
  }
}

void CompressReactor::FillSummary(v1::CompressSummary& summary) {
  const Clock::time_point now = Clock::now();
  summary.set_request_id(header_->request_id);
  summary.set_tokens_in(tokens_in_);
  summary.set_tokens_kept(tokens_kept_);
  summary.set_bytes_in(bytes_in_);
  summary.set_bytes_out(bytes_out_);
  summary.set_backend(std::string(header_->backend->name()));
  summary.set_forwarded_layers(forwarded_layers_);
  v1::StageTimings& timings = *summary.mutable_timings();
  timings.set_receive_seconds(Seconds(receive_end_ - header_time_));
  timings.set_queue_seconds(queue_seconds_);
  timings.set_score_seconds(score_seconds_);
  timings.set_select_seconds(select_seconds_);
  timings.set_gather_seconds(gather_seconds_);
  timings.set_send_seconds(send_seconds_);
  timings.set_total_seconds(Seconds(now - header_time_));
  timings.set_deferred_layers(deferred_layers_);
}

nlohmann::json CompressReactor::LogFields() {
  // Finish went out with status_ when the stream ended terminally, with OK otherwise (Fail
  // does nothing once Finish was called).
  const absl::Status status = terminal_ ? status_ : absl::OkStatus();
  std::string request_id;
  if (header_ != nullptr) {
    request_id = header_->request_id;
  } else if (!client_request_id_.empty()) {
    request_id = client_request_id_;
  } else {
    request_id = GenerateRequestId();
  }
  nlohmann::json fields = {
      {"request_id", request_id},
      {"peer", peer_},
      {"authenticated", identity_.authenticated},
      {"method", method_label_},
      {"code", absl::StatusCodeToString(status.code())},
      {"message", std::string(status.message())},
      {"duration_ms", std::chrono::duration<double, std::milli>(Clock::now() - opened_).count()},
      {"tokens_in", tokens_in_},
      {"tokens_kept", tokens_kept_},
      {"bytes_in", bytes_in_},
      {"bytes_out", bytes_out_},
      {"layers_done", layers_final_},
  };
  if (!identity_.certificate_subject.empty()) {
    fields["client_certificate"] = identity_.certificate_subject;
  }
  if (header_ != nullptr) {
    fields["sequences"] = header_->sequences.size();
    fields["layers"] = header_->geometry.num_layers;
    const MethodSpec& spec = header_->spec;
    fields["layer_budget"] = std::string(LayerBudgetName(spec.layer_budget));
    fields["head_budget"] = std::string(HeadBudgetName(spec.head_budget));
    fields["reducer"] = std::string(ReducerName(spec.reducer));
    if (spec.budget.use_ratio) {
      fields["keep_ratio"] = spec.budget.keep_ratio;
    } else {
      fields["keep_tokens"] = spec.budget.keep_tokens;
    }
  }
  return fields;
}

void CompressReactor::RecordOutcome(const absl::Status& status) {
  if (environment_.metrics == nullptr) return;
  ServiceMetrics& metrics = *environment_.metrics;
  metrics.requests.Increment({method_label_, absl::StatusCodeToString(status.code())});
  metrics.request_duration.Observe({method_label_}, Seconds(Clock::now() - opened_));
  if (!status.ok()) {
    metrics.errors.Increment({std::string(ErrorReasonName(error_reason_))});
    return;
  }
  if (tokens_in_ > 0) {
    metrics.compression_ratio.Observe(
        {}, static_cast<double>(tokens_kept_) / static_cast<double>(tokens_in_));
  }
  // The same figures as the summary's StageTimings.
  metrics.request_stage_duration.Observe({"receive"}, Seconds(receive_end_ - header_time_));
  metrics.request_stage_duration.Observe({"queue"}, queue_seconds_);
  metrics.request_stage_duration.Observe({"score"}, score_seconds_);
  metrics.request_stage_duration.Observe({"select"}, select_seconds_);
  metrics.request_stage_duration.Observe({"gather"}, gather_seconds_);
  metrics.request_stage_duration.Observe({"send"}, send_seconds_);
}

}  // namespace kvcompress
