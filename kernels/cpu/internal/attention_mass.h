// How much of the window queries' attention lands on a head's kept tokens: the per-layer
// quality signal LayerResult::attention_mass_kept. fp64 throughout. Pure function.
#ifndef KVCOMPRESS_KERNELS_CPU_INTERNAL_ATTENTION_MASS_H_
#define KVCOMPRESS_KERNELS_CPU_INTERNAL_ATTENTION_MASS_H_

#include <cstdint>
#include <span>
#include <vector>

#include "kernels/cpu/internal/head_tensors.h"
#include "kernels/cpu/internal/window_attention.h"

namespace kvcompress::cpu {

// Σ over group members g and window queries i of Σ_{j ∈ kept} A_ij, where A is the causal
// softmax of window_attention.h over all T keys. The layer's mass is the sum of this over
// KV heads divided by H_q · W. `kept` is ascending. `normalizers` ([G·W], from the scorer)
// saves recomputing each query's softmax denominator; pass null to compute them here.
double SumKeptAttention(const HeadKeys& keys, const GroupQueries& queries,
                        std::span<const int32_t> kept,
                        const std::vector<SoftmaxNormalizer>* normalizers);

}  // namespace kvcompress::cpu

#endif  // KVCOMPRESS_KERNELS_CPU_INTERNAL_ATTENTION_MASS_H_
