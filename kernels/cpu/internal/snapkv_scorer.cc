#include "kernels/cpu/internal/snapkv_scorer.h"

#include <algorithm>
#include <cmath>

#include "kernels/snapkv_window.h"

namespace kvcompress::cpu {
namespace {

// Pools the prefix scores `mean_attention` into `pooled` (both of length P).
void PoolPrefix(const SnapKvOptions& options, const std::vector<double>& mean_attention,
                std::vector<double>& pooled) {
  const int64_t prefix = static_cast<int64_t>(mean_attention.size());
  for (int64_t j = 0; j < prefix; ++j) {
    const PoolingWindow window = PoolingWindowAt(j, options.kernel_size, prefix);
    if (options.pooling == Pooling::kAvg) {
      double sum = 0;
      for (int64_t t = window.first; t <= window.last; ++t) sum += mean_attention[t];
      pooled[j] = sum / options.kernel_size;
    } else {
      double best = mean_attention[window.first];
      for (int64_t t = window.first + 1; t <= window.last; ++t) {
        best = std::max(best, mean_attention[t]);
      }
      pooled[j] = best;
    }
  }
}

}  // namespace

void ScoreSnapKvHead(const SnapKvOptions& options, const HeadKeys& keys,
                     const GroupQueries& queries, std::span<float> scores,
                     std::vector<SoftmaxNormalizer>* normalizers) {
  const int64_t num_tokens = keys.num_tokens;
  const int window = queries.num_queries;
  const int64_t prefix = num_tokens - window;
  if (normalizers != nullptr) {
    normalizers->assign(static_cast<size_t>(queries.group_size) * window, SoftmaxNormalizer{});
  }

  std::vector<double> logits(num_tokens);
  std::vector<double> mean_attention(prefix);
  std::vector<double> pooled(prefix);
  std::vector<double> reduced(prefix,
                              options.group_reduction == GroupReduction::kMax ? -INFINITY : 0.0);
  for (int member = 0; member < queries.group_size; ++member) {
    std::fill(mean_attention.begin(), mean_attention.end(), 0.0);
    for (int query = 0; query < window; ++query) {
      const int64_t visible = VisibleKeys(num_tokens, window, query);
      const SoftmaxNormalizer normalizer =
          ComputeWindowLogits(keys, queries.row(member, query), visible, logits.data());
      if (normalizers != nullptr) (*normalizers)[member * window + query] = normalizer;
      for (int64_t j = 0; j < prefix; ++j) mean_attention[j] += normalizer.Weight(logits[j]);
    }
    for (double& value : mean_attention) value /= window;
    PoolPrefix(options, mean_attention, pooled);
    for (int64_t j = 0; j < prefix; ++j) {
      if (options.group_reduction == GroupReduction::kMax) {
        reduced[j] = std::max(reduced[j], pooled[j]);
      } else {
        reduced[j] += pooled[j];
      }
    }
  }
  const double divisor =
      options.group_reduction == GroupReduction::kMean ? queries.group_size : 1.0;
  for (int64_t j = 0; j < prefix; ++j) scores[j] = static_cast<float>(reduced[j] / divisor);
  for (int64_t j = prefix; j < num_tokens; ++j) scores[j] = INFINITY;
}

}  // namespace kvcompress::cpu
