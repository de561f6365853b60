#include "tests/kernels/test_layers.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <iterator>
#include <limits>
#include <numeric>
#include <random>
#include <sstream>
#include <tuple>

#include "kernels/backend.h"

namespace kvcompress::testing {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

size_t ElementIndexHnd(const CacheGeometry& geometry, int64_t num_tokens, int head, int64_t token) {
  if (geometry.layout == Layout::kHND) {
    return (static_cast<size_t>(head) * num_tokens + token) * geometry.head_dim;
  }
  return (static_cast<size_t>(token) * geometry.num_kv_heads + head) * geometry.head_dim;
}

}  // namespace

std::vector<float> RandomNormals(size_t count, uint32_t seed, float stddev) {
  std::mt19937 generator(seed);
  std::normal_distribution<float> normal(0.0f, stddev);
  std::vector<float> values(count);
  for (float& value : values) {
    value = normal(generator);
    if (value == 0.0f) value = 0.5f;
  }
  return values;
}

std::vector<std::byte> Encode(std::span<const float> values, DType dtype) {
  std::vector<std::byte> bytes(values.size() * DTypeSize(dtype));
  for (size_t i = 0; i < values.size(); ++i) {
    if (dtype == DType::kFloat32) {
      std::memcpy(bytes.data() + 4 * i, &values[i], 4);
      continue;
    }
    uint16_t bits =
        dtype == DType::kBFloat16 ? FloatToBFloat16(values[i]) : FloatToFloat16(values[i]);
    if ((bits & 0x7fffu) == 0) bits = dtype == DType::kBFloat16 ? 0x3f00u : 0x3800u;  // 0.5
    std::memcpy(bytes.data() + 2 * i, &bits, 2);
  }
  return bytes;
}

LayerInput MakeRandomLayer(const CacheGeometry& geometry, int64_t num_tokens,
                           int num_window_queries, uint32_t seed, int sequence, int layer) {
  LayerInput input;
  input.sequence = sequence;
  input.layer = layer;
  input.shape.num_tokens = num_tokens;
  input.shape.num_window_queries = num_window_queries;
  const size_t kv_count =
      static_cast<size_t>(geometry.num_kv_heads) * num_tokens * geometry.head_dim;
  const size_t query_count =
      static_cast<size_t>(geometry.num_query_heads) * num_window_queries * geometry.head_dim;
  input.keys = Encode(RandomNormals(kv_count, seed * 3 + 1), geometry.dtype);
  input.values = Encode(RandomNormals(kv_count, seed * 3 + 2), geometry.dtype);
  input.queries = Encode(RandomNormals(query_count, seed * 3 + 3), geometry.dtype);
  return input;
}

void AddRandomScores(LayerInput& input, int num_score_heads, uint32_t seed) {
  input.shape.num_score_heads = num_score_heads;
  input.scores =
      RandomNormals(static_cast<size_t>(num_score_heads) * input.shape.num_tokens, seed * 3 + 7);
}

LayerInput MakeRunLayer(const CacheGeometry& geometry, int64_t num_tokens, int num_window_queries,
                        uint32_t seed, int sequence, int layer) {
  LayerInput input =
      MakeRandomLayer(geometry, num_tokens, num_window_queries, seed, sequence, layer);
  const int dim = geometry.head_dim;
  std::vector<float> keys(static_cast<size_t>(geometry.num_kv_heads) * num_tokens * dim);
  std::mt19937 generator(seed * 7 + 5);
  std::uniform_int_distribution<int> run_length(1, 8);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (int head = 0; head < geometry.num_kv_heads; ++head) {
    std::vector<float> center(dim);
    int64_t run_left = 0;
    for (int64_t j = 0; j < num_tokens; ++j) {
      if (run_left == 0) {
        run_left = run_length(generator);
        for (float& value : center) value = normal(generator);
      }
      --run_left;
      for (int d = 0; d < dim; ++d) {
        keys[ElementIndexHnd(geometry, num_tokens, head, j) + d] =
            center[d] + 0.25f * normal(generator);
      }
    }
  }
  input.keys = Encode(keys, geometry.dtype);
  return input;
}

