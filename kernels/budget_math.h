// Budget arithmetic both backends and the pipeline share: Python-compatible rounding, the
// PyramidKV layer budget and the AdaKV safeguard. Each formula follows kvpress exactly (see
// docs/methods.md for where and why it differs from a literal reading of DESIGN §3). Pure
// inline functions; thread-safe.
#ifndef KVCOMPRESS_KERNELS_BUDGET_MATH_H_
#define KVCOMPRESS_KERNELS_BUDGET_MATH_H_

#include <cmath>
#include <cstdint>

#include "kernels/host_device.h"

namespace kvcompress {

// Python's round(): to the nearest integer, halves to the even one.
KVC_HOST_DEVICE inline double RoundHalfToEven(double value) {
  const double floor_value = floor(value);
  const double fraction = value - floor_value;
  if (fraction > 0.5) return floor_value + 1;
  if (fraction < 0.5) return floor_value;
  return fmod(floor_value, 2.0) == 0 ? floor_value : floor_value + 1;
}

// PyramidKV (kvpress PyramidKVPress.get_layer_budget, β = `beta`): tokens layer `layer` of
// `num_layers` keeps, window included, for a sequence of `num_tokens` tokens, window `window`
// and an average budget `average_keep` = T·keep_ratio (unfloored) or keep_tokens:
//   C = W + average_keep; min = (C − W)/β; max = 2(C − W) − min;
//   if max ≥ T − W: max = T − W, min = 2(C − W) − max;
//   unless T ≥ max ≥ min ≥ W: max(1, round(average_keep))   (the uniform fallback)
//   else round(max − layer·(max − min)/(L − 1))              (steps 0 when L = 1)
// round() is Python's. The caller clamps the result to [1, T].
KVC_HOST_DEVICE inline int64_t PyramidTokenBudget(double average_keep, int64_t num_tokens,
                                                  int window, int layer, int num_layers,
                                                  double beta) {
  const double capacity = window + average_keep;
  const double spread = capacity - window;  // C − W, rounded as kvpress rounds it
  double min_num = spread / beta;
  double max_num = spread * 2 - min_num;
  const double prefix = static_cast<double>(num_tokens - window);
  if (max_num >= prefix) {
    max_num = prefix;
    min_num = spread * 2 - max_num;
  }
  const double tokens = static_cast<double>(num_tokens);
  if (!(tokens >= max_num && max_num >= min_num && min_num >= window)) {
    const double fallback = RoundHalfToEven(average_keep);
    return fallback < 1 ? 1 : static_cast<int64_t>(fallback);
  }
  const double steps = num_layers > 1 ? (max_num - min_num) / (num_layers - 1) : 0.0;
  return static_cast<int64_t>(RoundHalfToEven(max_num - layer * steps));
}

// AdaKV safeguard (kvpress AdaKVPress): each head's top int(n·α) tokens are kept whatever the
// other heads score; at least 1 when α > 0 (n ≥ 1 always here), none when α = 0.
KVC_HOST_DEVICE inline int64_t AdaptiveSafeguardTokens(int64_t tokens_per_head, double alpha) {
  if (!(alpha > 0)) return 0;
  const int64_t safe = static_cast<int64_t>(static_cast<double>(tokens_per_head) * alpha);
  return safe < 1 ? 1 : safe;
}

}  // namespace kvcompress

#endif  // KVCOMPRESS_KERNELS_BUDGET_MATH_H_
