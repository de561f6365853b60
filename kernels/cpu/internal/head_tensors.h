// fp32 copies of the rows one KV head works on: its keys and its query group's window
// queries. The CPU reference converts each input element once and then does all of its
// arithmetic on these copies.
//
// Loading requires a view whose tensors match `geometry` (checked by the caller). The structs
// own their rows; thread-compatible.
#ifndef KVCOMPRESS_KERNELS_CPU_INTERNAL_HEAD_TENSORS_H_
#define KVCOMPRESS_KERNELS_CPU_INTERNAL_HEAD_TENSORS_H_

#include <cstdint>
#include <vector>

#include "kernels/cache_geometry.h"

namespace kvcompress::cpu {

// Keys (or values) of one KV head: [num_tokens, head_dim] fp32.
struct HeadRows {
  std::vector<float> rows;
  int64_t num_tokens = 0;
  int head_dim = 0;

  const float* row(int64_t token) const { return rows.data() + token * head_dim; }
};
using HeadKeys = HeadRows;

// Window queries of the query heads that share one KV head: [group_size, num_queries,
// head_dim] fp32. Query i sits at position num_tokens − num_queries + i.
struct GroupQueries {
  std::vector<float> rows;
  int group_size = 0;
  int num_queries = 0;
  int head_dim = 0;

  const float* row(int group_member, int query) const {
    return rows.data() + (static_cast<size_t>(group_member) * num_queries + query) * head_dim;
  }
};

// Converts `count` elements of `dtype` at `source` to fp32.
void ConvertToFloat(const std::byte* source, DType dtype, size_t count, float* out);

// Writes `count` fp32 values to `out` in `dtype` (round to nearest even for 16-bit types).
void ConvertFromFloat(const float* source, size_t count, DType dtype, std::byte* out);

HeadRows LoadHeadKeys(const CacheGeometry& geometry, const LayerView& view, int kv_head);
HeadRows LoadHeadValues(const CacheGeometry& geometry, const LayerView& view, int kv_head);

// The last `num_queries` (≤ view.shape.num_window_queries) queries of query heads
// kv_head·G … kv_head·G + G − 1.
GroupQueries LoadGroupQueries(const CacheGeometry& geometry, const LayerView& view, int kv_head,
                              int num_queries);

}  // namespace kvcompress::cpu

#endif  // KVCOMPRESS_KERNELS_CPU_INTERNAL_HEAD_TENSORS_H_