double KeyAt(const CacheGeometry& geometry, const LayerInput& input, int head, int64_t token,
             int d) {
  const size_t index = ElementIndexHnd(geometry, input.shape.num_tokens, head, token) + d;
  return LoadAsFloat(input.keys.data(), geometry.dtype, index);
}

double ValueAt(const CacheGeometry& geometry, const LayerInput& input, int head, int64_t token,
               int d) {
  const size_t index = ElementIndexHnd(geometry, input.shape.num_tokens, head, token) + d;
  return LoadAsFloat(input.values.data(), geometry.dtype, index);
}

double QueryAt(const CacheGeometry& geometry, const LayerInput& input, int query_head, int query,
               int d) {
  const size_t index = (static_cast<size_t>(query_head) * input.shape.num_window_queries + query) *
                           geometry.head_dim +
                       d;
  return LoadAsFloat(input.queries.data(), geometry.dtype, index);
}

std::span<const std::byte> RowBytes(const CacheGeometry& geometry, const LayerInput& input,
                                    const std::vector<std::byte>& tensor, int head, int64_t token) {
  const size_t element = DTypeSize(geometry.dtype);
  const size_t index = ElementIndexHnd(geometry, input.shape.num_tokens, head, token);
  return std::span<const std::byte>(tensor.data() + index * element,
                                    static_cast<size_t>(geometry.head_dim) * element);
}

std::vector<std::vector<std::vector<double>>> ReferenceWindowAttention(
    const CacheGeometry& geometry, const LayerInput& input, int num_queries) {
  const int64_t num_tokens = input.shape.num_tokens;
  const int num_sent = input.shape.num_window_queries;
  const int group = geometry.num_query_heads / geometry.num_kv_heads;
  std::vector<std::vector<std::vector<double>>> attention(
      geometry.num_query_heads,
      std::vector<std::vector<double>>(num_queries, std::vector<double>(num_tokens)));
  const int dim = geometry.head_dim;
  // Decoded once: keys [H_kv][T·D], queries of the scoring window [H_q][num_queries·D].
  std::vector<std::vector<double>> keys(geometry.num_kv_heads,
                                        std::vector<double>(num_tokens * dim));
  for (int head = 0; head < geometry.num_kv_heads; ++head) {
    for (int64_t j = 0; j < num_tokens; ++j) {
      for (int d = 0; d < dim; ++d) keys[head][j * dim + d] = KeyAt(geometry, input, head, j, d);
    }
  }
  std::vector<std::vector<double>> queries(geometry.num_query_heads,
                                           std::vector<double>(num_queries * dim));
  for (int qh = 0; qh < geometry.num_query_heads; ++qh) {
    for (int i = 0; i < num_queries; ++i) {
      for (int d = 0; d < dim; ++d) {
        queries[qh][i * dim + d] = QueryAt(geometry, input, qh, num_sent - num_queries + i, d);
      }
    }
  }
  for (int qh = 0; qh < geometry.num_query_heads; ++qh) {
    const int head = qh / group;
    for (int i = 0; i < num_queries; ++i) {
      const int64_t position = num_tokens - num_queries + i;
      std::vector<double>& row = attention[qh][i];
      for (int64_t j = 0; j < num_tokens; ++j) {
        double dot = 0;
        for (int d = 0; d < dim; ++d) dot += queries[qh][i * dim + d] * keys[head][j * dim + d];
        row[j] = j <= position ? dot / std::sqrt(static_cast<double>(geometry.head_dim)) : -kInf;
      }
      const double max_logit = *std::max_element(row.begin(), row.end());
      double sum = 0;
      for (double& value : row) {
        value = std::exp(value - max_logit);
        sum += value;
      }
      for (double& value : row) value /= sum;
    }
  }
  return attention;
}

