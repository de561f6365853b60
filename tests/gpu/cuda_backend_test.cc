// The CUDA backend against the CPU reference backend on random configurations: identical kept
// sets (except genuine near-ties at the selection boundary, which the CPU's fp64 scores detect
// and which are counted and capped), rows byte-identical to the input rows they claim, the
// same counts and offsets, and attention_mass_kept within 1e-4.
//
// The merging reducers (merge_similar, merge_nearest) run on keys in runs of similar
// neighbours, so that sets really merge, and must match the reference exactly: kept counts,
// offsets, positions and merged counts identical, rows byte-identical — except that a
// merge_similar row averaged with Gaussian weights may differ by one unit in the last place of
// the output dtype, because the CPU's std::exp and CUDA's exp may round the last fp64 bit
// differently (counted, capped at 1 in 10^4 merged elements). Where the GPU's scores are not
// the CPU's bit for bit (snapkv), the reference is the CPU backend run on the GPU's own scores
// (LayerJob::precomputed_scores), so that the merging itself is compared exactly.
//
// Skips (GTEST_SKIP) when the build has no CUDA or cudaGetDeviceCount reports no device.
// The SmallConfigs suite (T ≤ 2048) is the subset run under compute-sanitizer.
#include "kernels/cuda_backend.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <random>
#include <span>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "kernels/backend.h"
#include "kernels/cache_geometry.h"
#include "kernels/dtype.h"
#include "kernels/method_spec.h"

