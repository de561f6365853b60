#include "kernels/cpu/internal/merge_similar.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <ostream>
#include <vector>

#include "gtest/gtest.h"
#include "tests/kernels/test_layers.h"

namespace kvcompress {
namespace {

// One output row of the reference: a protected token or a merging set.
struct ReferenceRow {
  int32_t position = 0;
  std::vector<int32_t> members;  // one member for verbatim rows
  bool is_protected = false;
};

using Matrix = std::vector<std::vector<double>>;

Matrix HeadMatrix(const CacheGeometry& geometry, const LayerInput& input, int head, bool keys) {
  Matrix rows(input.shape.num_tokens, std::vector<double>(geometry.head_dim));
  for (int64_t j = 0; j < input.shape.num_tokens; ++j) {
    for (int d = 0; d < geometry.head_dim; ++d) {
      rows[j][d] = keys ? testing::KeyAt(geometry, input, head, j, d)
                        : testing::ValueAt(geometry, input, head, j, d);
    }
  }
  return rows;
}

double Cosine(const std::vector<double>& a, const std::vector<double>& b) {
  const double dot = std::inner_product(a.begin(), a.end(), b.begin(), 0.0);
  const double na = std::sqrt(std::inner_product(a.begin(), a.end(), a.begin(), 0.0));
  const double nb = std::sqrt(std::inner_product(b.begin(), b.end(), b.begin(), 0.0));
  return dot / (na * nb);
}

// Brute-force KVMerger reconstruction (DESIGN §3): full sorts, runs found by marking links.
std::vector<ReferenceRow> ReferenceMergeSimilar(const MergeSimilarOptions& options,
                                                const std::vector<float>& scores, int64_t n,
                                                const Matrix& keys) {
  const int64_t tokens = static_cast<int64_t>(scores.size());
  const auto value = [&](int64_t j) {
    return std::isnan(scores[j]) ? -INFINITY : static_cast<double>(scores[j]);
  };
  std::vector<int64_t> order(tokens);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return value(a) > value(b); });
  std::vector<int64_t> rank(tokens);
  for (int64_t r = 0; r < tokens; ++r) rank[order[r]] = r;
  int64_t infinite = 0;
  for (int64_t j = 0; j < tokens; ++j) infinite += value(j) == INFINITY ? 1 : 0;
  const int64_t protect = std::min<int64_t>(
      n, std::max<int64_t>(static_cast<int64_t>(options.protect_fraction * n), infinite));
  std::vector<bool> is_protected(tokens, false);
  for (int64_t r = 0; r < protect; ++r) is_protected[order[r]] = true;
  // link[j]: j and j + 1 are both candidates and similar.
  std::vector<bool> link(tokens, false);
  for (int64_t j = 0; j + 1 < tokens; ++j) {
    link[j] = !is_protected[j] && !is_protected[j + 1] &&
              Cosine(keys[j], keys[j + 1]) > options.similarity_threshold;
  }
  std::vector<ReferenceRow> rows;
  std::vector<ReferenceRow> sets;
  for (int64_t j = 0; j < tokens;) {
    if (is_protected[j]) {
      rows.push_back({static_cast<int32_t>(j), {static_cast<int32_t>(j)}, true});
      ++j;
      continue;
    }
    ReferenceRow set;
    int64_t end = j;
    while (end + 1 < tokens && link[end]) ++end;
    for (int64_t m = j; m <= end; ++m) set.members.push_back(static_cast<int32_t>(m));
    set.position = *std::min_element(set.members.begin(), set.members.end(),
                                     [&](int32_t a, int32_t b) { return rank[a] < rank[b]; });
    sets.push_back(set);
    j = end + 1;
  }
  std::stable_sort(sets.begin(), sets.end(), [&](const ReferenceRow& a, const ReferenceRow& b) {
    return rank[a.position] < rank[b.position];
  });
  sets.resize(std::min<size_t>(sets.size(), static_cast<size_t>(n - protect)));
  rows.insert(rows.end(), sets.begin(), sets.end());
  std::sort(rows.begin(), rows.end(),
            [](const ReferenceRow& a, const ReferenceRow& b) { return a.position < b.position; });
  return rows;
}

