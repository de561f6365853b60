// EncodedLayerResult: one layer's compressed cache as the Compress stream sends it — a
// LayerResult message, then TensorChunk messages for KEYS, VALUES, POSITIONS and (when
// present) MERGED, each carrying at most kMaxChunkDataBytes.
//
// Encoding (ToPadded for the padded format, int32 tensors to bytes) happens once, on a
// worker; messages are then produced one at a time as the stream can take them, so a layer
// is never held twice in memory. Movable, not copyable; not thread-safe.
#ifndef KVCOMPRESS_SERVICE_INTERNAL_ENCODED_LAYER_RESULT_H_
#define KVCOMPRESS_SERVICE_INTERNAL_ENCODED_LAYER_RESULT_H_

#include <cstddef>
#include <cstdint>
#include <vector>

#include "kernels/cache_geometry.h"
#include "kernels/layer_result.h"
#include "kvcompress/v1/kvcompress.pb.h"

namespace kvcompress {

class EncodedLayerResult final {
 public:
  // `return_merged_counts` sends MERGED even for non-merging reducers (every row then
  // counts 1 token; padded rows 0).
  EncodedLayerResult(LayerResult result, const CacheGeometry& geometry, bool padded,
                     bool return_merged_counts);
  EncodedLayerResult(EncodedLayerResult&&) = default;
  EncodedLayerResult& operator=(EncodedLayerResult&&) = default;
  EncodedLayerResult(const EncodedLayerResult&) = delete;
  EncodedLayerResult& operator=(const EncodedLayerResult&) = delete;

  // Fills `response` with the next message; false when every message was produced.
  bool Next(v1::CompressResponse& response);

  const v1::LayerResult& header() const { return header_; }
  // Tensor bytes not yet handed out by Next.
  uint64_t pending_bytes() const { return total_bytes_ - sent_bytes_; }
  uint64_t total_bytes() const { return total_bytes_; }

 private:
  struct Tensor {
    v1::TensorKind kind;
    std::vector<std::byte> bytes;
  };

  v1::LayerResult header_;
  bool header_sent_ = false;
  std::vector<Tensor> tensors_;
  size_t tensor_index_ = 0;
  size_t offset_ = 0;  // within tensors_[tensor_index_]
  uint64_t total_bytes_ = 0;
  uint64_t sent_bytes_ = 0;
};

}  // namespace kvcompress

#endif  // KVCOMPRESS_SERVICE_INTERNAL_ENCODED_LAYER_RESULT_H_
