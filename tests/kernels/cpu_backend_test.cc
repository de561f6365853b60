#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <memory>
#include <numeric>
#include <ostream>
#include <thread>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/backend.h"
#include "tests/kernels/test_layers.h"

namespace kvcompress {
namespace {

struct BackendCase {
  int64_t num_tokens;
  int num_sent;
  int group;
  int head_dim;
  DType dtype;
  Layout layout;
  double keep_ratio = 0.3;
  int num_kv_heads = 2;
  int window_size = 64;
};

std::ostream& operator<<(std::ostream& out, const BackendCase& c) {
  return out << "T=" << c.num_tokens << " sent=" << c.num_sent << " G=" << c.group
             << " D=" << c.head_dim << " " << DTypeName(c.dtype) << " " << LayoutName(c.layout)
             << " keep=" << c.keep_ratio << " H_kv=" << c.num_kv_heads
             << " window=" << c.window_size;
}

CacheGeometry GeometryOf(const BackendCase& c) {
  CacheGeometry geometry;
  geometry.num_layers = 1;
  geometry.num_kv_heads = c.num_kv_heads;
  geometry.num_query_heads = c.num_kv_heads * c.group;
  geometry.head_dim = c.head_dim;
  geometry.dtype = c.dtype;
  geometry.layout = c.layout;
  return geometry;
}

// Checks a result against the reference kept sets and the input rows; returns the number of
// tolerated near-tie swaps.
int64_t ExpectMatchesReference(const CacheGeometry& geometry, const MethodSpec& spec,
                               const LayerInput& input, int64_t n, const LayerResult& result) {
  const auto reference = testing::ReferenceScores(geometry, spec, input);
  const size_t row_bytes = geometry.head_dim * DTypeSize(geometry.dtype);
  const int heads = geometry.num_kv_heads;
  EXPECT_EQ(result.kept, std::vector<int32_t>(heads, static_cast<int32_t>(n)));
  std::vector<int32_t> offsets(heads + 1);
  for (int h = 0; h <= heads; ++h) offsets[h] = static_cast<int32_t>(h * n);
  EXPECT_EQ(result.offsets, offsets);
  EXPECT_EQ(result.positions.size(), static_cast<size_t>(heads * n));
  EXPECT_EQ(result.keys.size(), heads * n * row_bytes);
  EXPECT_EQ(result.values.size(), heads * n * row_bytes);
  EXPECT_TRUE(result.merged.empty());
  int64_t tolerated = 0;
  for (int head = 0; head < heads && !::testing::Test::HasFailure(); ++head) {
    const std::vector<int32_t> kept = testing::KeptOfHead(result, head);
    const auto comparison = testing::CompareKept(reference[head], n, kept);
    EXPECT_TRUE(comparison.ok) << "head " << head << ": " << comparison.failure;
    tolerated += comparison.tolerated;
    for (int64_t row = 0; row < n && comparison.ok; ++row) {
      const size_t at = (offsets[head] + row) * row_bytes;
      const auto key = testing::RowBytes(geometry, input, input.keys, head, kept[row]);
      const auto value = testing::RowBytes(geometry, input, input.values, head, kept[row]);
      if (std::memcmp(result.keys.data() + at, key.data(), row_bytes) != 0 ||
          std::memcmp(result.values.data() + at, value.data(), row_bytes) != 0) {
        ADD_FAILURE() << "head " << head << " row " << row << " differs from the input row";
        break;
      }
    }
  }
  return tolerated;
}

class CpuBackendSnapKvTest : public ::testing::TestWithParam<BackendCase> {
 protected:
  static void TearDownTestSuite() {
    // fp32 rounding may only rarely reorder a reference near-tie at the boundary.
    EXPECT_LE(tolerated_, heads_ / 20) << tolerated_ << " near-tie swaps in " << heads_ << " heads";
    std::printf("SnapKV grid: %lld near-tie swaps in %lld heads\n",
                static_cast<long long>(tolerated_), static_cast<long long>(heads_));
  }
  static inline int64_t tolerated_ = 0;
  static inline int64_t heads_ = 0;
};

TEST_P(CpuBackendSnapKvTest, KeptSetsAndRowsMatchTheReference) {
  const BackendCase& c = GetParam();
  const CacheGeometry geometry = GeometryOf(c);
  MethodSpec spec;
  spec.snapkv.window_size = c.window_size;
  spec.budget.keep_ratio = c.keep_ratio;
  const LayerInput input = testing::MakeRandomLayer(
      geometry, c.num_tokens, c.num_sent, static_cast<uint32_t>(c.num_tokens + c.group * 1000));
  const int64_t n = TokensToKeep(spec.budget, c.num_tokens);
  LayerJob job;
  job.sequence = 3;
  job.layer = 0;
  job.input = input.view();
  job.tokens_per_head = n;
  job.keep_all = n >= c.num_tokens;
  auto backend = MakeCpuBackend(2);
  LayerResult result;
  ASSERT_TRUE(backend->CompressLayers(geometry, spec, {&job, 1}, {&result, 1}).ok());
  EXPECT_EQ(result.sequence, 3);
  tolerated_ += ExpectMatchesReference(geometry, spec, input, n, result);
  heads_ += c.num_kv_heads;
  // The window always survives when the budget covers it.
  const int window = std::min(c.window_size, c.num_sent);
  if (n >= window) {
    for (int head = 0; head < c.num_kv_heads; ++head) {
      const auto kept = testing::KeptOfHead(result, head);
      for (int64_t j = c.num_tokens - window; j < c.num_tokens; ++j) {
        ASSERT_TRUE(std::binary_search(kept.begin(), kept.end(), j)) << j;
      }
    }
  }
}

std::vector<BackendCase> Grid() {
  std::vector<BackendCase> cases;
  const DType dtypes[] = {DType::kFloat16, DType::kBFloat16, DType::kFloat32};
  int index = 0;
  for (int64_t tokens : {1, 2, 63, 64, 65, 733}) {
    for (int group : {1, 4, 8}) {
      const int sent = static_cast<int>(std::min<int64_t>(64, tokens));
      cases.push_back({tokens, sent, group, index % 4 == 3 ? 128 : 64, dtypes[index % 3],
                       index % 2 == 0 ? Layout::kHND : Layout::kNHD});
      ++index;
    }
  }
  // Budgets below, at and above the window; fewer queries sent than the window.
  for (double keep : {0.01, 0.0873, 0.5, 0.9}) {
    cases.push_back({733, 64, 4, 64, DType::kBFloat16, Layout::kNHD, keep});
  }
  cases.push_back({65, 16, 4, 128, DType::kFloat16, Layout::kHND, 0.5});
  cases.push_back({200, 40, 8, 64, DType::kFloat32, Layout::kNHD, 0.25, 1, 8});
  cases.push_back({4099, 64, 4, 64, DType::kBFloat16, Layout::kNHD, 0.2, 1});
  return cases;
}

INSTANTIATE_TEST_SUITE_P(Grid, CpuBackendSnapKvTest, ::testing::ValuesIn(Grid()));

CacheGeometry SmallGeometry() { return GeometryOf({0, 0, 4, 64, DType::kBFloat16, Layout::kHND}); }

TEST(CpuBackendTest, NameIsCpu) { EXPECT_EQ(MakeCpuBackend(1)->name(), "cpu"); }

TEST(CpuBackendTest, BatchesOfJobsWithDifferentLengthsAndScorers) {
  const CacheGeometry geometry = SmallGeometry();
  auto backend = MakeCpuBackend(3);
  for (ScorerKind scorer : {ScorerKind::kSnapKv, ScorerKind::kKnorm, ScorerKind::kStreaming}) {
    MethodSpec spec;
    spec.scorer = scorer;
    std::vector<LayerInput> inputs;
    std::vector<LayerJob> jobs;
    const int64_t lengths[] = {100, 7, 333, 64};
    for (int i = 0; i < 4; ++i) {
      inputs.push_back(testing::MakeRandomLayer(geometry, lengths[i], 5, 50 + i, i, 10 + i));
    }
    for (int i = 0; i < 4; ++i) {
      LayerJob job;
      job.sequence = i;
      job.layer = 10 + i;
      job.input = inputs[i].view();
      job.tokens_per_head = lengths[i] / 3;
      jobs.push_back(job);
    }
    std::vector<LayerResult> results(4);
    ASSERT_TRUE(backend->CompressLayers(geometry, spec, jobs, results).ok());
    for (int i = 0; i < 4; ++i) {
      EXPECT_EQ(results[i].sequence, i);
      EXPECT_EQ(results[i].layer, 10 + i);
      ExpectMatchesReference(geometry, spec, inputs[i], lengths[i] / 3, results[i]);
      EXPECT_GE(results[i].seconds.score, 0.0);
      EXPECT_GE(results[i].seconds.select, 0.0);
      EXPECT_GE(results[i].seconds.gather, 0.0);
    }
    if (scorer == ScorerKind::kSnapKv) {
      EXPECT_GT(results[2].seconds.score, 0.0);
    }
  }
}

TEST(CpuBackendTest, KeepAllReturnsEveryRowInOrder) {
  const CacheGeometry geometry = GeometryOf({0, 0, 2, 64, DType::kFloat16, Layout::kNHD});
  const LayerInput input = testing::MakeRandomLayer(geometry, 50, 8, 2);
  LayerJob job;
  job.input = input.view();
  job.tokens_per_head = 10;
  job.keep_all = true;
  LayerResult result;
  ASSERT_TRUE(
      MakeCpuBackend(2)->CompressLayers(geometry, MethodSpec{}, {&job, 1}, {&result, 1}).ok());
  EXPECT_EQ(result.kept, std::vector<int32_t>({50, 50}));
  EXPECT_EQ(result.offsets, std::vector<int32_t>({0, 50, 100}));
  const size_t row_bytes = 64 * 2;
  for (int head = 0; head < 2; ++head) {
    for (int64_t j = 0; j < 50; ++j) {
      ASSERT_EQ(result.positions[head * 50 + j], j);
      ASSERT_EQ(
          std::memcmp(result.keys.data() + (head * 50 + j) * row_bytes,
                      testing::RowBytes(geometry, input, input.keys, head, j).data(), row_bytes),
          0);
      ASSERT_EQ(
          std::memcmp(result.values.data() + (head * 50 + j) * row_bytes,
                      testing::RowBytes(geometry, input, input.values, head, j).data(), row_bytes),
          0);
    }
  }
  EXPECT_EQ(result.attention_mass_kept, 1.0);
}

TEST(CpuBackendTest, ProtectedTokensAreKeptByEveryScorer) {
  const CacheGeometry geometry = SmallGeometry();
  const LayerInput input = testing::MakeRandomLayer(geometry, 120, 8, 6);
  auto backend = MakeCpuBackend(2);
  for (ScorerKind scorer : {ScorerKind::kSnapKv, ScorerKind::kKnorm, ScorerKind::kStreaming}) {
    MethodSpec spec;
    spec.scorer = scorer;
    spec.streaming.sinks = 0;
    spec.protect_sinks = 5;
    spec.protect_recent = 11;
    LayerJob job;
    job.input = input.view();
    job.tokens_per_head = 30;
    LayerResult result;
    ASSERT_TRUE(backend->CompressLayers(geometry, spec, {&job, 1}, {&result, 1}).ok());
    ExpectMatchesReference(geometry, spec, input, 30, result);
    for (int head = 0; head < 2; ++head) {
      const auto kept = testing::KeptOfHead(result, head);
      for (int32_t j : {0, 1, 2, 3, 4, 109, 119}) {
        EXPECT_TRUE(std::binary_search(kept.begin(), kept.end(), j))
            << ScorerName(scorer) << " head " << head << " position " << j;
      }
    }
    // A budget smaller than the protected set keeps its lowest positions.
    job.tokens_per_head = 7;
    ASSERT_TRUE(backend->CompressLayers(geometry, spec, {&job, 1}, {&result, 1}).ok());
    EXPECT_EQ(testing::KeptOfHead(result, 1), std::vector<int32_t>({0, 1, 2, 3, 4, 109, 110}));
  }
}

TEST(CpuBackendTest, ScoreLayersReturnsTheReferenceScores) {
  const CacheGeometry geometry = SmallGeometry();
  const LayerInput input = testing::MakeRandomLayer(geometry, 90, 12, 9);
  for (ScorerKind scorer : {ScorerKind::kSnapKv, ScorerKind::kKnorm, ScorerKind::kStreaming}) {
    MethodSpec spec;
    spec.scorer = scorer;
    spec.protect_sinks = 2;
    LayerJob job;
    job.sequence = 1;
    job.layer = 4;
    job.input = input.view();
    job.tokens_per_head = 10;
    job.keep_all = true;  // scored all the same
    LayerScores scores;
    ASSERT_TRUE(MakeCpuBackend(2)->ScoreLayers(geometry, spec, {&job, 1}, {&scores, 1}).ok());
    EXPECT_EQ(scores.sequence, 1);
    EXPECT_EQ(scores.layer, 4);
    ASSERT_EQ(scores.scores.size(), 2u * 90);
    const auto reference = testing::ReferenceScores(geometry, spec, input);
    for (int head = 0; head < 2; ++head) {
      for (int j = 0; j < 90; ++j) {
        const double expected = reference[head][j];
        const float got = scores.scores[head * 90 + j];
        if (std::isinf(expected)) {
          ASSERT_EQ(got, static_cast<float>(expected)) << j;
        } else {
          ASSERT_NEAR(got, expected, 2e-7 * std::abs(expected)) << ScorerName(scorer) << j;
        }
      }
    }
  }
}

TEST(CpuBackendTest, ResultsDoNotDependOnThreadsOrConcurrentCallers) {
  const CacheGeometry geometry = GeometryOf({0, 0, 4, 64, DType::kBFloat16, Layout::kNHD, 0.3, 4});
  const LayerInput input = testing::MakeRandomLayer(geometry, 257, 16, 13);
  MethodSpec spec;
  LayerJob job;
  job.input = input.view();
  job.tokens_per_head = 77;
  LayerResult serial;
  ASSERT_TRUE(MakeCpuBackend(1)->CompressLayers(geometry, spec, {&job, 1}, {&serial, 1}).ok());

  auto shared = MakeCpuBackend(3);
  std::vector<std::thread> callers;
  std::vector<LayerResult> results(8);
  std::vector<absl::Status> statuses(8);
  for (int c = 0; c < 8; ++c) {
    callers.emplace_back([&, c] {
      for (int repeat = 0; repeat < 3; ++repeat) {
        statuses[c] = shared->CompressLayers(geometry, spec, {&job, 1}, {&results[c], 1});
      }
    });
  }
  for (std::thread& caller : callers) caller.join();
  for (int c = 0; c < 8; ++c) {
    ASSERT_TRUE(statuses[c].ok()) << statuses[c];
    EXPECT_EQ(results[c].positions, serial.positions);
    EXPECT_EQ(results[c].keys, serial.keys);
    EXPECT_EQ(results[c].values, serial.values);
    EXPECT_EQ(results[c].attention_mass_kept, serial.attention_mass_kept);
  }
}

TEST(CpuBackendTest, RejectsMalformedJobs) {
  const CacheGeometry geometry = SmallGeometry();
  const LayerInput input = testing::MakeRandomLayer(geometry, 20, 0, 1);
  auto backend = MakeCpuBackend(1);
  LayerJob job;
  job.input = input.view();
  job.tokens_per_head = 5;
  std::vector<LayerResult> two(2);
  EXPECT_EQ(backend->CompressLayers(geometry, MethodSpec{}, {&job, 1}, two).code(),
            absl::StatusCode::kInvalidArgument);
  LayerResult result;
  // snapkv without window queries.
  const absl::Status status =
      backend->CompressLayers(geometry, MethodSpec{}, {&job, 1}, {&result, 1});
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(status.message().find("window queries"), std::string::npos) << status;
}

}  // namespace
}  // namespace kvcompress
