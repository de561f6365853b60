// KeyDiff scores of one KV head (Park et al. 2025, kvpress KeyDiffPress): with the anchor
// a = mean_i(k_i / max(‖k_i‖, 1e-12)) over all T keys of the head, score_j = −cos(k_j, a) =
// −(k_j·a) / (max(‖k_j‖, 1e-8) · max(‖a‖, 1e-8)), so the keys least like the average direction
// are kept. fp64 throughout, fp32 out; no token is protected by the scorer itself. Pure
// function; thread-safe.
#ifndef KVCOMPRESS_KERNELS_CPU_INTERNAL_KEYDIFF_SCORER_H_
#define KVCOMPRESS_KERNELS_CPU_INTERNAL_KEYDIFF_SCORER_H_

#include <span>

#include "kernels/cpu/internal/head_tensors.h"

namespace kvcompress::cpu {

// `scores` has keys.num_tokens entries.
void ScoreKeyDiffHead(const HeadKeys& keys, std::span<float> scores);

}  // namespace kvcompress::cpu

#endif  // KVCOMPRESS_KERNELS_CPU_INTERNAL_KEYDIFF_SCORER_H_