namespace kvcompress {
namespace {

// Counts over every configuration, printed at the end.
struct Totals {
  int64_t configs = 0;
  int64_t heads = 0;
  int64_t near_ties = 0;
  int64_t kept_rows = 0;
};
Totals& GlobalTotals() {
  static Totals totals;
  return totals;
}

uint64_t SplitMix(uint64_t& state) {
  uint64_t z = (state += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

// `count` values of about normal(0, 1) in `dtype`, none zero.
std::vector<std::byte> RandomTensor(size_t count, DType dtype, uint64_t seed, float scale) {
  std::vector<std::byte> out(count * DTypeSize(dtype));
  uint64_t state = seed * 0x2545f4914f6cdd1dull + 1;
  for (size_t i = 0; i < count; i += 2) {
    const uint64_t bits = SplitMix(state);
    const double u1 = (static_cast<double>(bits >> 40) + 1.0) / 16777217.0;
    const double u2 = static_cast<double>((bits >> 16) & 0xffffff) / 16777216.0;
    const double radius = std::sqrt(-2.0 * std::log(u1));
    const float pair[2] = {static_cast<float>(radius * std::cos(6.283185307179586 * u2)) * scale,
                           static_cast<float>(radius * std::sin(6.283185307179586 * u2)) * scale};
    for (size_t k = 0; k < 2 && i + k < count; ++k) {
      float value = pair[k];
      if (value == 0.0f) value = 0.5f;
      if (dtype == DType::kFloat32) {
        std::memcpy(out.data() + (i + k) * 4, &value, 4);
      } else {
        uint16_t half = dtype == DType::kBFloat16 ? FloatToBFloat16(value) : FloatToFloat16(value);
        if ((half & 0x7fff) == 0) half = dtype == DType::kBFloat16 ? 0x3f00 : 0x3800;  // 0.5
        std::memcpy(out.data() + (i + k) * 2, &half, 2);
      }
    }
  }
  return out;
}

struct GpuCase {
  std::string name;
  DType dtype = DType::kBFloat16;
  Layout layout = Layout::kHND;
  int num_kv_heads = 2;
  int group_size = 4;
  int head_dim = 128;
  std::vector<int64_t> tokens;  // one layer job per entry: a ragged batch
  int queries_sent = 64;        // clamped to T per job
  MethodSpec spec;
  int64_t keep_tokens = 0;  // > 0: absolute budget, else spec.budget's ratio
  bool keep_all_layer = false;
  uint64_t seed = 1;
  bool scores_per_query_head = false;  // observed: H_q score rows (group-reduced), else H_kv
  bool similar_key_runs = false;       // keys in runs of similar neighbours (merging reducers)
};

std::string CaseName(const GpuCase& c) {
  std::string scorer(ScorerName(c.spec.scorer));
  if (c.spec.reducer != ReducerKind::kDrop) {
    scorer = absl::StrCat(std::string(ReducerName(c.spec.reducer)), "_", scorer);
  }
  std::string name = absl::StrCat(scorer, "_", std::string(DTypeName(c.dtype)), "_",
                                  c.layout == Layout::kHND ? "HND" : "NHD", "_h", c.num_kv_heads,
                                  "g", c.group_size, "d", c.head_dim, "_T");
  for (size_t i = 0; i < c.tokens.size(); ++i) absl::StrAppend(&name, i ? "x" : "", c.tokens[i]);
  absl::StrAppend(&name, "_w", c.queries_sent, "_s", c.seed);
  if (c.spec.head_budget == HeadBudgetKind::kAdaptive) {
    absl::StrAppend(&name, "_adaptive", static_cast<int>(c.spec.adaptive.alpha * 100));
  }
  return name;
}

// A random configuration; `small` keeps T ≤ 2048 (the compute-sanitizer subset).
GpuCase RandomCase(int index, bool small) {
  std::mt19937 rng(1000 + index * 7919 + (small ? 0 : 500000));
  const auto pick = [&](auto... values) {
    const std::vector<std::common_type_t<decltype(values)...>> options{values...};
    return options[std::uniform_int_distribution<size_t>(0, options.size() - 1)(rng)];
  };
  const auto pick64 = [&](std::initializer_list<int64_t> values) {
    const std::vector<int64_t> options(values);
    return options[std::uniform_int_distribution<size_t>(0, options.size() - 1)(rng)];
  };
  GpuCase c;
  c.seed = static_cast<uint64_t>(index) + (small ? 1 : 100000);
  c.dtype = pick(DType::kFloat16, DType::kBFloat16, DType::kFloat32);
  c.layout = pick(Layout::kHND, Layout::kNHD);
  c.group_size = pick(1, 4, 8);
  c.head_dim = pick(64, 128, 256);
  c.num_kv_heads = pick(1, 2, 3);
  const int64_t tokens =
      small ? pick64({1, 2, 7, 31, 63, 64, 65, 97, 127, 128, 257, 509, 1000, 1021, 2048})
            : pick64({4093, 4096, 10007, 16384, 32768});
  c.tokens = {tokens};
  if (index % 5 == 4) c.tokens.push_back(std::max<int64_t>(1, tokens / 3 + 1));  // ragged batch
  c.queries_sent = pick(1, 8, 17, 64, 70);
  MethodSpec& spec = c.spec;
  spec.scorer =
      pick(ScorerKind::kSnapKv, ScorerKind::kSnapKv, ScorerKind::kKnorm, ScorerKind::kStreaming);
  spec.snapkv.window_size = pick(64, 64, 16, 128);
  spec.snapkv.kernel_size = pick(1, 3, 5, 5, 7);
  spec.snapkv.pooling = pick(Pooling::kAvg, Pooling::kAvg, Pooling::kMax);
  spec.snapkv.group_reduction =
      pick(GroupReduction::kMean, GroupReduction::kMax, GroupReduction::kSum);
  spec.streaming.sinks = pick(0, 4, 4, 9);
  spec.protect_sinks = pick(0, 0, 2, 5);
  spec.protect_recent = pick(0, 0, 3, 32);
  spec.budget.use_ratio = true;
  spec.budget.keep_ratio = pick(0.1, 0.1, 0.25, 0.5, 0.9, 1.0);
  if (index % 7 == 3) c.keep_tokens = tokens + pick64({0, 5});  // n ≥ T
  if (index % 11 == 5) c.keep_all_layer = true;
  if (spec.scorer != ScorerKind::kSnapKv && index % 3 == 0) c.queries_sent = 0;
  // Drawn last, so the configurations above stay what they were before keydiff and adaptive
  // existed.
  if (index % 5 == 2) spec.scorer = ScorerKind::kKeyDiff;
  if (index % 9 == 4) {
    spec.scorer = ScorerKind::kTova;
    c.queries_sent = std::max(c.queries_sent, 1);
  }
  if (index % 7 == 6) {
    spec.scorer = ScorerKind::kObserved;
    spec.observed.group_reduction =
        pick(GroupReduction::kMean, GroupReduction::kMax, GroupReduction::kSum);
    c.scores_per_query_head = pick(true, false);
  }
  if (index % 3 == 1) {
    spec.head_budget = HeadBudgetKind::kAdaptive;
    spec.adaptive.alpha = pick(0.2, 0.2, 0.0, 0.5, 1.0);
  }
  c.name = CaseName(c);
  return c;
}

// Keys in runs of similar neighbours, KVMerger's premise: each token's key continues the
// previous one's with a small perturbation (cosine about 0.94), or starts afresh with
// probability 0.35.
std::vector<std::byte> RunsOfSimilarKeys(const CacheGeometry& geometry, int64_t num_tokens,
                                         uint64_t seed) {
  const int dim = geometry.head_dim;
  const size_t element_size = DTypeSize(geometry.dtype);
  std::vector<std::byte> out(static_cast<size_t>(geometry.num_kv_heads) * num_tokens * dim *
                             element_size);
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_real_distribution<float> uniform(0.0f, 1.0f);
  std::vector<float> row(dim);
  for (int h = 0; h < geometry.num_kv_heads; ++h) {
    for (int64_t t = 0; t < num_tokens; ++t) {
      const bool fresh = t == 0 || uniform(rng) < 0.35f;
      for (int d = 0; d < dim; ++d) row[d] = fresh ? normal(rng) : row[d] + 0.35f * normal(rng);
      const size_t offset =
          KeyValueRowOffset(geometry.layout, geometry.num_kv_heads, num_tokens, dim, h, t);
      for (int d = 0; d < dim; ++d) {
        std::byte* target = out.data() + (offset + d) * element_size;
        if (geometry.dtype == DType::kFloat32) {
          std::memcpy(target, &row[d], 4);
        } else {
          const uint16_t half =
              geometry.dtype == DType::kBFloat16 ? FloatToBFloat16(row[d]) : FloatToFloat16(row[d]);
          std::memcpy(target, &half, 2);
        }
      }
    }
  }
  return out;
}

// A merging-reducer configuration; `tag` names what it varies.
GpuCase MergeCase(const std::string& tag, ReducerKind reducer, ScorerKind scorer, DType dtype,
                  int head_dim, int num_kv_heads, int group_size, std::vector<int64_t> tokens,
                  double keep_ratio, uint64_t seed) {
  GpuCase c;
  c.spec.reducer = reducer;
  c.spec.scorer = scorer;
  c.dtype = dtype;
  c.head_dim = head_dim;
  c.num_kv_heads = num_kv_heads;
  c.group_size = group_size;
  c.tokens = std::move(tokens);
  c.spec.budget.use_ratio = true;
  c.spec.budget.keep_ratio = keep_ratio;
  c.seed = seed;
  c.similar_key_runs = true;
  if (scorer != ScorerKind::kSnapKv && scorer != ScorerKind::kTova) c.queries_sent = 0;
  c.name = tag;
  return c;
}

void NameMergeCase(GpuCase& c) { c.name = absl::StrCat(CaseName(c), "_", c.name); }

// Merging reducers over dtypes, head dims, GQA ratios, layouts, odd token counts, ragged
// batches, uniform and adaptive head budgets and every merge_similar option.
std::vector<GpuCase> SmallMergeCases() {
  using R = ReducerKind;
  using S = ScorerKind;
  std::vector<GpuCase> cases;
  cases.push_back(MergeCase("defaults", R::kMergeSimilar, S::kKnorm, DType::kBFloat16, 128, 2, 4,
                            {1021}, 0.25, 501));
  GpuCase auto_sigma = MergeCase("auto_sigma", R::kMergeSimilar, S::kKnorm, DType::kFloat16, 64, 3,
                                 1, {2047, 683}, 0.1, 502);
  auto_sigma.spec.merge_similar.auto_sigma = true;
  cases.push_back(auto_sigma);
  GpuCase scaled = MergeCase("protect10_scaled", R::kMergeSimilar, S::kObserved, DType::kFloat32,
                             256, 2, 8, {999}, 0.3, 503);
  scaled.spec.merge_similar.protect_fraction = 0.1;
  scaled.spec.merge_similar.scale_values_by_set_size = true;
  cases.push_back(scaled);
  GpuCase snapkv_adaptive = MergeCase("adaptive", R::kMergeSimilar, S::kSnapKv, DType::kBFloat16,
                                      128, 2, 4, {1537}, 0.2, 504);
  snapkv_adaptive.spec.head_budget = HeadBudgetKind::kAdaptive;
  cases.push_back(snapkv_adaptive);
  GpuCase adaptive_auto = MergeCase("adaptive_auto_protect0_NHD", R::kMergeSimilar, S::kKnorm,
                                    DType::kFloat32, 128, 4, 2, {777}, 0.15, 505);
  adaptive_auto.layout = Layout::kNHD;
  adaptive_auto.spec.head_budget = HeadBudgetKind::kAdaptive;
  adaptive_auto.spec.merge_similar.auto_sigma = true;
  adaptive_auto.spec.merge_similar.protect_fraction = 0.0;
  cases.push_back(adaptive_auto);
  GpuCase streaming = MergeCase("sinks", R::kMergeSimilar, S::kStreaming, DType::kBFloat16, 64, 1,
                                8, {511}, 0.5, 506);
  streaming.spec.protect_recent = 16;
  cases.push_back(streaming);
  GpuCase snapkv = MergeCase("auto_scaled", R::kMergeSimilar, S::kSnapKv, DType::kFloat16, 256, 1,
                             4, {1999}, 0.1, 507);
  snapkv.spec.merge_similar.auto_sigma = true;
  snapkv.spec.merge_similar.scale_values_by_set_size = true;
  snapkv.spec.protect_sinks = 4;
  cases.push_back(snapkv);
  GpuCase whole = MergeCase("n_ge_T", R::kMergeSimilar, S::kKnorm, DType::kBFloat16, 128, 2, 4,
                            {301, 5}, 1.0, 508);
  whole.keep_tokens = 10;  // the second layer is kept whole
  cases.push_back(whole);
  GpuCase loose = MergeCase("threshold03_sigma1", R::kMergeSimilar, S::kKnorm, DType::kFloat32, 64,
                            2, 1, {1500}, 0.2, 509);
  loose.spec.merge_similar.similarity_threshold = 0.3;
  loose.spec.merge_similar.sigma = 1.0;
  cases.push_back(loose);
  GpuCase observed_per_query = MergeCase("per_query_scores", R::kMergeSimilar, S::kObserved,
                                         DType::kBFloat16, 64, 2, 4, {63, 1025}, 0.3, 510);
  observed_per_query.scores_per_query_head = true;
  cases.push_back(observed_per_query);

  cases.push_back(MergeCase("uniform", R::kMergeNearest, S::kKnorm, DType::kBFloat16, 128, 2, 4,
                            {1021}, 0.25, 601));
  cases.push_back(MergeCase("ragged_batch", R::kMergeNearest, S::kSnapKv, DType::kFloat16, 64, 3, 1,
                            {2047, 501}, 0.1, 602));
  GpuCase nearest_adaptive = MergeCase("adaptive", R::kMergeNearest, S::kObserved, DType::kFloat32,
                                       256, 2, 8, {999}, 0.3, 603);
  nearest_adaptive.spec.head_budget = HeadBudgetKind::kAdaptive;
  cases.push_back(nearest_adaptive);
  GpuCase nearest_streaming = MergeCase("ranges_NHD", R::kMergeNearest, S::kStreaming,
                                        DType::kBFloat16, 128, 2, 1, {1111}, 0.2, 604);
  nearest_streaming.layout = Layout::kNHD;
  cases.push_back(nearest_streaming);
  GpuCase nearest_whole = MergeCase("n_ge_T", R::kMergeNearest, S::kKnorm, DType::kFloat32, 128, 2,
                                    4, {300, 5}, 1.0, 605);
  nearest_whole.keep_tokens = 10;
  cases.push_back(nearest_whole);
  GpuCase nearest_snapkv_adaptive = MergeCase("snapkv_adaptive", R::kMergeNearest, S::kSnapKv,
                                              DType::kBFloat16, 128, 2, 4, {1537}, 0.2, 606);
  nearest_snapkv_adaptive.spec.head_budget = HeadBudgetKind::kAdaptive;
  cases.push_back(nearest_snapkv_adaptive);
  for (GpuCase& c : cases) NameMergeCase(c);
  return cases;
}

std::vector<GpuCase> LargeMergeCases() {
  std::vector<GpuCase> cases;
  cases.push_back(MergeCase("llama", ReducerKind::kMergeSimilar, ScorerKind::kSnapKv,
                            DType::kBFloat16, 128, 8, 4, {16384, 4099}, 0.1, 701));
  GpuCase adaptive = MergeCase("adaptive_auto", ReducerKind::kMergeSimilar, ScorerKind::kKnorm,
                               DType::kBFloat16, 128, 2, 4, {32768}, 0.1, 702);
  adaptive.spec.head_budget = HeadBudgetKind::kAdaptive;
  adaptive.spec.merge_similar.auto_sigma = true;
  cases.push_back(adaptive);
  cases.push_back(MergeCase("uniform", ReducerKind::kMergeNearest, ScorerKind::kKnorm,
                            DType::kBFloat16, 128, 2, 4, {8191}, 0.1, 703));
  for (GpuCase& c : cases) NameMergeCase(c);
  return cases;
}

std::vector<GpuCase> SmallCases() {
  std::vector<GpuCase> cases;
  for (int i = 0; i < 44; ++i) cases.push_back(RandomCase(i, true));
  // Edge cases named explicitly: T = 1, T ≤ W, n ≥ T, T prime with every scorer.
  GpuCase one;
  one.tokens = {1};
  one.queries_sent = 1;
  one.name = "snapkv_T1";
  cases.push_back(one);
  GpuCase window_covers;
  window_covers.tokens = {40};
  window_covers.queries_sent = 40;
  window_covers.spec.budget.keep_ratio = 0.5;
  window_covers.name = "snapkv_T_le_W";
  cases.push_back(window_covers);
  GpuCase keep_more;
  keep_more.tokens = {300};
  keep_more.keep_tokens = 5000;
  keep_more.name = "snapkv_n_ge_T";
  cases.push_back(keep_more);
  for (ScorerKind scorer : {ScorerKind::kSnapKv, ScorerKind::kKnorm, ScorerKind::kStreaming,
                            ScorerKind::kKeyDiff, ScorerKind::kTova}) {
    GpuCase prime;
    prime.tokens = {1999};
    prime.spec.scorer = scorer;
    prime.spec.budget.keep_ratio = 0.1;
    prime.spec.protect_sinks = 3;
    prime.name = absl::StrCat(std::string(ScorerName(scorer)), "_T_prime_1999");
    cases.push_back(prime);
  }
  // AdaKV over streaming scores: every head scores alike, so the shared slots are settled by
  // the tie order alone (lower head, then lower position).
  GpuCase adaptive_ties;
  adaptive_ties.tokens = {1500};
  adaptive_ties.num_kv_heads = 3;
  adaptive_ties.spec.scorer = ScorerKind::kStreaming;
  adaptive_ties.spec.head_budget = HeadBudgetKind::kAdaptive;
  adaptive_ties.spec.budget.keep_ratio = 0.2;
  adaptive_ties.name = "streaming_adaptive_exact_ties";
  cases.push_back(adaptive_ties);
  for (GpuCase& c : SmallMergeCases()) cases.push_back(std::move(c));
  return cases;
}

std::vector<GpuCase> LargeCases() {
  std::vector<GpuCase> cases;
  for (int i = 0; i < 8; ++i) cases.push_back(RandomCase(i, false));
  // Llama-3.1-8B-like heads at 128K tokens (two KV heads to keep the fp64 reference quick).
  GpuCase snapkv;
  snapkv.dtype = DType::kBFloat16;
  snapkv.num_kv_heads = 2;
  snapkv.group_size = 4;
  snapkv.tokens = {131072};
  snapkv.spec.budget.keep_ratio = 0.1;
  snapkv.name = "snapkv_bf16_llama_T128K";
  cases.push_back(snapkv);
  GpuCase knorm = snapkv;
  knorm.dtype = DType::kFloat16;
  knorm.layout = Layout::kNHD;
  knorm.head_dim = 64;
  knorm.spec.scorer = ScorerKind::kKnorm;
  knorm.queries_sent = 0;
  knorm.name = "knorm_fp16_NHD_T128K";
  cases.push_back(knorm);
  GpuCase streaming = snapkv;
  streaming.spec.scorer = ScorerKind::kStreaming;
  streaming.spec.protect_recent = 100;
  streaming.queries_sent = 0;
  streaming.name = "streaming_bf16_T128K";
  cases.push_back(streaming);
  GpuCase keydiff = snapkv;
  keydiff.spec.scorer = ScorerKind::kKeyDiff;
  keydiff.queries_sent = 0;
  keydiff.layout = Layout::kNHD;
  keydiff.name = "keydiff_bf16_NHD_T128K";
  cases.push_back(keydiff);
  GpuCase observed = snapkv;
  observed.spec.scorer = ScorerKind::kObserved;
  observed.scores_per_query_head = true;
  observed.queries_sent = 0;
  observed.tokens = {65536};
  observed.name = "observed_bf16_per_query_head_T64K";
  cases.push_back(observed);
  GpuCase tova = snapkv;
  tova.spec.scorer = ScorerKind::kTova;
  tova.group_size = 8;
  tova.tokens = {32768};
  tova.name = "tova_bf16_g8_T32K";
  cases.push_back(tova);
  GpuCase adakv = snapkv;
  adakv.num_kv_heads = 8;
  adakv.tokens = {32768, 4099};
  adakv.spec.head_budget = HeadBudgetKind::kAdaptive;
  adakv.name = "snapkv_adaptive_llama_h8_T32K";
  cases.push_back(adakv);
  GpuCase mass = snapkv;
  mass.tokens = {32768};
  mass.group_size = 8;
  mass.dtype = DType::kFloat32;
  mass.name = "snapkv_fp32_g8_T32K";
  cases.push_back(mass);
  for (GpuCase& c : LargeMergeCases()) cases.push_back(std::move(c));
  return cases;
}

class CudaBackendTest : public ::testing::TestWithParam<GpuCase> {
 protected:
  static void SetUpTestSuite() {
    absl::StatusOr<std::unique_ptr<Backend>> backend = MakeCudaBackend(CudaBackendOptions{});
    if (backend.ok()) {
      cuda_ = backend->release();
      cpu_ = MakeCpuBackend(0).release();
    } else {
      skip_reason_ = new std::string(backend.status().ToString());
    }
  }
  static void TearDownTestSuite() {
    delete cuda_;
    delete cpu_;
    cuda_ = nullptr;
    cpu_ = nullptr;
    const Totals& totals = GlobalTotals();
    if (totals.configs > 0) {
      std::printf("[gpu totals] configs %lld, heads %lld, kept rows %lld, near-tie swaps %lld\n",
                  static_cast<long long>(totals.configs), static_cast<long long>(totals.heads),
                  static_cast<long long>(totals.kept_rows),
                  static_cast<long long>(totals.near_ties));
    }
  }
  void SetUp() override {
    if (cuda_ == nullptr) {
      GTEST_SKIP() << "no CUDA backend: " << (skip_reason_ ? *skip_reason_ : "");
    }
  }

  void ExpectMergedLayersMatch(const CacheGeometry& geometry, const GpuCase& c,
                               std::span<const LayerJob> jobs,
                               std::vector<LayerResult>& cpu_results,
                               const std::vector<LayerResult>& gpu_results);

  static Backend* cuda_;
  static Backend* cpu_;
  static std::string* skip_reason_;
};

Backend* CudaBackendTest::cuda_ = nullptr;
Backend* CudaBackendTest::cpu_ = nullptr;
std::string* CudaBackendTest::skip_reason_ = nullptr;

// The rank order of the CPU's selection: whether (a, pa) is preferred to (b, pb).
bool Before(float a, int64_t pa, float b, int64_t pb) {
  a = std::isnan(a) ? -INFINITY : a;
  b = std::isnan(b) ? -INFINITY : b;
  return a > b || (a == b && pa < pb);
}

// Whether two output elements of `dtype` are at most one unit in the last place apart.
bool WithinOneUlp(const std::byte* a, const std::byte* b, DType dtype) {
  if (dtype == DType::kFloat32) {
    int32_t x;
    int32_t y;
    std::memcpy(&x, a, 4);
    std::memcpy(&y, b, 4);
    return (x < 0) == (y < 0) && std::abs(static_cast<int64_t>(x) - y) <= 1;
  }
  int16_t x;
  int16_t y;
  std::memcpy(&x, a, 2);
  std::memcpy(&y, b, 2);
  return (x < 0) == (y < 0) && std::abs(static_cast<int32_t>(x) - y) <= 1;
}

// Merging reducers: see the file comment.
void CudaBackendTest::ExpectMergedLayersMatch(const CacheGeometry& geometry, const GpuCase& c,
                                              std::span<const LayerJob> jobs,
                                              std::vector<LayerResult>& cpu_results,
                                              const std::vector<LayerResult>& gpu_results) {
  const bool exact_scores = c.spec.scorer == ScorerKind::kKnorm ||
                            c.spec.scorer == ScorerKind::kStreaming ||
                            c.spec.scorer == ScorerKind::kObserved;
  if (!exact_scores) {
    // The reference on the GPU's scores (kept-whole layers need none).
    std::vector<LayerScores> gpu_scores(jobs.size());
    const absl::Status status = cuda_->ScoreLayers(geometry, c.spec, jobs, gpu_scores);
    ASSERT_TRUE(status.ok()) << status;
    std::vector<LayerJob> rescored(jobs.begin(), jobs.end());
    for (size_t i = 0; i < rescored.size(); ++i) {
      if (!rescored[i].keep_all) rescored[i].precomputed_scores = gpu_scores[i].scores.data();
    }
    ASSERT_TRUE(cpu_->CompressLayers(geometry, c.spec, rescored, cpu_results).ok());
  }
  const size_t element_size = DTypeSize(c.dtype);
  const size_t row_bytes = static_cast<size_t>(c.head_dim) * element_size;
  const bool gaussian = c.spec.reducer == ReducerKind::kMergeSimilar;
  int64_t merged_rows = 0;
  int64_t merged_elements = 0;
  int64_t ulp_differences = 0;
  int64_t kept_rows = 0;
  for (size_t i = 0; i < jobs.size(); ++i) {
    SCOPED_TRACE(absl::StrCat("job ", i, " T=", jobs[i].input.shape.num_tokens));
    const LayerResult& cpu = cpu_results[i];
    const LayerResult& gpu = gpu_results[i];
    ASSERT_EQ(gpu.sequence, cpu.sequence);
    ASSERT_EQ(gpu.layer, cpu.layer);
    ASSERT_EQ(gpu.kept, cpu.kept);
    ASSERT_EQ(gpu.offsets, cpu.offsets);
    ASSERT_EQ(gpu.positions, cpu.positions);
    ASSERT_EQ(gpu.merged, cpu.merged);
    ASSERT_EQ(gpu.keys.size(), cpu.keys.size());
    ASSERT_EQ(gpu.values.size(), cpu.values.size());
    if (cpu.attention_mass_kept < 0 || jobs[i].keep_all) {
      EXPECT_EQ(gpu.attention_mass_kept, cpu.attention_mass_kept);
    } else {
      EXPECT_NEAR(gpu.attention_mass_kept, cpu.attention_mass_kept, 1e-4);
    }
    kept_rows += static_cast<int64_t>(gpu.positions.size());
    for (size_t row = 0; row < gpu.positions.size(); ++row) {
      const bool merged = gpu.merged[row] > 1;
      merged_rows += merged ? 1 : 0;
      for (const auto tensor : {&LayerResult::keys, &LayerResult::values}) {
        const std::byte* want = (cpu.*tensor).data() + row * row_bytes;
        const std::byte* got = (gpu.*tensor).data() + row * row_bytes;
        if (std::memcmp(want, got, row_bytes) == 0) {
          merged_elements += merged ? c.head_dim : 0;
          continue;
        }
        const char* name = tensor == &LayerResult::keys ? "key" : "value";
        ASSERT_TRUE(merged && gaussian)
            << name << " row " << row << " (position " << gpu.positions[row] << ", merged "
            << gpu.merged[row] << ") differs from the reference";
        for (int d = 0; d < c.head_dim; ++d) {
          const std::byte* a = want + d * element_size;
          const std::byte* b = got + d * element_size;
          if (std::memcmp(a, b, element_size) == 0) continue;
          ASSERT_TRUE(WithinOneUlp(a, b, c.dtype))
              << name << " row " << row << " element " << d << " differs by more than one ulp";
          ++ulp_differences;
        }
        merged_elements += c.head_dim;
      }
    }
  }
  EXPECT_LE(ulp_differences, std::max<int64_t>(2, merged_elements / 10000))
      << "too many one-ulp differences in merged rows";
  std::printf("[gpu merge] %s: %lld rows, %lld merged, %lld one-ulp elements\n", c.name.c_str(),
              static_cast<long long>(kept_rows), static_cast<long long>(merged_rows),
              static_cast<long long>(ulp_differences));
  EXPECT_GT(merged_rows, 0) << "no row merged anything: the configuration tests nothing";
  Totals& totals = GlobalTotals();
  totals.configs += 1;
  totals.heads += static_cast<int64_t>(jobs.size()) * c.num_kv_heads;
  totals.kept_rows += kept_rows;
}

TEST_P(CudaBackendTest, MatchesCpuReference) {
  const GpuCase& c = GetParam();
  CacheGeometry geometry;
  geometry.num_layers = static_cast<int>(c.tokens.size());
  geometry.num_kv_heads = c.num_kv_heads;
  geometry.num_query_heads = c.num_kv_heads * c.group_size;
  geometry.head_dim = c.head_dim;
  geometry.dtype = c.dtype;
  geometry.layout = c.layout;
  ASSERT_TRUE(ValidateMethodSpec(c.spec, geometry).ok());

  std::vector<LayerInput> inputs;
  std::vector<LayerJob> jobs;
  for (size_t i = 0; i < c.tokens.size(); ++i) {
    const int64_t num_tokens = c.tokens[i];
    LayerInput input;
    input.sequence = static_cast<int>(i);
    input.layer = static_cast<int>(i);
    input.shape.num_tokens = num_tokens;
    input.shape.num_window_queries =
        static_cast<int>(std::min<int64_t>(c.queries_sent, num_tokens));
    const size_t kv_elements = static_cast<size_t>(c.num_kv_heads) * num_tokens * c.head_dim;
    input.keys = c.similar_key_runs
                     ? RunsOfSimilarKeys(geometry, num_tokens, c.seed * 3 + i * 101)
                     : RandomTensor(kv_elements, c.dtype, c.seed * 3 + i * 101, 1.0f);
    input.values = RandomTensor(kv_elements, c.dtype, c.seed * 5 + i * 103, 1.0f);
    // Larger queries give peaked attention, as real models do.
    input.queries = RandomTensor(
        static_cast<size_t>(geometry.num_query_heads) * input.shape.num_window_queries * c.head_dim,
        c.dtype, c.seed * 7 + i * 107, 2.0f);
    if (c.spec.scorer == ScorerKind::kObserved) {
      input.shape.num_score_heads =
          c.scores_per_query_head ? geometry.num_query_heads : geometry.num_kv_heads;
      const size_t count = static_cast<size_t>(input.shape.num_score_heads) * num_tokens;
      const std::vector<std::byte> bytes =
          RandomTensor(count, DType::kFloat32, c.seed * 11 + i * 109, 1.0f);
      input.scores.resize(count);
      std::memcpy(input.scores.data(), bytes.data(), bytes.size());
    }
    inputs.push_back(std::move(input));
  }
  for (const LayerInput& input : inputs) {
    LayerJob job;
    job.sequence = input.sequence;
    job.layer = input.layer;
    job.input = input.view();
    const int64_t num_tokens = input.shape.num_tokens;
    const int64_t n = c.keep_tokens > 0 ? std::min(c.keep_tokens, num_tokens)
                                        : TokensToKeep(c.spec.budget, num_tokens);
    job.tokens_per_head = n;
    job.keep_all = c.keep_all_layer || c.keep_tokens >= num_tokens;
    jobs.push_back(job);
  }

  std::vector<LayerResult> cpu_results(jobs.size());
  std::vector<LayerResult> gpu_results(jobs.size());
  ASSERT_TRUE(cpu_->CompressLayers(geometry, c.spec, jobs, cpu_results).ok());
  const absl::Status gpu_status = cuda_->CompressLayers(geometry, c.spec, jobs, gpu_results);
  ASSERT_TRUE(gpu_status.ok()) << gpu_status;
  if (c.spec.reducer != ReducerKind::kDrop) {
    ExpectMergedLayersMatch(geometry, c, jobs, cpu_results, gpu_results);
    return;
  }

  std::vector<LayerScores> cpu_scores;  // computed on the first mismatch only
  const size_t row_bytes = static_cast<size_t>(c.head_dim) * DTypeSize(c.dtype);
  int64_t near_ties = 0;
  int64_t kept_rows = 0;
  for (size_t i = 0; i < jobs.size(); ++i) {
    SCOPED_TRACE(absl::StrCat("job ", i, " T=", inputs[i].shape.num_tokens));
    const LayerResult& cpu = cpu_results[i];
    const LayerResult& gpu = gpu_results[i];
    ASSERT_EQ(gpu.sequence, cpu.sequence);
    ASSERT_EQ(gpu.layer, cpu.layer);
    ASSERT_EQ(gpu.kept, cpu.kept);
    ASSERT_EQ(gpu.offsets, cpu.offsets);
    ASSERT_EQ(gpu.positions.size(), cpu.positions.size());
    ASSERT_EQ(gpu.keys.size(), cpu.keys.size());
    ASSERT_EQ(gpu.values.size(), cpu.values.size());
    if (cpu.attention_mass_kept < 0 || jobs[i].keep_all) {
      EXPECT_EQ(gpu.attention_mass_kept, cpu.attention_mass_kept);
    } else {
      EXPECT_NEAR(gpu.attention_mass_kept, cpu.attention_mass_kept, 1e-4);
    }
    const int64_t num_tokens = inputs[i].shape.num_tokens;
    for (int h = 0; h < c.num_kv_heads; ++h) {
      SCOPED_TRACE(absl::StrCat("head ", h));
      const auto first = cpu.positions.begin() + cpu.offsets[h];
      const auto last = cpu.positions.begin() + cpu.offsets[h + 1];
      const std::vector<int32_t> cpu_kept(first, last);
      const std::vector<int32_t> gpu_kept(gpu.positions.begin() + gpu.offsets[h],
                                          gpu.positions.begin() + gpu.offsets[h + 1]);
      kept_rows += static_cast<int64_t>(gpu_kept.size());
      ASSERT_TRUE(std::is_sorted(gpu_kept.begin(), gpu_kept.end()));
      ASSERT_TRUE(std::adjacent_find(gpu_kept.begin(), gpu_kept.end()) == gpu_kept.end());
      // Every gathered row equals, byte for byte, the input row at its position.
      for (size_t r = 0; r < gpu_kept.size(); ++r) {
        const int32_t position = gpu_kept[r];
        ASSERT_GE(position, 0);
        ASSERT_LT(position, num_tokens);
        const size_t source =
            KeyValueRowOffset(c.layout, c.num_kv_heads, num_tokens, c.head_dim, h, position) *
            DTypeSize(c.dtype);
        const size_t target = (static_cast<size_t>(gpu.offsets[h]) + r) * row_bytes;
        ASSERT_EQ(std::memcmp(gpu.keys.data() + target, inputs[i].keys.data() + source, row_bytes),
                  0)
            << "key row " << r << " (position " << position << ")";
        ASSERT_EQ(
            std::memcmp(gpu.values.data() + target, inputs[i].values.data() + source, row_bytes), 0)
            << "value row " << r << " (position " << position << ")";
      }
      if (gpu_kept == cpu_kept) continue;

      // Differences must be near-ties at the CPU's selection boundary.
      if (cpu_scores.empty()) {
        cpu_scores.resize(jobs.size());
        ASSERT_TRUE(cpu_->ScoreLayers(geometry, c.spec, jobs, cpu_scores).ok());
      }
      const float* scores = cpu_scores[i].scores.data() + static_cast<size_t>(h) * num_tokens;
      // The boundary: the worst-ranked token the CPU kept.
      int32_t boundary = cpu_kept.front();
      for (int32_t p : cpu_kept) {
        if (Before(scores[boundary], boundary, scores[p], p)) boundary = p;
      }
      const float boundary_score = scores[boundary];
      std::vector<int32_t> differing;
      std::set_symmetric_difference(cpu_kept.begin(), cpu_kept.end(), gpu_kept.begin(),
                                    gpu_kept.end(), std::back_inserter(differing));
      for (int32_t p : differing) {
        const float score = scores[p];
        const bool near = std::isfinite(boundary_score) && std::isfinite(score) &&
                          std::fabs(score - boundary_score) <=
                              1e-5f * std::max(std::fabs(boundary_score), 1e-30f);
        EXPECT_TRUE(near) << "position " << p << " (cpu score " << score << ") differs; boundary "
                          << boundary << " scores " << boundary_score << "; " << differing.size()
                          << " differing of " << cpu_kept.size();
        if (!near) break;
      }
      near_ties += static_cast<int64_t>(differing.size()) / 2;
      EXPECT_LE(static_cast<int64_t>(differing.size()) / 2,
                std::max<int64_t>(2, static_cast<int64_t>(cpu_kept.size()) / 500))
          << "too many near-tie swaps";
    }
  }
  Totals& totals = GlobalTotals();
  totals.configs += 1;
  totals.heads += static_cast<int64_t>(jobs.size()) * c.num_kv_heads;
  totals.near_ties += near_ties;
  totals.kept_rows += kept_rows;
  if (near_ties > 0)
    std::printf("[gpu near-ties] %s: %lld\n", c.name.c_str(), (long long)near_ties);
}

TEST_P(CudaBackendTest, ScoresMatchCpuReference) {
  const GpuCase& c = GetParam();
  if (c.tokens.front() > 40000) GTEST_SKIP() << "covered by MatchesCpuReference";
  CacheGeometry geometry;
  geometry.num_layers = 1;
  geometry.num_kv_heads = c.num_kv_heads;
  geometry.num_query_heads = c.num_kv_heads * c.group_size;
  geometry.head_dim = c.head_dim;
  geometry.dtype = c.dtype;
  geometry.layout = c.layout;
  const int64_t num_tokens = c.tokens.front();
  LayerInput input;
  input.shape.num_tokens = num_tokens;
  input.shape.num_window_queries = static_cast<int>(std::min<int64_t>(c.queries_sent, num_tokens));
  if ((c.spec.scorer == ScorerKind::kSnapKv || c.spec.scorer == ScorerKind::kTova) &&
      input.shape.num_window_queries == 0) {
    input.shape.num_window_queries = 1;
  }
  const size_t kv_elements = static_cast<size_t>(c.num_kv_heads) * num_tokens * c.head_dim;
  input.keys = RandomTensor(kv_elements, c.dtype, c.seed * 11, 1.0f);
  input.values = RandomTensor(kv_elements, c.dtype, c.seed * 13, 1.0f);
  input.queries = RandomTensor(
      static_cast<size_t>(geometry.num_query_heads) * input.shape.num_window_queries * c.head_dim,
      c.dtype, c.seed * 17, 2.0f);
  if (c.spec.scorer == ScorerKind::kObserved) {
    input.shape.num_score_heads =
        c.scores_per_query_head ? geometry.num_query_heads : geometry.num_kv_heads;
    const size_t count = static_cast<size_t>(input.shape.num_score_heads) * num_tokens;
    const std::vector<std::byte> bytes = RandomTensor(count, DType::kFloat32, c.seed * 19, 1.0f);
    input.scores.resize(count);
    std::memcpy(input.scores.data(), bytes.data(), bytes.size());
  }
  LayerJob job;
  job.input = input.view();
  job.tokens_per_head = 1;
  std::vector<LayerScores> cpu(1);
  std::vector<LayerScores> gpu(1);
  ASSERT_TRUE(cpu_->ScoreLayers(geometry, c.spec, {&job, 1}, cpu).ok());
  const absl::Status status = cuda_->ScoreLayers(geometry, c.spec, {&job, 1}, gpu);
  ASSERT_TRUE(status.ok()) << status;
  ASSERT_EQ(gpu[0].scores.size(), cpu[0].scores.size());
  double worst = 0;
  for (size_t j = 0; j < cpu[0].scores.size(); ++j) {
    const float a = cpu[0].scores[j];
    const float b = gpu[0].scores[j];
    if (std::isinf(a) || std::isinf(b)) {
      ASSERT_EQ(a, b) << "token " << j;
      continue;
    }
    // knorm, streaming and observed compute what the CPU computes, in its order; snapkv and
    // tova use fp32 attention, keydiff sums its anchor in another order.
    const bool approximate = c.spec.scorer == ScorerKind::kSnapKv ||
                             c.spec.scorer == ScorerKind::kTova ||
                             c.spec.scorer == ScorerKind::kKeyDiff;
    if (!approximate) {
      ASSERT_EQ(a, b) << "token " << j << ": knorm, streaming and observed scores are exact";
      continue;
    }
    const double relative =
        std::fabs(static_cast<double>(a) - b) / std::max(std::fabs(static_cast<double>(a)), 1e-30);
    worst = std::max(worst, relative);
  }
  EXPECT_LT(worst, 2e-5) << "worst relative score error";
  RecordProperty("worst_relative_error", absl::StrCat(worst));
}

INSTANTIATE_TEST_SUITE_P(SmallConfigs, CudaBackendTest, ::testing::ValuesIn(SmallCases()),
                         [](const ::testing::TestParamInfo<GpuCase>& info) {
                           return absl::StrCat(info.index, "_", info.param.name);
                         });
INSTANTIATE_TEST_SUITE_P(LargeConfigs, CudaBackendTest, ::testing::ValuesIn(LargeCases()),
                         [](const ::testing::TestParamInfo<GpuCase>& info) {
                           return absl::StrCat(info.index, "_", info.param.name);
                         });

class CudaBackendContractTest : public ::testing::Test {
 protected:
  void SetUp() override {
    absl::StatusOr<std::unique_ptr<Backend>> backend = MakeCudaBackend(CudaBackendOptions{});
    if (!backend.ok()) {
      EXPECT_TRUE(absl::IsFailedPrecondition(backend.status()) ||
                  absl::IsUnimplemented(backend.status()))
          << backend.status();
      GTEST_SKIP() << "no CUDA backend: " << backend.status();
    }
    backend_ = *std::move(backend);
  }
  std::unique_ptr<Backend> backend_;
};

TEST_F(CudaBackendContractTest, NameIsCuda) { EXPECT_EQ(backend_->name(), "cuda"); }

TEST_F(CudaBackendContractTest, UnsupportedStagesAreUnimplementedByName) {
  CacheGeometry geometry{1, 2, 8, 128, DType::kBFloat16, Layout::kHND};
  std::vector<LayerJob> none;
  std::vector<LayerResult> results;
  MethodSpec spec;
  for (ScorerKind scorer : {ScorerKind::kSnapKv, ScorerKind::kKnorm, ScorerKind::kStreaming,
                            ScorerKind::kObserved, ScorerKind::kTova, ScorerKind::kKeyDiff}) {
    spec.scorer = scorer;
    EXPECT_TRUE(backend_->Supports(spec, 128).ok()) << ScorerName(scorer);
  }
  absl::Status status;
  spec = MethodSpec{};
  spec.head_budget = HeadBudgetKind::kAdaptive;
  EXPECT_TRUE(backend_->Supports(spec, 128).ok());
  for (ReducerKind reducer :
       {ReducerKind::kDrop, ReducerKind::kMergeSimilar, ReducerKind::kMergeNearest}) {
    spec = MethodSpec{};
    spec.reducer = reducer;
    EXPECT_TRUE(backend_->Supports(spec, 128).ok()) << ReducerName(reducer);
  }
  geometry.head_dim = 96;
  status = backend_->CompressLayers(geometry, MethodSpec{}, none, results);
  EXPECT_TRUE(absl::IsUnimplemented(status)) << status;
  EXPECT_NE(status.message().find("head_dim 96"), std::string::npos) << status;
}

TEST_F(CudaBackendContractTest, MemoryBudgetAnswersResourceExhausted) {
  CudaBackendOptions options;
  options.memory_budget_bytes = size_t{1} << 20;
  absl::StatusOr<std::unique_ptr<Backend>> small = MakeCudaBackend(options);
  ASSERT_TRUE(small.ok()) << small.status();
  CacheGeometry geometry{1, 2, 8, 128, DType::kBFloat16, Layout::kHND};
  LayerInput input;
  input.shape.num_tokens = 8192;  // 4 MiB of keys alone
  input.shape.num_window_queries = 8;
  input.keys = RandomTensor(2 * 8192 * 128, DType::kBFloat16, 1, 1.0f);
  input.values = input.keys;
  input.queries = RandomTensor(8 * 8 * 128, DType::kBFloat16, 2, 1.0f);
  LayerJob job;
  job.input = input.view();
  job.tokens_per_head = 100;
  std::vector<LayerResult> results(1);
  const absl::Status status = (*small)->CompressLayers(geometry, MethodSpec{}, {&job, 1}, results);
  EXPECT_TRUE(absl::IsResourceExhausted(status)) << status;
  // The backend stays usable for batches that fit.
  input.shape.num_tokens = 256;
  input.keys.resize(2 * 256 * 128 * 2);
  input.values = input.keys;
  job.input = input.view();
  EXPECT_TRUE((*small)->CompressLayers(geometry, MethodSpec{}, {&job, 1}, results).ok());
  EXPECT_EQ(results[0].kept, std::vector<int32_t>({100, 100}));
}

}  // namespace
}  // namespace kvcompress
