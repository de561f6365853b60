#include "kernels/cpu/internal/tova_scorer.h"

#include <cmath>
#include <cstdint>

#include "kernels/cpu/internal/window_attention.h"

namespace kvcompress::cpu {

std::vector<double> SumGroupLastQueryAttention(const HeadKeys& keys, const GroupQueries& queries) {
  const int64_t num_tokens = keys.num_tokens;
  std::vector<double> sums(num_tokens, 0.0);
  std::vector<double> logits(num_tokens);
  for (int member = 0; member < queries.group_size; ++member) {
    const float* query = queries.row(member, queries.num_queries - 1);
    const SoftmaxNormalizer normalizer =
        ComputeWindowLogits(keys, query, num_tokens, logits.data());
    for (int64_t j = 0; j < num_tokens; ++j) sums[j] += normalizer.Weight(logits[j]);
  }
  return sums;
}

std::vector<float> CombineTovaScores(std::span<const std::vector<double>* const> group_sums,
                                     int num_query_heads) {
  const size_t num_tokens = group_sums.empty() ? 0 : group_sums.front()->size();
  std::vector<float> scores(num_tokens, INFINITY);
  for (size_t j = 0; j + 1 < num_tokens; ++j) {
    double total = 0;
    for (const std::vector<double>* sums : group_sums) total += (*sums)[j];
    scores[j] = static_cast<float>(total / num_query_heads);
  }
  return scores;
}

}  // namespace kvcompress::cpu
