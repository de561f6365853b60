#include "kernels/cpu/internal/head_tensors.h"

#include <cstring>

namespace kvcompress::cpu {

void ConvertToFloat(const std::byte* source, DType dtype, size_t count, float* out) {
  switch (dtype) {
    case DType::kFloat32:
      std::memcpy(out, source, count * sizeof(float));
      return;
    case DType::kBFloat16:
      for (size_t i = 0; i < count; ++i) {
        uint16_t bits;
        std::memcpy(&bits, source + 2 * i, 2);
        out[i] = BFloat16ToFloat(bits);
      }
      return;
    case DType::kFloat16:
      for (size_t i = 0; i < count; ++i) {
        uint16_t bits;
        std::memcpy(&bits, source + 2 * i, 2);
        out[i] = Float16ToFloat(bits);
      }
      return;
  }
}

void ConvertFromFloat(const float* source, size_t count, DType dtype, std::byte* out) {
  switch (dtype) {
    case DType::kFloat32:
      std::memcpy(out, source, count * sizeof(float));
      return;
    case DType::kBFloat16:
    case DType::kFloat16:
      for (size_t i = 0; i < count; ++i) {
        const uint16_t bits =
            dtype == DType::kBFloat16 ? FloatToBFloat16(source[i]) : FloatToFloat16(source[i]);
        std::memcpy(out + 2 * i, &bits, 2);
      }
      return;
  }
}

namespace {

// Rows of head `kv_head` of one layer's K or V tensor.
HeadRows LoadHeadRows(const CacheGeometry& geometry, const std::byte* tensor, int64_t num_tokens,
                      int kv_head) {
  HeadRows head;
  head.num_tokens = num_tokens;
  head.head_dim = geometry.head_dim;
  head.rows.resize(static_cast<size_t>(head.num_tokens) * head.head_dim);
  const size_t element_size = DTypeSize(geometry.dtype);
  if (geometry.layout == Layout::kHND) {
    // The head's rows are contiguous.
    const size_t first = KeyValueRowOffset(geometry.layout, geometry.num_kv_heads, head.num_tokens,
                                           head.head_dim, kv_head, 0);
    ConvertToFloat(tensor + first * element_size, geometry.dtype, head.rows.size(),
                   head.rows.data());
    return head;
  }
  for (int64_t token = 0; token < head.num_tokens; ++token) {
    const size_t first = KeyValueRowOffset(geometry.layout, geometry.num_kv_heads, head.num_tokens,
                                           head.head_dim, kv_head, token);
    ConvertToFloat(tensor + first * element_size, geometry.dtype, head.head_dim,
                   head.rows.data() + token * head.head_dim);
  }
  return head;
}

}  // namespace

HeadRows LoadHeadKeys(const CacheGeometry& geometry, const LayerView& view, int kv_head) {
  return LoadHeadRows(geometry, view.keys, view.shape.num_tokens, kv_head);
}

HeadRows LoadHeadValues(const CacheGeometry& geometry, const LayerView& view, int kv_head) {
  return LoadHeadRows(geometry, view.values, view.shape.num_tokens, kv_head);
}

GroupQueries LoadGroupQueries(const CacheGeometry& geometry, const LayerView& view, int kv_head,
                              int num_queries) {
  GroupQueries queries;
  queries.group_size = geometry.group_size();
  queries.num_queries = num_queries;
  queries.head_dim = geometry.head_dim;
  queries.rows.resize(static_cast<size_t>(queries.group_size) * num_queries * queries.head_dim);
  const int num_sent = view.shape.num_window_queries;
  const size_t element_size = DTypeSize(geometry.dtype);
  for (int member = 0; member < queries.group_size; ++member) {
    const size_t query_head = static_cast<size_t>(kv_head) * queries.group_size + member;
    // Queries are [H_q, W_sent, D]; the last num_queries of this head are contiguous.
    const size_t first = (query_head * num_sent + (num_sent - num_queries)) * queries.head_dim;
    ConvertToFloat(
        view.queries + first * element_size, geometry.dtype,
        static_cast<size_t>(num_queries) * queries.head_dim,
        queries.rows.data() + static_cast<size_t>(member) * num_queries * queries.head_dim);
  }
  return queries;
}

}  // namespace kvcompress::cpu
