// Runs the spec's scorer on one KV head of one layer, then raises protected tokens to +inf,
// and keeps what the attention-mass pass can reuse. Thread-safe; the view must match the
// geometry and carry what the scorer needs (window queries for snapkv and tova, client
// scores for observed).
//
// Most scorers finish inside ScoreHead. TOVA shares one score vector across the layer's KV
// heads: ScoreHead only sums its group's attention, and FinishLayerScores, called once the
// layer's heads are all scored, combines them and applies the protection.
#ifndef KVCOMPRESS_KERNELS_CPU_INTERNAL_HEAD_SCORER_H_
#define KVCOMPRESS_KERNELS_CPU_INTERNAL_HEAD_SCORER_H_

#include <span>
#include <vector>

#include "kernels/cache_geometry.h"
#include "kernels/cpu/internal/head_tensors.h"
#include "kernels/cpu/internal/window_attention.h"
#include "kernels/method_spec.h"

namespace kvcompress::cpu {

struct HeadScoring {
  std::vector<float> scores;  // [T], higher = more important (final after FinishLayerScores)
  // Loaded when the scorer or the attention-mass pass needs them; empty otherwise.
  HeadKeys keys;
  GroupQueries queries;  // the AttentionWindowSize(...) last window queries of the group
  std::vector<SoftmaxNormalizer> normalizers;  // [G · W] when the scorer computed them
  std::vector<double> group_attention;         // tova: the group's last-query attention [T]
};

// Window queries the attention mass averages over: snapkv's effective window, else every
// query sent.
int AttentionWindowSize(const MethodSpec& spec, int num_window_queries_sent);

// Whether the scorer's scores are per layer rather than per head (FinishLayerScores must run).
bool ScoresAreLayerShared(const MethodSpec& spec);

// Scores one head. With `load_attention_inputs`, keys and the mass queries are loaded even
// when the scorer does not need them (when the layer has window queries). With
// `precomputed_scores` ([T], final scores of this head from an earlier scoring of the same
// layer and spec) the scorer does not run; only the attention inputs are loaded.
HeadScoring ScoreHead(const CacheGeometry& geometry, const MethodSpec& spec, const LayerView& view,
                      int kv_head, bool load_attention_inputs,
                      const float* precomputed_scores = nullptr);

// Completes the scores of a layer whose heads (all H_kv of them, in order) were scored by
// ScoreHead without precomputed scores; a no-op unless ScoresAreLayerShared(spec).
void FinishLayerScores(const CacheGeometry& geometry, const MethodSpec& spec,
                       std::span<HeadScoring* const> heads);

}  // namespace kvcompress::cpu

#endif  // KVCOMPRESS_KERNELS_CPU_INTERNAL_HEAD_SCORER_H_
