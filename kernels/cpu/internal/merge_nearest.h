// The merge_nearest reducer (D2O / ToMe style) for one KV head: every evicted token folds its
// value into the kept token whose key is most cosine-similar to its own (ties to the lower
// position; a zero-norm key has similarity 0 with everything). Each kept row's value becomes
// the plain average of its own value and the values folded into it, and merged = 1 + the
// number folded. Keys are unchanged. fp64 arithmetic, rounded once to fp32. Costs
// O((T − n)·n·D) per head. Pure function; thread-safe.
#ifndef KVCOMPRESS_KERNELS_CPU_INTERNAL_MERGE_NEAREST_H_
#define KVCOMPRESS_KERNELS_CPU_INTERNAL_MERGE_NEAREST_H_

#include <cstdint>
#include <span>

#include "kernels/cpu/internal/head_tensors.h"
#include "kernels/cpu/internal/merged_head.h"

namespace kvcompress::cpu {

// `kept` ascending and non-empty, positions < keys.num_tokens; values shaped as keys.
MergedHead MergeNearestHead(std::span<const int32_t> kept, const HeadRows& keys,
                            const HeadRows& values);

}  // namespace kvcompress::cpu

#endif  // KVCOMPRESS_KERNELS_CPU_INTERNAL_MERGE_NEAREST_H_
