#include "kernels/cpu/internal/window_attention.h"

#include <algorithm>
#include <cmath>

namespace kvcompress::cpu {

double ScaledLogit(const float* query, const float* key, int head_dim) {
  // Four independent fp64 partial sums: the same exact products, summed in a fixed order
  // that does not wait on one long dependency chain.
  double partial[4] = {0, 0, 0, 0};
  int d = 0;
  for (; d + 4 <= head_dim; d += 4) {
    for (int lane = 0; lane < 4; ++lane) {
      partial[lane] += static_cast<double>(query[d + lane]) * key[d + lane];
    }
  }
  for (; d < head_dim; ++d) partial[0] += static_cast<double>(query[d]) * key[d];
  const double dot = (partial[0] + partial[1]) + (partial[2] + partial[3]);
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
