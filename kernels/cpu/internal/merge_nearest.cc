#include "kernels/cpu/internal/merge_nearest.h"

#include <cmath>
#include <vector>

namespace kvcompress::cpu {
namespace {

double Dot(const float* a, const float* b, int dim) {
  double sum = 0;
  for (int d = 0; d < dim; ++d) sum += static_cast<double>(a[d]) * b[d];
  return sum;
}

}  // namespace

MergedHead MergeNearestHead(std::span<const int32_t> kept, const HeadRows& keys,
                            const HeadRows& values) {
  const int64_t num_tokens = keys.num_tokens;
  const int dim = keys.head_dim;
  const size_t rows = kept.size();
  MergedHead head;
  head.positions.assign(kept.begin(), kept.end());
  head.merged.assign(rows, 1);

  std::vector<double> kept_norms(rows);
  std::vector<double> value_sums(rows * dim);
  std::vector<bool> is_kept(num_tokens, false);
  for (size_t row = 0; row < rows; ++row) {
    const float* key = keys.row(kept[row]);
    kept_norms[row] = std::sqrt(Dot(key, key, dim));
    const float* value = values.row(kept[row]);
    for (int d = 0; d < dim; ++d) value_sums[row * dim + d] = value[d];
    is_kept[kept[row]] = true;
  }
  for (int64_t j = 0; j < num_tokens; ++j) {
    if (is_kept[j]) continue;
    const float* key = keys.row(j);
    const double norm = std::sqrt(Dot(key, key, dim));
    size_t best = 0;
    double best_similarity = -INFINITY;
    for (size_t row = 0; row < rows; ++row) {
      const double denominator = norm * kept_norms[row];
      const double similarity =
          denominator > 0 ? Dot(key, keys.row(kept[row]), dim) / denominator : 0.0;
      if (similarity > best_similarity) {  // strict: ties keep the lower position
        best_similarity = similarity;
        best = row;
      }
    }
    const float* value = values.row(j);
    for (int d = 0; d < dim; ++d) value_sums[best * dim + d] += value[d];
    ++head.merged[best];
  }
  head.values.assign(rows * dim, 0.0f);
  for (size_t row = 0; row < rows; ++row) {
    if (head.merged[row] == 1) continue;
    for (int d = 0; d < dim; ++d) {
      head.values[row * dim + d] = static_cast<float>(value_sums[row * dim + d] / head.merged[row]);
    }
  }
  return head;
}

}  // namespace kvcompress::cpu
