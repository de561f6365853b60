#include "kernels/cpu/internal/streaming_scorer.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/backend.h"
#include "tests/kernels/test_layers.h"

namespace kvcompress {
namespace {

TEST(StreamingScorerTest, SinksAreInfiniteOthersScoreTheirPosition) {
  std::vector<float> scores(7);
  cpu::ScoreStreaming(3, scores);
  for (int j = 0; j < 3; ++j) EXPECT_TRUE(std::isinf(scores[j]) && scores[j] > 0);
  for (int j = 3; j < 7; ++j) EXPECT_EQ(scores[j], static_cast<float>(j));
  cpu::ScoreStreaming(0, scores);
  EXPECT_EQ(scores[0], 0.0f);
  cpu::ScoreStreaming(100, scores);
  EXPECT_TRUE(std::all_of(scores.begin(), scores.end(), [](float s) { return std::isinf(s); }));
}

// Through the backend: the first min(sinks, n) tokens and the n − that most recent ones.
TEST(StreamingScorerTest, BackendKeepsSinksAndTheMostRecent) {
  auto backend = MakeCpuBackend(3);
  CacheGeometry geometry;
  geometry.num_layers = 1;
  geometry.num_kv_heads = 3;
  geometry.num_query_heads = 6;
  geometry.head_dim = 64;
  geometry.dtype = DType::kFloat16;
  geometry.layout = Layout::kNHD;
  for (int64_t tokens : {1, 2, 63, 64, 65, 733}) {
    const LayerInput input = testing::MakeRandomLayer(geometry, tokens, 0, 8);
    for (int sinks : {0, 1, 4, 100}) {
      for (int64_t n : {int64_t{1}, int64_t{3}, tokens / 2, tokens - 1}) {
        if (n < 1 || n >= tokens) continue;
        MethodSpec spec;
        spec.scorer = ScorerKind::kStreaming;
        spec.streaming.sinks = sinks;
        LayerJob job;
        job.input = input.view();
        job.tokens_per_head = n;
        LayerResult result;
        ASSERT_TRUE(backend->CompressLayers(geometry, spec, {&job, 1}, {&result, 1}).ok());
        std::vector<int32_t> expected;
        const int64_t num_sinks = std::min<int64_t>(sinks, n);
        for (int64_t j = 0; j < num_sinks; ++j) expected.push_back(static_cast<int32_t>(j));
        for (int64_t j = tokens - (n - num_sinks); j < tokens; ++j) {
          expected.push_back(static_cast<int32_t>(j));
        }
        for (int head = 0; head < 3; ++head) {
          EXPECT_EQ(testing::KeptOfHead(result, head), expected)
              << "T=" << tokens << " sinks=" << sinks << " n=" << n;
        }
      }
    }
  }
}

}  // namespace
}  // namespace kvcompress
