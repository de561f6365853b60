// Geometry of a KV cache and non-owning views of one layer of one sequence.
//
// Views are plain structs: they do not own memory and the caller keeps the bytes alive for
// as long as a view is used. Thread-safe to read concurrently.
#ifndef KVCOMPRESS_KERNELS_CACHE_GEOMETRY_H_
#define KVCOMPRESS_KERNELS_CACHE_GEOMETRY_H_

#include <cstddef>
#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "kernels/dtype.h"
#include "kernels/host_device.h"

namespace kvcompress {

// Model geometry shared by every sequence of a request.
struct CacheGeometry {
  int num_layers = 0;
  int num_kv_heads = 0;
  int num_query_heads = 0;  // a multiple of num_kv_heads
  int head_dim = 0;
  DType dtype = DType::kBFloat16;  // keys, values and queries
  Layout layout = Layout::kHND;    // keys and values

  int group_size() const { return num_query_heads / num_kv_heads; }
  // Bytes of one row (one token of one head) of K or V: head_dim elements.
  size_t RowBytes() const { return static_cast<size_t>(head_dim) * DTypeSize(dtype); }
  // Bytes of one K (or V) tensor of one layer holding `num_tokens` tokens.
  size_t KeyValueBytes(int64_t num_tokens) const {
    return static_cast<size_t>(num_kv_heads) * num_tokens * head_dim * DTypeSize(dtype);
  }
  // Bytes of the window queries of one layer: [H_q, W, D].
  size_t QueryBytes(int64_t num_window_queries) const {
    return static_cast<size_t>(num_query_heads) * num_window_queries * head_dim * DTypeSize(dtype);
  }
  // Bytes of the client scores of one layer: [score_heads, T] fp32.
  static size_t ScoreBytes(int num_score_heads, int64_t num_tokens) {
    return static_cast<size_t>(num_score_heads) * num_tokens * sizeof(float);
  }
};

// Checks the geometry alone: positive sizes, H_q a multiple of H_kv. Returns
// INVALID_ARGUMENT naming the field, the value and what was expected.
absl::Status ValidateGeometry(const CacheGeometry& geometry);

// One sequence of a batch.
struct SequenceShape {
  int64_t num_tokens = 0;      // T
  int num_window_queries = 0;  // W queries sent per layer, 0 when none
  int num_score_heads = 0;     // rows of the client scores, 0 when none
};

// Element index of the first element of row (head, token) of a K or V tensor.
KVC_HOST_DEVICE inline size_t KeyValueRowOffset(Layout layout, int num_kv_heads, int64_t num_tokens,
                                                int head_dim, int head, int64_t token) {
  return layout == Layout::kHND ? (static_cast<size_t>(head) * num_tokens + token) * head_dim
                                : (static_cast<size_t>(token) * num_kv_heads + head) * head_dim;
}

// One layer of one sequence as the worker cached it.
struct LayerView {
  const std::byte* keys = nullptr;     // [H_kv, T, D] (HND) or [T, H_kv, D] (NHD)
  const std::byte* values = nullptr;   // same shape as keys
  const std::byte* queries = nullptr;  // [H_q, W, D] or null when W == 0
  const float* scores = nullptr;       // [num_score_heads, T] or null
  SequenceShape shape;
};

// An owned layer: what the service assembles from chunks and what `kvc --local` reads
// from a file. Movable, not copyable (it may hold gigabytes).
struct LayerInput {
  int sequence = 0;
  int layer = 0;
  SequenceShape shape;
  std::vector<std::byte> keys;
  std::vector<std::byte> values;
  std::vector<std::byte> queries;
  std::vector<float> scores;

  LayerInput() = default;
  LayerInput(LayerInput&&) = default;
  LayerInput& operator=(LayerInput&&) = default;
  LayerInput(const LayerInput&) = delete;
  LayerInput& operator=(const LayerInput&) = delete;

  LayerView view() const {
    return LayerView{keys.data(), values.data(), queries.empty() ? nullptr : queries.data(),
                     scores.empty() ? nullptr : scores.data(), shape};
  }
};

}  // namespace kvcompress

#endif  // KVCOMPRESS_KERNELS_CACHE_GEOMETRY_H_
