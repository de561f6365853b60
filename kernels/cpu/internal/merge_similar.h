// The merge_similar reducer (KVMerger, Wang et al. 2024, arXiv 2407.08454, as reconstructed in
// DESIGN §3 and docs/methods.md) for one KV head. All arithmetic in fp64 from the fp32 rows.
//
// 1. Protected: the `p` best tokens in selection order (score descending, lower position
//    first, NaN last), p = min(n, max(⌊protect_fraction·n⌋, #tokens scoring +inf)): the
//    window and protected tokens, then the top scorers. They are kept verbatim.
// 2. Merging sets: scanning the other tokens from position T − 1 down to 0, token i joins the
//    current set when token i + 1 is in it and cos(k_i, k_{i+1}) > similarity_threshold;
//    otherwise (or after a protected token) it starts a new set. Sets are contiguous runs.
// 3. Each set becomes one row at its pivot's position, the pivot being its best member in
//    selection order: with d_i = ‖k_i − k_p‖, g_i = exp(−d_i²/(2σ²)), w_i = g_i/Σg,
//    k* = Σ w_i k_i and v* = Σ w_i v_i (× |S| with scale_values_by_set_size); σ = sigma, or
//    with auto_sigma the RMS of d_i over the members other than the pivot, /√2 (so
//    2σ² = mean d_i²; all weights equal when every member equals the pivot). merged = |S|.
// 4. Every row counts one against the budget n: if p + #sets > n, only the n − p sets with
//    the best pivots (selection order) stay; the others are evicted with all their members.
// A head whose budget covers all its tokens (n ≥ T) is returned whole, unmerged.
// Pure function; thread-safe.
#ifndef KVCOMPRESS_KERNELS_CPU_INTERNAL_MERGE_SIMILAR_H_
#define KVCOMPRESS_KERNELS_CPU_INTERNAL_MERGE_SIMILAR_H_

#include <cstdint>
#include <span>

#include "kernels/cpu/internal/head_tensors.h"
#include "kernels/cpu/internal/merged_head.h"
#include "kernels/method_spec.h"

namespace kvcompress::cpu {

// `scores` has T = keys.num_tokens entries; values has the same shape as keys; n ≥ 1.
MergedHead MergeSimilarHead(const MergeSimilarOptions& options, std::span<const float> scores,
                            int64_t tokens_per_head, const HeadRows& keys, const HeadRows& values);

}  // namespace kvcompress::cpu

#endif  // KVCOMPRESS_KERNELS_CPU_INTERNAL_MERGE_SIMILAR_H_
