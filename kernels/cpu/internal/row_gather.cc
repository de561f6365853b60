#include "kernels/cpu/internal/row_gather.h"

#include <cstring>

namespace kvcompress::cpu {

void GatherHeadRows(const CacheGeometry& geometry, const std::byte* tensor, int64_t num_tokens,
                    int kv_head, std::span<const int32_t> positions, std::byte* out) {
  const size_t element_size = DTypeSize(geometry.dtype);
  const size_t row_bytes = static_cast<size_t>(geometry.head_dim) * element_size;
  for (size_t row = 0; row < positions.size(); ++row) {
    const size_t first = KeyValueRowOffset(geometry.layout, geometry.num_kv_heads, num_tokens,
                                           geometry.head_dim, kv_head, positions[row]);
    std::memcpy(out + row * row_bytes, tensor + first * element_size, row_bytes);
  }
}

}  // namespace kvcompress::cpu
