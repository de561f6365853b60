// The CPU reference backend: plain fp64 loops, parallel over (layer job, KV head) on a small
// thread pool the backend owns. See kernels/backend.h for the contract.
//
// A CompressLayers call runs in passes, each parallel over (job, head) where it can be:
//   1. score every head (skipped for layers kept whole);
//   2. per layer, finish layer-shared scores (tova);
//   3. per layer, adaptive head budgets choose every head's tokens at once;
//   4. per head: uniform selection, the reducer, the attention-mass pass;
//   5. per layer, lay out the ragged result (counts, offsets);
//   6. per head, write the rows: byte copies of the input, or merged rows rounded to the
//      input dtype.
// LayerResult::seconds holds, per stage, the time the layer's heads spent in it summed over
// heads (thread time; equal to wall time with one thread). The attention-mass pass counts as
// scoring; merging counts as gathering; the per-layer passes 2 and 3 count as scoring and
// selection. Thread-safe: concurrent calls share the pool, and each caller works on its own
// tasks too, so none waits on another's.
#include <algorithm>
#include <chrono>
#include <memory>
#include <numeric>
#include <thread>
#include <vector>

#include "absl/functional/function_ref.h"
#include "absl/strings/str_cat.h"
#include "kernels/backend.h"
#include "kernels/cpu/internal/adaptive_selection.h"
#include "kernels/cpu/internal/attention_mass.h"
#include "kernels/cpu/internal/head_scorer.h"
#include "kernels/cpu/internal/merge_nearest.h"
#include "kernels/cpu/internal/merge_similar.h"
#include "kernels/cpu/internal/merged_head.h"
#include "kernels/cpu/internal/row_gather.h"
#include "kernels/cpu/internal/thread_pool.h"
#include "kernels/cpu/internal/token_selection.h"
#include "kernels/status_macros.h"

