// The load generator without a server: workloads match the header they declare, options are
// checked before anything is sent, requests that fail are counted by status code (here
// against a port nobody listens on), and the JSON report parses.
#include "client/load_generator.h"

#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <string>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace kvcompress {
namespace {

SyntheticCacheOptions SmallCache() {
  SyntheticCacheOptions options;
  options.num_layers = 2;
  options.num_kv_heads = 2;
  options.num_query_heads = 4;
  options.head_dim = 16;
  options.num_tokens = 64;
  options.num_window_queries = 8;
  options.salient_tokens_per_head = 4;
  options.outlier_channel_pairs = 1;
  return options;
}

v1::MethodSpec Knorm() {
  v1::MethodSpec method;
  method.mutable_scorer()->mutable_knorm();
  method.set_keep_ratio(0.5);
  return method;
}

// A loopback port that refuses connections: bound, then closed.
int ClosedPort() {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t length = sizeof(address);
  ::bind(fd, reinterpret_cast<sockaddr*>(&address), sizeof(address));
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&address), &length);
  ::close(fd);
  return ntohs(address.sin_port);
}

TEST(LoadGeneratorTest, SyntheticWorkloadMatchesItsHeader) {
  absl::StatusOr<std::unique_ptr<SyntheticWorkload>> w =
      MakeSyntheticWorkload(SmallCache(), Knorm(), v1::OutputSpec());
  ASSERT_TRUE(w.ok()) << w.status();
  const LoadWorkload& load = (*w)->workload;
  ASSERT_EQ(load.header.sequences_size(), 1);
  EXPECT_EQ(load.header.sequences(0).num_tokens(), 64u);
  EXPECT_EQ(load.header.sequences(0).num_window_queries(), 8u);
  EXPECT_EQ(load.header.geometry().dtype(), v1::DTYPE_BFLOAT16);
  EXPECT_TRUE(load.header.method().scorer().has_knorm());
  const LayerTensorBytes expected = ExpectedLayerBytes(load.header, 0);
  ASSERT_EQ(load.layers.size(), 2u);
  for (const LayerTensors& layer : load.layers) {
    EXPECT_EQ(layer.keys.size(), expected.keys);
    EXPECT_EQ(layer.values.size(), expected.keys);
    EXPECT_EQ(layer.queries.size(), expected.queries);
    EXPECT_TRUE(layer.scores.empty());
  }
}

