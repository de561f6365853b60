// Per-layer kept statistics on hand-made kept sets with known answers.
#include "client/kept_summary.h"

#include <vector>

#include "gtest/gtest.h"

namespace kvcompress {
namespace {

LayerResult Result(const std::vector<std::vector<int32_t>>& heads,
                   std::vector<int32_t> merged = {}) {
  LayerResult result;
  result.offsets.push_back(0);
  for (const std::vector<int32_t>& positions : heads) {
    result.kept.push_back(static_cast<int32_t>(positions.size()));
    result.offsets.push_back(result.offsets.back() + result.kept.back());
    result.positions.insert(result.positions.end(), positions.begin(), positions.end());
  }
  result.merged = std::move(merged);
  return result;
}

TEST(KeptSummaryTest, CountsSinksRecentAndCoverage) {
  // T = 100, sinks 4, recent 4. Head 0 keeps all sinks and all recent tokens, head 1 half
  // of each plus token 50.
  std::vector<LayerResult> layers = {Result({{0, 1, 2, 3, 96, 97, 98, 99}, {0, 1, 50, 98, 99}},
                                            {1, 1, 1, 1, 1, 1, 1, 1, 3, 1, 2, 1, 1}),
                                     Result({{10}, {10}})};
  layers[0].attention_mass_kept = 0.75;
  absl::StatusOr<std::vector<LayerKeptSummary>> summaries = SummarizeKept(layers, 100, 4, 4);
  ASSERT_TRUE(summaries.ok()) << summaries.status();
  ASSERT_EQ(summaries->size(), 2u);
  const LayerKeptSummary& s = (*summaries)[0];
  EXPECT_EQ(s.layer, 0);
  EXPECT_EQ(s.total_kept, 13);
  EXPECT_EQ(s.min_kept, 5);
  EXPECT_EQ(s.max_kept, 8);
  EXPECT_DOUBLE_EQ(s.mean_kept, 6.5);
  EXPECT_DOUBLE_EQ(s.sinks_kept, 6.0 / 8.0);
  EXPECT_DOUBLE_EQ(s.recent_kept, 6.0 / 8.0);
  EXPECT_DOUBLE_EQ(s.any_head_kept, 9.0 / 100.0);  // {0, 1, 2, 3, 50, 96, 97, 98, 99}
  EXPECT_EQ(s.merged_rows, 2);
  EXPECT_DOUBLE_EQ(s.attention_mass_kept, 0.75);

  // Both heads keep the same single token: the layer still covers 1 % of the sequence.
  const LayerKeptSummary& t = (*summaries)[1];
  EXPECT_DOUBLE_EQ(t.any_head_kept, 0.01);
  EXPECT_DOUBLE_EQ(t.sinks_kept, 0.0);
  EXPECT_EQ(t.merged_rows, 0);
  EXPECT_DOUBLE_EQ(t.attention_mass_kept, -1.0);
}

TEST(KeptSummaryTest, WindowsAreClampedToTheSequence) {
  const std::vector<LayerResult> layers = {Result({{0, 1, 2}})};
  absl::StatusOr<std::vector<LayerKeptSummary>> summaries = SummarizeKept(layers, 3, 10, 0);
  ASSERT_TRUE(summaries.ok()) << summaries.status();
  EXPECT_DOUBLE_EQ((*summaries)[0].sinks_kept, 1.0);
  EXPECT_DOUBLE_EQ((*summaries)[0].recent_kept, 0.0);  // no recent window asked for
}

TEST(KeptSummaryTest, RejectsPositionsOutsideTheSequence) {
  const std::vector<LayerResult> layers = {Result({{0, 5}})};
  EXPECT_EQ(SummarizeKept(layers, 5, 4, 4).status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace kvcompress