namespace {

std::vector<std::vector<double>> ReferenceSnapKv(const CacheGeometry& geometry,
                                                 const SnapKvOptions& options,
                                                 const LayerInput& input) {
  const int64_t num_tokens = input.shape.num_tokens;
  const int window = std::min(options.window_size, input.shape.num_window_queries);
  const int64_t prefix = num_tokens - window;
  const int group = geometry.num_query_heads / geometry.num_kv_heads;
  const auto attention = ReferenceWindowAttention(geometry, input, window);

  std::vector<std::vector<double>> scores(geometry.num_kv_heads,
                                          std::vector<double>(num_tokens, kInf));
  std::vector<std::vector<double>> pooled(geometry.num_query_heads,
                                          std::vector<double>(prefix, 0.0));
  const int half = options.kernel_size / 2;
  for (int qh = 0; qh < geometry.num_query_heads; ++qh) {
    std::vector<double> mean(prefix, 0.0);
    for (int64_t j = 0; j < prefix; ++j) {
      for (int i = 0; i < window; ++i) mean[j] += attention[qh][i][j];
      mean[j] /= window;
    }
    // Zero-padded prefix, as torch.nn.functional.avg_pool1d / max_pool1d see it.
    std::vector<double> padded(prefix + 2 * half, options.pooling == Pooling::kAvg ? 0.0 : -kInf);
    std::copy(mean.begin(), mean.end(), padded.begin() + half);
    for (int64_t j = 0; j < prefix; ++j) {
      double value = options.pooling == Pooling::kAvg ? 0.0 : -kInf;
      for (int t = 0; t < options.kernel_size; ++t) {
        value = options.pooling == Pooling::kAvg ? value + padded[j + t]
                                                 : std::max(value, padded[j + t]);
      }
      pooled[qh][j] = options.pooling == Pooling::kAvg ? value / options.kernel_size : value;
    }
  }
  for (int head = 0; head < geometry.num_kv_heads; ++head) {
    for (int64_t j = 0; j < prefix; ++j) {
      std::vector<double> members;
      for (int g = 0; g < group; ++g) members.push_back(pooled[head * group + g][j]);
      const double sum = std::accumulate(members.begin(), members.end(), 0.0);
      switch (options.group_reduction) {
        case GroupReduction::kMean:
          scores[head][j] = sum / group;
          break;
        case GroupReduction::kSum:
          scores[head][j] = sum;
          break;
        case GroupReduction::kMax:
          scores[head][j] = *std::max_element(members.begin(), members.end());
          break;
      }
    }
  }
  return scores;
}

std::vector<std::vector<double>> ReferenceObserved(const CacheGeometry& geometry,
                                                   const ObservedOptions& options,
                                                   const LayerInput& input) {
  const int64_t num_tokens = input.shape.num_tokens;
  const int rows = input.shape.num_score_heads;
  const int members = rows == geometry.num_kv_heads ? 1 : rows / geometry.num_kv_heads;
  std::vector<std::vector<double>> scores(geometry.num_kv_heads, std::vector<double>(num_tokens));
  for (int head = 0; head < geometry.num_kv_heads; ++head) {
    for (int64_t j = 0; j < num_tokens; ++j) {
      std::vector<double> group;
      for (int m = 0; m < members; ++m) {
        group.push_back(input.scores[(head * members + m) * num_tokens + j]);
      }
      const double sum = std::accumulate(group.begin(), group.end(), 0.0);
      scores[head][j] = options.group_reduction == GroupReduction::kMean ? sum / members
                        : options.group_reduction == GroupReduction::kSum
                            ? sum
                            : *std::max_element(group.begin(), group.end());
    }
  }
  return scores;
}

std::vector<std::vector<double>> ReferenceTova(const CacheGeometry& geometry,
                                               const LayerInput& input) {
  const int64_t num_tokens = input.shape.num_tokens;
  const auto attention = ReferenceWindowAttention(geometry, input, 1);  // the query at T − 1
  std::vector<double> shared(num_tokens, kInf);
  for (int64_t j = 0; j + 1 < num_tokens; ++j) {
    double sum = 0;
    for (int qh = 0; qh < geometry.num_query_heads; ++qh) sum += attention[qh][0][j];
    shared[j] = sum / geometry.num_query_heads;
  }
  return std::vector<std::vector<double>>(geometry.num_kv_heads, shared);
}

std::vector<std::vector<double>> ReferenceKeyDiff(const CacheGeometry& geometry,
                                                  const LayerInput& input) {
  const int64_t num_tokens = input.shape.num_tokens;
  const int dim = geometry.head_dim;
  std::vector<std::vector<double>> scores(geometry.num_kv_heads, std::vector<double>(num_tokens));
  for (int head = 0; head < geometry.num_kv_heads; ++head) {
    std::vector<std::vector<double>> keys(num_tokens, std::vector<double>(dim));
    std::vector<double> anchor(dim, 0.0);
    for (int64_t j = 0; j < num_tokens; ++j) {
      double norm = 0;
      for (int d = 0; d < dim; ++d) {
        keys[j][d] = KeyAt(geometry, input, head, j, d);
        norm += keys[j][d] * keys[j][d];
      }
      norm = std::sqrt(norm);
      for (int d = 0; d < dim; ++d) anchor[d] += keys[j][d] / norm / num_tokens;
    }
    const double anchor_norm =
        std::sqrt(std::inner_product(anchor.begin(), anchor.end(), anchor.begin(), 0.0));
    for (int64_t j = 0; j < num_tokens; ++j) {
      const double dot = std::inner_product(keys[j].begin(), keys[j].end(), anchor.begin(), 0.0);
      const double norm =
          std::sqrt(std::inner_product(keys[j].begin(), keys[j].end(), keys[j].begin(), 0.0));
      scores[head][j] = -dot / (norm * anchor_norm);
    }
  }
  return scores;
}

}  // namespace

