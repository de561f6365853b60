// TOVA scores (Oren et al. 2024, kvpress TOVAPress): the attention of the last window query —
// the query at position T − 1, whose softmax covers all T keys — averaged over all H_q query
// heads, one score vector shared by every KV head. As in kvpress, the last token itself is
// dropped from the average and scores +inf (always kept). fp64 accumulation, fp32 out.
//
// Scoring is split at the head boundary so that the CPU backend keeps its per-KV-head tasks:
// each head sums its group's attention, then the layer adds the heads up. Pure functions.
#ifndef KVCOMPRESS_KERNELS_CPU_INTERNAL_TOVA_SCORER_H_
#define KVCOMPRESS_KERNELS_CPU_INTERNAL_TOVA_SCORER_H_

#include <span>
#include <vector>

#include "kernels/cpu/internal/head_tensors.h"

namespace kvcompress::cpu {

// Σ over the group members of the last query's attention on key j, for all T keys. Requires
// queries.num_queries ≥ 1; uses the last of them.
std::vector<double> SumGroupLastQueryAttention(const HeadKeys& keys, const GroupQueries& queries);

// The shared scores [T] from every KV head's group sums: Σ_heads sums[j] / num_query_heads
// for j < T − 1, +inf for j = T − 1.
std::vector<float> CombineTovaScores(std::span<const std::vector<double>* const> group_sums,
                                     int num_query_heads);

}  // namespace kvcompress::cpu

#endif  // KVCOMPRESS_KERNELS_CPU_INTERNAL_TOVA_SCORER_H_
