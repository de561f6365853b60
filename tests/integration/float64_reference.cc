#include "tests/integration/float64_reference.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <set>

namespace kvcompress::testing {

std::vector<std::vector<double>> SnapKvScores(const Float64Layer& layer, int kernel) {
  const int T = layer.num_tokens, W = layer.num_window_queries, D = layer.head_dim;
  const int P = T - W;
  const int G = layer.num_query_heads / layer.num_kv_heads;
  std::vector<std::vector<double>> scores(layer.num_kv_heads,
                                          std::vector<double>(T, 0.0));
  for (int qh = 0; qh < layer.num_query_heads; ++qh) {
    const int kvh = qh / G;
    std::vector<double> mean_attention(std::max(P, 0), 0.0);
    for (int i = 0; i < W; ++i) {
      const int last_visible = P + i;
      std::vector<double> logits(last_visible + 1);
      for (int j = 0; j <= last_visible; ++j) {
        double dot = 0;
        for (int d = 0; d < D; ++d) dot += layer.query(qh, i, d) * layer.key(kvh, j, d);
        logits[j] = dot / std::sqrt(double(D));
      }
      const double top = *std::max_element(logits.begin(), logits.end());
      double total = 0;
      for (double& logit : logits) total += (logit = std::exp(logit - top));
      for (int j = 0; j < P; ++j) mean_attention[j] += logits[j] / total / W;
    }
    for (int j = 0; j < P; ++j) {
      double pooled = 0;
      for (int t = j - kernel / 2; t <= j + kernel / 2; ++t) {
        if (t >= 0 && t < P) pooled += mean_attention[t];
      }
      scores[kvh][j] += pooled / kernel / G;
    }
  }
  for (auto& head : scores) {
    for (int j = std::max(P, 0); j < T; ++j) head[j] = std::numeric_limits<double>::infinity();
  }
  return scores;
}

std::vector<std::vector<double>> KnormScores(const Float64Layer& layer) {
  std::vector<std::vector<double>> scores(layer.num_kv_heads,
                                          std::vector<double>(layer.num_tokens));
  for (int h = 0; h < layer.num_kv_heads; ++h) {
    for (int t = 0; t < layer.num_tokens; ++t) {
      double sum = 0;
      for (int d = 0; d < layer.head_dim; ++d) sum += layer.key(h, t, d) * layer.key(h, t, d);
      scores[h][t] = -std::sqrt(sum);
    }
  }
  return scores;
}

std::vector<int32_t> TopPositions(const std::vector<double>& scores, int n) {
  std::vector<int32_t> order(scores.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](int32_t a, int32_t b) { return scores[a] > scores[b]; });
  order.resize(n);
  std::sort(order.begin(), order.end());
  return order;
}

int ExplainedByNearTies(const std::vector<double>& scores, const std::vector<int32_t>& a,
                        const std::vector<int32_t>& b, double tolerance) {
  if (a.size() != b.size()) return -1;
  std::vector<double> sorted = scores;
  std::sort(sorted.begin(), sorted.end(), std::greater<double>());
  const double boundary = sorted[a.size() - 1];
  const std::set<int32_t> in_a(a.begin(), a.end()), in_b(b.begin(), b.end());
  int explained = 0;
  for (int32_t position : in_a) {
    if (in_b.count(position)) continue;
    if (std::abs(scores[position] - boundary) > tolerance * std::abs(boundary)) return -1;
    ++explained;
  }
  for (int32_t position : in_b) {
    if (in_a.count(position)) continue;
    if (std::abs(scores[position] - boundary) > tolerance * std::abs(boundary)) return -1;
  }
  return explained;
}

}  // namespace kvcompress::testing
