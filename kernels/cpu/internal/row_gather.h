// Copies chosen rows of one KV head of a K or V tensor, byte for byte, into a packed
// [positions.size(), head_dim] block in the input dtype. Thread-safe for disjoint outputs.
#ifndef KVCOMPRESS_KERNELS_CPU_INTERNAL_ROW_GATHER_H_
#define KVCOMPRESS_KERNELS_CPU_INTERNAL_ROW_GATHER_H_

#include <cstddef>
#include <cstdint>
#include <span>

#include "kernels/cache_geometry.h"

namespace kvcompress::cpu {

// `tensor` is one layer's K or V ([H_kv, T, D] or [T, H_kv, D] per geometry.layout); `out`
// has room for positions.size() rows. Positions must lie in [0, num_tokens).
void GatherHeadRows(const CacheGeometry& geometry, const std::byte* tensor, int64_t num_tokens,
                    int kv_head, std::span<const int32_t> positions, std::byte* out);

}  // namespace kvcompress::cpu

#endif  // KVCOMPRESS_KERNELS_CPU_INTERNAL_ROW_GATHER_H_
