#include "kernels/compression_pipeline.h"

#include <algorithm>
#include <atomic>
#include <memory>
#include <set>
#include <thread>
#include <utility>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "gtest/gtest.h"
#include "tests/kernels/test_layers.h"

namespace kvcompress {
namespace {

using ::kvcompress::testing::KeptOfHead;
using ::kvcompress::testing::MakeRandomLayer;
using ::kvcompress::testing::ReferenceKept;
using ::kvcompress::testing::ReferenceScores;
namespace testing = ::kvcompress::testing;

CacheGeometry SmallGeometry() {
  CacheGeometry geometry;
  geometry.num_layers = 4;
  geometry.num_kv_heads = 2;
  geometry.num_query_heads = 8;
  geometry.head_dim = 64;
  geometry.dtype = DType::kBFloat16;
  geometry.layout = Layout::kHND;
  return geometry;
}

MethodSpec KnormSpec(double keep_ratio) {
  MethodSpec spec;
  spec.scorer = ScorerKind::kKnorm;
  spec.budget.keep_ratio = keep_ratio;
  return spec;
}

class CompressionPipelineTest : public ::testing::Test {
 protected:
  std::unique_ptr<CompressionPipeline> MakePipeline(const MethodSpec& spec,
                                                    std::vector<SequenceShape> sequences) {
    auto pipeline =
        CompressionPipeline::Create(backend_.get(), geometry_, spec, std::move(sequences));
    EXPECT_TRUE(pipeline.ok()) << pipeline.status();
    return pipeline.ok() ? std::move(pipeline).value() : nullptr;
  }

