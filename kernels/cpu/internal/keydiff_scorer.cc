#include "kernels/cpu/internal/keydiff_scorer.h"

#include <algorithm>
#include <cmath>
#include <vector>

namespace kvcompress::cpu {
namespace {

// The thresholds torch's F.normalize and F.cosine_similarity clamp norms to.
constexpr double kNormalizeEps = 1e-12;
constexpr double kCosineEps = 1e-8;

double Norm(const float* row, int head_dim) {
  double squares = 0;
  for (int d = 0; d < head_dim; ++d) squares += static_cast<double>(row[d]) * row[d];
  return std::sqrt(squares);
}

}  // namespace

void ScoreKeyDiffHead(const HeadKeys& keys, std::span<float> scores) {
  const int dim = keys.head_dim;
  std::vector<double> norms(keys.num_tokens);
  std::vector<double> anchor(dim, 0.0);
  for (int64_t j = 0; j < keys.num_tokens; ++j) {
    const float* key = keys.row(j);
    norms[j] = Norm(key, dim);
    const double scale = 1.0 / std::max(norms[j], kNormalizeEps);
    for (int d = 0; d < dim; ++d) anchor[d] += key[d] * scale;
  }
  double anchor_squares = 0;
  for (double& value : anchor) {
    value /= static_cast<double>(keys.num_tokens);
    anchor_squares += value * value;
  }
  const double anchor_norm = std::max(std::sqrt(anchor_squares), kCosineEps);
  for (int64_t j = 0; j < keys.num_tokens; ++j) {
    const float* key = keys.row(j);
    double dot = 0;
    for (int d = 0; d < dim; ++d) dot += key[d] * anchor[d];
    scores[j] = static_cast<float>(-dot / (std::max(norms[j], kCosineEps) * anchor_norm));
  }
}

}  // namespace kvcompress::cpu
