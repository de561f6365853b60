// Per-head token selection: the n best tokens in the order of kernels/selection_order.h
// (score descending, ties to the lower position, NaN as −inf), returned ascending.
// Pure function; thread-safe.
#ifndef KVCOMPRESS_KERNELS_CPU_INTERNAL_TOKEN_SELECTION_H_
#define KVCOMPRESS_KERNELS_CPU_INTERNAL_TOKEN_SELECTION_H_

#include <cstdint>
#include <span>

namespace kvcompress::cpu {

// Writes the positions of the kept.size() best-ranked tokens of `scores`, ascending, to
// `kept`. Requires kept.size() ≤ scores.size() and scores.size() ≤ INT32_MAX.
void SelectTopTokens(std::span<const float> scores, std::span<int32_t> kept);

}  // namespace kvcompress::cpu

#endif  // KVCOMPRESS_KERNELS_CPU_INTERNAL_TOKEN_SELECTION_H_
