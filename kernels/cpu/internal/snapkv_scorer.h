// SnapKV scores of one KV head (DESIGN §3), the CPU reference: fp64 accumulation, fp32 out.
//
// For each query head g of the group and window query i, A_ij is the causal softmax over all
// T keys; s_j = mean_i A_ij over prefix keys j < P = T − W; s is pooled over the prefix with
// zero padding (avg divides by kernel_size; max takes the max of the covered scores); the
// pooled rows of the G query heads are reduced (mean, max or sum). Window tokens score +inf.
// Pure function; thread-safe.
#ifndef KVCOMPRESS_KERNELS_CPU_INTERNAL_SNAPKV_SCORER_H_
#define KVCOMPRESS_KERNELS_CPU_INTERNAL_SNAPKV_SCORER_H_

#include <span>
#include <vector>

#include "kernels/cpu/internal/head_tensors.h"
#include "kernels/cpu/internal/window_attention.h"
#include "kernels/method_spec.h"

namespace kvcompress::cpu {

// `queries` holds the W_eff scoring queries (W = queries.num_queries ≥ 1, ≤ T); `scores` has
// T entries. When `normalizers` is not null it receives the softmax normalizer of each
// (group member g, query i) at g·W + i, for the attention-mass pass.
void ScoreSnapKvHead(const SnapKvOptions& options, const HeadKeys& keys,
                     const GroupQueries& queries, std::span<float> scores,
                     std::vector<SoftmaxNormalizer>* normalizers);

}  // namespace kvcompress::cpu

#endif  // KVCOMPRESS_KERNELS_CPU_INTERNAL_SNAPKV_SCORER_H_
