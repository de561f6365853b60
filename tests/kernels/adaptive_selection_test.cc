#include "kernels/cpu/internal/adaptive_selection.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <ostream>
#include <set>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/backend.h"
#include "tests/kernels/test_layers.h"

namespace kvcompress {
namespace {

using Kept = std::vector<std::vector<int32_t>>;

Kept Select(const std::vector<std::vector<float>>& scores, int64_t n, double alpha) {
  std::vector<std::span<const float>> spans(scores.begin(), scores.end());
  return cpu::SelectAdaptive(spans, n, alpha);
}

// Brute force of kvpress AdaKVPress with our tie rule: each head's top int(n·α) (≥ 1 when
// α > 0) by a full sort, then the best H·n − H·safe of the rest by a full sort over
// (score desc, head asc, position asc). NaN ranks as −inf.
Kept ReferenceAdaptive(const std::vector<std::vector<float>>& scores, int64_t n, double alpha) {
  const int heads = static_cast<int>(scores.size());
  const int64_t tokens = static_cast<int64_t>(scores[0].size());
  int64_t safe = static_cast<int64_t>(static_cast<double>(n) * alpha);
  if (alpha > 0) safe = std::max<int64_t>(safe, 1);
  const auto value = [&](int h, int64_t j) {
    return std::isnan(scores[h][j]) ? -INFINITY : static_cast<double>(scores[h][j]);
  };
  Kept kept(heads);
  std::vector<std::set<int64_t>> taken(heads);
  struct Entry {
    double score;
    int head;
    int64_t position;
  };
  std::vector<Entry> rest;
  for (int h = 0; h < heads; ++h) {
    std::vector<int64_t> order(tokens);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(),
                     [&](int64_t a, int64_t b) { return value(h, a) > value(h, b); });
    for (int64_t i = 0; i < safe; ++i) taken[h].insert(order[i]);
    for (int64_t j = 0; j < tokens; ++j) {
      if (!taken[h].count(j)) rest.push_back({value(h, j), h, j});
    }
  }
  std::stable_sort(rest.begin(), rest.end(),
                   [](const Entry& a, const Entry& b) { return a.score > b.score; });
  for (int64_t i = 0; i < heads * (n - safe); ++i) taken[rest[i].head].insert(rest[i].position);
  for (int h = 0; h < heads; ++h) kept[h].assign(taken[h].begin(), taken[h].end());
  return kept;
}

TEST(SelectAdaptiveTest, TiesGoToTheLowerHeadThenTheLowerPosition) {
  const std::vector<std::vector<float>> flat = {{1, 1, 1, 1}, {1, 1, 1, 1}};
  // α = 0: no safeguard; the 4 shared slots all go to head 0, head 1 keeps nothing.
  EXPECT_EQ(Select(flat, 2, 0.0), Kept({{0, 1, 2, 3}, {}}));
  // α = 0.5: each head keeps its first token, then head 0 wins the two ties.
  EXPECT_EQ(Select(flat, 2, 0.5), Kept({{0, 1, 2}, {0}}));
}

TEST(SelectAdaptiveTest, TheSafeguardHoldsAgainstStrongerHeads) {
  const std::vector<std::vector<float>> scores = {{9, 8, 7, 6, 5}, {0.1f, 0.3f, 0.2f, 0.0f, NAN}};
  // n = 3, α = 0.4: safeguard int(1.2) = 1 per head (head 1 keeps its best, position 1);
  // the 2·3 − 2 = 4 shared slots all go to head 0's 8, 7, 6, 5.
  EXPECT_EQ(Select(scores, 3, 0.4), Kept({{0, 1, 2, 3, 4}, {1}}));
  // α = 1: every head keeps exactly n.
  EXPECT_EQ(Select(scores, 3, 1.0), Kept({{0, 1, 2}, {0, 1, 2}}));
  // NaN ranks below everything: with n = 5 and α = 0.2 head 1 loses it last.
  EXPECT_EQ(Select(scores, 5, 0.2), ReferenceAdaptive(scores, 5, 0.2));
}

struct AdaptiveCase {
  ScorerKind scorer;
  int64_t num_tokens;
  int group;
  int num_kv_heads;
  double keep;
  double alpha;
  DType dtype;
  Layout layout;
};

std::ostream& operator<<(std::ostream& out, const AdaptiveCase& c) {
  return out << ScorerName(c.scorer) << " T=" << c.num_tokens << " G=" << c.group
             << " H_kv=" << c.num_kv_heads << " keep=" << c.keep << " alpha=" << c.alpha << " "
             << DTypeName(c.dtype) << " " << LayoutName(c.layout);
}

class AdaptiveBackendTest : public ::testing::TestWithParam<AdaptiveCase> {};

// Through the backend: the ragged result holds exactly the reference sets (computed on the
// backend's own fp32 scores, so that only the selection is under test), counts differ
// between heads and sum to H·n, every head keeps its safeguard and the window, and the rows
// are the input rows byte for byte.
TEST_P(AdaptiveBackendTest, RaggedSetsMatchTheReference) {
  const AdaptiveCase& c = GetParam();
  CacheGeometry geometry;
  geometry.num_layers = 1;
  geometry.num_kv_heads = c.num_kv_heads;
  geometry.num_query_heads = c.num_kv_heads * c.group;
  geometry.head_dim = 64;
  geometry.dtype = c.dtype;
  geometry.layout = c.layout;
  MethodSpec spec;
  spec.scorer = c.scorer;
  spec.snapkv.window_size = 8;
  spec.head_budget = HeadBudgetKind::kAdaptive;
  spec.adaptive.alpha = c.alpha;
  const LayerInput input =
      testing::MakeRandomLayer(geometry, c.num_tokens, 8, 17 + c.num_tokens + c.group);
  spec.budget.keep_ratio = c.keep;
  const int64_t n = TokensToKeep(spec.budget, c.num_tokens);
  auto scores = testing::ScoreLayer(geometry, spec, input);
  ASSERT_TRUE(scores.ok()) << scores.status();
  auto result = testing::CompressLayer(geometry, spec, input, n);
  ASSERT_TRUE(result.ok()) << result.status();

  const Kept expected = ReferenceAdaptive(*scores, n, c.alpha);
  const int heads = c.num_kv_heads;
  ASSERT_EQ(result->kept.size(), static_cast<size_t>(heads));
  EXPECT_EQ(result->total_kept(), heads * n);
  std::set<int32_t> distinct_counts;
  const int64_t safe = std::max<int64_t>(1, static_cast<int64_t>(n * c.alpha));
  const size_t row_bytes = 64 * DTypeSize(c.dtype);
  for (int h = 0; h < heads; ++h) {
    const std::vector<int32_t> kept = testing::KeptOfHead(*result, h);
    EXPECT_EQ(kept, expected[h]) << "head " << h;
    EXPECT_EQ(result->kept[h], static_cast<int32_t>(kept.size()));
    EXPECT_GE(result->kept[h], safe) << "head " << h << " lost its safeguard";
    distinct_counts.insert(result->kept[h]);
    // The head's own top `safe` tokens are all there.
    std::vector<float> sorted = (*scores)[h];
    std::vector<int32_t> own(sorted.size());
    std::iota(own.begin(), own.end(), 0);
    std::stable_sort(own.begin(), own.end(),
                     [&](int32_t a, int32_t b) { return sorted[a] > sorted[b]; });
    for (int64_t i = 0; i < safe; ++i) {
      EXPECT_TRUE(std::binary_search(kept.begin(), kept.end(), own[i])) << "head " << h;
    }
    if (c.scorer == ScorerKind::kSnapKv && n >= 8) {
      for (int64_t j = c.num_tokens - 8; j < c.num_tokens; ++j) {
        EXPECT_TRUE(std::binary_search(kept.begin(), kept.end(), j)) << "window token " << j;
      }
    }
    for (size_t row = 0; row < kept.size(); ++row) {
      const size_t at = (result->offsets[h] + row) * row_bytes;
      ASSERT_EQ(std::memcmp(result->keys.data() + at,
                            testing::RowBytes(geometry, input, input.keys, h, kept[row]).data(),
                            row_bytes),
                0);
      ASSERT_EQ(std::memcmp(result->values.data() + at,
                            testing::RowBytes(geometry, input, input.values, h, kept[row]).data(),
                            row_bytes),
                0);
    }
  }
  if (heads > 1 && c.alpha < 1) {
    EXPECT_GT(distinct_counts.size(), 1u) << "adaptive budgets should differ between heads";
  }
  if (c.scorer == ScorerKind::kSnapKv) {
    EXPECT_NEAR(result->attention_mass_kept,
                testing::ReferenceAttentionMass(geometry, input, 8, expected), 1e-9);
  }
}

INSTANTIATE_TEST_SUITE_P(
    Grid, AdaptiveBackendTest,
    ::testing::Values(
        AdaptiveCase{ScorerKind::kSnapKv, 333, 1, 4, 0.3, 0.2, DType::kBFloat16, Layout::kHND},
        AdaptiveCase{ScorerKind::kSnapKv, 517, 4, 3, 0.25, 0.2, DType::kFloat16, Layout::kNHD},
        AdaptiveCase{ScorerKind::kSnapKv, 129, 8, 2, 0.5, 0.5, DType::kFloat32, Layout::kHND},
        AdaptiveCase{ScorerKind::kKnorm, 401, 4, 5, 0.1, 0.2, DType::kBFloat16, Layout::kNHD},
        AdaptiveCase{ScorerKind::kKeyDiff, 257, 1, 3, 0.4, 0.05, DType::kFloat32, Layout::kNHD},
        AdaptiveCase{ScorerKind::kSnapKv, 97, 4, 1, 0.3, 0.2, DType::kBFloat16, Layout::kHND},
        AdaptiveCase{ScorerKind::kKnorm, 200, 1, 4, 0.3, 1.0, DType::kBFloat16, Layout::kHND}));

}  // namespace
}  // namespace kvcompress
