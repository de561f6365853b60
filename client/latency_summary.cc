#include "client/latency_summary.h"

#include <algorithm>
#include <cmath>

namespace kvcompress {

absl::Duration NearestRankPercentile(std::span<const absl::Duration> sorted, double q) {
  if (sorted.empty()) return absl::ZeroDuration();
  const double n = static_cast<double>(sorted.size());
  // The epsilon keeps q·n that is an integer in exact arithmetic (0.99 × 100) from rounding
  // up to the next rank through binary floating point.
  const double rank = std::ceil(std::clamp(q, 0.0, 1.0) * n - 1e-9);
  const size_t index = static_cast<size_t>(std::clamp(rank, 1.0, n)) - 1;
  return sorted[index];
}

LatencySummary SummarizeLatencies(std::vector<absl::Duration> samples) {
  LatencySummary summary;
  if (samples.empty()) return summary;
  std::sort(samples.begin(), samples.end());
  summary.count = static_cast<int64_t>(samples.size());
  summary.min = samples.front();
  summary.max = samples.back();
  absl::Duration total;
  for (absl::Duration sample : samples) total += sample;
  summary.mean = total / summary.count;
  summary.p50 = NearestRankPercentile(samples, 0.50);
  summary.p90 = NearestRankPercentile(samples, 0.90);
  summary.p99 = NearestRankPercentile(samples, 0.99);
  return summary;
}

}  // namespace kvcompress
