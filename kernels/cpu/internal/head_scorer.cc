#include "kernels/cpu/internal/head_scorer.h"

#include <algorithm>
#include <cmath>

#include "kernels/cpu/internal/keydiff_scorer.h"
#include "kernels/cpu/internal/knorm_scorer.h"
#include "kernels/cpu/internal/observed_scorer.h"
#include "kernels/cpu/internal/protected_tokens.h"
#include "kernels/cpu/internal/snapkv_scorer.h"
#include "kernels/cpu/internal/streaming_scorer.h"
#include "kernels/cpu/internal/tova_scorer.h"
#include "kernels/snapkv_window.h"

namespace kvcompress::cpu {

int AttentionWindowSize(const MethodSpec& spec, int num_window_queries_sent) {
  return spec.scorer == ScorerKind::kSnapKv
             ? EffectiveWindowSize(spec.snapkv.window_size, num_window_queries_sent)
             : num_window_queries_sent;
}

bool ScoresAreLayerShared(const MethodSpec& spec) { return spec.scorer == ScorerKind::kTova; }

HeadScoring ScoreHead(const CacheGeometry& geometry, const MethodSpec& spec, const LayerView& view,
                      int kv_head, bool load_attention_inputs, const float* precomputed_scores) {
  HeadScoring result;
  const int64_t num_tokens = view.shape.num_tokens;
  const int attention_window = AttentionWindowSize(spec, view.shape.num_window_queries);
  const bool has_queries = attention_window > 0 && view.queries != nullptr;
  const bool scores_now = precomputed_scores == nullptr;
  const bool attention_scorer =
      scores_now && (spec.scorer == ScorerKind::kSnapKv || spec.scorer == ScorerKind::kTova);
  const bool key_scorer =
      scores_now && (spec.scorer == ScorerKind::kKnorm || spec.scorer == ScorerKind::kKeyDiff);
  const bool needs_keys = attention_scorer || key_scorer || (load_attention_inputs && has_queries);
  const bool needs_queries = attention_scorer || (load_attention_inputs && has_queries);
  if (needs_keys) result.keys = LoadHeadKeys(geometry, view, kv_head);
  if (needs_queries && has_queries) {
    result.queries = LoadGroupQueries(geometry, view, kv_head, attention_window);
  }

  if (!scores_now) {
    result.scores.assign(precomputed_scores, precomputed_scores + num_tokens);
    return result;
  }
  result.scores.resize(num_tokens);
  switch (spec.scorer) {
    case ScorerKind::kSnapKv:
      ScoreSnapKvHead(spec.snapkv, result.keys, result.queries, result.scores, &result.normalizers);
      break;
    case ScorerKind::kKnorm:
      ScoreKnormHead(result.keys, result.scores);
      break;
    case ScorerKind::kStreaming:
      ScoreStreaming(spec.streaming.sinks, result.scores);
      break;
    case ScorerKind::kObserved:
      ScoreObservedHead(spec.observed, geometry, view, kv_head, result.scores);
      break;
    case ScorerKind::kKeyDiff:
      ScoreKeyDiffHead(result.keys, result.scores);
      break;
    case ScorerKind::kTova:
      // Finished (combined across heads and protected) by FinishLayerScores.
      result.group_attention = SumGroupLastQueryAttention(result.keys, result.queries);
      return result;
  }
  ProtectTokens(spec.protect_sinks, spec.protect_recent, result.scores);
  return result;
}

void FinishLayerScores(const CacheGeometry& geometry, const MethodSpec& spec,
                       std::span<HeadScoring* const> heads) {
  if (!ScoresAreLayerShared(spec) || heads.empty()) return;
  std::vector<const std::vector<double>*> group_sums;
  group_sums.reserve(heads.size());
  for (const HeadScoring* head : heads) group_sums.push_back(&head->group_attention);
  std::vector<float> shared = CombineTovaScores(group_sums, geometry.num_query_heads);
  ProtectTokens(spec.protect_sinks, spec.protect_recent, shared);
  for (HeadScoring* head : heads) {
    head->scores = shared;
    head->group_attention.clear();
    head->group_attention.shrink_to_fit();
  }
}

}  // namespace kvcompress::cpu