// The Gaussian-weighted average of a set's members (key and value), fp64.
void ReferenceMergedRow(const MergeSimilarOptions& options, const ReferenceRow& row,
                        const Matrix& keys, const Matrix& values, std::vector<double>& key,
                        std::vector<double>& value) {
  const size_t dim = keys[0].size();
  std::vector<double> squared;
  for (int32_t m : row.members) {
    double sum = 0;
    for (size_t d = 0; d < dim; ++d) sum += std::pow(keys[m][d] - keys[row.position][d], 2);
    squared.push_back(sum);
  }
  double sigma = options.sigma;
  if (options.auto_sigma) {
    const double mean = std::accumulate(squared.begin(), squared.end(), 0.0) /
                        static_cast<double>(row.members.size() - 1);
    sigma = std::sqrt(mean) / std::sqrt(2.0);
  }
  std::vector<double> weights;
  for (double s : squared) weights.push_back(sigma > 0 ? std::exp(-s / (2 * sigma * sigma)) : 1);
  const double total = std::accumulate(weights.begin(), weights.end(), 0.0);
  key.assign(dim, 0.0);
  value.assign(dim, 0.0);
  for (size_t i = 0; i < row.members.size(); ++i) {
    for (size_t d = 0; d < dim; ++d) {
      key[d] += weights[i] / total * keys[row.members[i]][d];
      value[d] += weights[i] / total * values[row.members[i]][d];
    }
  }
  if (options.scale_values_by_set_size) {
    for (double& v : value) v *= static_cast<double>(row.members.size());
  }
}

// |got − expected| within one unit in the last place of the output dtype.
void ExpectRowNear(DType dtype, const std::vector<double>& got, const std::vector<double>& expected,
                   const char* what, int head, int32_t position) {
  const double relative = dtype == DType::kBFloat16  ? 0x1p-7
                          : dtype == DType::kFloat16 ? 0x1p-10
                                                     : 0x1p-22;
  for (size_t d = 0; d < got.size(); ++d) {
    ASSERT_NEAR(got[d], expected[d], relative * std::abs(expected[d]) + 0x1p-24)
        << what << " head " << head << " position " << position << " d " << d;
  }
}

struct MergeCase {
  ScorerKind scorer;
  int64_t num_tokens;
  int group;
  int num_kv_heads;
  double keep;
  DType dtype;
  Layout layout;
  bool auto_sigma = false;
  bool scale_values = false;
  double sigma = 5.0;
  double protect_fraction = 0.5;
  bool adaptive = false;
};

std::ostream& operator<<(std::ostream& out, const MergeCase& c) {
  return out << ScorerName(c.scorer) << " T=" << c.num_tokens << " G=" << c.group
             << " H_kv=" << c.num_kv_heads << " keep=" << c.keep << " " << DTypeName(c.dtype) << " "
             << LayoutName(c.layout) << (c.auto_sigma ? " auto_sigma" : "")
             << (c.scale_values ? " scale" : "") << " sigma=" << c.sigma
             << " protect=" << c.protect_fraction << (c.adaptive ? " adaptive" : "");
}

class MergeSimilarTest : public ::testing::TestWithParam<MergeCase> {};

