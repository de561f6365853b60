// StreamAssembler: turns the TensorChunk messages of one Compress stream into complete,
// owned layers, validating every chunk against the header.
//
// Chunks of a tensor arrive in order (offset == bytes already received); tensors and layers
// may interleave freely. A layer is complete when its keys and values have arrived, plus its
// window queries when the sequence declares W > 0 and its scores when it declares score
// heads. Each tensor's buffer is allocated whole on its first chunk, reserved against the
// server's MemoryBudget; the reservation travels with the completed layer.
//
// Errors are INVALID_ARGUMENT naming the sequence, layer, tensor, the value received and
// what was expected (RESOURCE_EXHAUSTED when the memory budget is spent). After an error the
// assembler must not be used further.
//
// Thread safety: none; one stream feeds one assembler. No gRPC inside, so it is testable
// on its own.
#ifndef KVCOMPRESS_SERVICE_STREAM_ASSEMBLER_H_
#define KVCOMPRESS_SERVICE_STREAM_ASSEMBLER_H_

#include <array>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kernels/cache_geometry.h"
#include "kvcompress/v1/kvcompress.pb.h"
#include "service/cuda_ipc_transport.h"
#include "service/memory_budget.h"
#include "service/nccl_link.h"

namespace kvcompress {

// Tensor data bytes one TensorChunk may carry: 4 MiB − 1 KiB (the proto's kMaxChunkDataBytes).
inline constexpr size_t kMaxChunkDataBytes = 4 * 1024 * 1024 - 1024;

// A complete layer and the memory reservation covering its buffers; or, for GPU transports
// (service/layer_ready_assembler.h), a layer left in device memory (`input` then empty).
struct AssembledLayer {
  LayerInput input;
  MemoryReservation reservation;
  std::optional<DeviceLayerInput> device;
  // nccl: the receive that fills `device` (and owns its memory); null for other transports.
  std::shared_ptr<NcclTransfer> device_transfer;
  uint64_t device_bytes = 0;  // device memory `device_transfer` holds
};

class StreamAssembler final {
 public:
  // Requires a geometry that passed ValidateGeometry and sequences with num_tokens ≥ 1,
  // num_window_queries ≤ num_tokens and num_score_heads in {0, H_kv, H_q} (the header
  // validation guarantees it). `budget` may be null: no accounting.
  StreamAssembler(const CacheGeometry& geometry, std::vector<SequenceShape> sequences,
                  MemoryBudget* budget);
  StreamAssembler(const StreamAssembler&) = delete;
  StreamAssembler& operator=(const StreamAssembler&) = delete;

  // Accepts one message after the header: a chunk (see AddChunk). A second header or an
  // empty message is INVALID_ARGUMENT.
  absl::StatusOr<std::optional<AssembledLayer>> AddRequest(const v1::CompressRequest& request);

  // Accepts one chunk; returns the layer it completed, if any.
  absl::StatusOr<std::optional<AssembledLayer>> AddChunk(const v1::TensorChunk& chunk);

  // Called at half-close: OK when every layer of every sequence is complete, else
  // INVALID_ARGUMENT listing the first missing tensors.
  absl::Status CheckComplete() const;

  // Tensor bytes accepted so far.
  uint64_t bytes_received() const { return bytes_received_; }
  // Bytes allocated for layers not yet complete.
  uint64_t bytes_buffered() const { return bytes_buffered_; }
  int64_t layers_completed() const { return layers_completed_; }
  int64_t layers_total() const { return static_cast<int64_t>(layer_state_.size()); }
  // Total tensor bytes the header implies (all sequences, layers and tensors).
  uint64_t bytes_expected() const;

 private:
  // Request tensors of a layer, in the order missing tensors are reported.
  enum Slot : int { kKeys = 0, kValues = 1, kQueries = 2, kScores = 3, kNumSlots = 4 };
  enum class LayerState : uint8_t { kNotStarted, kInProgress, kComplete };

  struct PendingLayer {
    LayerInput input;
    std::array<uint64_t, kNumSlots> received{};
    MemoryReservation reservation;
  };

  // Expected bytes of `slot` for `sequence` (0 when the sequence sends no such tensor).
  uint64_t ExpectedBytes(int sequence, Slot slot) const;
  // "8*4096*128 bfloat16 elements (8388608 bytes)".
  std::string DescribeTensor(int sequence, Slot slot) const;
  absl::StatusOr<Slot> SlotForChunk(const v1::TensorChunk& chunk) const;
  bool LayerComplete(int sequence, const PendingLayer& pending) const;

  const CacheGeometry geometry_;
  const std::vector<SequenceShape> sequences_;
  MemoryBudget* const budget_;

  // [sequence * num_layers + layer]
  std::vector<LayerState> layer_state_;
  absl::flat_hash_map<size_t, PendingLayer> pending_;
  uint64_t bytes_received_ = 0;
  uint64_t bytes_buffered_ = 0;
  int64_t layers_completed_ = 0;
};

}  // namespace kvcompress

#endif  // KVCOMPRESS_SERVICE_STREAM_ASSEMBLER_H_
