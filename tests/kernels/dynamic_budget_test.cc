#include "kernels/internal/dynamic_budget.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <tuple>
#include <vector>

#include "gtest/gtest.h"
#include "tests/kernels/test_layers.h"

namespace kvcompress {
namespace {

using internal::DynamicBudgetInput;
using internal::DynamicPrefixBudgets;
using internal::PythonFloorDivide;

using LayerScores3 = testing::DynamicLayerScores;

// Flattens to the [H, P] rows DynamicPrefixBudgets reads (row stride P).
struct Flattened {
  std::vector<std::vector<float>> storage;
  DynamicBudgetInput input;
};

Flattened Flatten(const LayerScores3& scores, int64_t base, double r_max, int interval) {
  Flattened flat;
  const int heads = static_cast<int>(scores[0].size());
  const int64_t prefix = static_cast<int64_t>(scores[0][0].size());
  for (const auto& layer : scores) {
    std::vector<float> rows;
    for (const auto& row : layer) rows.insert(rows.end(), row.begin(), row.end());
    flat.storage.push_back(std::move(rows));
  }
  flat.input.base = base;
  flat.input.prefix_length = prefix;
  flat.input.num_heads = heads;
  flat.input.r_max = r_max;
  flat.input.update_interval = interval;
  flat.input.row_stride = prefix;
  for (const auto& rows : flat.storage) flat.input.layer_scores.push_back(rows.data());
  return flat;
}

std::vector<int64_t> Budgets(const LayerScores3& scores, int64_t base, double r_max = 10,
                             int interval = 4) {
  Flattened flat = Flatten(scores, base, r_max, interval);
  return DynamicPrefixBudgets(flat.input);
}

TEST(PythonFloorDivideTest, MatchesCPython) {
  EXPECT_EQ(PythonFloorDivide(7, 2), 3);
  EXPECT_EQ(PythonFloorDivide(-7, 2), -4);
  EXPECT_EQ(PythonFloorDivide(7, -2), -4);
  EXPECT_EQ(PythonFloorDivide(1, 0.1), 9);  // Python: 1 // 0.1 == 9.0 although 1 / 0.1 == 10.0
  EXPECT_EQ(PythonFloorDivide(6, 1.5), 4);
  EXPECT_EQ(PythonFloorDivide(0, 3), 0);
  EXPECT_EQ(PythonFloorDivide(10, 0.3333333333333333), 30);  // 10 / (1/3): fp quotient 30.000…
}

// Budgets computed by hand, by running the upstream procedure on these inputs in Python.
TEST(DynamicPrefixBudgetsTest, HandComputedValues) {
  // L = 2, H = 1, P = 6, base 2, bs = min(20, 6) = 6. Layer 0 holds the global top 4:
  // c = (4, 0), counts = c // 2 = (2, 0), k = (6, 0), Σk / (base·L) = 1.5, f = (4, 0).
  EXPECT_EQ(Budgets({{{9, 8, 7, 6, 5, 4}}, {{3, 2, 1, 0, -1, -2}}}, 2),
            std::vector<int64_t>({4, 0}));

  const LayerScores3 three = {
      {{0.238f, 0.544f, 0.37f, 0.604f, 0.626f}, {0.066f, 0.013f, 0.837f, 0.259f, 0.234f}},
      {{0.996f, 0.47f, 0.836f, 0.476f, 0.639f}, {0.151f, 0.635f, 0.868f, 0.523f, 0.741f}},
      {{0.671f, 0.064f, 0.758f, 0.591f, 0.301f}, {0.031f, 0.866f, 0.473f, 0.719f, 0.879f}}};
  EXPECT_EQ(Budgets(three, 2), std::vector<int64_t>({0, 3, 3}));

  const LayerScores3 six = {{{0.71f, 0.92f, 0.39f, 0.8f, 0.44f, 0.94f, 0.88f},
                             {0.1f, 0.14f, 0.22f, 0.97f, 0.44f, 0.63f, 0.3f}},
                            {{1.01f, 0.77f, 0.7f, 1.17f, 1.17f, 1.81f, 1.36f},
                             {1.86f, 1.71f, 1.98f, 1.34f, 0.33f, 1.72f, 1.93f}},
                            {{2.71f, 1.71f, 2.14f, 0.63f, 2.49f, 1.72f, 0.85f},
                             {0.19f, 2.56f, 2.97f, 0.27f, 2.4f, 1.23f, 0.45f}},
                            {{1.18f, 3.08f, 3.49f, 0.18f, 2.46f, 0.18f, 2.87f},
                             {1.32f, 3.52f, 3.92f, 2.02f, 3.99f, 1.24f, 0.31f}},
                            {{3.0f, 0.16f, 0.99f, 2.04f, 3.05f, 0.78f, 0.21f},
                             {4.34f, 1.57f, 4.79f, 4.48f, 1.89f, 2.3f, 2.6f}},
                            {{3.86f, 3.57f, 3.36f, 3.72f, 5.64f, 3.04f, 2.59f},
                             {4.32f, 1.43f, 1.81f, 5.87f, 3.13f, 3.29f, 0.07f}}};
  // bs = min(int(2·2), 7) = 4 caps the later layers, so Σ = 10 < base·L = 12.
  EXPECT_EQ(Budgets(six, 2, /*r_max=*/2, /*interval=*/4), std::vector<int64_t>({0, 0, 0, 3, 3, 4}));
  // Updates after layers 2, 4 and 6; the early cuts and the cap P = 7 leave Σ = 16 < 18.
  EXPECT_EQ(Budgets(six, 3, /*r_max=*/10, /*interval=*/2),
            std::vector<int64_t>({0, 0, 3, 3, 3, 7}));

  // An early cut binds: after layers 0 and 1 (update every 2), layer 1 holds the whole top
  // set, so layer 0 is cut to 0; the final update would give it 3, but a cut is never undone.
  LayerScores3 cut(4, std::vector<std::vector<float>>(1));
  const float offsets[] = {5.0f, 9.0f, 0.1f, 0.2f};
  for (int l = 0; l < 4; ++l) {
    for (int j = 0; j < 10; ++j) cut[l][0].push_back(offsets[l] + 0.01f * j);
  }
  EXPECT_EQ(Budgets(cut, 4, /*r_max=*/10, /*interval=*/2), std::vector<int64_t>({0, 8, 0, 5}));
}

TEST(DynamicPrefixBudgetsTest, MatchesTheBruteForceProcedure) {
  std::mt19937 generator(11);
  struct Case {
    int layers, heads;
    int64_t prefix, base;
    double r_max;
    int interval;
    bool coarse;  // quantized scores: many ties across layers and heads
  };
  for (const Case& c : {Case{8, 2, 97, 12, 10, 4, false}, Case{7, 3, 61, 5, 10, 4, true},
                        Case{12, 1, 200, 30, 3, 4, false}, Case{5, 4, 33, 4, 10, 2, true},
                        Case{9, 2, 150, 7, 10, 3, false}, Case{3, 8, 41, 40, 1, 4, false}}) {
    LayerScores3 scores(c.layers, std::vector<std::vector<float>>(c.heads));
    for (int l = 0; l < c.layers; ++l) {
      // Layers differ in scale, so that budgets move between them.
      std::lognormal_distribution<float> distribution(0.3f * (l % 4), 1.0f);
      for (auto& row : scores[l]) {
        for (int64_t j = 0; j < c.prefix; ++j) {
          float value = distribution(generator);
          row.push_back(c.coarse ? std::round(value * 4) / 4 : value);
        }
      }
    }
    scores[0][0][1] = NAN;
    const std::vector<int64_t> got = Budgets(scores, c.base, c.r_max, c.interval);
    EXPECT_EQ(got, testing::ReferenceDynamicBudgets(scores, c.base, c.r_max, c.interval))
        << "L=" << c.layers << " H=" << c.heads << " P=" << c.prefix << " base=" << c.base;
    const int64_t temporary = std::min<int64_t>(static_cast<int64_t>(c.r_max * c.base), c.prefix);
    int64_t sum = 0;
    for (int64_t budget : got) {
      EXPECT_GE(budget, 0);
      EXPECT_LE(budget, temporary);
      sum += budget;
    }
    EXPECT_LE(sum, c.base * c.layers);
  }
}

}  // namespace
}  // namespace kvcompress
