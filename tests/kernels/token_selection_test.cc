#include "kernels/cpu/internal/token_selection.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <random>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/selection_order.h"

namespace kvcompress::cpu {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();

std::vector<int32_t> Select(const std::vector<float>& scores, size_t n) {
  std::vector<int32_t> kept(n, -1);
  SelectTopTokens(scores, kept);
  return kept;
}

// Full stable sort by score descending (NaN last), the n first, ascending.
std::vector<int32_t> SortedTop(const std::vector<float>& scores, size_t n) {
  std::vector<int32_t> order(scores.size());
  std::iota(order.begin(), order.end(), 0);
  const auto key = [&](int32_t i) { return std::isnan(scores[i]) ? -kInf : scores[i]; };
  std::stable_sort(order.begin(), order.end(),
                   [&](int32_t a, int32_t b) { return key(a) > key(b); });
  order.resize(n);
  std::sort(order.begin(), order.end());
  return order;
}

TEST(SelectionOrderTest, HigherScoreThenLowerPosition) {
  EXPECT_TRUE(RanksBefore(2.0f, 9, 1.0f, 0));
  EXPECT_FALSE(RanksBefore(1.0f, 0, 2.0f, 9));
  EXPECT_TRUE(RanksBefore(1.0f, 3, 1.0f, 4));
  EXPECT_FALSE(RanksBefore(1.0f, 4, 1.0f, 3));
  EXPECT_FALSE(RanksBefore(1.0f, 4, 1.0f, 4));
  EXPECT_TRUE(RanksBefore(kInf, 7, kInf, 8));
  EXPECT_EQ(SelectionScore(std::nanf("")), -kInf);
  EXPECT_EQ(SelectionScore(3.0f), 3.0f);
}

TEST(SelectTopTokensTest, KeepsTheBestAscending) {
  EXPECT_EQ(Select({0.1f, 0.9f, 0.5f, 0.7f, 0.2f}, 2), std::vector<int32_t>({1, 3}));
  EXPECT_EQ(Select({0.1f, 0.9f, 0.5f, 0.7f, 0.2f}, 1), std::vector<int32_t>({1}));
  EXPECT_EQ(Select({0.1f, 0.9f, 0.5f, 0.7f, 0.2f}, 5), std::vector<int32_t>({0, 1, 2, 3, 4}));
  EXPECT_EQ(Select({-3.0f}, 1), std::vector<int32_t>({0}));
}

TEST(SelectTopTokensTest, TiesGoToTheLowerPosition) {
  EXPECT_EQ(Select({1, 1, 1, 1, 1}, 3), std::vector<int32_t>({0, 1, 2}));
  EXPECT_EQ(Select({0, 1, 0, 1, 0, 1}, 2), std::vector<int32_t>({1, 3}));
  EXPECT_EQ(Select({0, 1, 0, 1, 0, 1}, 4), std::vector<int32_t>({0, 1, 3, 5}));
}

TEST(SelectTopTokensTest, InfiniteScoresTieByPositionToo) {
  // More +inf tokens than the budget: the lowest positions among them win.
  EXPECT_EQ(Select({5, kInf, 7, kInf, kInf, kInf}, 2), std::vector<int32_t>({1, 3}));
  EXPECT_EQ(Select({5, kInf, 7, kInf, kInf, kInf}, 5), std::vector<int32_t>({1, 2, 3, 4, 5}));
  EXPECT_EQ(Select({-kInf, 1, -kInf}, 2), std::vector<int32_t>({0, 1}));
}

TEST(SelectTopTokensTest, NaNRanksAsNegativeInfinity) {
  const float nan = std::nanf("");
  EXPECT_EQ(Select({nan, 0.5f, nan, -1e30f}, 2), std::vector<int32_t>({1, 3}));
  EXPECT_EQ(Select({nan, 0.5f, -kInf, -1e30f}, 3), std::vector<int32_t>({0, 1, 3}));
  EXPECT_EQ(Select({nan, nan, nan}, 2), std::vector<int32_t>({0, 1}));
}

TEST(SelectTopTokensTest, MatchesAFullSortOnRandomScoresWithManyTies) {
  std::mt19937 generator(77);
  for (size_t size : {1u, 2u, 3u, 63u, 64u, 65u, 733u, 4099u}) {
    for (int distinct : {2, 17, 1 << 20}) {
      std::uniform_int_distribution<int> level(0, distinct - 1);
      std::vector<float> scores(size);
      for (float& score : scores) score = static_cast<float>(level(generator)) / distinct;
      if (size > 4) scores[size / 2] = kInf;
      for (size_t n : {size_t{1}, size / 3 + 1, size / 2 + 1, size}) {
        n = std::min(n, size);
        ASSERT_EQ(Select(scores, n), SortedTop(scores, n))
            << "size " << size << " n " << n << " distinct " << distinct;
      }
    }
  }
}

}  // namespace
}  // namespace kvcompress::cpu