// Every row is the reference's: protected tokens and singleton sets byte for byte, merged
// sets the Gaussian-weighted average of their members (rounded to the dtype); the merged
// counts add up to the tokens each head still represents; rows never exceed the budget.
TEST_P(MergeSimilarTest, RowsAreGaussianAveragesOfTheReferenceSets) {
  const MergeCase& c = GetParam();
  CacheGeometry geometry;
  geometry.num_layers = 1;
  geometry.num_kv_heads = c.num_kv_heads;
  geometry.num_query_heads = c.num_kv_heads * c.group;
  geometry.head_dim = 64;
  geometry.dtype = c.dtype;
  geometry.layout = c.layout;
  MethodSpec spec;
  spec.scorer = c.scorer;
  spec.snapkv.window_size = 16;
  spec.reducer = ReducerKind::kMergeSimilar;
  spec.merge_similar.auto_sigma = c.auto_sigma;
  spec.merge_similar.scale_values_by_set_size = c.scale_values;
  spec.merge_similar.sigma = c.sigma;
  spec.merge_similar.protect_fraction = c.protect_fraction;
  if (c.adaptive) spec.head_budget = HeadBudgetKind::kAdaptive;
  spec.budget.keep_ratio = c.keep;
  const LayerInput input =
      testing::MakeRunLayer(geometry, c.num_tokens, 16, 5 + c.num_tokens + c.group);
  const int64_t n = TokensToKeep(spec.budget, c.num_tokens);
  auto scores = testing::ScoreLayer(geometry, spec, input);
  ASSERT_TRUE(scores.ok()) << scores.status();
  auto result = testing::CompressLayer(geometry, spec, input, n);
  ASSERT_TRUE(result.ok()) << result.status();
  ASSERT_EQ(result->merged.size(), result->positions.size());

  // Head budgets: n each, or the adaptive counts (drop's kept counts for the same spec).
  std::vector<int64_t> budgets(c.num_kv_heads, n);
  if (c.adaptive) {
    MethodSpec drop = spec;
    drop.reducer = ReducerKind::kDrop;
    auto dropped = testing::CompressLayer(geometry, drop, input, n);
    ASSERT_TRUE(dropped.ok()) << dropped.status();
    for (int h = 0; h < c.num_kv_heads; ++h) budgets[h] = dropped->kept[h];
  }

  const size_t row_bytes = 64 * DTypeSize(c.dtype);
  int64_t merged_rows = 0;
  for (int h = 0; h < c.num_kv_heads; ++h) {
    const Matrix keys = HeadMatrix(geometry, input, h, true);
    const Matrix values = HeadMatrix(geometry, input, h, false);
    const std::vector<ReferenceRow> expected =
        ReferenceMergeSimilar(spec.merge_similar, (*scores)[h], budgets[h], keys);
    ASSERT_EQ(result->kept[h], static_cast<int32_t>(expected.size())) << "head " << h;
    ASSERT_LE(result->kept[h], budgets[h]);
    int64_t represented = 0;
    int64_t expected_represented = 0;
    for (size_t r = 0; r < expected.size(); ++r) {
      const size_t row = result->offsets[h] + r;
      const ReferenceRow& reference = expected[r];
      ASSERT_EQ(result->positions[row], reference.position) << "head " << h << " row " << r;
      ASSERT_EQ(result->merged[row], static_cast<int32_t>(reference.members.size()))
          << "head " << h << " position " << reference.position;
      represented += result->merged[row];
      expected_represented += static_cast<int64_t>(reference.members.size());
      if (reference.members.size() == 1) {
        ASSERT_EQ(std::memcmp(
                      result->keys.data() + row * row_bytes,
                      testing::RowBytes(geometry, input, input.keys, h, reference.position).data(),
                      row_bytes),
                  0);
        ASSERT_EQ(
            std::memcmp(
                result->values.data() + row * row_bytes,
                testing::RowBytes(geometry, input, input.values, h, reference.position).data(),
                row_bytes),
            0);
        continue;
      }
      ++merged_rows;
      std::vector<double> key, value;
      ReferenceMergedRow(spec.merge_similar, reference, keys, values, key, value);
      ExpectRowNear(c.dtype, testing::DecodeRow(geometry, result->keys, row), key, "key", h,
                    reference.position);
      ExpectRowNear(c.dtype, testing::DecodeRow(geometry, result->values, row), value, "value", h,
                    reference.position);
    }
    EXPECT_EQ(represented, expected_represented);
    EXPECT_LE(represented, c.num_tokens);
    // The snapkv window is protected, verbatim.
    if (c.scorer == ScorerKind::kSnapKv && budgets[h] >= 16) {
      const std::vector<int32_t> kept = testing::KeptOfHead(*result, h);
      for (int64_t j = c.num_tokens - 16; j < c.num_tokens; ++j) {
        const auto at = std::lower_bound(kept.begin(), kept.end(), j);
        ASSERT_TRUE(at != kept.end() && *at == j) << "window token " << j;
        EXPECT_EQ(result->merged[result->offsets[h] + (at - kept.begin())], 1);
      }
    }
  }
  EXPECT_GT(merged_rows, 0) << "the run-structured keys should merge";
}

INSTANTIATE_TEST_SUITE_P(
    Grid, MergeSimilarTest,
    ::testing::Values(
        MergeCase{ScorerKind::kSnapKv, 333, 4, 2, 0.3, DType::kBFloat16, Layout::kHND},
        MergeCase{ScorerKind::kSnapKv, 517, 1, 3, 0.2, DType::kFloat16, Layout::kNHD, true},
        MergeCase{ScorerKind::kSnapKv, 211, 8, 1, 0.5, DType::kFloat32, Layout::kHND, false, true},
        MergeCase{ScorerKind::kKnorm, 401, 4, 2, 0.6, DType::kBFloat16, Layout::kNHD, false, false,
                  0.5},
        MergeCase{ScorerKind::kKeyDiff, 257, 1, 2, 0.9, DType::kFloat32, Layout::kNHD, true, true,
                  5.0, 0.0},
        // ⌊0.1·60⌋ = 6 < 16 window tokens: the window alone is protected.
        MergeCase{ScorerKind::kSnapKv, 301, 4, 2, 0.2, DType::kBFloat16, Layout::kNHD, false, false,
                  5.0, 0.1},
        MergeCase{ScorerKind::kSnapKv, 389, 4, 3, 0.3, DType::kBFloat16, Layout::kHND, false, false,
                  5.0, 0.5, true}));

