#include "kernels/budget_math.h"

#include <cstdint>

#include "gtest/gtest.h"

namespace kvcompress {
namespace {

TEST(RoundHalfToEvenTest, RoundsLikePython) {
  EXPECT_EQ(RoundHalfToEven(2.5), 2.0);
  EXPECT_EQ(RoundHalfToEven(3.5), 4.0);
  EXPECT_EQ(RoundHalfToEven(97.5), 98.0);
  EXPECT_EQ(RoundHalfToEven(654.709), 655.0);
  EXPECT_EQ(RoundHalfToEven(64.00000000000001), 64.0);
  EXPECT_EQ(RoundHalfToEven(0.49999999999999994), 0.0);
  EXPECT_EQ(RoundHalfToEven(-0.5), -0.0);
  EXPECT_EQ(RoundHalfToEven(-1.5), -2.0);
}

// Values computed by hand from kvpress PyramidKVPress.get_layer_budget (Python round).
TEST(PyramidTokenBudgetTest, HandComputedValues) {
  // T = 1000, keep 0.5, W = 64, L = 32, β = 20: C − W = 500, min 25, max 975 ≥ T − W, so
  // max = 936 and min = 1000 − 936 = 64; steps = 872 / 31.
  EXPECT_EQ(PyramidTokenBudget(500, 1000, 64, 0, 32, 20), 936);
  EXPECT_EQ(PyramidTokenBudget(500, 1000, 64, 10, 32, 20), 655);  // round(654.709…)
  EXPECT_EQ(PyramidTokenBudget(500, 1000, 64, 31, 32, 20), 64);
  int64_t total = 0;
  for (int layer = 0; layer < 32; ++layer)
    total += PyramidTokenBudget(500, 1000, 64, layer, 32, 20);
  EXPECT_EQ(total, 16000);  // L · T · keep

  // T = 4096, keep 0.25, W = 32, L = 28: min 51.2, max 1996.8, steps 1945.6 / 27.
  EXPECT_EQ(PyramidTokenBudget(1024, 4096, 32, 0, 28, 20), 1997);
  EXPECT_EQ(PyramidTokenBudget(1024, 4096, 32, 13, 28, 20), 1060);  // round(1060.03…)
  EXPECT_EQ(PyramidTokenBudget(1024, 4096, 32, 27, 28, 20), 51);

  // Halves round to even: T = 100, keep 0.5, W = 1, L = 2: max 97.5, min 2.5.
  EXPECT_EQ(PyramidTokenBudget(50, 100, 1, 0, 2, 20), 98);
  EXPECT_EQ(PyramidTokenBudget(50, 100, 1, 1, 2, 20), 2);

  // β = 2, T = 733, keep_tokens 300, W = 16, L = 5: min 150, max 450, steps 75.
  const int64_t expected[] = {450, 375, 300, 225, 150};
  for (int layer = 0; layer < 5; ++layer) {
    EXPECT_EQ(PyramidTokenBudget(300, 733, 16, layer, 5, 2), expected[layer]) << layer;
  }
  // One layer: steps 0, the budget is round(max).
  EXPECT_EQ(PyramidTokenBudget(500, 1000, 64, 0, 1, 20), 936);
}

TEST(PyramidTokenBudgetTest, FallsBackToTheUniformBudget) {
  // min = (C − W)/β = 5 < W = 64: SnapKV's uniform round(T·keep) for every layer.
  EXPECT_EQ(PyramidTokenBudget(100, 1000, 64, 0, 32, 20), 100);
  EXPECT_EQ(PyramidTokenBudget(100, 1000, 64, 31, 32, 20), 100);
  // The same with β = 20, T = 733, keep_tokens 300, W = 16: min 15 < 16.
  EXPECT_EQ(PyramidTokenBudget(300, 733, 16, 4, 5, 20), 300);
  // Budget near T: max clips to T − W = 136, min = 300 − 136 = 164 > max.
  EXPECT_EQ(PyramidTokenBudget(150, 200, 64, 0, 4, 20), 150);
  // The fallback rounds half to even and never drops below 1.
  EXPECT_EQ(PyramidTokenBudget(2.5, 10, 64, 0, 4, 20), 2);
  EXPECT_EQ(PyramidTokenBudget(0.2, 10, 64, 0, 4, 20), 1);
  // The window larger than T (no compression room) falls back too.
  EXPECT_EQ(PyramidTokenBudget(30, 60, 64, 0, 4, 20), 30);
}

TEST(AdaptiveSafeguardTokensTest, FloorsAndKeepsAtLeastOne) {
  EXPECT_EQ(AdaptiveSafeguardTokens(100, 0.2), 20);
  EXPECT_EQ(AdaptiveSafeguardTokens(99, 0.2), 19);
  EXPECT_EQ(AdaptiveSafeguardTokens(4, 0.2), 1);  // int(0.8) = 0 → 1
  EXPECT_EQ(AdaptiveSafeguardTokens(7, 1.0), 7);
  EXPECT_EQ(AdaptiveSafeguardTokens(100, 0.0), 0);
}

}  // namespace
}  // namespace kvcompress