std::vector<std::vector<double>> ReferenceScores(const CacheGeometry& geometry,
                                                 const MethodSpec& spec, const LayerInput& input) {
  const int64_t num_tokens = input.shape.num_tokens;
  std::vector<std::vector<double>> scores;
  if (spec.scorer == ScorerKind::kSnapKv) {
    scores = ReferenceSnapKv(geometry, spec.snapkv, input);
  } else if (spec.scorer == ScorerKind::kObserved) {
    scores = ReferenceObserved(geometry, spec.observed, input);
  } else if (spec.scorer == ScorerKind::kTova) {
    scores = ReferenceTova(geometry, input);
  } else if (spec.scorer == ScorerKind::kKeyDiff) {
    scores = ReferenceKeyDiff(geometry, input);
  } else {
    scores.assign(geometry.num_kv_heads, std::vector<double>(num_tokens));
    for (int head = 0; head < geometry.num_kv_heads; ++head) {
      for (int64_t j = 0; j < num_tokens; ++j) {
        if (spec.scorer == ScorerKind::kKnorm) {
          double squares = 0;
          for (int d = 0; d < geometry.head_dim; ++d) {
            squares += KeyAt(geometry, input, head, j, d) * KeyAt(geometry, input, head, j, d);
          }
          scores[head][j] = -std::sqrt(squares);
        } else {
          scores[head][j] = j < spec.streaming.sinks ? kInf : static_cast<double>(j);
        }
      }
    }
  }
  for (auto& row : scores) {
    for (int64_t j = 0; j < num_tokens; ++j) {
      if (j < spec.protect_sinks || j >= num_tokens - spec.protect_recent) row[j] = kInf;
    }
  }
  return scores;
}

