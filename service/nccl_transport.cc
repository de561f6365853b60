// The nccl transport with CUDA and NCCL: see nccl_transport.h and nccl_link.h.
#include "service/nccl_transport.h"

#include <cuda_runtime_api.h>
#include <nccl.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "kernels/cuda/cuda_compressor.h"
#include "kernels/cuda/cuda_status.h"
#include "kernels/cuda_backend.h"
#include "kernels/status_macros.h"

namespace kvcompress {
namespace {

constexpr int kClientRank = 0;
constexpr int kKvcdRank = 1;

absl::Status NcclError(ncclResult_t result, absl::string_view what, ncclComm_t comm) {
  const char* detail = comm != nullptr ? ncclGetLastError(comm) : nullptr;
  return absl::InternalError(absl::StrCat("nccl: ", what, " failed: ", ncclGetErrorString(result),
                                          detail != nullptr && *detail != '\0' ? " (" : "",
                                          detail != nullptr ? detail : "",
                                          detail != nullptr && *detail != '\0' ? ")" : ""));
}

// Between polls: spins (yielding) for the first two milliseconds — a layer's transfer takes
// tens of microseconds on NVLink, less than a sleep's timer slack — then sleeps 50
// microseconds at a time, so that a long wait does not burn a core.
class Backoff {
 public:
  void Pause() {
    if (std::chrono::steady_clock::now() - started_ < std::chrono::milliseconds(2)) {
      std::this_thread::yield();
    } else {
      std::this_thread::sleep_for(std::chrono::microseconds(50));
    }
  }

 private:
  const std::chrono::steady_clock::time_point started_ = std::chrono::steady_clock::now();
};

class NcclLinkImpl;

// A group of sends or receives: an event recorded on the link's stream after them, and (for
// receives) the pooled device memory they land in.
//
// NCCL connects peers lazily: the group of a first transfer stays ncclInProgress until the
// peer takes part, which it does only after it has seen the announcement. So enqueueing does
// not wait for the group; the event is recorded once the group has left ncclInProgress
// (NcclLinkImpl::SettleLocked: at the next enqueue or at Wait, whichever comes first).
class NcclTransferImpl final : public NcclTransfer {
 public:
  NcclTransferImpl(NcclLinkImpl& link, cudaEvent_t done, cuda::DeviceBuffer memory)
      : link_(link), done_(done), memory_(std::move(memory)) {}
  ~NcclTransferImpl() override;
  absl::Status Wait(absl::Time deadline) override;

 private:
  friend class NcclLinkImpl;
  NcclLinkImpl& link_;
  cudaEvent_t done_;
  cuda::DeviceBuffer memory_;
  bool recorded_ = false;  // guarded by the link's lock
  bool completed_ = false;
};

class NcclLinkImpl final : public NcclLink {
 public:
  NcclLinkImpl(int device, ChannelDirection direction, cudaStream_t stream, ncclComm_t comm)
      : device_(device), direction_(direction), stream_(stream), comm_(comm) {}

  ~NcclLinkImpl() override {
    Abort("the channel was closed");
    cudaSetDevice(device_);
    cudaStreamSynchronize(stream_);
    cudaStreamDestroy(stream_);
    (void)cudaGetLastError();
  }

  ChannelDirection direction() const override { return direction_; }
  int device() const { return device_; }
  cudaStream_t stream() const { return stream_; }

  absl::StatusOr<std::unique_ptr<NcclTransfer>> EnqueueSends(std::span<const DeviceSpan> tensors,
                                                             absl::Time deadline) override {
    return Enqueue(tensors, /*send=*/true, deadline, cuda::DeviceBuffer());
  }
  absl::StatusOr<std::unique_ptr<NcclTransfer>> EnqueueReceives(std::span<const DeviceSpan> tensors,
                                                                absl::Time deadline) override {
    return Enqueue(tensors, /*send=*/false, deadline, cuda::DeviceBuffer());
  }

