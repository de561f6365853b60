// The CPU reference backend: plain fp64 loops, parallel over (layer job, KV head) on a small
// thread pool the backend owns. See kernels/backend.h for the contract.
//
// Each (job, head) task scores, selects and gathers its head on its own: with uniform head
// budgets every head keeps the same count, so its output slot is known up front.
// LayerResult::seconds holds, per stage, the time the layer's heads spent in it summed over
// heads (thread time; equal to wall time with one thread). The attention-mass pass counts as
// scoring. Thread-safe: concurrent CompressLayers calls share the pool, and each caller
// works on its own tasks too, so none waits on another's.
#include <algorithm>
#include <chrono>
#include <limits>
#include <memory>
#include <numeric>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "kernels/backend.h"
#include "kernels/cpu/internal/attention_mass.h"
#include "kernels/cpu/internal/head_scorer.h"
#include "kernels/cpu/internal/row_gather.h"
#include "kernels/cpu/internal/thread_pool.h"
#include "kernels/cpu/internal/token_selection.h"

namespace kvcompress {
namespace {

using Clock = std::chrono::steady_clock;

double SecondsSince(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

// What one (job, head) task reports back; summed per job after the parallel loop.
struct HeadReport {
  StageSeconds seconds;
  double kept_attention = 0;  // Σ over the head's group and window of kept attention
};

absl::Status ValidateJob(const CacheGeometry& geometry, const MethodSpec& spec, const LayerJob& job,
                         size_t index) {
  const auto error = [&](auto&&... parts) {
    return absl::InvalidArgumentError(absl::StrCat("jobs[", index, "] (sequence ", job.sequence,
                                                   " layer ", job.layer, "): ", parts...));
  };
  const SequenceShape& shape = job.input.shape;
  if (shape.num_tokens < 1 || shape.num_tokens > std::numeric_limits<int32_t>::max()) {
    return error("num_tokens ", shape.num_tokens, " is out of range; expected 1 <= T <= 2^31-1");
  }
  if (job.input.keys == nullptr || job.input.values == nullptr) {
    return error("keys and values are required");
  }
  if (shape.num_window_queries < 0 || shape.num_window_queries > shape.num_tokens) {
    return error("num_window_queries ", shape.num_window_queries,
                 " is out of range; expected 0 <= W <= num_tokens ", shape.num_tokens);
  }
  if (shape.num_window_queries > 0 && job.input.queries == nullptr) {
    return error("num_window_queries is ", shape.num_window_queries, " but no queries were given");
  }
  if (spec.scorer == ScorerKind::kSnapKv && shape.num_window_queries < 1 && !job.keep_all) {
    return error("the snapkv scorer needs window queries; got none");
  }
  (void)geometry;
  return absl::OkStatus();
}

class CpuBackend final : public Backend {
 public:
  // The calling thread of each CompressLayers call works too, hence num_threads − 1 workers.
  explicit CpuBackend(int num_threads) : pool_(std::max(num_threads, 1) - 1) {}

  std::string_view name() const override { return "cpu"; }

  absl::Status CompressLayers(const CacheGeometry& geometry, const MethodSpec& spec,
                              std::span<const LayerJob> jobs,
                              std::span<LayerResult> results) override;

  absl::Status ScoreLayers(const CacheGeometry& geometry, const MethodSpec& spec,
                           std::span<const LayerJob> jobs, std::span<LayerScores> scores) override;

 private:
  // Scores, selects and gathers head `kv_head` of `job` into its slot of `result`.
  HeadReport CompressHead(const CacheGeometry& geometry, const MethodSpec& spec,
                          const LayerJob& job, int kv_head, LayerResult& result) const;

  cpu::ThreadPool pool_;
};

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
  const size_t row_bytes = static_cast<size_t>(geometry.head_dim) * DTypeSize(geometry.dtype);
  for (size_t i = 0; i < jobs.size(); ++i) {
    const LayerJob& job = jobs[i];
    const int64_t num_tokens = job.input.shape.num_tokens;
    // Uniform head budgets: every head keeps the same count, so each head's slot is known
    // before any head is scored and the heads can fill their slots independently.
    const int64_t per_head =
        job.keep_all ? num_tokens : std::clamp<int64_t>(job.tokens_per_head, 1, num_tokens);
    LayerResult& result = results[i];
    result = LayerResult{};
    result.sequence = job.sequence;
    result.layer = job.layer;
    result.kept.assign(num_heads, static_cast<int32_t>(per_head));
    result.offsets.resize(num_heads + 1);
    for (int h = 0; h <= num_heads; ++h) result.offsets[h] = static_cast<int32_t>(h * per_head);
    const size_t total = static_cast<size_t>(num_heads) * per_head;
    result.keys.resize(total * row_bytes);
    result.values.resize(total * row_bytes);
    result.positions.resize(total);
  }

  std::vector<HeadReport> reports(jobs.size() * num_heads);
  pool_.ParallelFor(static_cast<int64_t>(reports.size()), [&](int64_t task) {
    const size_t job = static_cast<size_t>(task / num_heads);
    const int head = static_cast<int>(task % num_heads);
    reports[task] = CompressHead(geometry, spec, jobs[job], head, results[job]);
  });

  for (size_t i = 0; i < jobs.size(); ++i) {
    LayerResult& result = results[i];
    const int num_sent = jobs[i].input.shape.num_window_queries;
    const int attention_window = cpu::AttentionWindowSize(spec, num_sent);
    double kept_attention = 0;
    for (int h = 0; h < num_heads; ++h) {
      const HeadReport& report = reports[i * num_heads + h];
      result.seconds.score += report.seconds.score;
      result.seconds.select += report.seconds.select;
      result.seconds.gather += report.seconds.gather;
      kept_attention += report.kept_attention;
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

HeadReport CpuBackend::CompressHead(const CacheGeometry& geometry, const MethodSpec& spec,
                                    const LayerJob& job, int kv_head, LayerResult& result) const {
  HeadReport report;
  const int64_t num_tokens = job.input.shape.num_tokens;
  const size_t first_row = static_cast<size_t>(result.offsets[kv_head]);
  const std::span<int32_t> positions(result.positions.data() + first_row,
                                     static_cast<size_t>(result.kept[kv_head]));
  const size_t row_bytes = static_cast<size_t>(geometry.head_dim) * DTypeSize(geometry.dtype);

  if (job.keep_all) {
    Clock::time_point start = Clock::now();
    std::iota(positions.begin(), positions.end(), 0);
    report.seconds.select = SecondsSince(start);
    start = Clock::now();
    cpu::GatherHeadRows(geometry, job.input.keys, num_tokens, kv_head, positions,
                        result.keys.data() + first_row * row_bytes);
    cpu::GatherHeadRows(geometry, job.input.values, num_tokens, kv_head, positions,
                        result.values.data() + first_row * row_bytes);
    report.seconds.gather = SecondsSince(start);
    return report;
  }

  Clock::time_point start = Clock::now();
  const cpu::HeadScoring scoring =
      cpu::ScoreHead(geometry, spec, job.input, kv_head, /*load_attention_inputs=*/true);
  report.seconds.score = SecondsSince(start);

  start = Clock::now();
  cpu::SelectTopTokens(scoring.scores, positions);
  report.seconds.select = SecondsSince(start);

  start = Clock::now();
  cpu::GatherHeadRows(geometry, job.input.keys, num_tokens, kv_head, positions,
                      result.keys.data() + first_row * row_bytes);
  cpu::GatherHeadRows(geometry, job.input.values, num_tokens, kv_head, positions,
                      result.values.data() + first_row * row_bytes);
  report.seconds.gather = SecondsSince(start);

  if (scoring.queries.num_queries > 0) {
    // Counted as scoring: it is the same attention pass, restricted to the kept keys.
    start = Clock::now();
    report.kept_attention =
        cpu::SumKeptAttention(scoring.keys, scoring.queries, positions,
                              scoring.normalizers.empty() ? nullptr : &scoring.normalizers);
    report.seconds.score += SecondsSince(start);
  }
  return report;
}

absl::Status CpuBackend::ScoreLayers(const CacheGeometry& geometry, const MethodSpec& spec,
                                     std::span<const LayerJob> jobs,
                                     std::span<LayerScores> scores) {
  if (scores.size() != jobs.size()) {
    return absl::InvalidArgumentError(absl::StrCat("scores: expected ", jobs.size(),
                                                   " entries (one per job), got ", scores.size()));
  }
  const int num_heads = geometry.num_kv_heads;
  for (size_t i = 0; i < jobs.size(); ++i) {
    LayerJob scored = jobs[i];
    scored.keep_all = false;  // scores are wanted even for layers kept whole
    if (absl::Status status = ValidateJob(geometry, spec, scored, i); !status.ok()) {
      return status;
    }
    scores[i].sequence = jobs[i].sequence;
    scores[i].layer = jobs[i].layer;
    scores[i].scores.assign(static_cast<size_t>(num_heads) * jobs[i].input.shape.num_tokens, 0.f);
  }
  pool_.ParallelFor(static_cast<int64_t>(jobs.size()) * num_heads, [&](int64_t task) {
    const size_t job = static_cast<size_t>(task / num_heads);
    const int head = static_cast<int>(task % num_heads);
    const cpu::HeadScoring scoring =
        cpu::ScoreHead(geometry, spec, jobs[job].input, head, /*load_attention_inputs=*/false);
    std::copy(scoring.scores.begin(), scoring.scores.end(),
              scores[job].scores.begin() + static_cast<size_t>(head) * scoring.scores.size());
  });
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
