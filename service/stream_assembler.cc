#include "service/stream_assembler.h"

#include <cstring>
#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "kernels/dtype.h"
#include "kernels/status_macros.h"

namespace kvcompress {
namespace {

constexpr const char* kSlotNames[] = {"keys", "values", "queries", "scores"};

// Missing tensors listed by name at half-close; the rest are counted.
constexpr int kMaxMissingListed = 4;

std::string LayerName(int sequence, int layer) {
  return absl::StrCat("sequence ", sequence, " layer ", layer);
}

}  // namespace

StreamAssembler::StreamAssembler(const CacheGeometry& geometry,
                                 std::vector<SequenceShape> sequences, MemoryBudget* budget)
    : geometry_(geometry),
      sequences_(std::move(sequences)),
      budget_(budget),
      layer_state_(sequences_.size() * static_cast<size_t>(geometry.num_layers),
                   LayerState::kNotStarted) {}

uint64_t StreamAssembler::ExpectedBytes(int sequence, Slot slot) const {
  const SequenceShape& shape = sequences_[sequence];
  switch (slot) {
    case kKeys:
    case kValues:
      return geometry_.KeyValueBytes(shape.num_tokens);
    case kQueries:
      return geometry_.QueryBytes(shape.num_window_queries);
    case kScores:
      return CacheGeometry::ScoreBytes(shape.num_score_heads, shape.num_tokens);
    case kNumSlots:
      break;
  }
  return 0;
}

uint64_t StreamAssembler::bytes_expected() const {
  uint64_t total = 0;
  for (size_t s = 0; s < sequences_.size(); ++s) {
    uint64_t per_layer = 0;
    for (int slot = 0; slot < kNumSlots; ++slot) {
      per_layer += ExpectedBytes(static_cast<int>(s), static_cast<Slot>(slot));
    }
    total += per_layer * static_cast<uint64_t>(geometry_.num_layers);
  }
  return total;
}

std::string StreamAssembler::DescribeTensor(int sequence, Slot slot) const {
  const SequenceShape& shape = sequences_[sequence];
  const std::string dtype(DTypeName(geometry_.dtype));
  std::string elements;
  switch (slot) {
    case kKeys:
    case kValues:
      elements = geometry_.layout == Layout::kHND
                     ? absl::StrCat(geometry_.num_kv_heads, "*", shape.num_tokens, "*",
                                    geometry_.head_dim, " ", dtype)
                     : absl::StrCat(shape.num_tokens, "*", geometry_.num_kv_heads, "*",
                                    geometry_.head_dim, " ", dtype);
      break;
    case kQueries:
      elements = absl::StrCat(geometry_.num_query_heads, "*", shape.num_window_queries, "*",
                              geometry_.head_dim, " ", dtype);
      break;
    case kScores:
      elements = absl::StrCat(shape.num_score_heads, "*", shape.num_tokens, " float32");
      break;
    case kNumSlots:
      break;
  }
  return absl::StrCat(elements, " elements (", ExpectedBytes(sequence, slot), " bytes)");
}

absl::StatusOr<StreamAssembler::Slot> StreamAssembler::SlotForChunk(
    const v1::TensorChunk& chunk) const {
  const SequenceShape& shape = sequences_[chunk.sequence()];
  const std::string where = LayerName(chunk.sequence(), chunk.layer());
  switch (chunk.tensor()) {
    case v1::TENSOR_KIND_KEYS:
      return kKeys;
    case v1::TENSOR_KIND_VALUES:
      return kValues;
    case v1::TENSOR_KIND_QUERIES:
      if (shape.num_window_queries == 0) {
        return absl::InvalidArgumentError(
            absl::StrCat(where,
                         ": queries chunk, but the header declares num_window_queries 0 "
                         "for sequence ",
                         chunk.sequence(), "; send queries only when W > 0"));
      }
      return kQueries;
    case v1::TENSOR_KIND_SCORES:
      if (shape.num_score_heads == 0) {
        return absl::InvalidArgumentError(
            absl::StrCat(where,
                         ": scores chunk, but the header declares num_score_heads 0 "
                         "for sequence ",
                         chunk.sequence(), "; send scores only when num_score_heads > 0"));
      }
      return kScores;
    case v1::TENSOR_KIND_POSITIONS:
    case v1::TENSOR_KIND_MERGED:
      return absl::InvalidArgumentError(absl::StrCat(
          where, ": tensor ", v1::TensorKind_Name(chunk.tensor()),
          " is result-only; requests carry TENSOR_KIND_KEYS, VALUES, QUERIES or SCORES"));
    default:
      return absl::InvalidArgumentError(
          absl::StrCat(where, ": tensor ",
                       chunk.tensor() == v1::TENSOR_KIND_UNSPECIFIED
                           ? std::string("not set")
                           : absl::StrCat("has unknown kind ", static_cast<int>(chunk.tensor())),
                       "; expected TENSOR_KIND_KEYS, VALUES, QUERIES or SCORES"));
  }
}

bool StreamAssembler::LayerComplete(int sequence, const PendingLayer& pending) const {
  for (int slot = 0; slot < kNumSlots; ++slot) {
    if (pending.received[slot] != ExpectedBytes(sequence, static_cast<Slot>(slot))) return false;
  }
  return true;
}

absl::StatusOr<std::optional<AssembledLayer>> StreamAssembler::AddRequest(
    const v1::CompressRequest& request) {
  switch (request.payload_case()) {
    case v1::CompressRequest::kChunk:
      return AddChunk(request.chunk());
    case v1::CompressRequest::kHeader:
      return absl::InvalidArgumentError(
          "second header: a Compress stream carries exactly one header, as its first message");
    case v1::CompressRequest::kLayerReady:
      return absl::InvalidArgumentError(
          "layer_ready on an inline stream: layer_ready needs a header with transport "
          "TRANSPORT_CUDA_IPC and a channel_id; inline streams send chunks");
    case v1::CompressRequest::PAYLOAD_NOT_SET:
      break;
  }
  return absl::InvalidArgumentError(
      "empty CompressRequest: after the header every message must carry a chunk");
}

absl::StatusOr<std::optional<AssembledLayer>> StreamAssembler::AddChunk(
    const v1::TensorChunk& chunk) {
  if (chunk.sequence() >= sequences_.size()) {
    return absl::InvalidArgumentError(absl::StrCat("chunk sequence ", chunk.sequence(),
                                                   " out of range: the header declares ",
                                                   sequences_.size(), " sequences"));
  }
  if (chunk.layer() >= static_cast<uint32_t>(geometry_.num_layers)) {
    return absl::InvalidArgumentError(absl::StrCat("chunk layer ", chunk.layer(),
                                                   " out of range: geometry.num_layers is ",
                                                   geometry_.num_layers));
  }
  const int sequence = static_cast<int>(chunk.sequence());
  const int layer = static_cast<int>(chunk.layer());
  KVC_ASSIGN_OR_RETURN(const Slot slot, SlotForChunk(chunk));
  const std::string where =
      absl::StrCat(LayerName(sequence, layer), " ", kSlotNames[static_cast<int>(slot)]);

  const size_t index = static_cast<size_t>(sequence) * geometry_.num_layers + layer;
  if (layer_state_[index] == LayerState::kComplete) {
    return absl::InvalidArgumentError(
        absl::StrCat(where, ": chunk at offset ", chunk.offset(),
                     " arrived after the layer was complete; each tensor is sent once"));
  }
  const std::string& data = chunk.data();
  if (data.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(where, ": empty chunk at offset ",
                                                   chunk.offset(), "; expected 1 to ",
                                                   kMaxChunkDataBytes, " bytes of data"));
  }
  if (data.size() > kMaxChunkDataBytes) {
    return absl::InvalidArgumentError(absl::StrCat(where, ": chunk holds ", data.size(),
                                                   " bytes of data; at most ", kMaxChunkDataBytes,
                                                   " bytes (4 MiB - 1 KiB) per chunk"));
  }

