// Latency percentiles from recorded samples, exact (nearest rank), for `kvc bench`.
//
// A load run records every request's latency (a few bytes each, even for a million
// requests), so there is no need for the approximation of a bucketed histogram: the p99
// printed is a latency some request actually had. Pure functions; thread-safe.
#ifndef KVCOMPRESS_CLIENT_LATENCY_SUMMARY_H_
#define KVCOMPRESS_CLIENT_LATENCY_SUMMARY_H_

#include <cstdint>
#include <span>
#include <vector>

#include "absl/time/time.h"

namespace kvcompress {

struct LatencySummary {
  int64_t count = 0;  // samples; every field below is zero when there are none
  absl::Duration min;
  absl::Duration mean;
  absl::Duration p50;
  absl::Duration p90;
  absl::Duration p99;
  absl::Duration max;
};

// The nearest-rank q-quantile of `sorted` (ascending): the smallest sample s such that at
// least ⌈q·n⌉ samples are ≤ s, i.e. sorted[⌈q·n⌉ − 1]; q ≤ 0 gives the minimum, q ≥ 1 the
// maximum. Zero for no samples.
absl::Duration NearestRankPercentile(std::span<const absl::Duration> sorted, double q);

// Sorts `samples` and summarises them.
LatencySummary SummarizeLatencies(std::vector<absl::Duration> samples);

}  // namespace kvcompress

#endif  // KVCOMPRESS_CLIENT_LATENCY_SUMMARY_H_
