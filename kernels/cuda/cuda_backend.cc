// The CUDA Backend over host layer views: uploads each batch through pinned staging buffers
// into pooled device memory, runs it with CudaCompressor (one launch sequence per call), and
// downloads the ragged results the same way. See kernels/cuda_backend.h for the contract.
//
// Each call leases a stream, two pinned staging buffers and a few events; leases are pooled
// so that steady-state calls allocate nothing but stream-ordered device memory. Staging is
// double-buffered: the host copies into one buffer while the DMA engine drains the other.
// LayerResult::seconds holds the batch's device time per stage (CUDA events) divided evenly
// among its layers.
#include "kernels/cuda_backend.h"

#include <algorithm>
#include <cstring>
#include <functional>
#include <memory>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "kernels/cuda/cuda_compressor.h"
#include "kernels/cuda/cuda_status.h"
#include "kernels/status_macros.h"

namespace kvcompress {
namespace {

// A host span and the device span it is copied to or from.
struct CopyPiece {
  std::byte* host = nullptr;
  std::byte* device = nullptr;
  size_t bytes = 0;
};

template <typename Job>
bool HasPrecomputedScores(const Job& job) {
  if constexpr (requires { job.precomputed_scores; }) {
    return job.precomputed_scores != nullptr;
  } else {
    return false;
  }
}

// Bytes of a job's client scores ([num_score_heads, T] fp32), 0 when it has none.
size_t ClientScoreBytes(const LayerJob& job) {
  if (job.input.scores == nullptr || job.input.shape.num_score_heads <= 0) return 0;
  return static_cast<size_t>(job.input.shape.num_score_heads) * job.input.shape.num_tokens *
         sizeof(float);
}

// What one call holds while it runs.
struct Lease {
  cudaStream_t stream = nullptr;
  std::byte* staging[2] = {nullptr, nullptr};
  cudaEvent_t staged[2] = {nullptr, nullptr};
  cudaEvent_t start = nullptr;
  StageEvents stages;
};

class CudaBackend final : public Backend {
 public:
  CudaBackend(std::unique_ptr<CudaCompressor> compressor, size_t staging_bytes)
      : compressor_(std::move(compressor)), staging_bytes_(staging_bytes) {}
  ~CudaBackend() override;

  std::string_view name() const override { return "cuda"; }

  CudaCompressor* compressor() const { return compressor_.get(); }

  absl::Status Supports(const MethodSpec& spec, int head_dim) const override {
    return CheckCudaMethodSupported(spec, head_dim);
  }

  std::vector<BackendDevice> Devices() const override;

  absl::Status CompressLayers(const CacheGeometry& geometry, const MethodSpec& spec,
                              std::span<const LayerJob> jobs,
                              std::span<LayerResult> results) override;

  absl::Status ScoreLayers(const CacheGeometry& geometry, const MethodSpec& spec,
                           std::span<const LayerJob> jobs, std::span<LayerScores> scores) override;

 private:
  absl::StatusOr<Lease*> Acquire();
  void Release(Lease* lease);

  // Copies every job's K, V and queries into one pooled device buffer and describes them as
  // device jobs.
  absl::Status Upload(Lease& lease, const CacheGeometry& geometry, std::span<const LayerJob> jobs,
                      cuda::DeviceBuffer& inputs, std::vector<DeviceLayerJob>& device_jobs);
  absl::Status StagedUpload(Lease& lease, std::span<const CopyPiece> pieces);
  absl::Status StagedDownload(Lease& lease, std::span<const CopyPiece> pieces);

  std::unique_ptr<CudaCompressor> compressor_;
  const size_t staging_bytes_;
  absl::Mutex mu_;
  std::vector<Lease*> free_leases_ ABSL_GUARDED_BY(mu_);
  std::vector<std::unique_ptr<Lease>> leases_ ABSL_GUARDED_BY(mu_);
};

// Returns a lease to the pool when the call ends, after its stream has drained.
class LeaseGuard {
 public:
  LeaseGuard(std::function<void(Lease*)> release, Lease* lease)
      : release_(std::move(release)), lease_(lease) {}
  ~LeaseGuard() {
    cudaStreamSynchronize(lease_->stream);
    (void)cudaGetLastError();
    release_(lease_);
  }
  LeaseGuard(const LeaseGuard&) = delete;
  LeaseGuard& operator=(const LeaseGuard&) = delete;

