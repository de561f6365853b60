#include "service/internal/encoded_layer_result.h"

#include <algorithm>
#include <cstring>
#include <utility>

#include "service/stream_assembler.h"

namespace kvcompress {
namespace {

// int32 tensors go out little-endian, which is the host order on every platform we build.
std::vector<std::byte> Int32Bytes(const std::vector<int32_t>& values) {
  std::vector<std::byte> bytes(values.size() * sizeof(int32_t));
  if (!values.empty()) std::memcpy(bytes.data(), values.data(), bytes.size());
  return bytes;
}

}  // namespace

EncodedLayerResult::EncodedLayerResult(LayerResult result, const CacheGeometry& geometry,
                                       bool padded, bool return_merged_counts) {
  header_.set_sequence(static_cast<uint32_t>(result.sequence));
  header_.set_layer(static_cast<uint32_t>(result.layer));
  header_.set_format(padded ? v1::OUTPUT_FORMAT_PADDED : v1::OUTPUT_FORMAT_RAGGED);
  header_.set_attention_mass_kept(result.attention_mass_kept);
  int32_t max_kept = 0;
  for (int32_t kept : result.kept) {
    header_.add_kept(static_cast<uint32_t>(kept));
    max_kept = std::max(max_kept, kept);
  }
  header_.set_max_kept(static_cast<uint32_t>(max_kept));

  if (result.in_output_region) {
    // Written into the client's output slice (cuda_ipc): the header alone, with the sizes.
    const uint64_t rows = static_cast<uint64_t>(result.total_kept());
    const uint64_t row_bytes = geometry.RowBytes();
    header_.set_in_output_region(true);
    header_.set_keys_bytes(rows * row_bytes);
    header_.set_values_bytes(rows * row_bytes);
    header_.set_positions_bytes(rows * sizeof(int32_t));
    return;
  }
  const bool send_merged = !result.merged.empty() || return_merged_counts;
  std::vector<std::byte> keys, values, positions, merged;
  if (padded) {
    PaddedLayerResult padded_result = ToPadded(result, geometry);
    header_.set_max_kept(static_cast<uint32_t>(padded_result.max_kept));
    keys = std::move(padded_result.keys);
    values = std::move(padded_result.values);
    positions = Int32Bytes(padded_result.positions);
    if (send_merged) {
      if (padded_result.merged.empty()) {
        // Non-merging reducer: every kept row stands for itself, padding for nothing.
        padded_result.merged.assign(result.kept.size() * padded_result.max_kept, 0);
        for (size_t h = 0; h < result.kept.size(); ++h) {
          std::fill_n(padded_result.merged.begin() + h * padded_result.max_kept, result.kept[h], 1);
        }
      }
      merged = Int32Bytes(padded_result.merged);
    }
  } else {
    keys = std::move(result.keys);
    values = std::move(result.values);
    positions = Int32Bytes(result.positions);
    if (send_merged) {
      if (result.merged.empty()) result.merged.assign(result.positions.size(), 1);
      merged = Int32Bytes(result.merged);
    }
  }
  header_.set_keys_bytes(keys.size());
  header_.set_values_bytes(values.size());
  header_.set_positions_bytes(positions.size());
  header_.set_merged_bytes(merged.size());
  tensors_.push_back({v1::TENSOR_KIND_KEYS, std::move(keys)});
  tensors_.push_back({v1::TENSOR_KIND_VALUES, std::move(values)});
  tensors_.push_back({v1::TENSOR_KIND_POSITIONS, std::move(positions)});
  if (send_merged) tensors_.push_back({v1::TENSOR_KIND_MERGED, std::move(merged)});
  for (const Tensor& tensor : tensors_) total_bytes_ += tensor.bytes.size();
}

bool EncodedLayerResult::Next(v1::CompressResponse& response) {
  if (!header_sent_) {
    *response.mutable_layer_result() = header_;
    header_sent_ = true;
    return true;
  }
  while (tensor_index_ < tensors_.size() && offset_ >= tensors_[tensor_index_].bytes.size()) {
    // Done with this tensor: free it now rather than with the whole layer.
    std::vector<std::byte>().swap(tensors_[tensor_index_].bytes);
    ++tensor_index_;
    offset_ = 0;
  }
  if (tensor_index_ == tensors_.size()) return false;
  const Tensor& tensor = tensors_[tensor_index_];
  const size_t size = std::min(kMaxChunkDataBytes, tensor.bytes.size() - offset_);
  v1::TensorChunk* chunk = response.mutable_result_chunk();
  chunk->set_sequence(header_.sequence());
  chunk->set_layer(header_.layer());
  chunk->set_tensor(tensor.kind);
  chunk->set_offset(offset_);
  chunk->set_data(reinterpret_cast<const char*>(tensor.bytes.data()) + offset_, size);
  offset_ += size;
  sent_bytes_ += size;
  return true;
}

}  // namespace kvcompress
