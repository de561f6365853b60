// `kvc bench` against a real kvcd: a short load with four concurrent streams succeeds and
// reports consistent numbers; a method the server rejects is counted by status code in the
// report (and fails the command), never a crash or a hang.
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/integration/kvcd_process.h"

namespace kvcompress::testing {
namespace {

using ::testing::HasSubstr;
using Json = nlohmann::json;

class KvcBenchTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    auto server = KvcdProcess::Start();
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = server->release();
  }
  static void TearDownTestSuite() { delete server_; }

  // Runs kvc bench on a small cache (4 layers × 2 KV heads, T = 1024, W = 16).
  static CommandResult Bench(const std::vector<std::string>& flags) {
    std::vector<std::string> argv = {BinDir() + "/kvc", "bench",         "--server",
                                     server_->target(), "--layers=4",    "--kv-heads=2",
                                     "--query-heads=8", "--head-dim=64", "--tokens=1024"};
    argv.insert(argv.end(), flags.begin(), flags.end());
    absl::StatusOr<CommandResult> run = RunCommand(argv);
    EXPECT_TRUE(run.ok()) << run.status();
    return run.ok() ? *run : CommandResult{};
  }

  // The JSON report: stdout, before the error line a failed run adds on stderr.
  static Json Report(const std::string& output) {
    const std::string json = output.substr(0, output.find("kvc: error"));
    Json parsed = Json::parse(json, nullptr, false);
    EXPECT_FALSE(parsed.is_discarded()) << output;
    return parsed;
  }

  static KvcdProcess* server_;
};

KvcdProcess* KvcBenchTest::server_ = nullptr;

TEST_F(KvcBenchTest, FourStreamsForTwoSecondsAllSucceedWithConsistentCounts) {
  const CommandResult run = Bench({"--concurrency=4", "--duration=2s", "--warmup=300ms",
                                   "--window=16", "--method=snapkv", "--keep=0.1", "--json"});
  ASSERT_EQ(run.exit_code, 0) << run.output;
  const Json report = Report(run.output);
  ASSERT_TRUE(report.is_object());

  const int64_t ok = report["requests"]["ok"];
  EXPECT_GT(ok, 0);
  EXPECT_EQ(report["requests"]["failed"], 0);
  EXPECT_TRUE(report["requests"]["failed_by_code"].empty());
  EXPECT_TRUE(report["errors"].empty());
  EXPECT_EQ(report["requests"]["warmup_failed"], 0);
  EXPECT_EQ(report["requests"]["after_window_failed"], 0);
  EXPECT_EQ(report["concurrency"], 4);

  const Json& latency = report["latency_ms"];
  EXPECT_EQ(latency["count"], ok);
  const double min = latency["min"], p50 = latency["p50"], p90 = latency["p90"],
               p99 = latency["p99"], max = latency["max"], mean = latency["mean"];
  EXPECT_GT(min, 0.0);
  EXPECT_LE(min, p50);
  EXPECT_LE(p50, p90);
  EXPECT_LE(p90, p99);
  EXPECT_LE(p99, max);
  EXPECT_LE(min, mean);
  EXPECT_LE(mean, max);

  // Duration mode measures the requests that finished inside the 2-s window, over 2 s.
  const double seconds = report["measured_seconds"];
  EXPECT_DOUBLE_EQ(seconds, 2.0);
  const Json& throughput = report["throughput"];
  EXPECT_NEAR(throughput["requests_per_second"].get<double>(), ok / seconds, 1e-6 * ok);
  EXPECT_NEAR(throughput["input_tokens_per_second"].get<double>(), 1024.0 * ok / seconds,
              1e-3 * ok);
  // K and V of 4 layers × 2 heads × 1024 tokens × 64 dims, queries 4 × 8 × 16 × 64, bf16.
  const int64_t bytes = 4 * (2 * 2 * 1024 * 64 + 8 * 16 * 64) * 2;
  EXPECT_EQ(report["workload"]["bytes_per_request"], bytes);
  EXPECT_NEAR(throughput["input_gb_per_second"].get<double>(), bytes * ok / seconds / 1e9, 1e-9);
  // snapkv keep 0.1 keeps floor(1024 · 0.1) = 102 rows per head: 4 layers × 2 heads each.
  EXPECT_EQ(report["output"]["tokens_kept"], ok * 102 * 4 * 2);
  EXPECT_EQ(report["workload"]["method"]["scorer"]["snapkv"]["window_size"], 16);
}

TEST_F(KvcBenchTest, FixedRequestCountInTextForm) {
  const CommandResult run = Bench(
      {"--concurrency=2", "--requests=5", "--warmup=0", "--method=knorm", "--keep-tokens=64"});
  ASSERT_EQ(run.exit_code, 0) << run.output;
  EXPECT_THAT(run.output, HasSubstr("requests    ok 5, failed 0"));
  EXPECT_THAT(run.output, HasSubstr("latency     p50 "));
  EXPECT_THAT(run.output, HasSubstr("requests/s"));
  EXPECT_THAT(run.output, HasSubstr("6.25% of tokens kept"));  // 64 of 1024
}

TEST_F(KvcBenchTest, RejectedRequestsAreCountedByStatusCode) {
  // snapkv scores with window queries; a cache without any is INVALID_ARGUMENT at the server.
  const CommandResult run = Bench({"--concurrency=3", "--requests=6", "--warmup=0", "--window=0",
                                   "--method=snapkv", "--keep=0.1", "--json"});
  EXPECT_EQ(run.exit_code, 1) << run.output;
  EXPECT_THAT(run.output, HasSubstr("kvc: error: INVALID_ARGUMENT: 6 of 6 requests failed"));
  const Json report = Report(run.output);
  ASSERT_TRUE(report.is_object());
  EXPECT_EQ(report["requests"]["ok"], 0);
  EXPECT_EQ(report["requests"]["failed"], 6);
  EXPECT_EQ(report["requests"]["failed_by_code"], Json({{"INVALID_ARGUMENT", 6}}));
  ASSERT_EQ(report["errors"].size(), 1u);
  EXPECT_FALSE(report["errors"][0]["message"].get<std::string>().empty());
  EXPECT_EQ(report["latency_ms"]["count"], 0);
  EXPECT_EQ(report["throughput"]["requests_per_second"], 0.0);
  EXPECT_TRUE(server_->Alive());
}

TEST_F(KvcBenchTest, UsageErrors) {
  absl::StatusOr<CommandResult> run =
      RunCommand({BinDir() + "/kvc", "bench", "--method=knorm", "--keep=0.5"});
  ASSERT_TRUE(run.ok());
  EXPECT_EQ(run->exit_code, 2);
  EXPECT_THAT(run->output, HasSubstr("--server is required"));

  const CommandResult both =
      Bench({"--duration=1s", "--requests=3", "--method=knorm", "--keep=0.5"});
  EXPECT_EQ(both.exit_code, 2);
  EXPECT_THAT(both.output, HasSubstr("not both"));

  const CommandResult duration = Bench({"--duration=soon", "--method=knorm", "--keep=0.5"});
  EXPECT_EQ(duration.exit_code, 2);
  EXPECT_THAT(duration.output, HasSubstr("--duration=soon"));

  const CommandResult stage = Bench({"--requests=1", "--method=knorm", "--keep=0.5", "--sinks=4"});
  EXPECT_EQ(stage.exit_code, 2);
  EXPECT_THAT(stage.output, HasSubstr("--sinks"));
}

}  // namespace
}  // namespace kvcompress::testing