 private:
  std::function<void(Lease*)> release_;
  Lease* lease_;
};

CudaBackend::~CudaBackend() {
  cudaSetDevice(compressor_->device());
  absl::MutexLock lock(&mu_);
  for (const std::unique_ptr<Lease>& lease : leases_) {
    cudaStreamSynchronize(lease->stream);
    for (int slot = 0; slot < 2; ++slot) {
      if (lease->staging[slot] != nullptr) cudaFreeHost(lease->staging[slot]);
      if (lease->staged[slot] != nullptr) cudaEventDestroy(lease->staged[slot]);
    }
    for (cudaEvent_t event :
         {lease->start, lease->stages.scored, lease->stages.selected, lease->stages.gathered}) {
      if (event != nullptr) cudaEventDestroy(event);
    }
    if (lease->stream != nullptr) cudaStreamDestroy(lease->stream);
  }
}

absl::StatusOr<Lease*> CudaBackend::Acquire() {
  {
    absl::MutexLock lock(&mu_);
    if (!free_leases_.empty()) {
      Lease* lease = free_leases_.back();
      free_leases_.pop_back();
      return lease;
    }
  }
  auto lease = std::make_unique<Lease>();
  Lease* raw = lease.get();
  {
    absl::MutexLock lock(&mu_);
    leases_.push_back(std::move(lease));  // owned from here, so the destructor frees it all
  }
  KVC_CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&raw->stream, cudaStreamNonBlocking));
  for (int slot = 0; slot < 2; ++slot) {
    KVC_CUDA_RETURN_IF_ERROR(cudaHostAlloc(reinterpret_cast<void**>(&raw->staging[slot]),
                                           staging_bytes_, cudaHostAllocDefault));
    KVC_CUDA_RETURN_IF_ERROR(cudaEventCreateWithFlags(&raw->staged[slot], cudaEventDisableTiming));
  }
  KVC_CUDA_RETURN_IF_ERROR(cudaEventCreate(&raw->start));
  KVC_CUDA_RETURN_IF_ERROR(cudaEventCreate(&raw->stages.scored));
  KVC_CUDA_RETURN_IF_ERROR(cudaEventCreate(&raw->stages.selected));
  KVC_CUDA_RETURN_IF_ERROR(cudaEventCreate(&raw->stages.gathered));
  return raw;
}

std::vector<BackendDevice> CudaBackend::Devices() const {
  BackendDevice device;
  device.ordinal = compressor_->device();
  cudaDeviceProp properties{};
  if (cudaGetDeviceProperties(&properties, device.ordinal) == cudaSuccess) {
    device.name = properties.name;
    device.compute_capability = absl::StrCat(properties.major, ".", properties.minor);
    device.total_memory_bytes = properties.totalGlobalMem;
  } else {
    (void)cudaGetLastError();
  }
  device.budget_bytes = compressor_->memory_pool().budget_bytes();
  device.in_use_bytes = compressor_->memory_pool().bytes_in_use();
  return {device};
}

void CudaBackend::Release(Lease* lease) {
  absl::MutexLock lock(&mu_);
  free_leases_.push_back(lease);
}

absl::Status CudaBackend::StagedUpload(Lease& lease, std::span<const CopyPiece> pieces) {
  int slot = 0;
  size_t used = 0;
  for (const CopyPiece& piece : pieces) {
    size_t offset = 0;
    while (offset < piece.bytes) {
      if (used == staging_bytes_) {
        KVC_CUDA_RETURN_IF_ERROR(cudaEventRecord(lease.staged[slot], lease.stream));
        slot ^= 1;
        KVC_CUDA_RETURN_IF_ERROR(cudaEventSynchronize(lease.staged[slot]));
        used = 0;
      }
      const size_t bytes = std::min(piece.bytes - offset, staging_bytes_ - used);
      std::memcpy(lease.staging[slot] + used, piece.host + offset, bytes);
      KVC_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(piece.device + offset, lease.staging[slot] + used,
                                               bytes, cudaMemcpyHostToDevice, lease.stream));
      used += bytes;
      offset += bytes;
    }
  }
  KVC_CUDA_RETURN_IF_ERROR(cudaEventRecord(lease.staged[slot], lease.stream));
  return absl::OkStatus();
}