  const CacheGeometry geometry_ = SmallGeometry();
  std::unique_ptr<Backend> backend_ = MakeCpuBackend(2);
};

TEST_F(CompressionPipelineTest, CompressesOneLayerWithTheUniformBudget) {
  const MethodSpec spec = KnormSpec(0.29);
  auto pipeline = MakePipeline(spec, {{100, 0, 0}, {37, 0, 0}});
  ASSERT_NE(pipeline, nullptr);
  EXPECT_EQ(pipeline->LayerTokenBudget(0, 100), 29);
  EXPECT_EQ(pipeline->LayerTokenBudget(0, 37), 10);

  LayerInput input = MakeRandomLayer(geometry_, 100, 0, /*seed=*/11, /*sequence=*/0, /*layer=*/2);
  const auto reference = ReferenceScores(geometry_, spec, input);
  auto results = pipeline->AddLayer(std::move(input));
  ASSERT_TRUE(results.ok()) << results.status();
  ASSERT_EQ(results->size(), 1u);
  const LayerResult& result = (*results)[0];
  EXPECT_EQ(result.sequence, 0);
  EXPECT_EQ(result.layer, 2);
  EXPECT_EQ(result.kept, std::vector<int32_t>({29, 29}));
  EXPECT_EQ(result.offsets, std::vector<int32_t>({0, 29, 58}));
  for (int head = 0; head < 2; ++head) {
    EXPECT_EQ(KeptOfHead(result, head), ReferenceKept(reference[head], 29)) << "head " << head;
  }
  EXPECT_EQ(result.attention_mass_kept, -1.0);
}

TEST_F(CompressionPipelineTest, SkippedLayersAndFullBudgetsKeepEverything) {
  MethodSpec spec = KnormSpec(0.5);
  spec.skip_layers = {1};
  auto pipeline = MakePipeline(spec, {{50, 0, 0}, {1, 0, 0}});
  ASSERT_NE(pipeline, nullptr);
  EXPECT_EQ(pipeline->LayerTokenBudget(1, 50), 50);
  EXPECT_EQ(pipeline->LayerTokenBudget(0, 50), 25);
  EXPECT_EQ(pipeline->LayerTokenBudget(0, 1), 1);

  auto skipped = pipeline->AddLayer(MakeRandomLayer(geometry_, 50, 0, 3, 0, 1));
  ASSERT_TRUE(skipped.ok()) << skipped.status();
  EXPECT_EQ((*skipped)[0].kept, std::vector<int32_t>({50, 50}));
  EXPECT_EQ(KeptOfHead((*skipped)[0], 1)[49], 49);

  // T = 1: n = 1 ≥ T, the layer comes back whole.
  auto single = pipeline->AddLayer(MakeRandomLayer(geometry_, 1, 0, 4, 1, 0));
  ASSERT_TRUE(single.ok()) << single.status();
  EXPECT_EQ((*single)[0].kept, std::vector<int32_t>({1, 1}));
}

// PyramidKV through the pipeline: T = 1000, W = min(64, 16 sent) = 16, keep 0.5, L = 4:
// C − W = 500, min 25, max 975 (< T − W = 984), steps 950/3 → 975, 658, 342, 25 (Σ = 4·500).
TEST_F(CompressionPipelineTest, PyramidBudgetsShrinkWithDepthAndKeepTheReferenceSets) {
  MethodSpec spec;
  spec.layer_budget = LayerBudgetKind::kPyramid;
  spec.budget.keep_ratio = 0.5;
  const SequenceShape shape{1000, 16, 0};
  auto pipeline = MakePipeline(spec, {shape});
  ASSERT_NE(pipeline, nullptr);
  const int64_t expected[] = {975, 658, 342, 25};
  // Without window queries W = window_size = 64: max 975 ≥ T − W, so max = 936, min = 64,
  // steps 872/3.
  const int64_t without_queries[] = {936, 645, 355, 64};
  for (int layer = 0; layer < 4; ++layer) {
    EXPECT_EQ(pipeline->LayerTokenBudget(layer, shape), expected[layer]) << layer;
    EXPECT_EQ(pipeline->LayerTokenBudget(layer, 1000), without_queries[layer]) << layer;
  }
  // keep 0.1 with W = 16: min = 100/20 = 5 < W, the uniform fallback for every layer.
  MethodSpec small = spec;
  small.budget.keep_ratio = 0.1;
  auto fallback = MakePipeline(small, {shape});
  ASSERT_NE(fallback, nullptr);
  for (int layer = 0; layer < 4; ++layer) EXPECT_EQ(fallback->LayerTokenBudget(layer, shape), 100);
  for (int layer = 0; layer < 4; ++layer) {
    LayerInput input = MakeRandomLayer(geometry_, 1000, 16, 60 + layer, 0, layer);
    const auto reference = ReferenceScores(geometry_, spec, input);
    auto results = pipeline->AddLayer(std::move(input));
    ASSERT_TRUE(results.ok()) << results.status();
    ASSERT_EQ(results->size(), 1u);
    const LayerResult& result = (*results)[0];
    EXPECT_FALSE(result.deferred);
    for (int head = 0; head < 2; ++head) {
      const auto comparison =
          testing::CompareKept(reference[head], expected[layer], KeptOfHead(result, head));
      EXPECT_TRUE(comparison.ok) << "layer " << layer << " head " << head << ": "
                                 << comparison.failure;
    }
  }

  // A skipped layer stays whole; keep_tokens stands for T·keep.
  spec.skip_layers = {2};
  spec.budget.use_ratio = false;
  spec.budget.keep_tokens = 500;
  pipeline = MakePipeline(spec, {shape});
  ASSERT_NE(pipeline, nullptr);
  EXPECT_EQ(pipeline->LayerTokenBudget(1, shape), 658);
  EXPECT_EQ(pipeline->LayerTokenBudget(2, shape), 1000);
  EXPECT_EQ(pipeline->LayerTokenBudget(3, shape), 25);
}

// A backend that fails the next CompressLayers call when asked to, else the CPU backend.
class FlakyBackend final : public Backend {
 public:
  std::string_view name() const override { return "flaky"; }
  absl::Status CompressLayers(const CacheGeometry& geometry, const MethodSpec& spec,
                              std::span<const LayerJob> jobs,
                              std::span<LayerResult> results) override {
    if (fail_next_.exchange(false)) return absl::InternalError("injected failure");
    return cpu_->CompressLayers(geometry, spec, jobs, results);
  }
  absl::Status ScoreLayers(const CacheGeometry& geometry, const MethodSpec& spec,
                           std::span<const LayerJob> jobs, std::span<LayerScores> scores) override {
    return cpu_->ScoreLayers(geometry, spec, jobs, scores);
  }
  void FailNext() { fail_next_ = true; }

