// Runs the spec's scorer on one KV head of one layer, then raises protected tokens to +inf,
// and keeps what the attention-mass pass can reuse. Thread-safe; the view must match the
// geometry and carry the window queries the scorer needs.
#ifndef KVCOMPRESS_KERNELS_CPU_INTERNAL_HEAD_SCORER_H_
#define KVCOMPRESS_KERNELS_CPU_INTERNAL_HEAD_SCORER_H_

#include <vector>

#include "kernels/cache_geometry.h"
#include "kernels/cpu/internal/head_tensors.h"
#include "kernels/cpu/internal/window_attention.h"
#include "kernels/method_spec.h"

namespace kvcompress::cpu {

struct HeadScoring {
  std::vector<float> scores;  // [T], higher = more important
  // Loaded when the scorer or the attention-mass pass needs them; empty otherwise.
  HeadKeys keys;
  GroupQueries queries;  // the AttentionWindowSize(...) last window queries of the group
  std::vector<SoftmaxNormalizer> normalizers;  // [G · W] when the scorer computed them
};

// Window queries the attention mass averages over: snapkv's effective window, else every
// query sent.
int AttentionWindowSize(const MethodSpec& spec, int num_window_queries_sent);

// Requires a scorer CheckMethodImplemented accepts. With `load_attention_inputs`, keys and
// the mass queries are loaded even when the scorer does not need them (when the layer has
// window queries).
HeadScoring ScoreHead(const CacheGeometry& geometry, const MethodSpec& spec, const LayerView& view,
                      int kv_head, bool load_attention_inputs);

}  // namespace kvcompress::cpu

#endif  // KVCOMPRESS_KERNELS_CPU_INTERNAL_HEAD_SCORER_H_
