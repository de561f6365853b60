#include "kernels/cpu/internal/knorm_scorer.h"

#include <cmath>

namespace kvcompress::cpu {

void ScoreKnormHead(const HeadKeys& keys, std::span<float> scores) {
  for (int64_t j = 0; j < keys.num_tokens; ++j) {
    const float* key = keys.row(j);
    double squares = 0;
    for (int d = 0; d < keys.head_dim; ++d) squares += static_cast<double>(key[d]) * key[d];
    scores[j] = static_cast<float>(-std::sqrt(squares));
  }
}

}  // namespace kvcompress::cpu