  // Receives into `memory` (pooled), which the transfer then owns.
  absl::StatusOr<std::unique_ptr<NcclTransfer>> EnqueueReceivesInto(
      std::span<const DeviceSpan> tensors, absl::Time deadline, cuda::DeviceBuffer memory) {
    return Enqueue(tensors, /*send=*/false, deadline, std::move(memory));
  }

  void Abort(absl::string_view reason) override {
    // A thread may hold the lock while it waits for a group to leave ncclInProgress (up to its
    // deadline, when the peer is gone): ask it to stop first, then take the lock.
    {
      absl::MutexLock lock(&request_mu_);
      if (requested_abort_reason_.empty()) requested_abort_reason_ = std::string(reason);
    }
    abort_requested_.store(true);
    absl::MutexLock lock(&mu_);
    AbortLocked(reason);
  }
  bool aborted() const override {
    absl::MutexLock lock(&mu_);
    return comm_ == nullptr;
  }
  std::string abort_reason() const override {
    absl::MutexLock lock(&mu_);
    return abort_reason_;
  }

  // OK while the transfer's event is pending and the communicator is healthy; the failure
  // otherwise. Takes the lock: the communicator may be aborted concurrently.
  absl::Status CheckHealthy() {
    absl::MutexLock lock(&mu_);
    if (comm_ == nullptr) return Aborted();
    ncclResult_t state = ncclSuccess;
    const ncclResult_t result = ncclCommGetAsyncError(comm_, &state);
    if (result != ncclSuccess || (state != ncclSuccess && state != ncclInProgress)) {
      absl::Status status =
          NcclError(result != ncclSuccess ? result : state, "the channel's communicator", comm_);
      AbortLocked(status.message());
      return status;
    }
    return absl::OkStatus();
  }

  void AbortAfterDeadline() {
    absl::MutexLock lock(&mu_);
    AbortLocked("a transfer did not complete by its deadline (the peer stalled or died)");
  }

  // Makes sure `transfer`'s completion event is recorded (settling its group first). OK, or
  // the failure (the link aborted).
  absl::Status EnsureRecorded(NcclTransferImpl& transfer, absl::Time deadline) {
    absl::MutexLock lock(&mu_);
    if (transfer.recorded_) return absl::OkStatus();
    return SettleLocked(deadline);
  }

  // A transfer goes away: it must no longer be the pending one.
  void Forget(NcclTransferImpl& transfer) {
    absl::MutexLock lock(&mu_);
    if (pending_ == &transfer) pending_ = nullptr;
  }

 private:
  absl::Status Aborted() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return absl::FailedPreconditionError(
        absl::StrCat("nccl channel aborted (", abort_reason_, "); open a new channel"));
  }

  void AbortLocked(absl::string_view reason) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    pending_ = nullptr;
    if (comm_ == nullptr) return;
    cudaSetDevice(device_);
    // Makes the communicator's kernels in flight return, so the stream drains.
    ncclCommAbort(comm_);
    comm_ = nullptr;
    abort_reason_ = std::string(reason);
  }

