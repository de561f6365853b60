#include "kernels/cpu/internal/merge_nearest.h"

#include <cmath>
#include <cstring>
#include <numeric>
#include <vector>

#include "gtest/gtest.h"
#include "tests/kernels/test_layers.h"

namespace kvcompress {
namespace {

TEST(MergeNearestUnitTest, EvictedValuesFoldIntoTheMostSimilarKeptKey) {
  cpu::HeadRows keys;
  keys.num_tokens = 5;
  keys.head_dim = 2;
  // Kept: 0 (1, 0) and 3 (0, 1). Token 1 (2, 0.1) is nearest 0; token 2 (0.1, 5) nearest 3;
  // token 4 (1, 1) ties between them and goes to the lower position, 0.
  keys.rows = {1, 0, 2, 0.1f, 0.1f, 5, 0, 1, 1, 1};
  cpu::HeadRows values = keys;
  values.rows = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10};
  const std::vector<int32_t> kept = {0, 3};
  const cpu::MergedHead head = cpu::MergeNearestHead(kept, keys, values);
  EXPECT_EQ(head.positions, kept);
  EXPECT_EQ(head.merged, std::vector<int32_t>({3, 2}));
  EXPECT_TRUE(head.keys.empty());
  EXPECT_FLOAT_EQ(head.values[0], (1 + 3 + 9) / 3.0f);
  EXPECT_FLOAT_EQ(head.values[1], (2 + 4 + 10) / 3.0f);
  EXPECT_FLOAT_EQ(head.values[2], (7 + 5) / 2.0f);
  EXPECT_FLOAT_EQ(head.values[3], (8 + 6) / 2.0f);
}

// Through the backend on random layers: the kept set is drop's, keys are the input's byte for
// byte, every head's merged counts add up to T, and each value row is the plain average of its
// own value and those of the evicted tokens whose most cosine-similar kept key it is (brute
// force, fp64).
TEST(MergeNearestTest, ValuesAreAveragesOverTheNearestAssignment) {
  struct Case {
    ScorerKind scorer;
    int64_t num_tokens;
    int group;
    int num_kv_heads;
    double keep;
    DType dtype;
    Layout layout;
    bool adaptive;
  };
  for (const Case& c :
       {Case{ScorerKind::kSnapKv, 301, 4, 2, 0.3, DType::kBFloat16, Layout::kHND, false},
        Case{ScorerKind::kKnorm, 187, 1, 3, 0.2, DType::kFloat16, Layout::kNHD, false},
        Case{ScorerKind::kTova, 255, 8, 1, 0.5, DType::kFloat32, Layout::kNHD, false},
        Case{ScorerKind::kSnapKv, 233, 4, 3, 0.25, DType::kBFloat16, Layout::kNHD, true}}) {
    CacheGeometry geometry;
    geometry.num_layers = 1;
    geometry.num_kv_heads = c.num_kv_heads;
    geometry.num_query_heads = c.num_kv_heads * c.group;
    geometry.head_dim = 64;
    geometry.dtype = c.dtype;
    geometry.layout = c.layout;
    MethodSpec drop;
    drop.scorer = c.scorer;
    drop.snapkv.window_size = 8;
    if (c.adaptive) drop.head_budget = HeadBudgetKind::kAdaptive;
    MethodSpec merge = drop;
    merge.reducer = ReducerKind::kMergeNearest;
    const LayerInput input = testing::MakeRandomLayer(geometry, c.num_tokens, 8, 90 + c.group);
    drop.budget.keep_ratio = c.keep;
    const int64_t n = TokensToKeep(drop.budget, c.num_tokens);
    auto dropped = testing::CompressLayer(geometry, drop, input, n);
    auto merged = testing::CompressLayer(geometry, merge, input, n);
    ASSERT_TRUE(dropped.ok() && merged.ok());
    ASSERT_EQ(merged->positions, dropped->positions) << ScorerName(c.scorer);
    ASSERT_EQ(merged->keys, dropped->keys);
    ASSERT_EQ(merged->kept, dropped->kept);

    const int dim = 64;
    const size_t row_bytes = dim * DTypeSize(c.dtype);
    const double relative = c.dtype == DType::kBFloat16  ? 0x1p-7
                            : c.dtype == DType::kFloat16 ? 0x1p-10
                                                         : 0x1p-22;
    for (int h = 0; h < c.num_kv_heads; ++h) {
      const std::vector<int32_t> kept = testing::KeptOfHead(*merged, h);
      std::vector<std::vector<double>> sums(kept.size(), std::vector<double>(dim));
      std::vector<int32_t> counts(kept.size(), 1);
      for (size_t r = 0; r < kept.size(); ++r) {
        for (int d = 0; d < dim; ++d) sums[r][d] = testing::ValueAt(geometry, input, h, kept[r], d);
      }
      for (int64_t j = 0; j < c.num_tokens; ++j) {
        if (std::binary_search(kept.begin(), kept.end(), static_cast<int32_t>(j))) continue;
        size_t best = 0;
        double best_cos = -2;
        for (size_t r = 0; r < kept.size(); ++r) {
          double dot = 0, nj = 0, nr = 0;
          for (int d = 0; d < dim; ++d) {
            const double a = testing::KeyAt(geometry, input, h, j, d);
            const double b = testing::KeyAt(geometry, input, h, kept[r], d);
            dot += a * b;
            nj += a * a;
            nr += b * b;
          }
          const double cos = dot / std::sqrt(nj * nr);
          if (cos > best_cos) {
            best_cos = cos;
            best = r;
          }
        }
        ++counts[best];
        for (int d = 0; d < dim; ++d) sums[best][d] += testing::ValueAt(geometry, input, h, j, d);
      }
      int64_t represented = 0;
      for (size_t r = 0; r < kept.size(); ++r) {
        const size_t row = merged->offsets[h] + r;
        ASSERT_EQ(merged->merged[row], counts[r]) << "head " << h << " position " << kept[r];
        represented += merged->merged[row];
        if (counts[r] == 1) {
          ASSERT_EQ(std::memcmp(merged->values.data() + row * row_bytes,
                                testing::RowBytes(geometry, input, input.values, h, kept[r]).data(),
                                row_bytes),
                    0);
          continue;
        }
        const std::vector<double> got = testing::DecodeRow(geometry, merged->values, row);
        for (int d = 0; d < dim; ++d) {
          const double expected = sums[r][d] / counts[r];
          ASSERT_NEAR(got[d], expected, relative * std::abs(expected) + 0x1p-24)
              << "head " << h << " position " << kept[r] << " d " << d;
        }
      }
      EXPECT_EQ(represented, c.num_tokens) << "every token is represented once";
    }
  }
}

TEST(MergeNearestTest, LayersKeptWholeReportOneTokenPerRow) {
  CacheGeometry geometry;
  geometry.num_layers = 1;
  geometry.num_kv_heads = 2;
  geometry.num_query_heads = 2;
  geometry.head_dim = 64;
  geometry.dtype = DType::kBFloat16;
  const LayerInput input = testing::MakeRandomLayer(geometry, 40, 0, 3);
  MethodSpec spec;
  spec.scorer = ScorerKind::kKnorm;
  spec.reducer = ReducerKind::kMergeNearest;
  auto whole = testing::CompressLayer(geometry, spec, input, 40);
  ASSERT_TRUE(whole.ok()) << whole.status();
  EXPECT_EQ(whole->merged, std::vector<int32_t>(80, 1));
  EXPECT_EQ(whole->keys, input.keys);  // HND: the rows in order are the input
  EXPECT_EQ(whole->values, input.values);
}

}  // namespace
}  // namespace kvcompress