std::vector<int32_t> ReferenceKept(const std::vector<double>& scores, int64_t n) {
  std::vector<int32_t> order(scores.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](int32_t a, int32_t b) { return scores[a] > scores[b]; });
  order.resize(n);
  std::sort(order.begin(), order.end());
  return order;
}

KeptComparison CompareKept(const std::vector<double>& reference_scores, int64_t n,
                           std::span<const int32_t> kept) {
  KeptComparison comparison;
  std::ostringstream failure;
  if (static_cast<int64_t>(kept.size()) != n) {
    failure << "kept " << kept.size() << " tokens, expected " << n;
  } else if (!std::is_sorted(kept.begin(), kept.end()) ||
             std::adjacent_find(kept.begin(), kept.end()) != kept.end()) {
    failure << "kept positions are not strictly ascending";
  } else if (!kept.empty() &&
             (kept.front() < 0 || kept.back() >= static_cast<int32_t>(reference_scores.size()))) {
    failure << "kept position out of range";
  }
  if (!failure.str().empty()) {
    comparison.ok = false;
    comparison.failure = failure.str();
    return comparison;
  }
  const std::vector<int32_t> expected = ReferenceKept(reference_scores, n);
  if (std::equal(expected.begin(), expected.end(), kept.begin(), kept.end())) return comparison;

  // The boundary: the lowest score the reference keeps.
  double boundary = kInf;
  for (int32_t position : expected) boundary = std::min(boundary, reference_scores[position]);
  std::vector<int32_t> differences;
  std::set_symmetric_difference(expected.begin(), expected.end(), kept.begin(), kept.end(),
                                std::back_inserter(differences));
  for (int32_t position : differences) {
    const double score = reference_scores[position];
    const bool near_tie = std::isfinite(boundary) && std::isfinite(score) &&
                          std::abs(score - boundary) <= 1e-6 * std::abs(boundary);
    if (!near_tie) {
      comparison.ok = false;
      failure << "position " << position << " (reference score " << score
              << ") differs from the reference kept set; boundary score " << boundary << ". ";
    }
  }
  comparison.tolerated = static_cast<int64_t>(differences.size()) / 2;
  comparison.failure = failure.str();
  return comparison;
}

double ReferenceAttentionMass(const CacheGeometry& geometry, const LayerInput& input,
                              int num_queries, const std::vector<std::vector<int32_t>>& kept) {
  const auto attention = ReferenceWindowAttention(geometry, input, num_queries);
  const int group = geometry.num_query_heads / geometry.num_kv_heads;
  double total = 0;
  for (int qh = 0; qh < geometry.num_query_heads; ++qh) {
    for (int i = 0; i < num_queries; ++i) {
      for (int32_t j : kept[qh / group]) total += attention[qh][i][j];
    }
  }
  return total / (static_cast<double>(geometry.num_query_heads) * num_queries);
}

absl::StatusOr<LayerResult> CompressLayer(const CacheGeometry& geometry, const MethodSpec& spec,
                                          const LayerInput& input, int64_t tokens_per_head) {
  LayerJob job;
  job.sequence = input.sequence;
  job.layer = input.layer;
  job.input = input.view();
  job.tokens_per_head = tokens_per_head;
  job.keep_all = tokens_per_head >= input.shape.num_tokens;
  LayerResult result;
  const absl::Status status =
      MakeCpuBackend(2)->CompressLayers(geometry, spec, {&job, 1}, {&result, 1});
  if (!status.ok()) return status;
  return result;
}

absl::StatusOr<std::vector<std::vector<float>>> ScoreLayer(const CacheGeometry& geometry,
                                                           const MethodSpec& spec,
                                                           const LayerInput& input) {
  LayerJob job;
  job.input = input.view();
  job.tokens_per_head = 1;
  LayerScores scores;
  const absl::Status status =
      MakeCpuBackend(2)->ScoreLayers(geometry, spec, {&job, 1}, {&scores, 1});
  if (!status.ok()) return status;
  const int64_t num_tokens = input.shape.num_tokens;
  std::vector<std::vector<float>> rows(geometry.num_kv_heads);
  for (int head = 0; head < geometry.num_kv_heads; ++head) {
    rows[head].assign(scores.scores.begin() + head * num_tokens,
                      scores.scores.begin() + (head + 1) * num_tokens);
  }
  return rows;
}

