// Synthetic KV caches that look like a real model's, for demos, tests and benchmarks.
//
// Deterministic by seed: the same options give the same bytes on any machine and with any
// number of threads (every (layer, head) draws from its own counter-seeded generator).
// The structure is what compression methods key on, never zeros:
//   - keys: a per-head mean plus per-channel scaled noise, with a few outlier rotary
//     channel pairs of large magnitude (as in real K), RoPE applied at each position
//     ("rotate half" pairing, base 500000 by default);
//   - attention sinks: the first few tokens share a distinct key direction;
//   - salient tokens: a few positions per head whose keys carry a direction the window
//     queries point at, so attention concentrates on them (SnapKV keeps real mass);
//   - queries: the last W positions' queries, post-RoPE, each query head a mixture of its
//     group's salient directions (and the sink direction) plus noise; early layers are
//     more diffuse than later ones;
//   - values: normal with a per-head scale.
// Thread-safe: GenerateSyntheticCache has no shared state.
#ifndef KVCOMPRESS_CLIENT_SYNTHETIC_CACHE_H_
#define KVCOMPRESS_CLIENT_SYNTHETIC_CACHE_H_

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "kernels/cache_geometry.h"

namespace kvcompress {

// Defaults: Llama-3-8B-like geometry.
struct SyntheticCacheOptions {
  int num_layers = 32;
  int num_kv_heads = 8;
  int num_query_heads = 32;
  int head_dim = 128;  // even (rotary pairs)
  int64_t num_tokens = 4096;
  int num_window_queries = 64;  // 0: no queries stored
  DType dtype = DType::kBFloat16;
  uint64_t seed = 0;

  int num_sinks = 4;                 // attention-sink tokens at the start
  int salient_tokens_per_head = 16;  // prefix tokens the queries point at
  int outlier_channel_pairs = 2;     // rotary pairs with large key magnitude, per head
  double rope_base = 500000.0;
  int num_threads = 0;  // 0: hardware concurrency
};

struct SyntheticCache {
  CacheGeometry geometry;  // HND
  SequenceShape shape;
  std::vector<LayerInput> layers;  // layers[l].layer == l, sequence 0
  // [layer][kv_head]: ascending positions of the salient tokens (sinks not included).
  std::vector<std::vector<std::vector<int64_t>>> salient_positions;
  // [layer][kv_head]: the key channels of the outlier rotary pairs (both halves), ascending.
  std::vector<std::vector<std::vector<int>>> outlier_channels;
};

// INVALID_ARGUMENT when an option is out of range (non-positive sizes, odd head_dim,
// H_q not a multiple of H_kv, W > T, more sinks and salient tokens than the prefix holds).
absl::StatusOr<SyntheticCache> GenerateSyntheticCache(const SyntheticCacheOptions& options);

}  // namespace kvcompress

#endif  // KVCOMPRESS_CLIENT_SYNTHETIC_CACHE_H_
