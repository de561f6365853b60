// Nearest-rank percentiles: the p-th percentile is a sample that exists, the smallest with
// at least ⌈p·n⌉ samples at or below it.
#include "client/latency_summary.h"

#include <algorithm>
#include <random>
#include <vector>

#include "gtest/gtest.h"

namespace kvcompress {
namespace {

std::vector<absl::Duration> Milliseconds(std::vector<int> values) {
  std::vector<absl::Duration> out;
  for (int value : values) out.push_back(absl::Milliseconds(value));
  return out;
}

TEST(LatencySummaryTest, OneToHundredMilliseconds) {
  std::vector<int> values;
  for (int i = 100; i >= 1; --i) values.push_back(i);  // unsorted on purpose
  std::shuffle(values.begin(), values.end(), std::mt19937(1));
  const LatencySummary s = SummarizeLatencies(Milliseconds(values));
  EXPECT_EQ(s.count, 100);
  EXPECT_EQ(s.min, absl::Milliseconds(1));
  EXPECT_EQ(s.p50, absl::Milliseconds(50));
  EXPECT_EQ(s.p90, absl::Milliseconds(90));
  // 0.99 · 100 is 99 in exact arithmetic; binary rounding must not push it to rank 100.
  EXPECT_EQ(s.p99, absl::Milliseconds(99));
  EXPECT_EQ(s.max, absl::Milliseconds(100));
  EXPECT_EQ(s.mean, absl::Microseconds(50500));
  // 0.07 · 100 is 7.000000000000001 in binary floating point: still rank 7.
  std::vector<absl::Duration> sorted = Milliseconds(values);
  std::sort(sorted.begin(), sorted.end());
  EXPECT_EQ(NearestRankPercentile(sorted, 0.07), absl::Milliseconds(7));
}

TEST(LatencySummaryTest, SmallSamplesRoundRanksUp) {
  // n = 10: p50 is rank 5, p90 rank 9, p99 rank ⌈9.9⌉ = 10.
  const LatencySummary ten =
      SummarizeLatencies(Milliseconds({10, 20, 30, 40, 50, 60, 70, 80, 90, 1000}));
  EXPECT_EQ(ten.p50, absl::Milliseconds(50));
  EXPECT_EQ(ten.p90, absl::Milliseconds(90));
  EXPECT_EQ(ten.p99, absl::Milliseconds(1000));
  EXPECT_EQ(ten.max, absl::Milliseconds(1000));

  // n = 3: p50 is rank ⌈1.5⌉ = 2.
  const LatencySummary three = SummarizeLatencies(Milliseconds({7, 3, 5}));
  EXPECT_EQ(three.p50, absl::Milliseconds(5));
  EXPECT_EQ(three.p90, absl::Milliseconds(7));

  const LatencySummary one = SummarizeLatencies(Milliseconds({42}));
  EXPECT_EQ(one.count, 1);
  for (absl::Duration d : {one.min, one.mean, one.p50, one.p90, one.p99, one.max}) {
    EXPECT_EQ(d, absl::Milliseconds(42));
  }
}

TEST(LatencySummaryTest, OrderingHoldsOnRandomSamples) {
  std::mt19937 rng(5);
  std::lognormal_distribution<double> latency(3.0, 1.0);
  for (int n : {1, 2, 5, 99, 1000}) {
    std::vector<absl::Duration> samples;
    for (int i = 0; i < n; ++i) samples.push_back(absl::Microseconds(1000 * latency(rng)));
    const LatencySummary s = SummarizeLatencies(samples);
    EXPECT_LE(s.min, s.p50);
    EXPECT_LE(s.p50, s.p90);
    EXPECT_LE(s.p90, s.p99);
    EXPECT_LE(s.p99, s.max);
    EXPECT_LE(s.min, s.mean);
    EXPECT_LE(s.mean, s.max);
    // Every percentile is one of the samples.
    for (absl::Duration p : {s.p50, s.p90, s.p99}) {
      EXPECT_NE(std::find(samples.begin(), samples.end(), p), samples.end());
    }
    // At least ⌈q·n⌉ samples lie at or below the q-th percentile, fewer below it.
    const auto at_or_below = [&](absl::Duration d) {
      return std::count_if(samples.begin(), samples.end(),
                           [&](absl::Duration x) { return x <= d; });
    };
    const auto below = [&](absl::Duration d) {
      return std::count_if(samples.begin(), samples.end(), [&](absl::Duration x) { return x < d; });
    };
    EXPECT_GE(at_or_below(s.p90), (9 * n + 9) / 10);
    EXPECT_LT(below(s.p90), (9 * n + 9) / 10);
  }
}

TEST(LatencySummaryTest, EdgesAndEmpty) {
  const LatencySummary empty = SummarizeLatencies({});
  EXPECT_EQ(empty.count, 0);
  EXPECT_EQ(empty.p99, absl::ZeroDuration());
  EXPECT_EQ(empty.max, absl::ZeroDuration());

  const std::vector<absl::Duration> sorted = Milliseconds({1, 2, 3, 4});
  EXPECT_EQ(NearestRankPercentile(sorted, 0.0), absl::Milliseconds(1));
  EXPECT_EQ(NearestRankPercentile(sorted, -1.0), absl::Milliseconds(1));
  EXPECT_EQ(NearestRankPercentile(sorted, 0.25), absl::Milliseconds(1));
  EXPECT_EQ(NearestRankPercentile(sorted, 0.26), absl::Milliseconds(2));
  EXPECT_EQ(NearestRankPercentile(sorted, 1.0), absl::Milliseconds(4));
  EXPECT_EQ(NearestRankPercentile(sorted, 2.0), absl::Milliseconds(4));
  EXPECT_EQ(NearestRankPercentile({}, 0.5), absl::ZeroDuration());
}

}  // namespace
}  // namespace kvcompress