namespace {

float Fp32(double value) { return static_cast<float>(value); }

// CPython's float floor division (Objects/floatobject.c).
double PyFloorDivide(double a, double b) {
  const double mod = std::fmod(a, b);
  double div = (a - mod) / b;
  if (mod != 0 && ((b < 0) != (mod < 0))) div -= 1.0;
  if (div == 0) return std::copysign(0.0, a / b);
  double floor_div = std::floor(div);
  if (div - floor_div > 0.5) floor_div += 1.0;
  return floor_div;
}

}  // namespace

std::vector<int64_t> ReferenceDynamicBudgets(const DynamicLayerScores& scores, int64_t base,
                                             double r_max, int interval) {
  const int layers = static_cast<int>(scores.size());
  const int heads = static_cast<int>(scores[0].size());
  const int64_t prefix = static_cast<int64_t>(scores[0][0].size());
  const int64_t temporary = std::min<int64_t>(static_cast<int64_t>(r_max * base), prefix);
  std::vector<int64_t> cache(layers, temporary);
  for (int u = 0; u < layers; ++u) {
    if (u % interval != interval - 1 && u != layers - 1) continue;
    const int seen = u + 1;
    std::vector<std::tuple<double, int, int, int64_t>> flat;
    for (int l = 0; l < seen; ++l) {
      for (int h = 0; h < heads; ++h) {
        for (int64_t j = 0; j < prefix; ++j) {
          const float s = scores[l][h][j];
          flat.emplace_back(std::isnan(s) ? INFINITY : -static_cast<double>(s), l, h, j);
        }
      }
    }
    std::sort(flat.begin(), flat.end());
    const int64_t top = base * heads * seen;
    std::vector<int64_t> counts(seen, 0);
    for (int64_t i = 0; i < top; ++i) ++counts[std::get<1>(flat[i])];
    for (int64_t& c : counts) c = c / seen;
    int64_t sum = 0;
    for (int64_t c : counts) sum += c;
    if (u == layers - 1) counts.back() += top / layers - sum;
    sum = 0;
    for (int64_t c : counts) sum += c;
    std::vector<int64_t> fixed;
    for (int64_t c : counts) {
      const float t = Fp32(static_cast<double>(Fp32(c)) / Fp32(sum));
      fixed.push_back(static_cast<int64_t>(Fp32(static_cast<double>(Fp32(temporary)) * t)));
    }
    const int64_t need = base * layers;
    int64_t fixed_sum = 0;
    for (int64_t f : fixed) fixed_sum += f;
    const double ratio = static_cast<double>(fixed_sum) / need;
    fixed_sum = 0;
    for (int64_t& f : fixed) {
      f = static_cast<int64_t>(PyFloorDivide(static_cast<double>(f), ratio));
      fixed_sum += f;
    }
    fixed.back() += need - fixed_sum;
    for (int l = 0; l < seen; ++l) cache[l] = std::min(cache[l], std::min(fixed[l], prefix));
  }
  return cache;
}

std::vector<int32_t> KeptOfHead(const LayerResult& result, int head) {
  return std::vector<int32_t>(result.positions.begin() + result.offsets[head],
                              result.positions.begin() + result.offsets[head + 1]);
}

std::vector<double> DecodeRow(const CacheGeometry& geometry, const std::vector<std::byte>& tensor,
                              size_t row) {
  std::vector<double> values(geometry.head_dim);
  for (int d = 0; d < geometry.head_dim; ++d) {
    values[d] = LoadAsFloat(tensor.data(), geometry.dtype, row * geometry.head_dim + d);
  }
  return values;
}

}  // namespace kvcompress::testing