 private:
  std::unique_ptr<Backend> cpu_ = MakeCpuBackend(2);
  std::atomic<bool> fail_next_{false};
};

// DynamicKV fixture data: T = 301 tokens, 8 window queries (W = 8), keep 0.2 → n = 60,
// base = 52, P = 293; updates every 2 layers of 4. Layers differ in key scale so that the
// allocation moves budget between them.
constexpr int64_t kDynamicTokens = 301;
constexpr int kDynamicWindow = 8;
constexpr int64_t kDynamicBase = 60 - kDynamicWindow;

MethodSpec DynamicSpec() {
  MethodSpec spec;
  spec.snapkv.window_size = kDynamicWindow;
  spec.budget.keep_ratio = 0.2;
  spec.layer_budget = LayerBudgetKind::kDynamic;
  spec.dynamic.update_interval = 2;
  return spec;
}

LayerInput DynamicLayer(const CacheGeometry& geometry, int sequence, int layer,
                        int64_t tokens = kDynamicTokens) {
  LayerInput input = MakeRandomLayer(geometry, tokens, kDynamicWindow, 300 + 10 * sequence + layer,
                                     sequence, layer);
  // Sharper attention in deeper layers: scale the queries of layer l by 1 + l/2.
  std::vector<float> queries(input.queries.size() / 2);
  for (size_t i = 0; i < queries.size(); ++i) {
    queries[i] = LoadAsFloat(input.queries.data(), geometry.dtype, i) * (1.0f + 0.5f * layer);
  }
  input.queries = testing::Encode(queries, geometry.dtype);
  return input;
}

// The reference budgets of a sequence's layers (in layer order) from the backend's own snapkv
// scores, so that only the allocation is under test.
std::vector<int64_t> ReferenceDynamic(const CacheGeometry& geometry, const MethodSpec& spec,
                                      const std::vector<const LayerInput*>& layers) {
  MethodSpec snapkv = spec;
  snapkv.scorer = ScorerKind::kSnapKv;
  testing::DynamicLayerScores scores;
  for (const LayerInput* input : layers) {
    auto rows = testing::ScoreLayer(geometry, snapkv, *input);
    EXPECT_TRUE(rows.ok()) << rows.status();
    for (auto& row : *rows) row.resize(input->shape.num_tokens - kDynamicWindow);
    scores.push_back(*rows);
  }
  return testing::ReferenceDynamicBudgets(scores, kDynamicBase, spec.dynamic.r_max,
                                          spec.dynamic.update_interval);
}

TEST_F(CompressionPipelineTest, DynamicHoldsLayersUntilTheSequenceIsComplete) {
  const MethodSpec spec = DynamicSpec();
  auto pipeline = MakePipeline(spec, {{kDynamicTokens, kDynamicWindow, 0}});
  ASSERT_NE(pipeline, nullptr);
  std::vector<LayerInput> inputs;
  for (int layer = 0; layer < 4; ++layer) inputs.push_back(DynamicLayer(geometry_, 0, layer));
  std::vector<const LayerInput*> views;
  for (const LayerInput& input : inputs) views.push_back(&input);
  const std::vector<int64_t> budgets = ReferenceDynamic(geometry_, spec, views);
  std::vector<std::vector<std::vector<double>>> reference;
  for (const LayerInput& input : inputs)
    reference.push_back(ReferenceScores(geometry_, spec, input));

  // Out of order: nothing is final until the last layer arrives.
  for (int layer : {2, 0, 3}) {
    auto results = pipeline->AddLayer(DynamicLayer(geometry_, 0, layer));
    ASSERT_TRUE(results.ok()) << results.status();
    EXPECT_TRUE(results->empty()) << "layer " << layer;
  }
  auto results = pipeline->AddLayer(DynamicLayer(geometry_, 0, 1));
  ASSERT_TRUE(results.ok()) << results.status();
  ASSERT_EQ(results->size(), 4u);

  int64_t total = 0;
  std::set<int64_t> distinct;
  for (const LayerResult& result : *results) {
    const int layer = result.layer;
    EXPECT_EQ(result.deferred, layer != 1) << "layer " << layer;
    const int64_t n = budgets[layer] + kDynamicWindow;
    EXPECT_EQ(result.kept, std::vector<int32_t>(2, static_cast<int32_t>(n))) << "layer " << layer;
    for (int head = 0; head < 2; ++head) {
      const auto comparison =
          testing::CompareKept(reference[layer][head], n, KeptOfHead(result, head));
      EXPECT_TRUE(comparison.ok) << "layer " << layer << " head " << head << ": "
                                 << comparison.failure;
      // The window survives every cut.
      const std::vector<int32_t> kept = KeptOfHead(result, head);
      EXPECT_EQ(kept[n - kDynamicWindow], kDynamicTokens - kDynamicWindow);
    }
    total += budgets[layer];
    distinct.insert(budgets[layer]);
  }
  EXPECT_GT(distinct.size(), 2u) << "per-layer budgets should differ";
  EXPECT_EQ(total, 4 * kDynamicBase) << "Σ budget_l = L · (n − W)";
}

TEST_F(CompressionPipelineTest, DynamicComposesWithAdaptiveHeadBudgets) {
  MethodSpec uniform = DynamicSpec();
  MethodSpec adaptive = uniform;
  adaptive.head_budget = HeadBudgetKind::kAdaptive;
  auto pipeline = MakePipeline(adaptive, {{kDynamicTokens, kDynamicWindow, 0}});
  ASSERT_NE(pipeline, nullptr);
  std::vector<LayerInput> inputs;
  for (int layer = 0; layer < 4; ++layer) inputs.push_back(DynamicLayer(geometry_, 0, layer));
  std::vector<const LayerInput*> views;
  for (const LayerInput& input : inputs) views.push_back(&input);
  const std::vector<int64_t> budgets = ReferenceDynamic(geometry_, uniform, views);

  std::vector<LayerResult> results;
  for (int layer = 0; layer < 4; ++layer) {
    auto added = pipeline->AddLayer(DynamicLayer(geometry_, 0, layer));
    ASSERT_TRUE(added.ok()) << added.status();
    for (LayerResult& result : *added) results.push_back(std::move(result));
  }
  ASSERT_EQ(results.size(), 4u);
  bool some_heads_differ = false;
  for (const LayerResult& result : results) {
    const int64_t n = budgets[result.layer] + kDynamicWindow;
    EXPECT_EQ(result.total_kept(), 2 * n) << "layer " << result.layer;
    some_heads_differ = some_heads_differ || result.kept[0] != result.kept[1];
    const int64_t safe = std::max<int64_t>(1, static_cast<int64_t>(n * 0.2));
    for (int head = 0; head < 2; ++head) {
      EXPECT_GE(result.kept[head], safe);
      const std::vector<int32_t> kept = KeptOfHead(result, head);
      if (n >= kDynamicWindow) {
        EXPECT_TRUE(std::binary_search(kept.begin(), kept.end(), kDynamicTokens - 1));
      }
    }
  }
  EXPECT_TRUE(some_heads_differ);
}

TEST_F(CompressionPipelineTest, DynamicSkippedLayersShortBudgetsAndSequencesAreIndependent) {
  MethodSpec spec = DynamicSpec();
  spec.skip_layers = {0};
  // Sequence 1: T = 30, n = 6 ≤ W = 8, nothing to allocate: uniform, at once.
  auto pipeline =
      MakePipeline(spec, {{kDynamicTokens, kDynamicWindow, 0}, {30, kDynamicWindow, 0}});
  ASSERT_NE(pipeline, nullptr);
  auto skipped = pipeline->AddLayer(DynamicLayer(geometry_, 0, 0));
  ASSERT_TRUE(skipped.ok()) << skipped.status();
  ASSERT_EQ(skipped->size(), 1u);
  EXPECT_EQ((*skipped)[0].kept, std::vector<int32_t>({301, 301}));
  EXPECT_FALSE((*skipped)[0].deferred);
  for (int layer = 0; layer < 4; ++layer) {
    auto results = pipeline->AddLayer(DynamicLayer(geometry_, 1, layer, 30));
    ASSERT_TRUE(results.ok()) << results.status();
    ASSERT_EQ(results->size(), 1u);
    const int32_t expected = layer == 0 ? 30 : 6;
    EXPECT_EQ((*results)[0].kept, std::vector<int32_t>({expected, expected}));
  }
  // Sequence 0 allocates over its three compressed layers only: Σ = 3 · base.
  std::vector<LayerInput> inputs;
  for (int layer = 1; layer < 4; ++layer) inputs.push_back(DynamicLayer(geometry_, 0, layer));
  std::vector<const LayerInput*> views;
  for (const LayerInput& input : inputs) views.push_back(&input);
  const std::vector<int64_t> budgets = ReferenceDynamic(geometry_, spec, views);
  std::vector<LayerResult> results;
  for (int layer = 1; layer < 4; ++layer) {
    auto added = pipeline->AddLayer(DynamicLayer(geometry_, 0, layer));
    ASSERT_TRUE(added.ok()) << added.status();
    for (LayerResult& result : *added) results.push_back(std::move(result));
  }
  ASSERT_EQ(results.size(), 3u);
  int64_t total = 0;
  for (const LayerResult& result : results) {
    EXPECT_EQ(result.kept[0], budgets[result.layer - 1] + kDynamicWindow);
    total += result.kept[0] - kDynamicWindow;
  }
  EXPECT_EQ(total, 3 * kDynamicBase);
}

TEST_F(CompressionPipelineTest, DynamicBackendFailureConsumesNothing) {
  FlakyBackend flaky;
  auto created = CompressionPipeline::Create(&flaky, geometry_, DynamicSpec(),
                                             {{kDynamicTokens, kDynamicWindow, 0}});
  ASSERT_TRUE(created.ok()) << created.status();
  auto& pipeline = *created;
  for (int layer = 0; layer < 3; ++layer) {
    auto results = pipeline->AddLayer(DynamicLayer(geometry_, 0, layer));
    ASSERT_TRUE(results.ok()) << results.status();
  }
  flaky.FailNext();
  auto failed = pipeline->AddLayer(DynamicLayer(geometry_, 0, 3));
  EXPECT_EQ(failed.status().code(), absl::StatusCode::kInternal);
  auto retried = pipeline->AddLayer(DynamicLayer(geometry_, 0, 3));
  ASSERT_TRUE(retried.ok()) << retried.status();
  ASSERT_EQ(retried->size(), 4u);
  // This backend takes no precomputed scores, so it scored the layers again: the same
  // results as the CPU backend, which reuses the allocation's scores.
  EXPECT_FALSE(flaky.AcceptsPrecomputedScores());
  EXPECT_TRUE(backend_->AcceptsPrecomputedScores());
  auto cpu_pipeline = MakePipeline(DynamicSpec(), {{kDynamicTokens, kDynamicWindow, 0}});
  ASSERT_NE(cpu_pipeline, nullptr);
  std::vector<LayerResult> cpu_results;
  for (int layer = 0; layer < 4; ++layer) {
    auto added = cpu_pipeline->AddLayer(DynamicLayer(geometry_, 0, layer));
    ASSERT_TRUE(added.ok()) << added.status();
    for (LayerResult& result : *added) cpu_results.push_back(std::move(result));
  }
  ASSERT_EQ(cpu_results.size(), 4u);
  for (const LayerResult& result : *retried) {
    EXPECT_EQ(result.positions, cpu_results[result.layer].positions) << "layer " << result.layer;
  }
  auto again = pipeline->AddLayer(DynamicLayer(geometry_, 0, 3));
  EXPECT_NE(again.status().message().find("added twice"), std::string::npos) << again.status();
}

TEST_F(CompressionPipelineTest, DynamicConcurrentAddsReturnEveryLayerOnce) {
  const MethodSpec spec = DynamicSpec();
  std::vector<SequenceShape> shapes;
  for (int sequence = 0; sequence < 3; ++sequence) {
    shapes.push_back({kDynamicTokens - 40 * sequence, kDynamicWindow, 0});
  }
  auto pipeline = MakePipeline(spec, shapes);
  ASSERT_NE(pipeline, nullptr);
  absl::Mutex mu;
  std::vector<std::pair<int, int>> returned;
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      // Thread t adds layer t of every sequence.
      for (int sequence = 0; sequence < 3; ++sequence) {
        auto results = pipeline->AddLayer(
            DynamicLayer(geometry_, sequence, t, kDynamicTokens - 40 * sequence));
        ASSERT_TRUE(results.ok()) << results.status();
        absl::MutexLock lock(&mu);
        for (const LayerResult& result : *results) {
          returned.emplace_back(result.sequence, result.layer);
        }
      }
    });
  }
  for (std::thread& thread : threads) thread.join();
  std::sort(returned.begin(), returned.end());
  std::vector<std::pair<int, int>> expected;
  for (int sequence = 0; sequence < 3; ++sequence) {
    for (int layer = 0; layer < 4; ++layer) expected.emplace_back(sequence, layer);
  }
  EXPECT_EQ(returned, expected);
}

