// Independent float64 references for end-to-end checks: written from DESIGN §3 alone,
// sharing no code with kernels/, so a bug in the engine cannot hide in its own oracle.
#ifndef KVCOMPRESS_TESTS_INTEGRATION_FLOAT64_REFERENCE_H_
#define KVCOMPRESS_TESTS_INTEGRATION_FLOAT64_REFERENCE_H_

#include <cstddef>
#include <cstdint>
#include <vector>

namespace kvcompress::testing {

// Tensors of one layer as float64, HND: keys/values [H_kv][T][D], queries [H_q][W][D].
struct Float64Layer {
  int num_kv_heads = 0;
  int num_query_heads = 0;
  int num_tokens = 0;
  int head_dim = 0;
  int num_window_queries = 0;
  std::vector<double> keys;
  std::vector<double> queries;
  double key(int h, int t, int d) const { return keys[(size_t(h) * num_tokens + t) * head_dim + d]; }
  double query(int h, int i, int d) const {
    return queries[(size_t(h) * num_window_queries + i) * head_dim + d];
  }
};

// SnapKV scores [H_kv][T] (window = all sent queries, avg pooling with `kernel`, group
// mean); window tokens get +inf.
std::vector<std::vector<double>> SnapKvScores(const Float64Layer& layer, int kernel);

// −‖k‖₂ per head and token.
std::vector<std::vector<double>> KnormScores(const Float64Layer& layer);

// Top `n` positions of `scores` by (score desc, position asc), returned ascending.
std::vector<int32_t> TopPositions(const std::vector<double>& scores, int n);

// Number of positions on which `a` and `b` (both ascending) differ only because of a
// near-tie at the selection boundary: returns −1 when a difference is not explained by
// scores within `tolerance` (relative) of the n-th best score, else the count of
// explained differences.
int ExplainedByNearTies(const std::vector<double>& scores, const std::vector<int32_t>& a,
                        const std::vector<int32_t>& b, double tolerance);

}  // namespace kvcompress::testing

#endif  // KVCOMPRESS_TESTS_INTEGRATION_FLOAT64_REFERENCE_H_