  // Waits until a non-blocking call's effect is in place (or the communicator is formed).
  absl::Status WaitCompleteLocked(absl::string_view what, absl::Time deadline)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    Backoff backoff;
    while (true) {
      ncclResult_t state = ncclSuccess;
      const ncclResult_t result = ncclCommGetAsyncError(comm_, &state);
      if (result != ncclSuccess) return NcclError(result, what, comm_);
      if (state == ncclSuccess) return absl::OkStatus();
      if (state != ncclInProgress) return NcclError(state, what, comm_);
      if (abort_requested_.load()) {
        absl::MutexLock lock(&request_mu_);
        return absl::FailedPreconditionError(requested_abort_reason_);
      }
      if (absl::Now() >= deadline) {
        return absl::DeadlineExceededError(
            absl::StrCat("nccl: ", what,
                         " did not complete by the deadline (has the client joined the "
                         "channel's communicator as rank 0?)"));
      }
      backoff.Pause();
    }
  }

  // Waits until the communicator is formed and the last group enqueued has left
  // ncclInProgress, then records that group's completion event. Aborts on failure.
  absl::Status SettleLocked(absl::Time deadline) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (comm_ == nullptr) return Aborted();
    KVC_CUDA_RETURN_IF_ERROR(cudaSetDevice(device_));
    absl::Status status = WaitCompleteLocked(
        pending_ != nullptr ? "enqueueing a transfer" : "forming the communicator", deadline);
    if (status.ok() && pending_ != nullptr) {
      if (const cudaError_t error = cudaEventRecord(pending_->done_, stream_);
          error != cudaSuccess) {
        status = cuda::CudaErrorToStatus(error, "cudaEventRecord", __FILE__, __LINE__);
      } else {
        pending_->recorded_ = true;
        pending_ = nullptr;
      }
    }
    if (!status.ok()) AbortLocked(status.message());
    return status;
  }

  absl::StatusOr<std::unique_ptr<NcclTransfer>> Enqueue(std::span<const DeviceSpan> tensors,
                                                        bool send, absl::Time deadline,
                                                        cuda::DeviceBuffer memory) {
    absl::MutexLock lock(&mu_);
    KVC_RETURN_IF_ERROR(SettleLocked(deadline));
    cudaEvent_t done = nullptr;
    KVC_CUDA_RETURN_IF_ERROR(cudaEventCreateWithFlags(&done, cudaEventDisableTiming));
    if (absl::Status status = EnqueueGroupLocked(tensors, send); !status.ok()) {
      // The peer's side of the group may be half matched: the byte stream is lost.
      AbortLocked(status.message());
      cudaEventDestroy(done);
      return status;
    }
    auto transfer = std::make_unique<NcclTransferImpl>(*this, done, std::move(memory));
    pending_ = transfer.get();
    return std::unique_ptr<NcclTransfer>(std::move(transfer));
  }

  // Issues the group; it may still be ncclInProgress on return (SettleLocked).
  absl::Status EnqueueGroupLocked(std::span<const DeviceSpan> tensors, bool send)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    const int peer = kClientRank;
    ncclResult_t result = ncclGroupStart();
    if (result != ncclSuccess) return NcclError(result, "ncclGroupStart", comm_);
    for (const DeviceSpan& tensor : tensors) {
      if (tensor.bytes == 0) continue;
      result = send ? ncclSend(tensor.data, tensor.bytes, ncclUint8, peer, comm_, stream_)
                    : ncclRecv(tensor.data, tensor.bytes, ncclUint8, peer, comm_, stream_);
      if (result != ncclSuccess && result != ncclInProgress) {
        ncclGroupEnd();
        return NcclError(result, send ? "ncclSend" : "ncclRecv", comm_);
      }
    }
    result = ncclGroupEnd();
    if (result != ncclSuccess && result != ncclInProgress) {
      return NcclError(result, "ncclGroupEnd", comm_);
    }
    return absl::OkStatus();
  }

  const int device_;
  const ChannelDirection direction_;
  const cudaStream_t stream_;
  mutable absl::Mutex mu_;
  ncclComm_t comm_ ABSL_GUARDED_BY(mu_);  // null once aborted
  std::string abort_reason_ ABSL_GUARDED_BY(mu_);
  // The last transfer enqueued whose event is not recorded yet (its group may be in progress).
  NcclTransferImpl* pending_ ABSL_GUARDED_BY(mu_) = nullptr;
  // Set by Abort before it takes mu_, so that a wait holding mu_ gives up at once.
  std::atomic<bool> abort_requested_{false};
  absl::Mutex request_mu_;
  std::string requested_abort_reason_ ABSL_GUARDED_BY(request_mu_);
};

NcclTransferImpl::~NcclTransferImpl() {
  link_.Forget(*this);
  if (!completed_) {
    // Never waited for (the stream ended first): the memory may still be written by a
    // receive, so the communicator must go before the memory does.
    link_.Abort("a stream ended with transfers in flight");
    cudaSetDevice(link_.device());
    cudaStreamSynchronize(link_.stream());
  }
  cudaEventDestroy(done_);
  memory_.Reset();
  (void)cudaGetLastError();
}

