#include "client/load_generator.h"

#include <algorithm>
#include <atomic>
#include <thread>
#include <utility>

#include "absl/strings/str_cat.h"
#include "client/method_flags.h"
#include "nlohmann/json.hpp"
#include "service/spec_conversion.h"

namespace kvcompress {
namespace {

// What one worker saw; merged after all workers have joined, so no locking.
struct WorkerTally {
  std::vector<absl::Duration> latencies;
  std::map<absl::StatusCode, FailureTally> failures;
  std::map<absl::StatusCode, FailureTally> unmeasured_failures;
  int64_t ok = 0;
  int64_t failed = 0;
  int64_t warmup_ok = 0;
  int64_t warmup_failed = 0;
  int64_t after_window_ok = 0;
  int64_t after_window_failed = 0;
  absl::Time last_completion = absl::InfinitePast();
  uint64_t tokens_kept = 0;
  uint64_t bytes_out = 0;
};

// One request through the SDK: open the stream, send every layer, wait for the summary.
absl::StatusOr<v1::CompressSummary> SendOnce(Client& client, const LoadWorkload& workload,
                                             absl::Duration deadline) {
  SessionOptions session_options;
  session_options.deadline = deadline;
  // The SDK has already checked each layer against the header when this runs; keeping
  // the bytes would only measure the generator's allocator.
  session_options.on_layer = [](CompressedLayer) {};
  absl::StatusOr<std::unique_ptr<CompressSession>> session =
      client.StartCompress(workload.header, std::move(session_options));
  if (!session.ok()) return session.status();
  for (size_t l = 0; l < workload.layers.size(); ++l) {
    absl::Status status = (*session)->SendLayer(0, static_cast<uint32_t>(l), workload.layers[l]);
    if (!status.ok()) {
      (*session)->Cancel();
      return status;
    }
  }
  return (*session)->Finish();
}

absl::Status CheckOptions(const LoadWorkload& workload, const LoadOptions& options) {
  if (options.concurrency < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("concurrency ", options.concurrency, ", expected >= 1"));
  }
  if (options.requests < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("requests ", options.requests, ", expected >= 0"));
  }
  if (options.requests == 0 && options.duration <= absl::ZeroDuration()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "duration ", absl::FormatDuration(options.duration), ", expected > 0 (or requests > 0)"));
  }
  if (options.warmup < absl::ZeroDuration()) {
    return absl::InvalidArgumentError(
        absl::StrCat("warmup ", absl::FormatDuration(options.warmup), ", expected >= 0"));
  }
  if (options.deadline <= absl::ZeroDuration()) {
    return absl::InvalidArgumentError(
        absl::StrCat("deadline ", absl::FormatDuration(options.deadline), ", expected > 0"));
  }
  if (workload.header.sequences_size() != 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "workload header has ", workload.header.sequences_size(), " sequences, expected 1"));
  }
  if (workload.layers.size() != workload.header.geometry().num_layers()) {
    return absl::InvalidArgumentError(absl::StrCat("workload has ", workload.layers.size(),
                                                   " layers of tensors, the header declares ",
                                                   workload.header.geometry().num_layers()));
  }
  return absl::OkStatus();
}

void Count(std::map<absl::StatusCode, FailureTally>& failures, const absl::Status& status) {
  FailureTally& failure = failures[status.code()];
  if (failure.count++ == 0) failure.first_message = std::string(status.message());
}

void Merge(const std::map<absl::StatusCode, FailureTally>& from,
           std::map<absl::StatusCode, FailureTally>& into) {
  for (const auto& [code, failure] : from) {
    FailureTally& total = into[code];
    if (total.count == 0) total.first_message = failure.first_message;
    total.count += failure.count;
  }
}

double Milliseconds(absl::Duration duration) { return absl::ToDoubleMilliseconds(duration); }

}  // namespace

