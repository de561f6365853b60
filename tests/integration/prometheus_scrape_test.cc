// A real Prometheus server (Debian package prometheus) scrapes a real kvcd every second while
// compressions run against it; queries through Prometheus's HTTP API then must see the target
// up, a positive request rate with kvcd's label set, finite latency quantiles from the stage
// histograms, and an answer to every expression of the Grafana dashboard
// (deploy/grafana/kvcompress-dashboard.json).
//
// Without a `prometheus` binary the test fails (it does not skip).
#include <sys/wait.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <map>
#include <set>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "kvcompress/v1/kvcompress.grpc.pb.h"
#include "tests/integration/grafana_dashboard.h"
#include "tests/integration/kvcd_process.h"
#include "tests/integration/prometheus_server.h"
#include "tests/integration/raw_stream.h"

namespace kvcompress::testing {
namespace {

using ::testing::UnorderedElementsAre;

// Present only with the GPU backend; their panels may be empty on this machine.
const std::set<std::string>& GpuOnlyMetrics() {
  static const std::set<std::string> kNames = {"kvcompress_device_memory_bytes"};
  return kNames;
}

// Drives kvcd from a thread until destroyed: snapkv and knorm compressions of fixed-seed
// random caches, and every fifth stream a header with keep_ratio 1.5 (INVALID_ARGUMENT).
class LoadDriver final {
 public:
  explicit LoadDriver(const std::string& target)
      : channel_(grpc::CreateChannel(target, grpc::InsecureChannelCredentials())),
        thread_([this] { Run(); }) {}
  ~LoadDriver() {
    stop_.store(true);
    thread_.join();
  }

  int ok() const { return ok_.load(); }
  int refused() const { return refused_.load(); }
  int unexpected() const { return unexpected_.load(); }