absl::Status NcclTransferImpl::Wait(absl::Time deadline) {
  if (completed_) return absl::OkStatus();
  if (absl::Status recorded = link_.EnsureRecorded(*this, deadline); !recorded.ok()) {
    if (recorded.code() == absl::StatusCode::kDeadlineExceeded) {
      return absl::DeadlineExceededError(
          absl::StrCat(recorded.message(),
                       "; the peer did not take part in the transfer, the channel was "
                       "aborted"));
    }
    return recorded;
  }
  Backoff backoff;
  while (true) {
    const cudaError_t query = cudaEventQuery(done_);
    if (query == cudaSuccess) break;
    if (query != cudaErrorNotReady) {
      return cuda::CudaErrorToStatus(query, "cudaEventQuery (nccl transfer)", __FILE__, __LINE__);
    }
    if (absl::Status healthy = link_.CheckHealthy(); !healthy.ok()) return healthy;
    if (absl::Now() >= deadline) {
      link_.AbortAfterDeadline();
      return absl::DeadlineExceededError(
          "nccl: a transfer did not complete by the stream's deadline (the peer stalled or "
          "died); the channel was aborted");
    }
    backoff.Pause();
  }
  completed_ = true;
  // A transfer that completes on an aborted communicator carries no data.
  if (link_.aborted()) return link_.CheckHealthy();
  return absl::OkStatus();
}

// Sizes of a layer's tensors, in transfer order.
std::vector<uint64_t> LayerTensorSizes(const CacheGeometry& geometry, const SequenceShape& shape) {
  const uint64_t kv = geometry.KeyValueBytes(shape.num_tokens);
  std::vector<uint64_t> sizes = {kv, kv};
  if (shape.num_window_queries > 0) {
    sizes.push_back(geometry.QueryBytes(shape.num_window_queries));
  }
  if (shape.num_score_heads > 0) {
    sizes.push_back(CacheGeometry::ScoreBytes(shape.num_score_heads, shape.num_tokens));
  }
  return sizes;
}

uint64_t AlignUp(uint64_t bytes) { return (bytes + 255) / 256 * 256; }

}  // namespace

bool NcclCompiled() { return true; }

absl::StatusOr<std::unique_ptr<NcclLink>> MakeNcclLink(Backend& backend,
                                                       absl::string_view unique_id,
                                                       ChannelDirection direction) {
  CudaCompressor* compressor = CudaCompressorOf(backend);
  if (compressor == nullptr) {
    return absl::FailedPreconditionError(
        "transport nccl needs kvcd's cuda backend (start kvcd with --backend=cuda on a GPU "
        "machine); this kvcd runs the cpu backend");
  }
  if (unique_id.size() != sizeof(ncclUniqueId)) {
    return absl::InvalidArgumentError(
        absl::StrCat("nccl.unique_id: expected ", sizeof(ncclUniqueId),
                     " bytes (an ncclUniqueId from ncclGetUniqueId), got ", unique_id.size()));
  }
  ncclUniqueId id;
  std::memcpy(&id, unique_id.data(), sizeof(id));
  const int device = compressor->device();
  KVC_CUDA_RETURN_IF_ERROR(cudaSetDevice(device));
  cudaStream_t stream = nullptr;
  KVC_CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
  config.blocking = 0;  // every wait is ours to bound
  ncclComm_t comm = nullptr;
  const ncclResult_t result = ncclCommInitRankConfig(&comm, 2, id, kKvcdRank, &config);
  if (result != ncclSuccess && result != ncclInProgress) {
    absl::Status status = NcclError(result, "ncclCommInitRankConfig (joining the client)", comm);
    if (comm != nullptr) ncclCommAbort(comm);
    cudaStreamDestroy(stream);
    return status;
  }
  return std::unique_ptr<NcclLink>(new NcclLinkImpl(device, direction, stream, comm));
}