absl::Status CudaBackend::StagedDownload(Lease& lease, std::span<const CopyPiece> pieces) {
  struct Pending {
    std::byte* host;
    size_t staging_offset;
    size_t bytes;
  };
  std::vector<Pending> pending[2];
  const auto drain = [&](int slot) -> absl::Status {
    if (pending[slot].empty()) return absl::OkStatus();
    KVC_CUDA_RETURN_IF_ERROR(cudaEventSynchronize(lease.staged[slot]));
    for (const Pending& part : pending[slot]) {
      std::memcpy(part.host, lease.staging[slot] + part.staging_offset, part.bytes);
    }
    pending[slot].clear();
    return absl::OkStatus();
  };
  int slot = 0;
  size_t used = 0;
  for (const CopyPiece& piece : pieces) {
    size_t offset = 0;
    while (offset < piece.bytes) {
      if (used == staging_bytes_) {
        KVC_CUDA_RETURN_IF_ERROR(cudaEventRecord(lease.staged[slot], lease.stream));
        slot ^= 1;
        KVC_RETURN_IF_ERROR(drain(slot));
        used = 0;
      }
      const size_t bytes = std::min(piece.bytes - offset, staging_bytes_ - used);
      KVC_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(lease.staging[slot] + used, piece.device + offset,
                                               bytes, cudaMemcpyDeviceToHost, lease.stream));
      pending[slot].push_back(Pending{piece.host + offset, used, bytes});
      used += bytes;
      offset += bytes;
    }
  }
  KVC_CUDA_RETURN_IF_ERROR(cudaEventRecord(lease.staged[slot], lease.stream));
  KVC_RETURN_IF_ERROR(drain(slot ^ 1));
  return drain(slot);
}

absl::Status CudaBackend::Upload(Lease& lease, const CacheGeometry& geometry,
                                 std::span<const LayerJob> jobs, cuda::DeviceBuffer& inputs,
                                 std::vector<DeviceLayerJob>& device_jobs) {
  const auto align = [](size_t bytes) { return (bytes + 255) / 256 * 256; };
  size_t total = 0;
  for (size_t i = 0; i < jobs.size(); ++i) {
    const LayerJob& job = jobs[i];
    const SequenceShape& shape = job.input.shape;
    if (HasPrecomputedScores(job)) {
      return absl::UnimplementedError(absl::StrCat(
          "jobs[", i, "]: precomputed scores are not implemented by the cuda backend"));
    }
    KVC_RETURN_IF_ERROR(ValidateLayerJobInput(job, i));
    total += 2 * align(geometry.KeyValueBytes(shape.num_tokens)) +
             align(geometry.QueryBytes(shape.num_window_queries)) + align(ClientScoreBytes(job));
  }
  KVC_ASSIGN_OR_RETURN(inputs, compressor_->memory_pool().Allocate(total, lease.stream));
  std::vector<CopyPiece> pieces;
  device_jobs.resize(jobs.size());
  size_t offset = 0;
  for (size_t i = 0; i < jobs.size(); ++i) {
    const LayerJob& job = jobs[i];
    const SequenceShape& shape = job.input.shape;
    const size_t kv_bytes = geometry.KeyValueBytes(shape.num_tokens);
    const size_t query_bytes = geometry.QueryBytes(shape.num_window_queries);
    DeviceLayerJob& device_job = device_jobs[i];
    device_job.sequence = job.sequence;
    device_job.layer = job.layer;
    device_job.tokens_per_head = job.tokens_per_head;
    device_job.keep_all = job.keep_all;
    device_job.input.shape = shape;
    std::byte* keys = inputs.data() + offset;
    offset += align(kv_bytes);
    std::byte* values = inputs.data() + offset;
    offset += align(kv_bytes);
    std::byte* queries = inputs.data() + offset;
    offset += align(query_bytes);
    const size_t score_bytes = ClientScoreBytes(job);
    std::byte* client_scores = inputs.data() + offset;
    offset += align(score_bytes);
    if (score_bytes > 0) {
      device_job.input.scores = reinterpret_cast<const float*>(client_scores);
      pieces.push_back(CopyPiece{reinterpret_cast<std::byte*>(const_cast<float*>(job.input.scores)),
                                 client_scores, score_bytes});
    }
    device_job.input.keys = keys;
    device_job.input.values = values;
    device_job.input.queries = query_bytes > 0 ? queries : nullptr;
    pieces.push_back(CopyPiece{const_cast<std::byte*>(job.input.keys), keys, kv_bytes});
    pieces.push_back(CopyPiece{const_cast<std::byte*>(job.input.values), values, kv_bytes});
    if (query_bytes > 0) {
      pieces.push_back(CopyPiece{const_cast<std::byte*>(job.input.queries), queries, query_bytes});
    }
  }
  return StagedUpload(lease, pieces);
}

