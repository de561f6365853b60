#include "kernels/cpu/internal/protected_tokens.h"

#include <algorithm>
#include <cmath>

namespace kvcompress::cpu {

void ProtectTokens(int sinks, int recent, std::span<float> scores) {
  const size_t size = scores.size();
  const size_t num_sinks = std::min(size, static_cast<size_t>(std::max(sinks, 0)));
  const size_t num_recent = std::min(size, static_cast<size_t>(std::max(recent, 0)));
  std::fill_n(scores.begin(), num_sinks, INFINITY);
  std::fill(scores.end() - num_recent, scores.end(), INFINITY);
}

}  // namespace kvcompress::cpu
