// AdaKV head budgets (Feng et al. 2024, kvpress AdaKVPress) on the CPU: the heads of one layer
// share a budget of H·n tokens. Each head first keeps its top AdaptiveSafeguardTokens(n, α)
// tokens (its own order: score descending, lower position first); the remaining
// H·n − H·safeguard slots go to the best of all other (head, token) pairs in the order of
// RanksBeforeAcrossHeads (score descending, then lower head, then lower position). NaN scores
// rank as −inf. Heads end with different counts; Σ = H·n exactly. Pure function; thread-safe.
#ifndef KVCOMPRESS_KERNELS_CPU_INTERNAL_ADAPTIVE_SELECTION_H_
#define KVCOMPRESS_KERNELS_CPU_INTERNAL_ADAPTIVE_SELECTION_H_

#include <cstdint>
#include <span>
#include <vector>

namespace kvcompress::cpu {

// `head_scores[h]` holds head h's T scores (all heads the same T); requires
// 1 ≤ tokens_per_head ≤ T and 0 ≤ alpha ≤ 1. Returns each head's kept positions, ascending.
std::vector<std::vector<int32_t>> SelectAdaptive(
    std::span<const std::span<const float>> head_scores, int64_t tokens_per_head, double alpha);

}  // namespace kvcompress::cpu

#endif  // KVCOMPRESS_KERNELS_CPU_INTERNAL_ADAPTIVE_SELECTION_H_
