// Test support for kernels/: fixed-seed random layers, and brute-force fp64 references of the
// scorers, selection and attention mass, written independently of kernels/cpu (full attention
// matrices, full sorts) so that the tests check the implementation rather than restate it.
#ifndef KVCOMPRESS_TESTS_KERNELS_TEST_LAYERS_H_
#define KVCOMPRESS_TESTS_KERNELS_TEST_LAYERS_H_

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "kernels/cache_geometry.h"
#include "kernels/layer_result.h"
#include "kernels/method_spec.h"

namespace kvcompress::testing {

// `count` normal(0, stddev) samples from std::mt19937(seed), none of them zero.
std::vector<float> RandomNormals(size_t count, uint32_t seed, float stddev = 1.0f);

// `values` in `dtype` (rounded to nearest even for 16-bit types); zeros after rounding become
// 0.5 so that no element of a test tensor is zero.
std::vector<std::byte> Encode(std::span<const float> values, DType dtype);

// A layer of random K, V ([H_kv, T, D] or [T, H_kv, D]) and num_window_queries queries.
LayerInput MakeRandomLayer(const CacheGeometry& geometry, int64_t num_tokens,
                           int num_window_queries, uint32_t seed, int sequence = 0, int layer = 0);

// Like MakeRandomLayer, but each head's keys come in runs of 1 to 8 tokens around a common
// random direction (k = c_run + 0.25·noise), so that adjacent keys within a run are highly
// cosine-similar and keys of different runs are not: input for the merging reducers.
LayerInput MakeRunLayer(const CacheGeometry& geometry, int64_t num_tokens, int num_window_queries,
                        uint32_t seed, int sequence = 0, int layer = 0);

// Adds `num_score_heads` rows of random client scores ([num_score_heads, T] fp32) to `input`.
void AddRandomScores(LayerInput& input, int num_score_heads, uint32_t seed);

// Element d of key (head, token) / query (query_head, query) as fp64, indexed by hand.
double KeyAt(const CacheGeometry& geometry, const LayerInput& input, int head, int64_t token,
             int d);
double ValueAt(const CacheGeometry& geometry, const LayerInput& input, int head, int64_t token,
               int d);
double QueryAt(const CacheGeometry& geometry, const LayerInput& input, int query_head, int query,
               int d);
// The bytes of row (head, token) of `tensor` (keys or values of `input`).
std::span<const std::byte> RowBytes(const CacheGeometry& geometry, const LayerInput& input,
                                    const std::vector<std::byte>& tensor, int head, int64_t token);

// Full causal attention of the last `num_queries` window queries: [H_q][num_queries][T],
// masked entries 0.
std::vector<std::vector<std::vector<double>>> ReferenceWindowAttention(
    const CacheGeometry& geometry, const LayerInput& input, int num_queries);

// Reference scores [H_kv][T] of every scorer, protected tokens at +inf: snapkv, knorm,
// streaming; observed (client rows, group-reduced when per query head); tova (the last
// query's full softmax averaged over all H_q heads, the last token +inf, the same row for
// every head); keydiff (−cos with the mean unit key).
std::vector<std::vector<double>> ReferenceScores(const CacheGeometry& geometry,
                                                 const MethodSpec& spec, const LayerInput& input);

// The n best of `scores` by a full sort (score desc, position asc), ascending.
std::vector<int32_t> ReferenceKept(const std::vector<double>& scores, int64_t n);

// Compares an implementation's kept set with the reference's. Differences are allowed only
// for tokens whose reference score lies within 1e-6 (relative) of the selection boundary,
// where fp32 rounding may legitimately reorder a near-tie; `tolerated` counts them.
struct KeptComparison {
  bool ok = true;
  int64_t tolerated = 0;
  std::string failure;
};
KeptComparison CompareKept(const std::vector<double>& reference_scores, int64_t n,
                           std::span<const int32_t> kept);

// Mean over query heads and the last `num_queries` window queries of the attention landing
// on each head's kept positions; `kept[h]` ascending.
double ReferenceAttentionMass(const CacheGeometry& geometry, const LayerInput& input,
                              int num_queries, const std::vector<std::vector<int32_t>>& kept);

// Runs one layer through a fresh CPU backend (2 threads) with `tokens_per_head` (keep_all
// when ≥ T).
absl::StatusOr<LayerResult> CompressLayer(const CacheGeometry& geometry, const MethodSpec& spec,
                                          const LayerInput& input, int64_t tokens_per_head);

// The backend's scores of one layer, [H_kv][T].
absl::StatusOr<std::vector<std::vector<float>>> ScoreLayer(const CacheGeometry& geometry,
                                                           const MethodSpec& spec,
                                                           const LayerInput& input);

// Prefix scores of one sequence's participating layers: [layer][head][position < P].
using DynamicLayerScores = std::vector<std::vector<std::vector<float>>>;

// DynamicKV prefix budgets by brute force, transcribed from DreamMr/DynamicKV
// (DynamicKVClusterV11.update_and_reset_budget and its layer loop, with an update at the last
// layer too): full sorts, Python integer and float semantics, torch float32 shares, caches
// cut cumulatively.
std::vector<int64_t> ReferenceDynamicBudgets(const DynamicLayerScores& scores, int64_t base,
                                             double r_max, int interval);

// The kept positions of head h of a result.
std::vector<int32_t> KeptOfHead(const LayerResult& result, int head);

// Row `row` of a result's keys or values (`tensor`) decoded to fp64.
std::vector<double> DecodeRow(const CacheGeometry& geometry, const std::vector<std::byte>& tensor,
                              size_t row);

}  // namespace kvcompress::testing

#endif  // KVCOMPRESS_TESTS_KERNELS_TEST_LAYERS_H_
