// Causal attention of window queries over all T keys of one KV head, in fp64: the arithmetic
// SnapKV scoring and the attention-mass signal share.
//
// Window query i of W sits at position T − W + i and sees keys 0 … T − W + i; its attention
// is A_j = exp(l_j − max_logit) / sum_exp with l_j = q·k_j / √D. Pure functions.
#ifndef KVCOMPRESS_KERNELS_CPU_INTERNAL_WINDOW_ATTENTION_H_
#define KVCOMPRESS_KERNELS_CPU_INTERNAL_WINDOW_ATTENTION_H_

#include <cmath>
#include <cstdint>

#include "kernels/cpu/internal/head_tensors.h"

namespace kvcompress::cpu {

// What turns a logit of one window query into its attention weight.
struct SoftmaxNormalizer {
  double max_logit = 0;
  double sum_exp = 0;  // Σ_j exp(l_j − max_logit) over the visible keys

  double Weight(double logit) const { return std::exp(logit - max_logit) / sum_exp; }
};

// Keys window query `query` (of `num_queries`) may see: T − num_queries + query + 1.
inline int64_t VisibleKeys(int64_t num_tokens, int num_queries, int query) {
  return num_tokens - num_queries + query + 1;
}

// q·k / √D accumulated in fp64.
double ScaledLogit(const float* query, const float* key, int head_dim);

// logits[j] = ScaledLogit(query, keys.row(j)) for j < num_visible; returns their normalizer.
SoftmaxNormalizer ComputeWindowLogits(const HeadKeys& keys, const float* query, int64_t num_visible,
                                      double* logits);

}  // namespace kvcompress::cpu

#endif  // KVCOMPRESS_KERNELS_CPU_INTERNAL_WINDOW_ATTENTION_H_
