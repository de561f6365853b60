#include "kernels/cpu/internal/head_scorer.h"

#include <algorithm>
#include <cmath>

#include "kernels/cpu/internal/knorm_scorer.h"
#include "kernels/cpu/internal/protected_tokens.h"
#include "kernels/cpu/internal/snapkv_scorer.h"
#include "kernels/cpu/internal/streaming_scorer.h"
#include "kernels/snapkv_window.h"

namespace kvcompress::cpu {

int AttentionWindowSize(const MethodSpec& spec, int num_window_queries_sent) {
  return spec.scorer == ScorerKind::kSnapKv
             ? EffectiveWindowSize(spec.snapkv.window_size, num_window_queries_sent)
             : num_window_queries_sent;
}

HeadScoring ScoreHead(const CacheGeometry& geometry, const MethodSpec& spec, const LayerView& view,
                      int kv_head, bool load_attention_inputs) {
  HeadScoring result;
  const int64_t num_tokens = view.shape.num_tokens;
  const int attention_window = AttentionWindowSize(spec, view.shape.num_window_queries);
  const bool has_queries = attention_window > 0 && view.queries != nullptr;
  const bool needs_keys =
      spec.scorer != ScorerKind::kStreaming || (load_attention_inputs && has_queries);
  const bool needs_queries =
      spec.scorer == ScorerKind::kSnapKv || (load_attention_inputs && has_queries);
  if (needs_keys) result.keys = LoadHeadKeys(geometry, view, kv_head);
  if (needs_queries && has_queries) {
    result.queries = LoadGroupQueries(geometry, view, kv_head, attention_window);
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
    default:
      // CheckMethodImplemented rejects the other scorers before they reach a backend.
      std::fill(result.scores.begin(), result.scores.end(), NAN);
      break;
  }
  ProtectTokens(spec.protect_sinks, spec.protect_recent, result.scores);
  return result;
}

}  // namespace kvcompress::cpu
