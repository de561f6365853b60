#include "kernels/cpu/internal/window_attention.h"

#include <algorithm>
#include <cmath>

namespace kvcompress::cpu {

double ScaledLogit(const float* query, const float* key, int head_dim) {
  double dot = 0;
  for (int d = 0; d < head_dim; ++d) dot += static_cast<double>(query[d]) * key[d];
  return dot / std::sqrt(static_cast<double>(head_dim));
}

SoftmaxNormalizer ComputeWindowLogits(const HeadKeys& keys, const float* query, int64_t num_visible,
                                      double* logits) {
  SoftmaxNormalizer normalizer;
  normalizer.max_logit = -INFINITY;
  for (int64_t j = 0; j < num_visible; ++j) {
    logits[j] = ScaledLogit(query, keys.row(j), keys.head_dim);
    normalizer.max_logit = std::max(normalizer.max_logit, logits[j]);
  }
  for (int64_t j = 0; j < num_visible; ++j) {
    normalizer.sum_exp += std::exp(logits[j] - normalizer.max_logit);
  }
  return normalizer;
}

}  // namespace kvcompress::cpu
