// Per-layer statistics of a compressed cache's kept sets, what `kvc inspect` prints: how
// evenly heads were budgeted, whether the attention sinks and the recent window survived,
// and how much of the sequence any head still sees.
//
// Works on ragged LayerResults (what ReadCompressedCache returns), checked with
// ValidateKeptPositions (client/kept_heatmap.h). Pure functions; thread-safe.
#ifndef KVCOMPRESS_CLIENT_KEPT_SUMMARY_H_
#define KVCOMPRESS_CLIENT_KEPT_SUMMARY_H_

#include <cstdint>
#include <span>
#include <vector>

#include "absl/status/statusor.h"
#include "kernels/layer_result.h"

namespace kvcompress {

struct LayerKeptSummary {
  int layer = 0;
  int64_t total_kept = 0;  // rows over all heads
  int64_t min_kept = 0;    // per head
  int64_t max_kept = 0;
  double mean_kept = 0;
  // Fraction of the first `sinks` positions kept, over all heads (0..1).
  double sinks_kept = 0;
  // Fraction of the last `recent` positions kept, over all heads (0..1).
  double recent_kept = 0;
  // Fraction of the T positions that at least one head kept: what the layer as a whole
  // still covers (1 when heads split the sequence between them, kept/T when they agree).
  double any_head_kept = 0;
  // Rows that stand for more than one original token (merging reducers); 0 without merged
  // counts.
  int64_t merged_rows = 0;
  double attention_mass_kept = -1.0;  // as recorded; −1 when not computed
};

// One summary per layer. `sinks` and `recent` are clamped to [0, T]; a zero count makes
// the matching fraction 0. INVALID_ARGUMENT for num_tokens < 1, layers with different head
// counts, or kept/offsets/positions that do not agree (positions outside [0, T) or not
// ascending within a head).
absl::StatusOr<std::vector<LayerKeptSummary>> SummarizeKept(std::span<const LayerResult> layers,
                                                            int64_t num_tokens, int64_t sinks,
                                                            int64_t recent);

}  // namespace kvcompress

#endif  // KVCOMPRESS_CLIENT_KEPT_SUMMARY_H_
