#include "client/synthetic_cache.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <set>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kernels/dtype.h"

namespace kvcompress {
namespace {

SyntheticCacheOptions SmallOptions() {
  SyntheticCacheOptions options;
  options.num_layers = 4;
  options.num_kv_heads = 2;
  options.num_query_heads = 8;
  options.head_dim = 64;
  options.num_tokens = 1024;
  options.num_window_queries = 32;
  options.seed = 42;
  return options;
}

float Load(const std::vector<std::byte>& bytes, DType dtype, size_t index) {
  return LoadAsFloat(bytes.data(), dtype, index);
}

TEST(SyntheticCacheTest, ShapesAndSizes) {
  for (DType dtype : {DType::kFloat16, DType::kBFloat16, DType::kFloat32}) {
    SyntheticCacheOptions options = SmallOptions();
    options.dtype = dtype;
    auto cache = GenerateSyntheticCache(options);
    ASSERT_TRUE(cache.ok()) << cache.status();
    EXPECT_EQ(cache->geometry.num_layers, 4);
    EXPECT_EQ(cache->geometry.num_kv_heads, 2);
    EXPECT_EQ(cache->geometry.num_query_heads, 8);
    EXPECT_EQ(cache->geometry.head_dim, 64);
    EXPECT_EQ(cache->geometry.dtype, dtype);
    EXPECT_EQ(cache->geometry.layout, Layout::kHND);
    EXPECT_EQ(cache->shape.num_tokens, 1024);
    EXPECT_EQ(cache->shape.num_window_queries, 32);
    ASSERT_EQ(cache->layers.size(), 4u);
    for (int l = 0; l < 4; ++l) {
      const LayerInput& layer = cache->layers[l];
      EXPECT_EQ(layer.layer, l);
      EXPECT_EQ(layer.keys.size(), 2u * 1024 * 64 * DTypeSize(dtype));
      EXPECT_EQ(layer.values.size(), layer.keys.size());
      EXPECT_EQ(layer.queries.size(), 8u * 32 * 64 * DTypeSize(dtype));
      EXPECT_TRUE(layer.scores.empty());
      ASSERT_EQ(cache->salient_positions[l].size(), 2u);
      for (const auto& positions : cache->salient_positions[l]) {
        EXPECT_EQ(positions.size(), 16u);
        EXPECT_TRUE(std::is_sorted(positions.begin(), positions.end()));
        EXPECT_GE(positions.front(), options.num_sinks);
        EXPECT_LT(positions.back(), 1024 - 32);
      }
    }
  }
}

TEST(SyntheticCacheTest, DeterministicBySeedAndThreadCount) {
  SyntheticCacheOptions options = SmallOptions();
  options.num_threads = 1;
  auto a = GenerateSyntheticCache(options);
  options.num_threads = 3;
  auto b = GenerateSyntheticCache(options);
  options.seed = 43;
  auto c = GenerateSyntheticCache(options);
  ASSERT_TRUE(a.ok() && b.ok() && c.ok());
  for (int l = 0; l < 4; ++l) {
    EXPECT_EQ(a->layers[l].keys, b->layers[l].keys);
    EXPECT_EQ(a->layers[l].values, b->layers[l].values);
    EXPECT_EQ(a->layers[l].queries, b->layers[l].queries);
    EXPECT_NE(a->layers[l].keys, c->layers[l].keys);
    EXPECT_NE(a->layers[l].values, c->layers[l].values);
    EXPECT_NE(a->layers[l].queries, c->layers[l].queries);
  }
  EXPECT_EQ(a->salient_positions, b->salient_positions);
}

TEST(SyntheticCacheTest, NoZeroRowsAndFiniteValues) {
  auto cache = GenerateSyntheticCache(SmallOptions());
  ASSERT_TRUE(cache.ok());
  const DType dtype = cache->geometry.dtype;
  const int d = cache->geometry.head_dim;
  for (const LayerInput& layer : cache->layers) {
    for (const auto* tensor : {&layer.keys, &layer.values, &layer.queries}) {
      const size_t rows = tensor->size() / (d * DTypeSize(dtype));
      for (size_t r = 0; r < rows; ++r) {
        double sum_sq = 0;
        for (int c = 0; c < d; ++c) {
          const float x = Load(*tensor, dtype, r * d + c);
          ASSERT_TRUE(std::isfinite(x));
          sum_sq += x * x;
        }
        ASSERT_GT(sum_sq, 1e-3) << "row " << r;
      }
    }
  }
}

TEST(SyntheticCacheTest, OutlierChannelPairsDominateKeyMagnitude) {
  auto cache = GenerateSyntheticCache(SmallOptions());
  ASSERT_TRUE(cache.ok());
  const int d = 64, half = 32;
  const int64_t t = 1024;
  for (int l = 0; l < 4; ++l) {
    for (int h = 0; h < 2; ++h) {
      // RoPE turns channel i into i + D/2, so measure the RMS of each rotary pair.
      std::vector<double> pair_rms(half, 0.0);
      for (int64_t tok = 0; tok < t; ++tok) {
        for (int i = 0; i < half; ++i) {
          const size_t base = (static_cast<size_t>(h) * t + tok) * d;
          const float x = Load(cache->layers[l].keys, DType::kBFloat16, base + i);
          const float y = Load(cache->layers[l].keys, DType::kBFloat16, base + i + half);
          pair_rms[i] += x * x + y * y;
        }
      }
      for (double& v : pair_rms) v = std::sqrt(v / t);
      std::vector<double> sorted = pair_rms;
      std::sort(sorted.begin(), sorted.end());
      const double median = sorted[half / 2];
      const auto& outliers = cache->outlier_channels[l][h];
      ASSERT_EQ(outliers.size(), 4u);  // 2 pairs, both halves
      for (int c : outliers) {
        const int pair = c % half;
        EXPECT_GT(pair_rms[pair], 4.0 * median) << "layer " << l << " head " << h;
      }
    }
  }
}

// Reference SnapKV over one layer (fp32, plain loops): window attention with the causal
// mask inside the window, averaged over the window queries, avg-pooled (kernel 5) over the
// prefix, mean over the group; keeps the top n − W prefix tokens plus the window per head.
// Returns the attention mass kept, averaged over query heads and window queries.
struct SnapKvCheck {
  double mass_kept = 0;
  double mass_on_targets = 0;  // sinks + salient tokens
};

SnapKvCheck ReferenceSnapKv(const SyntheticCache& cache, int l, double keep_ratio) {
  const CacheGeometry& g = cache.geometry;
  const int64_t t = cache.shape.num_tokens;
  const int w = cache.shape.num_window_queries;
  const int d = g.head_dim;
  const int group = g.num_query_heads / g.num_kv_heads;
  const int64_t prefix = t - w;
  const int64_t n = static_cast<int64_t>(std::floor(t * keep_ratio));
  const LayerInput& layer = cache.layers[l];
  SnapKvCheck check;
  for (int h = 0; h < g.num_kv_heads; ++h) {
    std::vector<std::vector<double>> attention(group * w);  // [G·W][T]
    std::vector<double> score(prefix, 0.0);
    for (int gi = 0; gi < group; ++gi) {
      const int qh = h * group + gi;
      std::vector<double> mean(prefix, 0.0);
      for (int i = 0; i < w; ++i) {
        const int64_t limit = prefix + i + 1;
        std::vector<double> logits(limit);
        double top = -1e300;
        for (int64_t j = 0; j < limit; ++j) {
          double dot = 0;
          for (int c = 0; c < d; ++c) {
            dot += Load(layer.queries, g.dtype, (static_cast<size_t>(qh) * w + i) * d + c) *
                   Load(layer.keys, g.dtype, (static_cast<size_t>(h) * t + j) * d + c);
          }
          logits[j] = dot / std::sqrt(static_cast<double>(d));
          top = std::max(top, logits[j]);
        }
        double sum = 0;
        for (double& x : logits) sum += (x = std::exp(x - top));
        for (double& x : logits) x /= sum;
        for (int64_t j = 0; j < prefix; ++j) mean[j] += logits[j] / w;
        logits.resize(t, 0.0);
        attention[gi * w + i] = std::move(logits);
      }
      for (int64_t j = 0; j < prefix; ++j) {
        double pooled = 0;
        for (int64_t k = j - 2; k <= j + 2; ++k) {
          if (k >= 0 && k < prefix) pooled += mean[k];
        }
        score[j] += pooled / 5.0 / group;
      }
    }
    std::vector<int64_t> order(prefix);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(),
                     [&](int64_t a, int64_t b) { return score[a] > score[b]; });
    std::vector<bool> kept(t, false);
    for (int64_t k = 0; k < std::max<int64_t>(0, n - w); ++k) kept[order[k]] = true;
    for (int64_t j = prefix; j < t; ++j) kept[j] = true;
    std::vector<bool> target(t, false);
    for (int s = 0; s < 4; ++s) target[s] = true;
    for (int64_t p : cache.salient_positions[l][h]) target[p] = true;
    for (const auto& row : attention) {
      for (int64_t j = 0; j < t; ++j) {
        if (kept[j]) check.mass_kept += row[j];
        if (target[j]) check.mass_on_targets += row[j];
      }
    }
  }
  const double rows = static_cast<double>(g.num_query_heads) * w;
  check.mass_kept /= rows;
  check.mass_on_targets /= rows;
  return check;
}

TEST(SyntheticCacheTest, WindowQueriesGiveSnapKvRealSignal) {
  SyntheticCacheOptions options = SmallOptions();
  auto cache = GenerateSyntheticCache(options);
  ASSERT_TRUE(cache.ok());
  double total_mass_kept = 0;
  for (int l = 0; l < options.num_layers; ++l) {
    const SnapKvCheck check = ReferenceSnapKv(*cache, l, 0.1);
    // 20 targets out of 1024 tokens (2%) draw a large share of the attention ...
    EXPECT_GT(check.mass_on_targets, l == 0 ? 0.05 : 0.3) << "layer " << l;
    // ... so keeping 10% of the tokens keeps far more than 10% of the attention (layer 0
    // is diffuse on purpose, as in real models).
    EXPECT_GT(check.mass_kept, l == 0 ? 0.15 : 0.45) << "layer " << l;
    EXPECT_LT(check.mass_kept, 1.0);
    total_mass_kept += check.mass_kept;
    std::printf("layer %d: attention on sinks+salient %.3f, SnapKV keep 0.1 mass kept %.3f\n", l,
                check.mass_on_targets, check.mass_kept);
  }
  EXPECT_GT(total_mass_kept / options.num_layers, 0.5);
}

TEST(SyntheticCacheTest, RejectsBadOptions) {
  SyntheticCacheOptions options = SmallOptions();
  options.head_dim = 63;
  EXPECT_THAT(GenerateSyntheticCache(options).status().message(),
              ::testing::HasSubstr("head_dim = 63"));
  options = SmallOptions();
  options.num_query_heads = 5;
  EXPECT_EQ(GenerateSyntheticCache(options).status().code(), absl::StatusCode::kInvalidArgument);
  options = SmallOptions();
  options.num_window_queries = 2000;
  EXPECT_EQ(GenerateSyntheticCache(options).status().code(), absl::StatusCode::kInvalidArgument);
  options = SmallOptions();
  options.num_tokens = 30;
  options.num_window_queries = 10;
  options.salient_tokens_per_head = 17;  // 30 − 10 − 4 sinks = 16 free
  EXPECT_THAT(GenerateSyntheticCache(options).status().message(),
              ::testing::HasSubstr("salient_tokens_per_head = 17"));
  options.salient_tokens_per_head = 16;
  EXPECT_TRUE(GenerateSyntheticCache(options).ok());
  options.num_window_queries = 0;
  auto no_queries = GenerateSyntheticCache(options);
  ASSERT_TRUE(no_queries.ok());
  EXPECT_TRUE(no_queries->layers[0].queries.empty());
}

}  // namespace
}  // namespace kvcompress