absl::Status CudaBackend::CompressLayers(const CacheGeometry& geometry, const MethodSpec& spec,
                                         std::span<const LayerJob> jobs,
                                         std::span<LayerResult> results) {
  if (results.size() != jobs.size()) {
    return absl::InvalidArgumentError(absl::StrCat("results: expected ", jobs.size(),
                                                   " entries (one per job), got ", results.size()));
  }
  KVC_RETURN_IF_ERROR(CheckCudaMethodSupported(spec, geometry.head_dim));
  if (jobs.empty()) return absl::OkStatus();
  KVC_CUDA_RETURN_IF_ERROR(cudaSetDevice(compressor_->device()));
  KVC_ASSIGN_OR_RETURN(Lease * lease, Acquire());
  LeaseGuard guard([this](Lease* done) { Release(done); }, lease);

  cuda::DeviceBuffer inputs;
  std::vector<DeviceLayerJob> device_jobs;
  KVC_RETURN_IF_ERROR(Upload(*lease, geometry, jobs, inputs, device_jobs));
  KVC_CUDA_RETURN_IF_ERROR(cudaEventRecord(lease->start, lease->stream));
  KVC_ASSIGN_OR_RETURN(DeviceBatchResult out,
                       compressor_->Compress(geometry, spec, device_jobs, lease->stream,
                                             &lease->stages, /*reads_merged_rows=*/true));

  const int num_heads = geometry.num_kv_heads;
  std::vector<double> mass_sums(jobs.size(), 0.0);
  std::vector<int32_t> head_counts(jobs.size() * num_heads, 0);
  bool any_ragged = false;
  std::vector<CopyPiece> pieces;
  for (size_t i = 0; i < jobs.size(); ++i) {
    const DeviceLayerResult& layer = out.layers[i];
    LayerResult& result = results[i];
    result = LayerResult{};
    result.sequence = layer.sequence;
    result.layer = layer.layer;
    // Ragged layers get their counts and offsets once head_counts has arrived.
    result.kept.assign(num_heads, layer.kept_per_head);
    result.offsets.resize(num_heads + 1);
    for (int h = 0; h <= num_heads; ++h) {
      result.offsets[h] = static_cast<int32_t>(static_cast<int64_t>(h) * layer.kept_per_head);
    }
    any_ragged = any_ragged || layer.ragged_heads;
    const size_t rows = static_cast<size_t>(layer.num_rows);
    result.keys.resize(rows * out.row_bytes);
    result.values.resize(rows * out.row_bytes);
    result.positions.resize(rows);
    const size_t first = static_cast<size_t>(layer.first_row);
    pieces.push_back(
        CopyPiece{result.keys.data(), out.keys + first * out.row_bytes, rows * out.row_bytes});
    pieces.push_back(
        CopyPiece{result.values.data(), out.values + first * out.row_bytes, rows * out.row_bytes});
    pieces.push_back(CopyPiece{reinterpret_cast<std::byte*>(result.positions.data()),
                               reinterpret_cast<std::byte*>(out.positions + first),
                               rows * sizeof(int32_t)});
    if (out.merged != nullptr) {
      result.merged.resize(rows);
      pieces.push_back(CopyPiece{reinterpret_cast<std::byte*>(result.merged.data()),
                                 reinterpret_cast<std::byte*>(out.merged + first),
                                 rows * sizeof(int32_t)});
    }
  }
  pieces.push_back(CopyPiece{reinterpret_cast<std::byte*>(mass_sums.data()),
                             reinterpret_cast<std::byte*>(out.mass_sums),
                             mass_sums.size() * sizeof(double)});
  if (any_ragged) {
    pieces.push_back(CopyPiece{reinterpret_cast<std::byte*>(head_counts.data()),
                               reinterpret_cast<std::byte*>(out.head_counts),
                               head_counts.size() * sizeof(int32_t)});
  }
  KVC_RETURN_IF_ERROR(StagedDownload(*lease, pieces));
  KVC_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(lease->stream));
  for (size_t i = 0; i < jobs.size(); ++i) {
    if (!out.layers[i].ragged_heads) continue;
    LayerResult& result = results[i];
    int64_t offset = 0;
    for (int h = 0; h < num_heads; ++h) {
      result.kept[h] = head_counts[i * num_heads + h];
      result.offsets[h] = static_cast<int32_t>(offset);
      offset += result.kept[h];
    }
    result.offsets[num_heads] = static_cast<int32_t>(offset);
    const int64_t capacity = out.layers[i].num_rows;
    const bool fits = out.layers[i].rows_upper_bound ? offset <= capacity : offset == capacity;
    if (!fits) {
      return absl::InternalError(
          absl::StrCat("cuda backend: sequence ", result.sequence, " layer ", result.layer,
                       ": heads kept ", offset, " rows in all, expected ",
                       out.layers[i].rows_upper_bound ? "at most " : "", capacity));
    }
    // merge_similar: the heads' rows are the first `offset` of the layer's capacity.
    const size_t rows = static_cast<size_t>(offset);
    result.keys.resize(rows * out.row_bytes);
    result.values.resize(rows * out.row_bytes);
    result.positions.resize(rows);
    if (!result.merged.empty()) result.merged.resize(rows);
  }

  float score_ms = 0;
  float select_ms = 0;
  float gather_ms = 0;
  KVC_CUDA_RETURN_IF_ERROR(cudaEventElapsedTime(&score_ms, lease->start, lease->stages.scored));
  KVC_CUDA_RETURN_IF_ERROR(
      cudaEventElapsedTime(&select_ms, lease->stages.scored, lease->stages.selected));
  KVC_CUDA_RETURN_IF_ERROR(
      cudaEventElapsedTime(&gather_ms, lease->stages.selected, lease->stages.gathered));
  const double share = 1e-3 / static_cast<double>(jobs.size());
  for (size_t i = 0; i < jobs.size(); ++i) {
    const DeviceLayerResult& layer = out.layers[i];
    LayerResult& result = results[i];
    result.attention_mass_kept =
        layer.mass_scale > 0 ? mass_sums[i] * layer.mass_scale : layer.mass_fixed;
    result.seconds.score = score_ms * share;
    result.seconds.select = select_ms * share;
    result.seconds.gather = gather_ms * share;
  }
  return absl::OkStatus();
}

