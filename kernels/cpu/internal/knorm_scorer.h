// Key-norm scores of one KV head (Devoto et al.): score_j = −‖k_j‖₂, accumulated in fp64, so
// that the smallest-norm keys are kept. Pure function; thread-safe.
#ifndef KVCOMPRESS_KERNELS_CPU_INTERNAL_KNORM_SCORER_H_
#define KVCOMPRESS_KERNELS_CPU_INTERNAL_KNORM_SCORER_H_

#include <span>

#include "kernels/cpu/internal/head_tensors.h"

namespace kvcompress::cpu {

// `scores` has keys.num_tokens entries.
void ScoreKnormHead(const HeadKeys& keys, std::span<float> scores);

}  // namespace kvcompress::cpu

#endif  // KVCOMPRESS_KERNELS_CPU_INTERNAL_KNORM_SCORER_H_
