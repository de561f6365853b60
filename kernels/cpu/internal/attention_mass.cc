#include "kernels/cpu/internal/attention_mass.h"

#include <algorithm>

namespace kvcompress::cpu {

double SumKeptAttention(const HeadKeys& keys, const GroupQueries& queries,
                        std::span<const int32_t> kept,
                        const std::vector<SoftmaxNormalizer>* normalizers) {
  const int window = queries.num_queries;
  std::vector<double> logits(normalizers == nullptr ? keys.num_tokens : 0);
  double total = 0;
  for (int member = 0; member < queries.group_size; ++member) {
    for (int query = 0; query < window; ++query) {
      const float* query_row = queries.row(member, query);
      const int64_t visible = VisibleKeys(keys.num_tokens, window, query);
      // Kept positions ascend, so the visible ones are a prefix of `kept`.
      const auto visible_end = std::lower_bound(kept.begin(), kept.end(), visible);
      double mass = 0;
      if (normalizers == nullptr) {
        const SoftmaxNormalizer normalizer =
            ComputeWindowLogits(keys, query_row, visible, logits.data());
        for (auto it = kept.begin(); it != visible_end; ++it) {
          mass += normalizer.Weight(logits[*it]);
        }
      } else {
        const SoftmaxNormalizer& normalizer = (*normalizers)[member * window + query];
        for (auto it = kept.begin(); it != visible_end; ++it) {
          mass += normalizer.Weight(ScaledLogit(query_row, keys.row(*it), keys.head_dim));
        }
      }
      total += mass;
    }
  }
  return total;
}

}  // namespace kvcompress::cpu
