#include "kernels/cpu/internal/adaptive_selection.h"

#include <algorithm>

#include "kernels/budget_math.h"
#include "kernels/cpu/internal/token_selection.h"
#include "kernels/selection_order.h"

namespace kvcompress::cpu {
namespace {

// One (head, token) competing for the layer's shared slots.
struct Candidate {
  float score;
  int head;
  int32_t position;
};

}  // namespace

std::vector<std::vector<int32_t>> SelectAdaptive(
    std::span<const std::span<const float>> head_scores, int64_t tokens_per_head, double alpha) {
  const int num_heads = static_cast<int>(head_scores.size());
  std::vector<std::vector<int32_t>> kept(num_heads);
  if (num_heads == 0) return kept;
  const int64_t num_tokens = static_cast<int64_t>(head_scores.front().size());
  const int64_t safeguard = AdaptiveSafeguardTokens(tokens_per_head, alpha);

  std::vector<Candidate> candidates;
  candidates.reserve(static_cast<size_t>(num_heads) * (num_tokens - safeguard));
  std::vector<bool> taken(num_tokens);
  for (int head = 0; head < num_heads; ++head) {
    kept[head].resize(safeguard);
    SelectTopTokens(head_scores[head], kept[head]);
    std::fill(taken.begin(), taken.end(), false);
    for (int32_t position : kept[head]) taken[position] = true;
    for (int64_t j = 0; j < num_tokens; ++j) {
      if (taken[j]) continue;
      candidates.push_back({SelectionScore(head_scores[head][j]), head, static_cast<int32_t>(j)});
    }
  }

  const size_t shared = static_cast<size_t>(num_heads) * (tokens_per_head - safeguard);
  if (shared > 0) {
    const auto ranks_before = [](const Candidate& a, const Candidate& b) {
      return RanksBeforeAcrossHeads(a.score, a.head, a.position, b.score, b.head, b.position);
    };
    // A strict total order, so the partition is exactly the best `shared` candidates.
    std::nth_element(candidates.begin(), candidates.begin() + (shared - 1), candidates.end(),
                     ranks_before);
    for (size_t i = 0; i < shared; ++i) kept[candidates[i].head].push_back(candidates[i].position);
  }
  for (std::vector<int32_t>& positions : kept) std::sort(positions.begin(), positions.end());
  return kept;
}

}  // namespace kvcompress::cpu
