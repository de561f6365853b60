#include "kernels/internal/dynamic_budget.h"

#include <algorithm>
#include <cmath>
#include <functional>
#include <numeric>

#include "kernels/selection_order.h"

namespace kvcompress::internal {
namespace {

// c_l of step 1: how many of each of the first `seen` layers' prefix scores are among the
// global top `top` (ties to the lower layer, head, position — the flat order).
std::vector<int64_t> TopCounts(const DynamicBudgetInput& input, int seen, int64_t top) {
  const int64_t prefix = input.prefix_length;
  std::vector<float> all;
  all.reserve(static_cast<size_t>(seen) * input.num_heads * prefix);
  for (int l = 0; l < seen; ++l) {
    for (int h = 0; h < input.num_heads; ++h) {
      const float* row = input.layer_scores[l] + h * input.row_stride;
      for (int64_t j = 0; j < prefix; ++j) all.push_back(SelectionScore(row[j]));
    }
  }
  std::vector<float> sorted = all;
  std::nth_element(sorted.begin(), sorted.begin() + (top - 1), sorted.end(), std::greater<>());
  const float threshold = sorted[top - 1];
  int64_t ties_left = top;
  for (float score : all) ties_left -= score > threshold ? 1 : 0;
  std::vector<int64_t> counts(seen, 0);
  const size_t per_layer = static_cast<size_t>(input.num_heads) * prefix;
  for (size_t i = 0; i < all.size(); ++i) {
    if (all[i] > threshold || (all[i] == threshold && ties_left-- > 0)) ++counts[i / per_layer];
  }
  return counts;
}

}  // namespace

double PythonFloorDivide(double a, double b) {
  // Objects/floatobject.c, float_floor_div via _float_div_mod.
  double mod = std::fmod(a, b);
  double div = (a - mod) / b;
  if (mod != 0) {
    if ((b < 0) != (mod < 0)) div -= 1.0;
  }
  if (div == 0) return std::copysign(0.0, a / b);
  double floor_div = std::floor(div);
  if (div - floor_div > 0.5) floor_div += 1.0;
  return floor_div;
}

std::vector<int64_t> DynamicPrefixBudgets(const DynamicBudgetInput& input) {
  const int num_layers = static_cast<int>(input.layer_scores.size());
  const int64_t base = input.base;
  const int64_t prefix = input.prefix_length;
  const int64_t temporary =
      std::min(static_cast<int64_t>(input.r_max * static_cast<double>(base)), prefix);
  std::vector<int64_t> budgets(num_layers, temporary);
  const int64_t need = base * num_layers;
  for (int last = 0; last < num_layers; ++last) {
    const int seen = last + 1;
    if (seen % input.update_interval != 0 && seen != num_layers) continue;
    const int64_t top = base * input.num_heads * seen;
    std::vector<int64_t> counts = TopCounts(input, seen, top);
    for (int64_t& count : counts) count /= seen;
    if (seen == num_layers) {
      counts[last] += base * input.num_heads - std::accumulate(counts.begin(), counts.end(), 0LL);
    }
    const int64_t count_sum = std::accumulate(counts.begin(), counts.end(), 0LL);
    if (count_sum <= 0) continue;
    std::vector<int64_t> fixed(seen);
    for (int l = 0; l < seen; ++l) {
      const float share = static_cast<float>(counts[l]) / static_cast<float>(count_sum);
      const float scaled = static_cast<float>(temporary) * share;
      fixed[l] = static_cast<int64_t>(scaled);
    }
    const int64_t fixed_sum = std::accumulate(fixed.begin(), fixed.end(), 0LL);
    if (fixed_sum <= 0) continue;
    const double ratio = static_cast<double>(fixed_sum) / static_cast<double>(need);
    for (int64_t& value : fixed) {
      value = static_cast<int64_t>(PythonFloorDivide(static_cast<double>(value), ratio));
    }
    fixed[last] += need - std::accumulate(fixed.begin(), fixed.end(), 0LL);
    for (int l = 0; l < seen; ++l) {
      budgets[l] = std::min(budgets[l], std::clamp<int64_t>(fixed[l], 0, prefix));
    }
  }
  return budgets;
}

}  // namespace kvcompress::internal