TEST(LoadGeneratorTest, BadOptionsAreRejectedBeforeSending) {
  absl::StatusOr<std::unique_ptr<SyntheticWorkload>> w =
      MakeSyntheticWorkload(SmallCache(), Knorm(), v1::OutputSpec());
  ASSERT_TRUE(w.ok());
  absl::StatusOr<std::unique_ptr<Client>> client = Client::Connect("127.0.0.1:1");
  ASSERT_TRUE(client.ok());
  auto run = [&](LoadOptions options) {
    return RunLoad(**client, (*w)->workload, options).status();
  };
  EXPECT_THAT(run({.concurrency = 0}).message(), ::testing::HasSubstr("concurrency 0"));
  EXPECT_EQ(run({.duration = absl::ZeroDuration()}).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(run({.requests = -1}).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(run({.requests = 1, .warmup = absl::Seconds(-1)}).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(run({.requests = 1, .deadline = absl::ZeroDuration()}).code(),
            absl::StatusCode::kInvalidArgument);
  LoadWorkload missing_layer = (*w)->workload;
  missing_layer.layers.pop_back();
  EXPECT_THAT(RunLoad(**client, missing_layer, {.requests = 1}).status().message(),
              ::testing::HasSubstr("1 layers of tensors, the header declares 2"));
}

TEST(LoadGeneratorTest, UnreachableServerFailuresAreCountedByCode) {
  absl::StatusOr<std::unique_ptr<SyntheticWorkload>> w =
      MakeSyntheticWorkload(SmallCache(), Knorm(), v1::OutputSpec());
  ASSERT_TRUE(w.ok());
  const std::string target = "127.0.0.1:" + std::to_string(ClosedPort());
  absl::StatusOr<std::unique_ptr<Client>> client = Client::Connect(target);
  ASSERT_TRUE(client.ok());
  const LoadOptions options{.concurrency = 3, .requests = 7, .deadline = absl::Seconds(20)};
  absl::StatusOr<LoadReport> report = RunLoad(**client, (*w)->workload, options);
  ASSERT_TRUE(report.ok()) << report.status();
  EXPECT_EQ(report->requests_ok, 0);
  EXPECT_EQ(report->requests_failed, 7);
  ASSERT_EQ(report->failures.size(), 1u);
  EXPECT_EQ(report->failures.begin()->first, absl::StatusCode::kUnavailable);
  EXPECT_EQ(report->failures.begin()->second.count, 7);
  EXPECT_FALSE(report->failures.begin()->second.first_message.empty());
  EXPECT_EQ(report->latency.count, 0);
  EXPECT_EQ(report->requests_per_second(), 0.0);

  const nlohmann::json json =
      nlohmann::json::parse(LoadReportToJson(*report, (*w)->workload, options, target));
  EXPECT_EQ(json["requests"]["failed"], 7);
  EXPECT_EQ(json["requests"]["failed_by_code"]["UNAVAILABLE"], 7);
  EXPECT_EQ(json["errors"][0]["code"], "UNAVAILABLE");
  EXPECT_EQ(json["workload"]["tokens"], 64);
  EXPECT_EQ(json["workload"]["method_name"], "knorm");
  EXPECT_TRUE(json["workload"]["method"]["scorer"].contains("knorm"));
  EXPECT_EQ(json["server"], target);
}

TEST(LoadGeneratorTest, UnmeasuredFailuresAreTalliedApart) {
  absl::StatusOr<std::unique_ptr<SyntheticWorkload>> w =
      MakeSyntheticWorkload(SmallCache(), Knorm(), v1::OutputSpec());
  ASSERT_TRUE(w.ok());
  const std::string target = "127.0.0.1:" + std::to_string(ClosedPort());
  absl::StatusOr<std::unique_ptr<Client>> client = Client::Connect(target);
  ASSERT_TRUE(client.ok());
  const LoadOptions options{.requests = 2, .warmup = absl::Milliseconds(50)};
  absl::StatusOr<LoadReport> report = RunLoad(**client, (*w)->workload, options);
  ASSERT_TRUE(report.ok()) << report.status();
  EXPECT_EQ(report->requests_failed, 2);
  EXPECT_EQ(report->failures.at(absl::StatusCode::kUnavailable).count, 2);
  EXPECT_GT(report->warmup_failed, 0);
  EXPECT_EQ(report->warmup_ok, 0);
  EXPECT_EQ(report->after_window_failed, 0);  // requests mode has no window to outlast
  ASSERT_EQ(report->unmeasured_failures.size(), 1u);
  EXPECT_EQ(report->unmeasured_failures.at(absl::StatusCode::kUnavailable).count,
            report->warmup_failed);

  const nlohmann::json json =
      nlohmann::json::parse(LoadReportToJson(*report, (*w)->workload, options, target));
  EXPECT_EQ(json["requests"]["unmeasured_failed_by_code"]["UNAVAILABLE"], report->warmup_failed);
  EXPECT_EQ(json["errors"].size(), 2u);
  EXPECT_EQ(json["errors"][0]["measured"], true);
  EXPECT_EQ(json["errors"][1]["measured"], false);
}

TEST(LoadGeneratorTest, RatesFollowTheMeasuredWindow) {
  LoadReport report;
  report.requests_ok = 50;
  report.measured = absl::Seconds(10);
  report.input_tokens_per_request = 4096;
  report.input_bytes_per_request = 1000;
  EXPECT_DOUBLE_EQ(report.requests_per_second(), 5.0);
  EXPECT_DOUBLE_EQ(report.input_tokens_per_second(), 5.0 * 4096);
  EXPECT_DOUBLE_EQ(report.input_bytes_per_second(), 5000.0);
}

}  // namespace
}  // namespace kvcompress