  PendingLayer* pending = nullptr;
  if (auto it = pending_.find(index); it != pending_.end()) pending = &it->second;
  const uint64_t received = pending != nullptr ? pending->received[slot] : 0;
  const uint64_t expected = ExpectedBytes(sequence, slot);
  if (chunk.offset() != received) {
    if (received == expected) {
      return absl::InvalidArgumentError(absl::StrCat(
          where, ": chunk at offset ", chunk.offset(), " after the tensor was complete (",
          DescribeTensor(sequence, slot), "); each tensor is sent once"));
    }
    return absl::InvalidArgumentError(absl::StrCat(
        where, ": chunk offset ", chunk.offset(), " but ", received,
        " bytes were received so far; the chunks of a tensor arrive in order, without gaps "
        "or repeats"));
  }
  if (data.size() > expected - received) {
    return absl::InvalidArgumentError(absl::StrCat(where, ": chunk ends at byte ",
                                                   received + data.size(), " but the tensor holds ",
                                                   DescribeTensor(sequence, slot)));
  }

  if (pending == nullptr) {
    PendingLayer fresh;
    fresh.input.sequence = sequence;
    fresh.input.layer = layer;
    fresh.input.shape = sequences_[sequence];
    pending = &pending_.emplace(index, std::move(fresh)).first->second;
    layer_state_[index] = LayerState::kInProgress;
  }
  LayerInput& input = pending->input;
  if (received == 0) {
    // First chunk of this tensor: allocate the whole tensor now, against the budget.
    if (budget_ != nullptr) {
      KVC_ASSIGN_OR_RETURN(MemoryReservation reservation, budget_->Reserve(expected));
      pending->reservation.Absorb(std::move(reservation));
    }
    switch (slot) {
      case kKeys:
        input.keys.reserve(expected);
        break;
      case kValues:
        input.values.reserve(expected);
        break;
      case kQueries:
        input.queries.reserve(expected);
        break;
      case kScores:
        input.scores.resize(expected / sizeof(float));
        break;
      case kNumSlots:
        break;
    }
    bytes_buffered_ += expected;
  }
  const auto* begin = reinterpret_cast<const std::byte*>(data.data());
  switch (slot) {
    case kKeys:
      input.keys.insert(input.keys.end(), begin, begin + data.size());
      break;
    case kValues:
      input.values.insert(input.values.end(), begin, begin + data.size());
      break;
    case kQueries:
      input.queries.insert(input.queries.end(), begin, begin + data.size());
      break;
    case kScores:
      std::memcpy(reinterpret_cast<std::byte*>(input.scores.data()) + received, begin, data.size());
      break;
    case kNumSlots:
      break;
  }
  pending->received[slot] += data.size();
  bytes_received_ += data.size();

