// Kept-token heatmaps: binning arithmetic, validation, and the picture of a kept set whose
// shape is known — StreamingLLM run by the CPU engine keeps the sinks and the most recent
// tokens, so the first and last columns must be bright and everything between dark.
#include "client/kept_heatmap.h"

#include <memory>
#include <random>
#include <vector>

#include "client/synthetic_cache.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kernels/backend.h"
#include "kernels/compression_pipeline.h"
#include "kernels/method_spec.h"

namespace kvcompress {
namespace {

using ::testing::HasSubstr;

// A ragged result with the given kept positions per head.
LayerResult Result(int layer, const std::vector<std::vector<int32_t>>& heads) {
  LayerResult result;
  result.layer = layer;
  result.offsets.push_back(0);
  for (const std::vector<int32_t>& positions : heads) {
    result.kept.push_back(static_cast<int32_t>(positions.size()));
    result.offsets.push_back(result.offsets.back() + result.kept.back());
    result.positions.insert(result.positions.end(), positions.begin(), positions.end());
  }
  return result;
}

TEST(KeptHeatmapTest, ColumnsPartitionTheTokens) {
  std::mt19937 rng(11);
  for (int trial = 0; trial < 200; ++trial) {
    const int64_t tokens = 1 + rng() % 5000;
    const int columns = 1 + rng() % 1100;
    KeptFractions f;
    f.num_tokens = tokens;
    f.num_columns = static_cast<int>(std::min<int64_t>(tokens, columns));
    EXPECT_EQ(f.ColumnStart(0), 0);
    EXPECT_EQ(f.ColumnStart(f.num_columns), tokens);
    for (int c = 0; c < f.num_columns; ++c) {
      const int64_t size = f.ColumnStart(c + 1) - f.ColumnStart(c);
      ASSERT_GE(size, tokens / f.num_columns);
      ASSERT_LE(size, (tokens + f.num_columns - 1) / f.num_columns);
      ASSERT_EQ(f.ColumnOf(f.ColumnStart(c)), c);
      ASSERT_EQ(f.ColumnOf(f.ColumnStart(c + 1) - 1), c);
    }
  }
}

TEST(KeptHeatmapTest, FractionsCountTokensPerColumn) {
  // T = 10 in 4 columns: [0, 3) [3, 5) [5, 8) [8, 10).
  const std::vector<LayerResult> layers = {Result(0, {{0, 1, 2, 9}, {3, 5, 6}})};
  absl::StatusOr<KeptFractions> f = BinKeptPositions(layers, 10, 4);
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_EQ(f->num_columns, 4);
  EXPECT_EQ(f->num_heads, 2);
  EXPECT_FLOAT_EQ(f->At(0, 0, 0), 1.0f);
  EXPECT_FLOAT_EQ(f->At(0, 0, 1), 0.0f);
  EXPECT_FLOAT_EQ(f->At(0, 0, 2), 0.0f);
  EXPECT_FLOAT_EQ(f->At(0, 0, 3), 0.5f);
  EXPECT_FLOAT_EQ(f->At(0, 1, 0), 0.0f);
  EXPECT_FLOAT_EQ(f->At(0, 1, 1), 0.5f);
  EXPECT_FLOAT_EQ(f->At(0, 1, 2), 2.0f / 3.0f);
  EXPECT_FLOAT_EQ(f->At(0, 1, 3), 0.0f);

  // Fewer tokens than columns: one column per token.
  absl::StatusOr<KeptFractions> small = BinKeptPositions(layers, 10, 1024);
  ASSERT_TRUE(small.ok());
  EXPECT_EQ(small->num_columns, 10);
  EXPECT_FLOAT_EQ(small->At(0, 0, 9), 1.0f);
  EXPECT_FLOAT_EQ(small->At(0, 0, 8), 0.0f);
}

TEST(KeptHeatmapTest, DamagedResultsAreRejectedWithTheirLayerAndHead) {
  auto error = [](std::vector<LayerResult> layers, int64_t tokens) {
    absl::StatusOr<KeptFractions> f = BinKeptPositions(layers, tokens, 16);
    EXPECT_EQ(f.status().code(), absl::StatusCode::kInvalidArgument);
    return std::string(f.status().message());
  };
  EXPECT_THAT(error({Result(0, {{1, 2}}), Result(1, {{0, 10}})}, 10),
              HasSubstr("layer 1: head 0 row 1: position 10"));
  EXPECT_THAT(error({Result(0, {{0}, {3, 3}})}, 10), HasSubstr("layer 0: head 1"));
  EXPECT_THAT(error({Result(0, {{-1}})}, 10), HasSubstr("position -1"));
  EXPECT_THAT(error({Result(0, {{0}, {1}}), Result(1, {{0}})}, 10), HasSubstr("layer 1: kept"));
  LayerResult short_positions = Result(0, {{0, 1}});
  short_positions.positions.pop_back();
  EXPECT_THAT(error({short_positions}, 10), HasSubstr("positions has 1 entries, expected 2"));
  EXPECT_THAT(error({}, 10), HasSubstr("no layers"));
  EXPECT_THAT(error({Result(0, {{0}})}, 0), HasSubstr("num_tokens 0"));
}

TEST(KeptHeatmapTest, ViridisEndsAndMonotoneLightness) {
  EXPECT_EQ(ViridisColor(0.0), (Rgb{68, 1, 84}));
  EXPECT_EQ(ViridisColor(1.0), (Rgb{253, 231, 37}));
  EXPECT_EQ(ViridisColor(-3.0), ViridisColor(0.0));
  EXPECT_EQ(ViridisColor(7.0), ViridisColor(1.0));
  // Brighter with the fraction: dark means dropped, bright means kept.
  double previous = -1;
  for (int i = 0; i <= 100; ++i) {
    const Rgb c = ViridisColor(i / 100.0);
    const double luma = 0.2126 * c.r + 0.7152 * c.g + 0.0722 * c.b;
    EXPECT_GT(luma, previous) << i;
    previous = luma;
  }
}

// StreamingLLM through the CPU engine on a synthetic cache: a budget of 260 tokens is the 4
// sinks and the 256 most recent tokens of T = 4096 (binned 4 tokens per column).
std::vector<LayerResult> StreamingResults(int num_layers, int num_heads, int64_t tokens) {
  SyntheticCacheOptions options;
  options.num_layers = num_layers;
  options.num_kv_heads = num_heads;
  options.num_query_heads = num_heads;
  options.head_dim = 16;
  options.num_tokens = tokens;
  options.num_window_queries = 0;
  options.outlier_channel_pairs = 1;
  absl::StatusOr<SyntheticCache> cache = GenerateSyntheticCache(options);
  EXPECT_TRUE(cache.ok()) << cache.status();
  MethodSpec spec;
  spec.scorer = ScorerKind::kStreaming;
  spec.streaming.sinks = 4;
  spec.budget.use_ratio = false;
  spec.budget.keep_tokens = 260;
  std::unique_ptr<Backend> backend = MakeCpuBackend(2);
  auto pipeline = CompressionPipeline::Create(backend.get(), cache->geometry, spec, {cache->shape});
  EXPECT_TRUE(pipeline.ok()) << pipeline.status();
  std::vector<LayerResult> results;
  for (LayerInput& layer : cache->layers) {
    auto done = (*pipeline)->AddLayer(std::move(layer));
    EXPECT_TRUE(done.ok()) << done.status();
    for (LayerResult& result : *done) results.push_back(std::move(result));
  }
  return results;
}

TEST(KeptHeatmapTest, StreamingIsBrightAtBothEndsAndDarkBetween) {
  constexpr int kLayers = 32, kHeads = 8;
  constexpr int64_t kTokens = 4096;
  const std::vector<LayerResult> results = StreamingResults(kLayers, kHeads, kTokens);
  ASSERT_EQ(results.size(), size_t{kLayers});
  absl::StatusOr<KeptHeatmap> map = RenderKeptHeatmap(results, kTokens, {.title = "streaming"});
  ASSERT_TRUE(map.ok()) << map.status();
  ASSERT_EQ(map->fractions.num_columns, 1024);
  // 32 × 8 rows get the 3-px rows that keep every head visible in an ~800-px plot.
  EXPECT_EQ(map->row_pixels, 3);
  EXPECT_EQ(map->layer_gap_pixels, 1);
  EXPECT_EQ(map->plot_height(), 32 * (8 * 3 + 1) - 1);
  EXPECT_LE(map->plot_left + map->plot_width(), map->image.width());
  EXPECT_LE(map->plot_top + map->plot_height(), map->image.height());

  const Rgb kept = ViridisColor(1.0), dropped = ViridisColor(0.0);
  // Recent tokens 3840..4095 are columns 960..1023; column 0 holds the 4 sinks.
  for (int l = 0; l < kLayers; ++l) {
    for (int h = 0; h < kHeads; ++h) {
      for (int dy = 0; dy < map->row_pixels; ++dy) {
        const int y = map->RowTop(l, h) + dy;
        ASSERT_EQ(map->image.At(map->ColumnLeft(0), y), kept) << l << "/" << h;
        for (int c : {1, 2, 500, 958, 959}) {
          ASSERT_EQ(map->image.At(map->ColumnLeft(c), y), dropped) << l << "/" << h << " " << c;
        }
        for (int c : {960, 961, 1023}) {
          ASSERT_EQ(map->image.At(map->ColumnLeft(c), y), kept) << l << "/" << h << " " << c;
        }
      }
    }
  }
  // The gap between layers is background, not data.
  for (int l = 0; l + 1 < kLayers; ++l) {
    const int gap = map->RowTop(l, kHeads - 1) + map->row_pixels;
    EXPECT_EQ(map->image.At(map->ColumnLeft(0), gap), kWhite);
    EXPECT_EQ(gap + 1, map->RowTop(l + 1, 0));
  }
  // Annotations drew something dark in the margins (title above, axis below).
  auto has_ink = [&](int y0, int y1) {
    for (int y = y0; y < y1; ++y) {
      for (int x = 0; x < map->image.width(); ++x) {
        const Rgb c = map->image.At(x, y);
        if (c.r < 100 && c.g < 100 && c.b < 100) return true;
      }
    }
    return false;
  };
  EXPECT_TRUE(has_ink(0, map->plot_top));
  EXPECT_TRUE(has_ink(map->plot_top + map->plot_height(), map->image.height()));
}

TEST(KeptHeatmapTest, BarePlotHasNoMarginsAndHonoursRowPixels) {
  const std::vector<LayerResult> layers = {Result(0, {{0, 1}, {7}}), Result(1, {{3}, {4, 5}})};
  absl::StatusOr<KeptHeatmap> map =
      RenderKeptHeatmap(layers, 8, {.row_pixels = 5, .annotate = false});
  ASSERT_TRUE(map.ok()) << map.status();
  // 8 tokens, 1 per column, widened to 64 px per column to reach the 512-px minimum.
  EXPECT_EQ(map->column_pixels, 64);
  EXPECT_EQ(map->image.width(), 512);
  EXPECT_EQ(map->image.height(), 2 * (2 * 5) + 1);
  EXPECT_EQ(map->image.At(0, 0), ViridisColor(1.0));
  EXPECT_EQ(map->image.At(64 * 7, 5), ViridisColor(1.0));  // layer 0 head 1, token 7
  EXPECT_EQ(map->image.At(64 * 6, 5), ViridisColor(0.0));
  EXPECT_EQ(map->image.At(0, 10), kWhite);                       // the layer gap
  EXPECT_EQ(map->image.At(64 * 3 + 63, 11), ViridisColor(1.0));  // layer 1 head 0, token 3

  EXPECT_EQ(RenderKeptHeatmap(layers, 8, {.row_pixels = 300}).status().code(),
            absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace kvcompress