absl::StatusOr<ReceivedDeviceLayer> ReceiveDeviceLayer(Backend& backend, NcclLink& link,
                                                       const CacheGeometry& geometry,
                                                       const DeviceLayerInput& layer,
                                                       absl::Time deadline) {
  CudaCompressor* compressor = CudaCompressorOf(backend);
  auto* impl = dynamic_cast<NcclLinkImpl*>(&link);
  if (compressor == nullptr || impl == nullptr) {
    return absl::FailedPreconditionError("transport nccl needs kvcd's cuda backend");
  }
  KVC_CUDA_RETURN_IF_ERROR(cudaSetDevice(impl->device()));
  const std::vector<uint64_t> sizes = LayerTensorSizes(geometry, layer.shape);
  uint64_t total = 0;
  for (uint64_t size : sizes) total += AlignUp(size);
  KVC_ASSIGN_OR_RETURN(cuda::DeviceBuffer memory,
                       compressor->memory_pool().Allocate(total, impl->stream()));
  std::vector<DeviceSpan> spans;
  std::byte* next = memory.data();
  for (uint64_t size : sizes) {
    spans.push_back(DeviceSpan{next, size});
    next += AlignUp(size);
  }
  ReceivedDeviceLayer received;
  received.device_bytes = total;
  received.input = layer;
  received.input.keys = spans[0].data;
  received.input.values = spans[1].data;
  size_t index = 2;
  if (layer.shape.num_window_queries > 0) received.input.queries = spans[index++].data;
  if (layer.shape.num_score_heads > 0) {
    received.input.scores = reinterpret_cast<const float*>(spans[index++].data);
  }
  KVC_ASSIGN_OR_RETURN(std::unique_ptr<NcclTransfer> transfer,
                       impl->EnqueueReceivesInto(spans, deadline, std::move(memory)));
  received.transfer = std::move(transfer);
  return received;
}

absl::Status ForwardHostLayer(Backend& device_backend, const CacheGeometry& geometry,
                              const LayerResult& result, const ForwardContext& forward) {
  CudaCompressor* compressor = CudaCompressorOf(device_backend);
  if (compressor == nullptr || forward.outbox == nullptr) {
    return absl::FailedPreconditionError("forwarding needs kvcd's cuda backend");
  }
  KVC_CUDA_RETURN_IF_ERROR(cudaSetDevice(compressor->device()));
  const size_t row_bytes = geometry.RowBytes();
  const std::vector<std::pair<const void*, uint64_t>> host = {
      {result.keys.data(), result.keys.size()},
      {result.values.data(), result.values.size()},
      {result.positions.data(), result.positions.size() * sizeof(int32_t)},
      {result.merged.data(), result.merged.size() * sizeof(int32_t)}};
  uint64_t total = 0;
  for (const auto& [data, bytes] : host) total += AlignUp(bytes);
  cudaStream_t stream = nullptr;
  KVC_CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  absl::Status status;
  {
    absl::StatusOr<cuda::DeviceBuffer> memory =
        compressor->memory_pool().Allocate(std::max<uint64_t>(total, 256), stream);
    if (!memory.ok()) {
      status = memory.status();
    } else {
      std::vector<DeviceSpan> spans;
      std::byte* next = memory->data();
      for (const auto& [data, bytes] : host) {
        if (bytes == 0) continue;
        if (const cudaError_t error =
                cudaMemcpyAsync(next, data, bytes, cudaMemcpyHostToDevice, stream);
            error != cudaSuccess) {
          status = cuda::CudaErrorToStatus(error, "cudaMemcpyAsync (forward staging)", __FILE__,
                                           __LINE__);
          break;
        }
        spans.push_back(DeviceSpan{next, bytes});
        next += AlignUp(bytes);
      }
      if (status.ok()) {
        if (const cudaError_t error = cudaStreamSynchronize(stream); error != cudaSuccess) {
          status = cuda::CudaErrorToStatus(error, "cudaStreamSynchronize", __FILE__, __LINE__);
        }
      }
      if (status.ok()) {
        status = forward.outbox->Deliver(ForwardNoticeFor(result, row_bytes, forward), spans,
                                         forward.deadline);
      }
      memory->Reset();
    }
  }
  cudaStreamSynchronize(stream);
  cudaStreamDestroy(stream);
  (void)cudaGetLastError();
  return status;
}

}  // namespace kvcompress
