#include "kernels/cpu/internal/token_selection.h"

#include <algorithm>
#include <numeric>
#include <vector>

#include "kernels/selection_order.h"

namespace kvcompress::cpu {

void SelectTopTokens(std::span<const float> scores, std::span<int32_t> kept) {
  const size_t num_kept = kept.size();
  if (num_kept == 0) return;
  if (num_kept == scores.size()) {
    std::iota(kept.begin(), kept.end(), 0);
    return;
  }
  std::vector<float> keys(scores.size());
  std::transform(scores.begin(), scores.end(), keys.begin(), SelectionScore);
  std::vector<int32_t> order(scores.size());
  std::iota(order.begin(), order.end(), 0);
  const auto ranks_before = [&keys](int32_t a, int32_t b) {
    return RanksBefore(keys[a], a, keys[b], b);
  };
  // A strict total order (no two tokens share a position), so nth_element's partition is
  // exactly the top num_kept.
  std::nth_element(order.begin(), order.begin() + (num_kept - 1), order.end(), ranks_before);
  std::copy_n(order.begin(), num_kept, kept.begin());
  std::sort(kept.begin(), kept.end());
}

}  // namespace kvcompress::cpu