absl::Status CudaBackend::ScoreLayers(const CacheGeometry& geometry, const MethodSpec& spec,
                                      std::span<const LayerJob> jobs,
                                      std::span<LayerScores> scores) {
  if (scores.size() != jobs.size()) {
    return absl::InvalidArgumentError(absl::StrCat("scores: expected ", jobs.size(),
                                                   " entries (one per job), got ", scores.size()));
  }
  KVC_RETURN_IF_ERROR(CheckCudaMethodSupported(spec, geometry.head_dim));
  if (jobs.empty()) return absl::OkStatus();
  KVC_CUDA_RETURN_IF_ERROR(cudaSetDevice(compressor_->device()));
  KVC_ASSIGN_OR_RETURN(Lease * lease, Acquire());
  LeaseGuard guard([this](Lease* done) { Release(done); }, lease);
  cuda::DeviceBuffer inputs;
  std::vector<DeviceLayerJob> device_jobs;
  KVC_RETURN_IF_ERROR(Upload(*lease, geometry, jobs, inputs, device_jobs));
  KVC_ASSIGN_OR_RETURN(DeviceBatchScores out,
                       compressor_->Score(geometry, spec, device_jobs, lease->stream));
  std::vector<CopyPiece> pieces;
  for (size_t i = 0; i < jobs.size(); ++i) {
    scores[i].sequence = jobs[i].sequence;
    scores[i].layer = jobs[i].layer;
    scores[i].scores.assign(
        static_cast<size_t>(geometry.num_kv_heads) * jobs[i].input.shape.num_tokens, 0.f);
    pieces.push_back(
        CopyPiece{reinterpret_cast<std::byte*>(scores[i].scores.data()),
                  reinterpret_cast<std::byte*>(const_cast<float*>(out.scores + out.offsets[i])),
                  scores[i].scores.size() * sizeof(float)});
  }
  KVC_RETURN_IF_ERROR(StagedDownload(*lease, pieces));
  KVC_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(lease->stream));
  return absl::OkStatus();
}

}  // namespace

bool CudaBackendCompiled() { return true; }

CudaCompressor* CudaCompressorOf(Backend& backend) {
  auto* cuda = dynamic_cast<CudaBackend*>(&backend);
  return cuda != nullptr ? cuda->compressor() : nullptr;
}

absl::StatusOr<std::unique_ptr<Backend>> MakeCudaBackend(const CudaBackendOptions& options) {
  CudaCompressorOptions compressor_options;
  compressor_options.device = options.device;
  compressor_options.memory_budget_bytes = options.memory_budget_bytes;
  KVC_ASSIGN_OR_RETURN(std::unique_ptr<CudaCompressor> compressor,
                       CudaCompressor::Create(compressor_options));
  const size_t staging = std::max<size_t>(options.staging_buffer_bytes, size_t{1} << 20);
  return std::unique_ptr<Backend>(new CudaBackend(std::move(compressor), staging));
}

}  // namespace kvcompress