// KVMerger's own choice, layers 0, 1 and L − 1 unmerged, is skip_layers = {0, 1, L − 1}:
// those layers come back whole (one token per row), the others merged within their budget.
TEST_F(CompressionPipelineTest, MergeSimilarWithThePapersSkippedLayers) {
  MethodSpec spec;
  spec.snapkv.window_size = 16;
  spec.budget.keep_ratio = 0.3;
  spec.reducer = ReducerKind::kMergeSimilar;
  spec.skip_layers = {0, 1, 3};
  auto pipeline = MakePipeline(spec, {{257, 16, 0}});
  ASSERT_NE(pipeline, nullptr);
  for (int layer = 0; layer < 4; ++layer) {
    auto results =
        pipeline->AddLayer(testing::MakeRunLayer(geometry_, 257, 16, 70 + layer, 0, layer));
    ASSERT_TRUE(results.ok()) << results.status();
    const LayerResult& result = (*results)[0];
    ASSERT_EQ(result.merged.size(), result.positions.size());
    if (layer != 2) {
      EXPECT_EQ(result.kept, std::vector<int32_t>({257, 257})) << "layer " << layer;
      EXPECT_EQ(result.merged, std::vector<int32_t>(2 * 257, 1));
      continue;
    }
    int32_t largest = 0;
    for (int head = 0; head < 2; ++head) {
      EXPECT_LE(result.kept[head], 77);  // ⌊0.3 · 257⌋
      for (int32_t row = result.offsets[head]; row < result.offsets[head + 1]; ++row) {
        largest = std::max(largest, result.merged[row]);
      }
    }
    EXPECT_GT(largest, 1);
  }
}

