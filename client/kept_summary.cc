#include "client/kept_summary.h"

#include <algorithm>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "client/kept_heatmap.h"

namespace kvcompress {

absl::StatusOr<std::vector<LayerKeptSummary>> SummarizeKept(std::span<const LayerResult> layers,
                                                            int64_t num_tokens, int64_t sinks,
                                                            int64_t recent) {
  if (absl::Status status = ValidateKeptPositions(layers, num_tokens); !status.ok()) return status;
  sinks = std::clamp<int64_t>(sinks, 0, num_tokens);
  recent = std::clamp<int64_t>(recent, 0, num_tokens);
  const int num_heads = static_cast<int>(layers[0].kept.size());

  std::vector<LayerKeptSummary> out;
  out.reserve(layers.size());
  std::vector<bool> covered(num_tokens);
  for (size_t l = 0; l < layers.size(); ++l) {
    const LayerResult& result = layers[l];
    LayerKeptSummary summary;
    summary.layer = static_cast<int>(l);
    summary.total_kept = result.offsets.back();
    summary.min_kept = *std::min_element(result.kept.begin(), result.kept.end());
    summary.max_kept = *std::max_element(result.kept.begin(), result.kept.end());
    summary.mean_kept = static_cast<double>(summary.total_kept) / num_heads;
    summary.attention_mass_kept = result.attention_mass_kept;
    for (int32_t count : result.merged) summary.merged_rows += count > 1;

    int64_t sinks_kept = 0, recent_kept = 0;
    for (int32_t position : result.positions) {
      sinks_kept += position < sinks;
      recent_kept += position >= num_tokens - recent;
    }
    if (sinks > 0) summary.sinks_kept = static_cast<double>(sinks_kept) / (sinks * num_heads);
    if (recent > 0) summary.recent_kept = static_cast<double>(recent_kept) / (recent * num_heads);

    std::fill(covered.begin(), covered.end(), false);
    for (int32_t position : result.positions) covered[position] = true;
    summary.any_head_kept =
        static_cast<double>(std::count(covered.begin(), covered.end(), true)) / num_tokens;
    out.push_back(summary);
  }
  return out;
}

}  // namespace kvcompress