absl::StatusOr<std::unique_ptr<SyntheticWorkload>> MakeSyntheticWorkload(
    const SyntheticCacheOptions& cache, const v1::MethodSpec& method,
    const v1::OutputSpec& output) {
  absl::StatusOr<SyntheticCache> generated = GenerateSyntheticCache(cache);
  if (!generated.ok()) return generated.status();
  auto out = std::make_unique<SyntheticWorkload>();
  out->cache = *std::move(generated);
  const CacheGeometry& geometry = out->cache.geometry;
  v1::CompressHeader& header = out->workload.header;
  v1::CacheGeometry* g = header.mutable_geometry();
  g->set_num_layers(geometry.num_layers);
  g->set_num_kv_heads(geometry.num_kv_heads);
  g->set_num_query_heads(geometry.num_query_heads);
  g->set_head_dim(geometry.head_dim);
  g->set_dtype(DTypeToProto(geometry.dtype));
  g->set_layout(LayoutToProto(geometry.layout));
  v1::SequenceShape* shape = header.add_sequences();
  shape->set_num_tokens(static_cast<uint32_t>(out->cache.shape.num_tokens));
  shape->set_num_window_queries(out->cache.shape.num_window_queries);
  shape->set_num_score_heads(out->cache.shape.num_score_heads);
  *header.mutable_method() = method;
  *header.mutable_output() = output;
  header.set_transport(v1::TRANSPORT_INLINE);
  for (const LayerInput& layer : out->cache.layers) {
    // Synthetic caches carry no client scores (num_score_heads is 0).
    out->workload.layers.push_back(LayerTensors{layer.keys, layer.values, layer.queries, {}});
  }
  return out;
}

double LoadReport::requests_per_second() const {
  const double seconds = absl::ToDoubleSeconds(measured);
  return seconds > 0 ? static_cast<double>(requests_ok) / seconds : 0.0;
}

double LoadReport::input_tokens_per_second() const {
  return requests_per_second() * static_cast<double>(input_tokens_per_request);
}

double LoadReport::input_bytes_per_second() const {
  return requests_per_second() * static_cast<double>(input_bytes_per_request);
}

absl::StatusOr<LoadReport> RunLoad(Client& client, const LoadWorkload& workload,
                                   const LoadOptions& options) {
  if (absl::Status status = CheckOptions(workload, options); !status.ok()) return status;

  const bool fixed_count = options.requests > 0;
  const absl::Time measure_start = absl::Now() + options.warmup;
  const absl::Time measure_end =
      fixed_count ? absl::InfiniteFuture() : measure_start + options.duration;
  // Measured requests started so far, for the fixed-count mode.
  std::atomic<int64_t> started{0};
  std::vector<WorkerTally> tallies(options.concurrency);
  std::vector<std::thread> workers;
  workers.reserve(options.concurrency);
  for (int w = 0; w < options.concurrency; ++w) {
    workers.emplace_back([&, w] {
      WorkerTally& tally = tallies[w];
      for (;;) {
        const absl::Time begin = absl::Now();
        if (begin >= measure_end) break;
        const bool started_measured = fixed_count && begin >= measure_start;
        if (started_measured && started.fetch_add(1) >= options.requests) break;
        absl::StatusOr<v1::CompressSummary> summary = SendOnce(client, workload, options.deadline);
        const absl::Time end = absl::Now();
        const bool before = fixed_count ? !started_measured : end < measure_start;
        const bool after = !fixed_count && end >= measure_end;
        if (before || after) {
          if (summary.ok()) {
            ++(before ? tally.warmup_ok : tally.after_window_ok);
          } else {
            ++(before ? tally.warmup_failed : tally.after_window_failed);
            Count(tally.unmeasured_failures, summary.status());
          }
          continue;
        }
        tally.last_completion = std::max(tally.last_completion, end);
        if (summary.ok()) {
          ++tally.ok;
          tally.latencies.push_back(end - begin);
          tally.tokens_kept += summary->tokens_kept();
          tally.bytes_out += summary->bytes_out();
        } else {
          ++tally.failed;
          Count(tally.failures, summary.status());
        }
      }
    });
  }
  for (std::thread& worker : workers) worker.join();

  LoadReport report;
  report.input_tokens_per_request = workload.header.sequences(0).num_tokens();
  for (const LayerTensors& layer : workload.layers) {
    report.input_bytes_per_request +=
        layer.keys.size() + layer.values.size() + layer.queries.size() + layer.scores.size();
  }
  std::vector<absl::Duration> latencies;
  absl::Time last_completion = absl::InfinitePast();
  for (WorkerTally& tally : tallies) {
    report.requests_ok += tally.ok;
    report.requests_failed += tally.failed;
    report.warmup_ok += tally.warmup_ok;
    report.warmup_failed += tally.warmup_failed;
    report.after_window_ok += tally.after_window_ok;
    report.after_window_failed += tally.after_window_failed;
    report.tokens_kept += tally.tokens_kept;
    report.bytes_out += tally.bytes_out;
    Merge(tally.failures, report.failures);
    Merge(tally.unmeasured_failures, report.unmeasured_failures);
    latencies.insert(latencies.end(), tally.latencies.begin(), tally.latencies.end());
    last_completion = std::max(last_completion, tally.last_completion);
  }
  if (!fixed_count) {
    report.measured = options.duration;
  } else if (last_completion > measure_start) {
    report.measured = last_completion - measure_start;
  }
  report.latency = SummarizeLatencies(std::move(latencies));
  return report;
}

