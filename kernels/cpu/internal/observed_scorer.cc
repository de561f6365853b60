#include "kernels/cpu/internal/observed_scorer.h"

#include <cmath>
#include <cstddef>

namespace kvcompress::cpu {

void ScoreObservedHead(const ObservedOptions& options, const CacheGeometry& geometry,
                       const LayerView& view, int kv_head, std::span<float> scores) {
  const int64_t num_tokens = view.shape.num_tokens;
  // Per KV head when the client sent H_kv rows (also when H_kv == H_q).
  const bool per_query_head = view.shape.num_score_heads != geometry.num_kv_heads;
  const int members = per_query_head ? geometry.group_size() : 1;
  const size_t first_row = static_cast<size_t>(kv_head) * members;
  for (int64_t j = 0; j < num_tokens; ++j) {
    double reduced = options.group_reduction == GroupReduction::kMax ? -INFINITY : 0.0;
    bool any_nan = false;
    for (int member = 0; member < members; ++member) {
      const double value = view.scores[(first_row + member) * num_tokens + j];
      any_nan = any_nan || std::isnan(value);
      if (options.group_reduction == GroupReduction::kMax) {
        reduced = value > reduced ? value : reduced;
      } else {
        reduced += value;
      }
    }
    if (options.group_reduction == GroupReduction::kMean) reduced /= members;
    scores[j] = any_nan ? NAN : static_cast<float>(reduced);
  }
}

}  // namespace kvcompress::cpu
