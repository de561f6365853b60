// The compressed cache of one layer of one sequence: true ragged per head.
//
// Rows are grouped by KV head in head order (offsets are cu_seqlens style); within a head
// positions ascend. Positions are the original token indices, never renumbered: the decode
// worker continues RoPE at T. Owned, movable value type.
#ifndef KVCOMPRESS_KERNELS_LAYER_RESULT_H_
#define KVCOMPRESS_KERNELS_LAYER_RESULT_H_

#include <cstddef>
#include <cstdint>
#include <vector>

#include "kernels/cache_geometry.h"

namespace kvcompress {

// Wall time spent in each stage for one layer, in seconds. Merging reducers count as gather.
struct StageSeconds {
  double score = 0;
  double select = 0;
  double gather = 0;
};

struct LayerResult {
  int sequence = 0;
  int layer = 0;
  std::vector<int32_t> kept;       // [H_kv] rows kept per head
  std::vector<int32_t> offsets;    // [H_kv + 1] prefix sums of kept
  std::vector<std::byte> keys;     // [Σ kept, D] in the input dtype
  std::vector<std::byte> values;   // [Σ kept, D] in the input dtype
  std::vector<int32_t> positions;  // [Σ kept] original token index of each row
  std::vector<int32_t> merged;     // [Σ kept] tokens folded into each row; empty for drop
  // Fraction of the window queries' attention (over all T keys, causal inside the window)
  // that lands on kept tokens, averaged over query heads and window queries; −1 when the
  // layer had no window queries.
  double attention_mass_kept = -1.0;
  StageSeconds seconds;
  // True when the result was returned by an AddLayer call for another layer: a cross-layer
  // budget (dynamic) held this layer back until its sequence was complete.
  bool deferred = false;
  // The tensors were written into device memory the client named (cuda_ipc output slices):
  // keys, values and positions are then empty here, the counts above still hold.
  bool in_output_region = false;

  int64_t total_kept() const { return offsets.empty() ? 0 : offsets.back(); }
};

// The padded layout some engines need: one length per layer.
struct PaddedLayerResult {
  int max_kept = 0;
  std::vector<int32_t> kept;       // [H_kv]
  std::vector<std::byte> keys;     // [H_kv, max_kept, D], zero rows past kept[h]
  std::vector<std::byte> values;   // [H_kv, max_kept, D], zero rows past kept[h]
  std::vector<int32_t> positions;  // [H_kv, max_kept], −1 past kept[h]
  std::vector<int32_t> merged;     // [H_kv, max_kept] or empty, 0 past kept[h]
};

// Lays a ragged result out padded. `geometry` gives head_dim and dtype.
PaddedLayerResult ToPadded(const LayerResult& result, const CacheGeometry& geometry);

}  // namespace kvcompress

#endif  // KVCOMPRESS_KERNELS_LAYER_RESULT_H_