std::string LoadReportToJson(const LoadReport& report, const LoadWorkload& workload,
                             const LoadOptions& options, const std::string& server) {
  using Json = nlohmann::json;
  const v1::CacheGeometry& g = workload.header.geometry();
  const v1::SequenceShape& shape = workload.header.sequences(0);
  Json failed_by_code = Json::object();
  Json unmeasured_failed_by_code = Json::object();
  Json errors = Json::array();
  for (const bool measured : {true, false}) {
    for (const auto& [code, failure] : measured ? report.failures : report.unmeasured_failures) {
      const std::string name = absl::StatusCodeToString(code);
      (measured ? failed_by_code : unmeasured_failed_by_code)[name] = failure.count;
      errors.push_back({{"code", name},
                        {"count", failure.count},
                        {"measured", measured},
                        {"message", failure.first_message}});
    }
  }
  Json method = Json::parse(MethodSpecToJson(workload.header.method()), nullptr, false);
  const LatencySummary& latency = report.latency;
  Json out = {
      {"server", server},
      {"concurrency", options.concurrency},
      {"measured_seconds", absl::ToDoubleSeconds(report.measured)},
      {"warmup_seconds", absl::ToDoubleSeconds(options.warmup)},
      {"requests",
       {{"ok", report.requests_ok},
        {"failed", report.requests_failed},
        {"failed_by_code", failed_by_code},
        {"warmup_ok", report.warmup_ok},
        {"warmup_failed", report.warmup_failed},
        {"after_window_ok", report.after_window_ok},
        {"after_window_failed", report.after_window_failed},
        {"unmeasured_failed_by_code", unmeasured_failed_by_code}}},
      {"throughput",
       {{"requests_per_second", report.requests_per_second()},
        {"input_tokens_per_second", report.input_tokens_per_second()},
        {"input_gb_per_second", report.input_bytes_per_second() / 1e9}}},
      {"latency_ms",
       {{"count", latency.count},
        {"min", Milliseconds(latency.min)},
        {"mean", Milliseconds(latency.mean)},
        {"p50", Milliseconds(latency.p50)},
        {"p90", Milliseconds(latency.p90)},
        {"p99", Milliseconds(latency.p99)},
        {"max", Milliseconds(latency.max)}}},
      {"output", {{"tokens_kept", report.tokens_kept}, {"bytes", report.bytes_out}}},
      {"workload",
       {{"layers", g.num_layers()},
        {"kv_heads", g.num_kv_heads()},
        {"query_heads", g.num_query_heads()},
        {"head_dim", g.head_dim()},
        {"dtype", v1::DType_Name(g.dtype())},
        {"tokens", shape.num_tokens()},
        {"window", shape.num_window_queries()},
        {"bytes_per_request", report.input_bytes_per_request},
        {"method_name", MethodName(workload.header.method())},
        {"method", method.is_discarded() ? Json() : method}}},
      {"errors", errors},
  };
  return out.dump(2);
}

}  // namespace kvcompress