 private:
  void Run() {
    auto stub = v1::KvCompress::NewStub(channel_);
    v1::CompressHeader snapkv = SmallHeader();
    v1::CompressHeader knorm = SmallHeader();
    knorm.mutable_method()->mutable_scorer()->mutable_knorm();
    knorm.mutable_sequences(0)->set_num_window_queries(0);
    v1::CompressHeader bad = SmallHeader();
    bad.mutable_method()->set_keep_ratio(1.5);
    const std::vector<v1::CompressRequest> requests[] = {ValidRequests(snapkv),
                                                         ValidRequests(knorm)};
    for (int i = 0; !stop_.load(); ++i) {
      if (i % 5 == 4) {
        const StreamOutcome outcome = RunStream(*stub, {HeaderRequest(bad)});
        (outcome.status.error_code() == grpc::StatusCode::INVALID_ARGUMENT ? refused_
                                                                           : unexpected_)++;
      } else {
        const StreamOutcome outcome = RunStream(*stub, requests[i % 2]);
        (outcome.status.ok() && outcome.has_summary() ? ok_ : unexpected_)++;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
  }

  std::shared_ptr<grpc::Channel> channel_;
  std::atomic<bool> stop_{false};
  std::atomic<int> ok_{0}, refused_{0}, unexpected_{0};
  std::thread thread_;
};

// The numbers of an instant vector's samples ("value": [time, "text"]).
std::vector<std::pair<nlohmann::json, double>> Samples(const nlohmann::json& data) {
  std::vector<std::pair<nlohmann::json, double>> samples;
  if (data.value("resultType", "") != "vector") return samples;
  for (const nlohmann::json& series : data["result"]) {
    const std::string text = series["value"][1].get<std::string>();
    samples.emplace_back(series["metric"], std::strtod(text.c_str(), nullptr));
  }
  return samples;
}

std::set<std::string> Keys(const nlohmann::json& object) {
  std::set<std::string> keys;
  for (const auto& [key, value] : object.items()) keys.insert(key);
  return keys;
}

constexpr char kStageQuantile[] =
    "histogram_quantile(0.99, sum by (le, stage) "
    "(rate(kvcompress_request_stage_duration_seconds_bucket{job=\"kvcd\"}[10s])))";
constexpr char kRequestRate[] = "rate(kvcompress_requests_total{job=\"kvcd\"}[10s])";

TEST(PrometheusScrapeTest, PrometheusScrapesKvcdAndAnswersTheDashboardsQueries) {
  auto kvcd = KvcdProcess::Start();
  ASSERT_TRUE(kvcd.ok()) << kvcd.status();
  auto prometheus = PrometheusServer::Start((*kvcd)->metrics_port(), "kvcd");
  ASSERT_TRUE(prometheus.ok()) << prometheus.status();
  PrometheusServer& server = **prometheus;
  auto load = std::make_unique<LoadDriver>((*kvcd)->target());

  // Wait (bounded) until Prometheus has scraped enough for every series below: the target
  // up, all three (method, code) pairs with a positive rate, a quantile for each stage.
  const std::set<std::pair<std::string, std::string>> wanted_pairs = {
      {"snapkv", "OK"}, {"knorm", "OK"}, {"snapkv", "INVALID_ARGUMENT"}};
  std::string last_state = "no query answered yet";
  bool ready = false;
  const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(90);
  while (!ready && std::chrono::steady_clock::now() < give_up) {
    std::this_thread::sleep_for(std::chrono::milliseconds(500));
    auto up = server.Query("up{job=\"kvcd\"}");
    auto rates = server.Query(kRequestRate);
    auto stages = server.Query(kStageQuantile);
    if (!up.ok() || !rates.ok() || !stages.ok()) {
      last_state = absl::StrCat(up.status().ToString(), "; ", rates.status().ToString(), "; ",
                                stages.status().ToString());
      continue;
    }
    std::set<std::pair<std::string, std::string>> positive;
    for (const auto& [metric, value] : Samples(*rates)) {
      if (value > 0) positive.insert({metric.value("method", ""), metric.value("code", "")});
    }
    int finite_stages = 0;
    for (const auto& [metric, value] : Samples(*stages)) finite_stages += std::isfinite(value);
    last_state = absl::StrCat("up: ", up->dump(), "\nrates: ", rates->dump(),
                              "\nstage quantiles: ", stages->dump());
    ready = Samples(*up).size() == 1 && Samples(*up)[0].second == 1 && positive == wanted_pairs &&
            finite_stages == 6;
  }
  ASSERT_TRUE(ready) << "Prometheus did not see kvcd's requests within 90 s. Last answers:\n"
                     << last_state << "\nprometheus log:\n"
                     << server.LogTail();

  // The label set kvcd gives request counts, plus the target labels Prometheus adds.
  auto rates = server.Query(kRequestRate);
  ASSERT_TRUE(rates.ok()) << rates.status();
  const std::string instance = absl::StrCat("127.0.0.1:", (*kvcd)->metrics_port());
  std::set<std::pair<std::string, std::string>> pairs;
  for (const auto& [metric, value] : Samples(*rates)) {
    EXPECT_THAT(Keys(metric), UnorderedElementsAre("method", "code", "job", "instance"))
        << metric.dump();
    EXPECT_EQ(metric.value("job", ""), "kvcd");
    EXPECT_EQ(metric.value("instance", ""), instance);
    EXPECT_TRUE(std::isfinite(value) && value >= 0) << metric.dump() << " " << value;
    pairs.insert({metric.value("method", ""), metric.value("code", "")});
  }
  EXPECT_EQ(pairs, wanted_pairs);

  auto stages = server.Query(kStageQuantile);
  ASSERT_TRUE(stages.ok()) << stages.status();
  std::set<std::string> stage_names;
  for (const auto& [metric, value] : Samples(*stages)) {
    const std::string stage = metric.value("stage", "");
    stage_names.insert(stage);
    EXPECT_TRUE(std::isfinite(value) && value > 0) << "p99 of stage " << stage << ": " << value;
  }
  EXPECT_THAT(stage_names,
              UnorderedElementsAre("receive", "queue", "score", "select", "gather", "send"));

  auto latency = server.Query(
      "histogram_quantile(0.5, sum by (le) "
      "(rate(kvcompress_request_duration_seconds_bucket{job=\"kvcd\"}[10s])))");
  ASSERT_TRUE(latency.ok()) << latency.status();
  ASSERT_EQ(Samples(*latency).size(), 1u) << latency->dump();
  const double p50 = Samples(*latency)[0].second;
  EXPECT_TRUE(std::isfinite(p50) && p50 > 0 && p50 < 30) << p50;

  // Every dashboard expression evaluates, and returns series unless only a GPU feeds it.
  auto dashboard = LoadDashboard(DashboardPath());
  ASSERT_TRUE(dashboard.ok()) << dashboard.status();
  const std::vector<DashboardQuery> queries = DashboardQueries(*dashboard);
  ASSERT_FALSE(queries.empty());
  for (const DashboardQuery& query : queries) {
    SCOPED_TRACE(
        absl::StrCat("panel \"", query.panel, "\" target ", query.ref_id, ": ", query.expr));
    auto answer = server.Query(ExpandGrafanaVariables(query.expr, "20s"));
    ASSERT_TRUE(answer.ok()) << answer.status();
    bool gpu_only = true;
    for (const std::string& name : KvcompressMetricNames(query.expr)) {
      gpu_only = gpu_only && GpuOnlyMetrics().count(name) > 0;
    }
    if (!gpu_only) {
      EXPECT_FALSE((*answer)["result"].empty()) << answer->dump();
    }
  }

  EXPECT_GT(load->ok(), 0);
  EXPECT_GT(load->refused(), 0);
  EXPECT_EQ(load->unexpected(), 0) << "a compression of the load failed or was not refused";
  load.reset();
  auto prometheus_exit = server.Terminate(30);
  ASSERT_TRUE(prometheus_exit.ok()) << prometheus_exit.status();
  EXPECT_TRUE(WIFEXITED(*prometheus_exit) && WEXITSTATUS(*prometheus_exit) == 0)
      << "prometheus exit status " << *prometheus_exit << "\n"
      << server.LogTail();
  auto kvcd_exit = (*kvcd)->Terminate(30);
  ASSERT_TRUE(kvcd_exit.ok()) << kvcd_exit.status();
  EXPECT_TRUE(WIFEXITED(*kvcd_exit) && WEXITSTATUS(*kvcd_exit) == 0) << *kvcd_exit;
}

}  // namespace
}  // namespace kvcompress::testing
