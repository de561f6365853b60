#include "service/layer_ready_assembler.h"

#include <string>
#include <utility>

#include "absl/strings/str_cat.h"

namespace kvcompress {

LayerReadyAssembler::LayerReadyAssembler(const CacheGeometry& geometry,
                                         std::vector<SequenceShape> sequences,
                                         const Channel* channel)
    : geometry_(geometry),
      sequences_(std::move(sequences)),
      channel_(channel),
      announced_(sequences_.size() * static_cast<size_t>(geometry.num_layers), false) {}

absl::StatusOr<DeviceLayerInput> LayerReadyAssembler::AddRequest(
    const v1::CompressRequest& request) {
  switch (request.payload_case()) {
    case v1::CompressRequest::kLayerReady:
      return AddLayerReady(request.layer_ready());
    case v1::CompressRequest::kChunk:
      return absl::InvalidArgumentError(
          absl::StrCat("chunk on a ", TransportName(),
                       " stream: every layer comes as a "
                       "layer_ready (and its tensors through the channel)"));
    case v1::CompressRequest::kHeader:
      return absl::InvalidArgumentError(
          "second header: a Compress stream carries exactly one header, as its first message");
    case v1::CompressRequest::PAYLOAD_NOT_SET:
      break;
  }
  return absl::InvalidArgumentError(
      absl::StrCat("empty CompressRequest: after the header every message of a ", TransportName(),
                   " stream must carry a layer_ready"));
}

absl::StatusOr<DeviceLayerInput> LayerReadyAssembler::AddLayerReady(const v1::LayerReady& ready) {
  if (ready.sequence() >= sequences_.size()) {
    return absl::InvalidArgumentError(absl::StrCat("layer_ready sequence ", ready.sequence(),
                                                   " out of range: the header declares ",
                                                   sequences_.size(), " sequences"));
  }
  if (ready.layer() >= static_cast<uint32_t>(geometry_.num_layers)) {
    return absl::InvalidArgumentError(absl::StrCat("layer_ready layer ", ready.layer(),
                                                   " out of range: the header declares ",
                                                   geometry_.num_layers, " layers"));
  }
  const size_t index = static_cast<size_t>(ready.sequence()) * geometry_.num_layers + ready.layer();
  const std::string where = absl::StrCat("sequence ", ready.sequence(), " layer ", ready.layer());
  if (announced_[index]) {
    return absl::InvalidArgumentError(
        absl::StrCat(where, ": layer_ready sent twice; each layer of each sequence comes once"));
  }
  const SequenceShape& shape = sequences_[ready.sequence()];
  DeviceLayerInput input;
  input.sequence = static_cast<int>(ready.sequence());
  input.layer = static_cast<int>(ready.layer());
  input.shape = shape;

  uint64_t bytes = 0;
  const auto resolve = [&](bool present, const v1::RegionSlice& slice, uint64_t expected,
                           const char* tensor, bool wanted,
                           const char* why) -> absl::StatusOr<const std::byte*> {
    const std::string field = absl::StrCat(where, " ", tensor);
    if (!wanted) {
      if (present) {
        return absl::InvalidArgumentError(absl::StrCat(field, ": given, but ", why));
      }
      return nullptr;
    }
    if (channel_ == nullptr) {
      // nccl: the tensor comes over the communicator; a slice would be a client's mistake.
      if (present) {
        return absl::InvalidArgumentError(absl::StrCat(
            field, ": a region slice on an nccl stream; nccl layer_ready messages carry none"));
      }
      bytes += expected;
      return nullptr;
    }
    if (!present) {
      return absl::InvalidArgumentError(
          absl::StrCat(field, ": missing; expected a region slice of ", expected, " bytes"));
    }
    absl::StatusOr<std::byte*> address =
        channel_->ResolveSlice(slice.region(), slice.offset(), slice.bytes(), expected, field);
    if (!address.ok()) return address.status();
    bytes += expected;
    return *address;
  };
  const uint64_t kv_bytes = geometry_.KeyValueBytes(shape.num_tokens);
  absl::StatusOr<const std::byte*> keys =
      resolve(ready.has_keys(), ready.keys(), kv_bytes, "keys", true, "");
  if (!keys.ok()) return keys.status();
  absl::StatusOr<const std::byte*> values =
      resolve(ready.has_values(), ready.values(), kv_bytes, "values", true, "");
  if (!values.ok()) return values.status();
  absl::StatusOr<const std::byte*> queries =
      resolve(ready.has_queries(), ready.queries(), geometry_.QueryBytes(shape.num_window_queries),
              "queries", shape.num_window_queries > 0,
              "the header declares num_window_queries 0 for this sequence");
  if (!queries.ok()) return queries.status();
  absl::StatusOr<const std::byte*> scores =
      resolve(ready.has_scores(), ready.scores(),
              CacheGeometry::ScoreBytes(shape.num_score_heads, shape.num_tokens), "scores",
              shape.num_score_heads > 0, "the header declares num_score_heads 0 for this sequence");
  if (!scores.ok()) return scores.status();
  input.keys = *keys;
  input.values = *values;
  input.queries = *queries;
  input.scores = reinterpret_cast<const float*>(*scores);
  if (ready.has_output()) {
    const std::string field = absl::StrCat(where, " output");
    if (channel_ == nullptr) {
      return absl::InvalidArgumentError(
          absl::StrCat(field,
                       ": output slices are for cuda_ipc streams; nccl results come inline or are "
                       "forwarded"));
    }
    absl::StatusOr<std::byte*> output = channel_->ResolveWritableSlice(
        ready.output().region(), ready.output().offset(), ready.output().bytes(), field);
    if (!output.ok()) return output.status();
    input.output = *output;
    input.output_capacity = ready.output().bytes();
  }

  announced_[index] = true;
  ++layers_completed_;
  bytes_received_ += bytes;
  return input;
}

OutputRegionLayout OutputLayoutFor(uint64_t rows, uint64_t row_bytes) {
  const auto align = [](uint64_t bytes) { return (bytes + 15) / 16 * 16; };
  OutputRegionLayout place;
  place.values_offset = align(rows * row_bytes);
  place.positions_offset = align(place.values_offset + rows * row_bytes);
  place.total_bytes = place.positions_offset + rows * sizeof(int32_t);
  return place;
}

const char* LayerReadyAssembler::TransportName() const {
  return channel_ == nullptr ? "nccl" : "cuda_ipc";
}

absl::Status LayerReadyAssembler::CheckComplete() const {
  for (size_t index = 0; index < announced_.size(); ++index) {
    if (!announced_[index]) {
      return absl::InvalidArgumentError(
          absl::StrCat("stream ended with sequence ", index / geometry_.num_layers, " layer ",
                       index % geometry_.num_layers,
                       " never announced: every layer of every sequence needs a "
                       "layer_ready before the half-close"));
    }
  }
  return absl::OkStatus();
}

}  // namespace kvcompress
