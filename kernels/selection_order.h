// The order in which a head's tokens compete for its budget, shared by both backends so that
// they keep identical sets: higher score first, ties to the lower position. Where tokens of
// several heads compete for one budget (adaptive head budgets), ties go to the lower head
// first, then to the lower position.
//
// NaN scores rank as −inf (below every real score, ties among them by position): a NaN can
// only come from a NaN or inf in the inputs, and such a token should be the first to go.
// +inf scores (window and protected tokens) tie with each other, so when a budget is smaller
// than the number of +inf tokens the lowest positions among them win.
#ifndef KVCOMPRESS_KERNELS_SELECTION_ORDER_H_
#define KVCOMPRESS_KERNELS_SELECTION_ORDER_H_

#include <cmath>
#include <cstdint>

#include "kernels/host_device.h"

namespace kvcompress {

// The score a token competes with: `score`, or −inf when it is NaN.
KVC_HOST_DEVICE inline float SelectionScore(float score) {
  return score != score ? -INFINITY : score;
}

// Whether token (score_a, position_a) is preferred to token (score_b, position_b).
// Scores must already have gone through SelectionScore.
KVC_HOST_DEVICE inline bool RanksBefore(float score_a, int64_t position_a, float score_b,
                                        int64_t position_b) {
  return score_a > score_b || (score_a == score_b && position_a < position_b);
}

// The order of (head, token) pairs competing for one layer-wide budget (adaptive head budgets):
// higher score, then lower head, then lower position.
KVC_HOST_DEVICE inline bool RanksBeforeAcrossHeads(float score_a, int head_a, int64_t position_a,
                                                   float score_b, int head_b, int64_t position_b) {
  if (score_a != score_b) return score_a > score_b;
  if (head_a != head_b) return head_a < head_b;
  return position_a < position_b;
}

}  // namespace kvcompress

#endif  // KVCOMPRESS_KERNELS_SELECTION_ORDER_H_
