// DynamicKV layer budgets (Zhou et al. 2024; DreamMr/DynamicKV, DynamicKVClusterV11) for one
// sequence, from every participating layer's snapkv scores. Host-side arithmetic of the
// pipeline; pure function, thread-safe.
//
// With base = n − W and P = T − W, each layer first holds bs = min(int(r_max·base), P)
// prefix tokens (its best by score). After every `update_interval`-th layer and after the
// last one, with `seen` layers so far:
//   1. c_l = how many of layer l's prefix scores are in the global top base·H·seen of all
//      seen layers (order: score descending, then lower layer, head, position; NaN last);
//   2. counts_l = c_l // seen; at the last layer the last count takes base·H − Σ counts;
//   3. k_l = int(fp32(bs) · fp32(counts_l / Σ counts))      (torch float32 arithmetic);
//   4. f_l = int(k_l // (Σ k / (base·L)))                    (Python float floor division);
//      the last seen layer takes base·L − Σ f;
//   5. every seen layer is cut to min(its current length, clamp(f_l, 0, P)).
// The result is each layer's final prefix budget; it keeps that many of its best prefix
// tokens plus the W window tokens. Σ budget = base·L unless a cut of an earlier update or the
// cap bs binds (then less, as upstream). An update whose Σ counts or Σ k is 0 cuts nothing.
#ifndef KVCOMPRESS_KERNELS_INTERNAL_DYNAMIC_BUDGET_H_
#define KVCOMPRESS_KERNELS_INTERNAL_DYNAMIC_BUDGET_H_

#include <cstdint>
#include <vector>

namespace kvcompress::internal {

struct DynamicBudgetInput {
  int64_t base = 0;           // n − W, ≥ 1
  int64_t prefix_length = 0;  // P = T − W, > base
  int num_heads = 0;          // H_kv
  double r_max = 10;
  int update_interval = 4;
  // One entry per participating layer, in layer order: scores [num_heads, row_stride] of
  // which the first prefix_length of each row are read.
  std::vector<const float*> layer_scores;
  int64_t row_stride = 0;  // T
};

// Prefix budgets, one per entry of layer_scores, each in [0, min(bs, P)].
std::vector<int64_t> DynamicPrefixBudgets(const DynamicBudgetInput& input);

// CPython's float floor division a // b (b ≠ 0), which is not always floor(a / b).
double PythonFloorDivide(double a, double b);

}  // namespace kvcompress::internal

#endif  // KVCOMPRESS_KERNELS_INTERNAL_DYNAMIC_BUDGET_H_