namespace kvcompress {
namespace {

using Clock = std::chrono::steady_clock;

double SecondsSince(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

// One (job, head) through the passes.
struct HeadWork {
  cpu::HeadScoring scoring;
  cpu::MergedHead rows;  // positions always; merged counts and rows for merging reducers
  StageSeconds seconds;
  double kept_attention = 0;  // Σ over the head's group and window of kept attention
};

absl::Status ValidateJob(const CacheGeometry& geometry, const MethodSpec& spec, const LayerJob& job,
                         size_t index) {
  const auto error = [&](auto&&... parts) {
    return absl::InvalidArgumentError(absl::StrCat("jobs[", index, "] (sequence ", job.sequence,
                                                   " layer ", job.layer, "): ", parts...));
  };
  KVC_RETURN_IF_ERROR(ValidateLayerJobInput(job, index));
  const SequenceShape& shape = job.input.shape;
  if (job.keep_all || job.precomputed_scores != nullptr) return absl::OkStatus();
  if ((spec.scorer == ScorerKind::kSnapKv || spec.scorer == ScorerKind::kTova) &&
      shape.num_window_queries < 1) {
    const std::string_view name = ScorerName(spec.scorer);
    return error("the ", absl::string_view(name.data(), name.size()),
                 " scorer needs window queries; got none");
  }
  if (spec.scorer == ScorerKind::kObserved) {
    if (job.input.scores == nullptr) {
      return error("the observed scorer needs client scores; got none");
    }
    if (shape.num_score_heads != geometry.num_kv_heads &&
        shape.num_score_heads != geometry.num_query_heads) {
      return error("num_score_heads ", shape.num_score_heads, " is invalid; expected num_kv_heads ",
                   geometry.num_kv_heads, " or num_query_heads ", geometry.num_query_heads);
    }
  }
  return absl::OkStatus();
}

bool IsMerging(const MethodSpec& spec) { return spec.reducer != ReducerKind::kDrop; }

class CpuBackend final : public Backend {
 public:
  // The calling thread of each call works too, hence num_threads − 1 workers.
  explicit CpuBackend(int num_threads) : pool_(std::max(num_threads, 1) - 1) {}

  std::string_view name() const override { return "cpu"; }

  bool AcceptsPrecomputedScores() const override { return true; }

  absl::Status CompressLayers(const CacheGeometry& geometry, const MethodSpec& spec,
                              std::span<const LayerJob> jobs,
                              std::span<LayerResult> results) override;

  absl::Status ScoreLayers(const CacheGeometry& geometry, const MethodSpec& spec,
                           std::span<const LayerJob> jobs, std::span<LayerScores> scores) override;

 private:
  // Pass 1 for every head of every job not kept whole, each task then running
  // `then_head(task)` (for every task, kept whole or not); then pass 2.
  void ScoreJobs(const CacheGeometry& geometry, const MethodSpec& spec,
                 std::span<const LayerJob> jobs, bool load_attention_inputs,
                 absl::FunctionRef<void(int64_t)> then_head, std::vector<HeadWork>& works);

  // Pass 3: adaptive head budgets choose the positions of every head of each job.
  static void SelectAdaptive(const MethodSpec& spec, int num_heads, std::span<const LayerJob> jobs,
                             std::vector<HeadWork>& works);

  // Pass 4 for one head of a job not kept whole.
  static void SelectAndReduceHead(const CacheGeometry& geometry, const MethodSpec& spec,
                                  const LayerJob& job, int kv_head, HeadWork& work);

  // Pass 6 for one head.
  static void WriteHeadRows(const CacheGeometry& geometry, const LayerJob& job, int kv_head,
                            const HeadWork& work, LayerResult& result);

  cpu::ThreadPool pool_;
};

void CpuBackend::ScoreJobs(const CacheGeometry& geometry, const MethodSpec& spec,
                           std::span<const LayerJob> jobs, bool load_attention_inputs,
                           absl::FunctionRef<void(int64_t)> then_head,
                           std::vector<HeadWork>& works) {
  const int num_heads = geometry.num_kv_heads;
  pool_.ParallelFor(static_cast<int64_t>(works.size()), [&](int64_t task) {
    const LayerJob& job = jobs[task / num_heads];
    if (!job.keep_all) {
      const int head = static_cast<int>(task % num_heads);
      const int64_t num_tokens = job.input.shape.num_tokens;
      const float* precomputed =
          job.precomputed_scores == nullptr ? nullptr : job.precomputed_scores + head * num_tokens;
      const Clock::time_point start = Clock::now();
      works[task].scoring =
          cpu::ScoreHead(geometry, spec, job.input, head, load_attention_inputs, precomputed);
      works[task].seconds.score += SecondsSince(start);
    }
    then_head(task);
  });
  if (!cpu::ScoresAreLayerShared(spec)) return;
  for (size_t i = 0; i < jobs.size(); ++i) {
    if (jobs[i].keep_all || jobs[i].precomputed_scores != nullptr) continue;
    const Clock::time_point start = Clock::now();
    std::vector<cpu::HeadScoring*> heads;
    for (int h = 0; h < num_heads; ++h) heads.push_back(&works[i * num_heads + h].scoring);
    cpu::FinishLayerScores(geometry, spec, heads);
    works[i * num_heads].seconds.score += SecondsSince(start);
  }
}

void CpuBackend::SelectAdaptive(const MethodSpec& spec, int num_heads,
                                std::span<const LayerJob> jobs, std::vector<HeadWork>& works) {
  for (size_t i = 0; i < jobs.size(); ++i) {
    if (jobs[i].keep_all) continue;
    const Clock::time_point start = Clock::now();
    const int64_t num_tokens = jobs[i].input.shape.num_tokens;
    std::vector<std::span<const float>> head_scores;
    for (int h = 0; h < num_heads; ++h) {
      head_scores.emplace_back(works[i * num_heads + h].scoring.scores);
    }
    std::vector<std::vector<int32_t>> kept = cpu::SelectAdaptive(
        head_scores, std::clamp<int64_t>(jobs[i].tokens_per_head, 1, num_tokens),
        spec.adaptive.alpha);
    for (int h = 0; h < num_heads; ++h) {
      works[i * num_heads + h].rows.positions = std::move(kept[h]);
    }
    works[i * num_heads].seconds.select += SecondsSince(start);
  }
}

void CpuBackend::SelectAndReduceHead(const CacheGeometry& geometry, const MethodSpec& spec,
                                     const LayerJob& job, int kv_head, HeadWork& work) {
  const int64_t num_tokens = job.input.shape.num_tokens;
  cpu::HeadScoring& scoring = work.scoring;
  std::vector<int32_t>& positions = work.rows.positions;
  Clock::time_point start = Clock::now();
  if (spec.head_budget == HeadBudgetKind::kUniform) {
    positions.resize(std::clamp<int64_t>(job.tokens_per_head, 1, num_tokens));
    cpu::SelectTopTokens(scoring.scores, positions);
  }  // adaptive: pass 3 chose the positions
  work.seconds.select += SecondsSince(start);

  if (IsMerging(spec)) {
    start = Clock::now();
    if (scoring.keys.rows.empty()) scoring.keys = cpu::LoadHeadKeys(geometry, job.input, kv_head);
    const cpu::HeadRows values = cpu::LoadHeadValues(geometry, job.input, kv_head);
    if (spec.reducer == ReducerKind::kMergeSimilar) {
      // The head's budget is what its selection kept: n, or the adaptive count.
      const int64_t budget = static_cast<int64_t>(positions.size());
      work.rows =
          cpu::MergeSimilarHead(spec.merge_similar, scoring.scores, budget, scoring.keys, values);
    } else {
      work.rows = cpu::MergeNearestHead(positions, scoring.keys, values);
    }
    work.seconds.gather += SecondsSince(start);
  }

  if (scoring.queries.num_queries > 0) {
    // Counted as scoring: it is the same attention pass, restricted to the kept keys.
    start = Clock::now();
    work.kept_attention =
        cpu::SumKeptAttention(scoring.keys, scoring.queries, work.rows.positions,
                              scoring.normalizers.empty() ? nullptr : &scoring.normalizers);
    work.seconds.score += SecondsSince(start);
  }
  scoring = cpu::HeadScoring{};  // release the fp32 copies before the next pass
}

void CpuBackend::WriteHeadRows(const CacheGeometry& geometry, const LayerJob& job, int kv_head,
                               const HeadWork& work, LayerResult& result) {
  const int64_t num_tokens = job.input.shape.num_tokens;
  const size_t row_bytes = geometry.RowBytes();
  const size_t first_row = static_cast<size_t>(result.offsets[kv_head]);
  const cpu::MergedHead& rows = work.rows;
  const size_t count = rows.positions.size();
  std::copy(rows.positions.begin(), rows.positions.end(), result.positions.begin() + first_row);
  std::byte* keys_out = result.keys.data() + first_row * row_bytes;
  std::byte* values_out = result.values.data() + first_row * row_bytes;
  if (rows.merged.empty()) {
    cpu::GatherHeadRows(geometry, job.input.keys, num_tokens, kv_head, rows.positions, keys_out);
    cpu::GatherHeadRows(geometry, job.input.values, num_tokens, kv_head, rows.positions,
                        values_out);
    return;
  }
  std::copy(rows.merged.begin(), rows.merged.end(), result.merged.begin() + first_row);
  const int dim = geometry.head_dim;
  for (size_t row = 0; row < count; ++row) {
    const std::span<const int32_t> position(&rows.positions[row], 1);
    std::byte* key_out = keys_out + row * row_bytes;
    std::byte* value_out = values_out + row * row_bytes;
    const bool merged = rows.merged[row] > 1;
    if (merged && !rows.keys.empty()) {
      cpu::ConvertFromFloat(rows.keys.data() + row * dim, dim, geometry.dtype, key_out);
    } else {
      cpu::GatherHeadRows(geometry, job.input.keys, num_tokens, kv_head, position, key_out);
    }
    if (merged) {
      cpu::ConvertFromFloat(rows.values.data() + row * dim, dim, geometry.dtype, value_out);
    } else {
      cpu::GatherHeadRows(geometry, job.input.values, num_tokens, kv_head, position, value_out);
    }
  }
}

absl::Status CpuBackend::CompressLayers(const CacheGeometry& geometry, const MethodSpec& spec,
                                        std::span<const LayerJob> jobs,
                                        std::span<LayerResult> results) {
  if (results.size() != jobs.size()) {
    return absl::InvalidArgumentError(absl::StrCat("results: expected ", jobs.size(),
                                                   " entries (one per job), got ", results.size()));
  }
  for (size_t i = 0; i < jobs.size(); ++i) {
    if (absl::Status status = ValidateJob(geometry, spec, jobs[i], i); !status.ok()) {
      return status;
    }
  }
  const int num_heads = geometry.num_kv_heads;
  std::vector<HeadWork> works(jobs.size() * num_heads);

  // With per-head scores and uniform head budgets every head finishes on its own, so each
  // task runs passes 1 and 4 back to back and holds its fp32 copies only briefly.
  const bool heads_independent =
      !cpu::ScoresAreLayerShared(spec) && spec.head_budget == HeadBudgetKind::kUniform;
  const auto finish_head = [&](int64_t task) {
    const LayerJob& job = jobs[task / num_heads];
    HeadWork& work = works[task];
    if (job.keep_all) {
      const Clock::time_point start = Clock::now();
      work.rows.positions.resize(job.input.shape.num_tokens);
      std::iota(work.rows.positions.begin(), work.rows.positions.end(), 0);
      if (IsMerging(spec)) work.rows.merged.assign(work.rows.positions.size(), 1);
      work.seconds.select += SecondsSince(start);
      return;
    }
    SelectAndReduceHead(geometry, spec, job, static_cast<int>(task % num_heads), work);
  };
  if (heads_independent) {
    ScoreJobs(geometry, spec, jobs, /*load_attention_inputs=*/true, finish_head, works);
  } else {
    ScoreJobs(
        geometry, spec, jobs, /*load_attention_inputs=*/true, [](int64_t) {}, works);
    if (spec.head_budget == HeadBudgetKind::kAdaptive) SelectAdaptive(spec, num_heads, jobs, works);
    pool_.ParallelFor(static_cast<int64_t>(works.size()), finish_head);
  }

  const size_t row_bytes = geometry.RowBytes();
  for (size_t i = 0; i < jobs.size(); ++i) {
    LayerResult& result = results[i];
    result = LayerResult{};
    result.sequence = jobs[i].sequence;
    result.layer = jobs[i].layer;
    result.kept.resize(num_heads);
    result.offsets.assign(num_heads + 1, 0);
    for (int h = 0; h < num_heads; ++h) {
      result.kept[h] = static_cast<int32_t>(works[i * num_heads + h].rows.positions.size());
      result.offsets[h + 1] = result.offsets[h] + result.kept[h];
    }
    const size_t total = static_cast<size_t>(result.offsets[num_heads]);
    result.keys.resize(total * row_bytes);
    result.values.resize(total * row_bytes);
    result.positions.resize(total);
    if (IsMerging(spec)) result.merged.resize(total);
  }

  pool_.ParallelFor(static_cast<int64_t>(works.size()), [&](int64_t task) {
    const size_t job = static_cast<size_t>(task / num_heads);
    const Clock::time_point start = Clock::now();
    WriteHeadRows(geometry, jobs[job], static_cast<int>(task % num_heads), works[task],
                  results[job]);
    works[task].seconds.gather += SecondsSince(start);
  });

  for (size_t i = 0; i < jobs.size(); ++i) {
    LayerResult& result = results[i];
    const int num_sent = jobs[i].input.shape.num_window_queries;
    const int attention_window = cpu::AttentionWindowSize(spec, num_sent);
    double kept_attention = 0;
    for (int h = 0; h < num_heads; ++h) {
      const HeadWork& work = works[i * num_heads + h];
      result.seconds.score += work.seconds.score;
      result.seconds.select += work.seconds.select;
      result.seconds.gather += work.seconds.gather;
      kept_attention += work.kept_attention;
    }
    if (num_sent == 0) {
      result.attention_mass_kept = -1.0;
    } else if (jobs[i].keep_all) {
      result.attention_mass_kept = 1.0;
    } else {
      result.attention_mass_kept =
          kept_attention / (static_cast<double>(geometry.num_query_heads) * attention_window);
    }
  }
  return absl::OkStatus();
}

absl::Status CpuBackend::ScoreLayers(const CacheGeometry& geometry, const MethodSpec& spec,
                                     std::span<const LayerJob> jobs,
                                     std::span<LayerScores> scores) {
  if (scores.size() != jobs.size()) {
    return absl::InvalidArgumentError(absl::StrCat("scores: expected ", jobs.size(),
                                                   " entries (one per job), got ", scores.size()));
  }
  // Scores are wanted even for layers kept whole, and always computed afresh.
  std::vector<LayerJob> scored(jobs.begin(), jobs.end());
  for (size_t i = 0; i < scored.size(); ++i) {
    scored[i].keep_all = false;
    scored[i].precomputed_scores = nullptr;
    if (absl::Status status = ValidateJob(geometry, spec, scored[i], i); !status.ok()) {
      return status;
    }
  }
  const int num_heads = geometry.num_kv_heads;
  std::vector<HeadWork> works(scored.size() * num_heads);
  ScoreJobs(
      geometry, spec, scored, /*load_attention_inputs=*/false, [](int64_t) {}, works);
  for (size_t i = 0; i < scored.size(); ++i) {
    const size_t num_tokens = static_cast<size_t>(scored[i].input.shape.num_tokens);
    scores[i].sequence = scored[i].sequence;
    scores[i].layer = scored[i].layer;
    scores[i].scores.resize(num_heads * num_tokens);
    for (int h = 0; h < num_heads; ++h) {
      const std::vector<float>& head_scores = works[i * num_heads + h].scoring.scores;
      std::copy(head_scores.begin(), head_scores.end(), scores[i].scores.begin() + h * num_tokens);
    }
  }
  return absl::OkStatus();
}

}  // namespace

std::unique_ptr<Backend> MakeCpuBackend(int num_threads) {
  if (num_threads <= 0) {
    num_threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  }
  return std::make_unique<CpuBackend>(num_threads);
}

}  // namespace kvcompress
