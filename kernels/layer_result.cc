#include "kernels/layer_result.h"

#include <algorithm>
#include <cstring>

namespace kvcompress {

PaddedLayerResult ToPadded(const LayerResult& result, const CacheGeometry& geometry) {
  PaddedLayerResult padded;
  const size_t num_heads = result.kept.size();
  const size_t row_bytes = geometry.RowBytes();
  for (int32_t kept : result.kept) padded.max_kept = std::max(padded.max_kept, kept);
  const size_t max_kept = static_cast<size_t>(padded.max_kept);

  padded.kept = result.kept;
  padded.keys.assign(num_heads * max_kept * row_bytes, std::byte{0});
  padded.values.assign(num_heads * max_kept * row_bytes, std::byte{0});
  padded.positions.assign(num_heads * max_kept, -1);
  const bool has_merged = !result.merged.empty();
  if (has_merged) padded.merged.assign(num_heads * max_kept, 0);

  for (size_t head = 0; head < num_heads; ++head) {
    const size_t first = static_cast<size_t>(result.offsets[head]);
    const size_t count = static_cast<size_t>(result.kept[head]);
    const size_t out_row = head * max_kept;
    if (count == 0) continue;
    std::memcpy(padded.keys.data() + out_row * row_bytes, result.keys.data() + first * row_bytes,
                count * row_bytes);
    std::memcpy(padded.values.data() + out_row * row_bytes,
                result.values.data() + first * row_bytes, count * row_bytes);
    std::copy_n(result.positions.begin() + first, count, padded.positions.begin() + out_row);
    if (has_merged) {
      std::copy_n(result.merged.begin() + first, count, padded.merged.begin() + out_row);
    }
  }
  return padded;
}

}  // namespace kvcompress
