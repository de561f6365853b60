#include "kernels/cpu/internal/streaming_scorer.h"

#include <cmath>
#include <cstddef>

namespace kvcompress::cpu {

void ScoreStreaming(int sinks, std::span<float> scores) {
  for (size_t j = 0; j < scores.size(); ++j) {
    scores[j] = j < static_cast<size_t>(sinks) ? INFINITY : static_cast<float>(j);
  }
}

}  // namespace kvcompress::cpu
