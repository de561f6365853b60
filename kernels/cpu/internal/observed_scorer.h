// Client-supplied scores (the `observed` scorer, H2O style) for one KV head: the client's row
// for the head, or — when the client scored per query head — the group's rows reduced with
// ObservedOptions::group_reduction (mean default, as kvpress ObservedAttentionPress averages
// the group). Reductions run in fp64 and round once to fp32; a NaN in any member makes the
// token NaN (ranked last by selection). Pure function; thread-safe.
#ifndef KVCOMPRESS_KERNELS_CPU_INTERNAL_OBSERVED_SCORER_H_
#define KVCOMPRESS_KERNELS_CPU_INTERNAL_OBSERVED_SCORER_H_

#include <span>

#include "kernels/cache_geometry.h"
#include "kernels/method_spec.h"

namespace kvcompress::cpu {

// Requires view.scores with view.shape.num_score_heads equal to H_kv or H_q; `scores` has T
// entries.
void ScoreObservedHead(const ObservedOptions& options, const CacheGeometry& geometry,
                       const LayerView& view, int kv_head, std::span<float> scores);

}  // namespace kvcompress::cpu

#endif  // KVCOMPRESS_KERNELS_CPU_INTERNAL_OBSERVED_SCORER_H_