TEST(MergeSimilarUnitTest, HandBuiltRunMergesIntoItsBestScoringMember) {
  // Six tokens in 2-D: tokens 1, 2, 3 point the same way, 4 is orthogonal, 5 is the window.
  cpu::HeadRows keys;
  keys.num_tokens = 6;
  keys.head_dim = 2;
  keys.rows = {0, 1, 1, 0, 1, 0.1f, 1, -0.1f, 0, -1, 1, 1};
  cpu::HeadRows values = keys;
  values.rows = {10, 10, 1, 2, 3, 4, 5, 6, 7, 8, 9, 9};
  const std::vector<float> scores = {0.9f, 0.1f, 0.3f, 0.2f, 0.05f, INFINITY};
  MergeSimilarOptions options;
  options.protect_fraction = 0.25;  // ⌊0.25·4⌋ = 1 < 1 window token: protected = {5}
  options.sigma = 1.0;
  // Budget 4: rows = {5} + sets {4}, {1, 2, 3}, {0} — 4 rows, all fit.
  const cpu::MergedHead head = cpu::MergeSimilarHead(options, scores, 4, keys, values);
  EXPECT_EQ(head.positions, std::vector<int32_t>({0, 2, 4, 5}));
  EXPECT_EQ(head.merged, std::vector<int32_t>({1, 3, 1, 1}));
  // Pivot 2 (score 0.3): squared distances 0.01, 0, 0.04; weights exp(−d²/2).
  const double g1 = std::exp(-0.01 / 2), g2 = 1.0, g3 = std::exp(-0.04 / 2);
  const double sum = g1 + g2 + g3;
  EXPECT_NEAR(head.values[1 * 2 + 0], (g1 * 1 + g2 * 3 + g3 * 5) / sum, 1e-6);
  EXPECT_NEAR(head.values[1 * 2 + 1], (g1 * 2 + g2 * 4 + g3 * 6) / sum, 1e-6);
  EXPECT_NEAR(head.keys[1 * 2 + 1], (g1 * 0 + g2 * 0.1 + g3 * -0.1) / sum, 1e-6);
  // Budget 3: the set with the worst pivot (token 4, score 0.05) is evicted.
  const cpu::MergedHead tight = cpu::MergeSimilarHead(options, scores, 3, keys, values);
  EXPECT_EQ(tight.positions, std::vector<int32_t>({0, 2, 5}));
  EXPECT_EQ(tight.merged, std::vector<int32_t>({1, 3, 1}));
  // A budget covering every token returns the head whole.
  const cpu::MergedHead whole = cpu::MergeSimilarHead(options, scores, 6, keys, values);
  EXPECT_EQ(whole.positions, std::vector<int32_t>({0, 1, 2, 3, 4, 5}));
  EXPECT_EQ(whole.merged, std::vector<int32_t>(6, 1));
}

TEST(MergeSimilarUnitTest, WithoutSimilarNeighboursItIsDrop) {
  CacheGeometry geometry;
  geometry.num_layers = 1;
  geometry.num_kv_heads = 2;
  geometry.num_query_heads = 8;
  geometry.head_dim = 64;
  geometry.dtype = DType::kBFloat16;
  const LayerInput input = testing::MakeRandomLayer(geometry, 300, 16, 4);
  MethodSpec drop;
  drop.snapkv.window_size = 16;
  MethodSpec merge = drop;
  merge.reducer = ReducerKind::kMergeSimilar;
  merge.merge_similar.similarity_threshold = 0.99;  // random 64-d keys never get there
  auto dropped = testing::CompressLayer(geometry, drop, input, 90);
  auto merged = testing::CompressLayer(geometry, merge, input, 90);
  ASSERT_TRUE(dropped.ok() && merged.ok());
  EXPECT_EQ(merged->positions, dropped->positions);
  EXPECT_EQ(merged->keys, dropped->keys);
  EXPECT_EQ(merged->values, dropped->values);
  EXPECT_EQ(merged->merged, std::vector<int32_t>(merged->positions.size(), 1));
  EXPECT_TRUE(dropped->merged.empty());
}

}  // namespace
}  // namespace kvcompress