TEST_F(CompressionPipelineTest, RejectsBadIndicesShapesSizesAndDuplicates) {
  auto pipeline = MakePipeline(KnormSpec(0.5), {{100, 4, 0}});
  ASSERT_NE(pipeline, nullptr);
  const auto expect_invalid = [&](LayerInput input, const std::string& substring) {
    auto result = pipeline->AddLayer(std::move(input));
    ASSERT_FALSE(result.ok()) << "expected an error containing: " << substring;
    EXPECT_EQ(result.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(result.status().message().find(substring), std::string::npos)
        << result.status().message();
  };

  expect_invalid(MakeRandomLayer(geometry_, 100, 4, 1, /*sequence=*/1, 0),
                 "sequence 1: out of range; the request declared 1 sequences");
  expect_invalid(MakeRandomLayer(geometry_, 100, 4, 1, /*sequence=*/-1, 0), "sequence -1");
  expect_invalid(MakeRandomLayer(geometry_, 100, 4, 1, 0, /*layer=*/4),
                 "sequence 0 layer 4: out of range; the model has 4 layers");
  expect_invalid(MakeRandomLayer(geometry_, 100, 4, 1, 0, /*layer=*/-1), "sequence 0 layer -1");
  expect_invalid(MakeRandomLayer(geometry_, 99, 4, 1, 0, 0),
                 "sequence 0 layer 0: shape {num_tokens 99");

  LayerInput short_keys = MakeRandomLayer(geometry_, 100, 4, 1, 0, 0);
  short_keys.keys.resize(short_keys.keys.size() - 2);
  expect_invalid(std::move(short_keys),
                 "sequence 0 layer 0 keys: expected 2*100*64 bfloat16 elements (25600 bytes), "
                 "got 25598 bytes");
  LayerInput long_values = MakeRandomLayer(geometry_, 100, 4, 1, 0, 0);
  long_values.values.resize(long_values.values.size() + 2);
  expect_invalid(std::move(long_values), "sequence 0 layer 0 values: expected");
  LayerInput no_queries = MakeRandomLayer(geometry_, 100, 4, 1, 0, 0);
  no_queries.queries.clear();
  expect_invalid(std::move(no_queries),
                 "sequence 0 layer 0 queries: expected 8*4*64 bfloat16 elements (4096 bytes), got "
                 "0 bytes");
  LayerInput stray_scores = MakeRandomLayer(geometry_, 100, 4, 1, 0, 0);
  stray_scores.scores.assign(100, 1.0f);
  expect_invalid(std::move(stray_scores), "sequence 0 layer 0 scores: expected 0*100");

  // Failed checks do not consume the layer; a good add does, once.
  auto first = pipeline->AddLayer(MakeRandomLayer(geometry_, 100, 4, 1, 0, 3));
  ASSERT_TRUE(first.ok()) << first.status();
  expect_invalid(MakeRandomLayer(geometry_, 100, 4, 1, 0, 3), "sequence 0 layer 3: added twice");
  auto other = pipeline->AddLayer(MakeRandomLayer(geometry_, 100, 4, 1, 0, 0));
  EXPECT_TRUE(other.ok()) << other.status();
}

TEST_F(CompressionPipelineTest, CreateValidatesGeometrySpecAndSequences) {
  const auto create = [&](const CacheGeometry& geometry, const MethodSpec& spec,
                          std::vector<SequenceShape> sequences) {
    return CompressionPipeline::Create(backend_.get(), geometry, spec, std::move(sequences))
        .status();
  };
  CacheGeometry bad_geometry = geometry_;
  bad_geometry.num_query_heads = 7;
  absl::Status status = create(bad_geometry, KnormSpec(0.5), {{10, 0, 0}});
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(
      status.message().find("geometry.num_query_heads: 7 is not a multiple of num_kv_heads 2"),
      std::string::npos)
      << status;

  status = create(geometry_, KnormSpec(1.5), {{10, 0, 0}});
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(status.message().find("method.budget.keep_ratio: 1.5"), std::string::npos) << status;

  MethodSpec observed = KnormSpec(0.5);
  observed.scorer = ScorerKind::kObserved;
  status = create(geometry_, observed, {{10, 0, 2}, {10, 0, 0}});
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(status.message().find("sequences[1].num_score_heads: 0"), std::string::npos) << status;

  MethodSpec snapkv;  // the default scorer needs window queries
  status = create(geometry_, snapkv, {{10, 4, 0}, {10, 0, 0}});
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(status.message().find("sequences[1]"), std::string::npos) << status;

  status = create(geometry_, KnormSpec(0.5), {});
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(CompressionPipelineTest, ConcurrentAddsOfDistinctLayersAllSucceedAndDuplicatesFail) {
  MethodSpec spec;  // snapkv defaults
  auto pipeline = MakePipeline(spec, {{300, 16, 0}, {129, 64, 0}});
  ASSERT_NE(pipeline, nullptr);
  std::vector<std::thread> threads;
  std::vector<int> ok_count(8, 0);
  for (int t = 0; t < 8; ++t) {
    threads.emplace_back([&, t] {
      // Threads t and t + 4 add the same layers; exactly one of each pair may succeed.
      const int layer = t % 4;
      for (int sequence = 0; sequence < 2; ++sequence) {
        const int64_t tokens = sequence == 0 ? 300 : 129;
        const int queries = sequence == 0 ? 16 : 64;
        auto result = pipeline->AddLayer(
            MakeRandomLayer(geometry_, tokens, queries, 100 + layer, sequence, layer));
        if (result.ok()) {
          ++ok_count[t];
        } else {
          EXPECT_NE(result.status().message().find("added twice"), std::string::npos);
        }
      }
    });
  }
  for (std::thread& thread : threads) thread.join();
  int total = 0;
  for (int count : ok_count) total += count;
  EXPECT_EQ(total, 8);  // 2 sequences × 4 layers
}

}  // namespace
}  // namespace kvcompress