  if (!LayerComplete(sequence, *pending)) return std::nullopt;
  AssembledLayer done{std::move(pending->input), std::move(pending->reservation)};
  uint64_t layer_bytes = 0;
  for (int s = 0; s < kNumSlots; ++s) layer_bytes += pending->received[s];
  bytes_buffered_ -= layer_bytes;
  pending_.erase(index);
  layer_state_[index] = LayerState::kComplete;
  ++layers_completed_;
  return std::optional<AssembledLayer>(std::move(done));
}

absl::Status StreamAssembler::CheckComplete() const {
  std::vector<std::string> listed;
  int64_t missing = 0;
  for (size_t index = 0; index < layer_state_.size(); ++index) {
    if (layer_state_[index] == LayerState::kComplete) continue;
    const int sequence = static_cast<int>(index / geometry_.num_layers);
    const int layer = static_cast<int>(index % geometry_.num_layers);
    const auto it = pending_.find(index);
    for (int slot = 0; slot < kNumSlots; ++slot) {
      const uint64_t expected = ExpectedBytes(sequence, static_cast<Slot>(slot));
      const uint64_t received = it != pending_.end() ? it->second.received[slot] : 0;
      if (received == expected) continue;
      ++missing;
      if (listed.size() < kMaxMissingListed) {
        listed.push_back(absl::StrCat(LayerName(sequence, layer), " ", kSlotNames[slot],
                                      " (received ", received, " of ", expected, " bytes)"));
      }
    }
  }
  if (missing == 0) return absl::OkStatus();
  std::string message = absl::StrCat("stream ended before ", absl::StrJoin(listed, ", "));
  if (missing > static_cast<int64_t>(listed.size())) {
    absl::StrAppend(&message, ", and ", missing - static_cast<int64_t>(listed.size()),
                    " more incomplete tensors");
  }
  return absl::InvalidArgumentError(message);
}

}  // namespace kvcompress
