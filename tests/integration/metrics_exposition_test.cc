// kvcd's real /metrics page, after successful and failed compressions: it passes
// `promtool check metrics` (the Prometheus project's own parser and linter) without a
// single remark, and it carries the metric set of DESIGN §7 with the documented types,
// labels and values (service/README.md lists them).
//
// promtool comes with the Debian package prometheus (scripts/install_deps.sh installs it);
// without it these tests fail rather than skip.
#include "tests/integration/metrics_exposition.h"

#include <chrono>
#include <cmath>
#include <fstream>
#include <map>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_split.h"
#include "gmock/gmock.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "kvcompress/v1/kvcompress.grpc.pb.h"
#include "tests/integration/kvcd_process.h"
#include "tests/integration/raw_stream.h"

namespace kvcompress::testing {
namespace {

using ::testing::IsEmpty;
using ::testing::UnorderedElementsAreArray;

constexpr int kSnapKvRequests = 3;
constexpr int kKnormRequests = 2;

v1::CompressHeader KnormHeader() {
  v1::CompressHeader header = SmallHeader();
  header.mutable_method()->mutable_scorer()->mutable_knorm();
  header.mutable_sequences(0)->set_num_window_queries(0);
  return header;
}

uint64_t ChunkBytes(const std::vector<v1::CompressRequest>& requests) {
  uint64_t bytes = 0;
  for (const auto& request : requests) {
    if (request.has_chunk()) bytes += request.chunk().data().size();
  }
  return bytes;
}

// Runs `path` on `input` through a shell redirect (promtool check metrics reads stdin).
CommandResult RunWithStdin(const std::string& program, const std::string& arguments,
                           const std::string& input) {
  const std::string file = MakeScratchDir() + "/input.txt";
  std::ofstream(file) << input;
  auto result = RunCommand({"/bin/sh", "-c", program + " " + arguments + " < '" + file + "'"});
  EXPECT_TRUE(result.ok()) << result.status();
  return result.ok() ? *result : CommandResult{};
}

// The one sample of `family` whose labels are exactly `labels`; NaN when there is none.
double SampleValue(const ExposedFamily& family, const std::string& name,
                   const std::map<std::string, std::string>& labels) {
  for (const ExposedSample& sample : family.samples) {
    if (sample.name == name && sample.labels == labels) return sample.value;
  }
  return NAN;
}

class MetricsExpositionTest : public ::testing::Test {
 protected:
  // One kvcd for the suite; the compressions below run once, before the first test.
  static void SetUpTestSuite() {
    auto server = KvcdProcess::Start();
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = server->release();
    auto channel = grpc::CreateChannel(server_->target(), grpc::InsecureChannelCredentials());
    auto stub = v1::KvCompress::NewStub(channel);

    for (int i = 0; i < kSnapKvRequests; ++i) {
      const auto requests = ValidRequests(SmallHeader());
      bytes_received_ += ChunkBytes(requests);
      const StreamOutcome outcome = RunStream(*stub, requests);
      ASSERT_TRUE(outcome.status.ok()) << outcome.status.error_message();
    }
    for (int i = 0; i < kKnormRequests; ++i) {
      const auto requests = ValidRequests(KnormHeader());
      bytes_received_ += ChunkBytes(requests);
      const StreamOutcome outcome = RunStream(*stub, requests);
      ASSERT_TRUE(outcome.status.ok()) << outcome.status.error_message();
    }
    // A header kvcd must refuse: keep_ratio above 1.
    v1::CompressHeader bad = SmallHeader();
    bad.mutable_method()->set_keep_ratio(1.5);
    const StreamOutcome refused = RunStream(*stub, {HeaderRequest(bad)});
    ASSERT_EQ(refused.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT)
        << refused.status.error_message();
    // A stream that starts with a chunk instead of a header.
    const StreamOutcome headless = RunStream(*stub, {ChunkRequest(ChunksFor(SmallHeader())[0])});
    ASSERT_EQ(headless.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT)
        << headless.status.error_message();

    // A stream leaves the in-flight gauge when its reactor is done, which can be just after
    // the client has its status: wait (bounded) for it before reading the page.
    const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(30);
    while (std::chrono::steady_clock::now() < give_up) {
      auto page = HttpGet(server_->metrics_port(), "/metrics");
      ASSERT_TRUE(page.ok()) << page.status();
      exposition_ = *page;
      if (exposition_.find("\nkvcompress_requests_in_flight 0\n") != std::string::npos) break;
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
  }

  static void TearDownTestSuite() {
    delete server_;
    server_ = nullptr;
  }

  static KvcdProcess* server_;
  static std::string exposition_;
  static uint64_t bytes_received_;
};

KvcdProcess* MetricsExpositionTest::server_ = nullptr;
std::string MetricsExpositionTest::exposition_;
uint64_t MetricsExpositionTest::bytes_received_ = 0;

TEST_F(MetricsExpositionTest, PromtoolCheckMetricsPassesWithoutRemarks) {
  const std::string promtool = FindProgram("promtool");
  ASSERT_FALSE(promtool.empty())
      << "promtool not found in PATH: install the Debian package prometheus "
         "(scripts/install_deps.sh does); this test does not skip";
  ASSERT_THAT(exposition_, ::testing::HasSubstr("kvcompress_requests_total{"));
  const CommandResult result = RunWithStdin(promtool, "check metrics", exposition_);
  EXPECT_EQ(result.exit_code, 0) << result.output;
  EXPECT_THAT(result.output, IsEmpty()) << "promtool remarks on kvcd's /metrics";
}

// The check above means something only if promtool does lint what it reads.
TEST_F(MetricsExpositionTest, PromtoolFlagsAConventionBreach) {
  const std::string promtool = FindProgram("promtool");
  ASSERT_FALSE(promtool.empty()) << "promtool not found in PATH (Debian package prometheus)";
  const CommandResult result =
      RunWithStdin(promtool, "check metrics",
                   "# HELP kvcompress_requests Streams.\n# TYPE kvcompress_requests counter\n"
                   "kvcompress_requests 1\n");
  EXPECT_NE(result.exit_code, 0);
  EXPECT_THAT(result.output, ::testing::HasSubstr("_total"));
}

struct ExpectedFamily {
  std::string name;
  std::string type;
  std::set<std::string> labels;
};

// DESIGN §7's metric set as kvcd exposes it (service/README.md documents each).
TEST_F(MetricsExpositionTest, ExposesTheDesignedMetricSet) {
  auto families = ParseExposition(exposition_);
  ASSERT_TRUE(families.ok()) << families.status();
  const std::vector<ExpectedFamily> expected = {
      {"kvcompress_requests_total", "counter", {"method", "code"}},
      {"kvcompress_errors_total", "counter", {"reason"}},
      {"kvcompress_request_duration_seconds", "histogram", {"method"}},
      {"kvcompress_request_stage_duration_seconds", "histogram", {"stage"}},
      {"kvcompress_layer_stage_duration_seconds", "histogram", {"stage"}},
      {"kvcompress_tokens_in_total", "counter", {}},
      {"kvcompress_tokens_kept_total", "counter", {}},
      {"kvcompress_bytes_received_total", "counter", {"transport"}},
      {"kvcompress_bytes_sent_total", "counter", {"transport"}},
      {"kvcompress_compression_ratio", "histogram", {}},
      {"kvcompress_attention_mass_kept_ratio", "histogram", {}},
      {"kvcompress_requests_in_flight", "gauge", {}},
      {"kvcompress_queue_depth", "gauge", {}},
      {"kvcompress_layers_running", "gauge", {}},
      {"kvcompress_buffered_bytes", "gauge", {}},
      {"kvcompress_buffered_limit_bytes", "gauge", {}},
  };
  for (const ExpectedFamily& want : expected) {
    SCOPED_TRACE(want.name);
    const auto it = families->find(want.name);
    ASSERT_NE(it, families->end()) << "missing from /metrics";
    EXPECT_EQ(it->second.type, want.type);
    EXPECT_FALSE(it->second.help.empty());
    EXPECT_THAT(it->second.label_names, UnorderedElementsAreArray(want.labels));
  }
  // Registered for the GPU backend; a CPU-only kvcd declares it without series.
  const auto device_memory = families->find("kvcompress_device_memory_bytes");
  ASSERT_NE(device_memory, families->end());
  EXPECT_EQ(device_memory->second.type, "gauge");
  if (!device_memory->second.samples.empty()) {
    EXPECT_THAT(device_memory->second.label_names,
                UnorderedElementsAreArray(std::set<std::string>{"device", "state"}));
  }
}

TEST_F(MetricsExpositionTest, EveryFamilyFollowsTheNamingConventions) {
  auto families = ParseExposition(exposition_);
  ASSERT_TRUE(families.ok()) << families.status();
  for (const auto& [name, family] : *families) {
    SCOPED_TRACE(name);
    EXPECT_EQ(name.rfind("kvcompress_", 0), 0u) << "every family has the kvcompress_ prefix";
    const bool total = name.size() > 6 && name.compare(name.size() - 6, 6, "_total") == 0;
    EXPECT_EQ(total, family.type == "counter") << "_total exactly on counters";
    const std::vector<std::string> words = absl::StrSplit(name, '_');
    for (const char* unit : {"milliseconds", "microseconds", "nanoseconds", "minutes", "hours",
                             "kilobytes", "megabytes", "gigabytes", "bits", "percent", "ms", "us",
                             "ns", "sec", "secs", "kb", "mb", "gb"}) {
      EXPECT_THAT(words, ::testing::Not(::testing::Contains(unit))) << "base units only";
    }
  }
}

TEST_F(MetricsExpositionTest, CountsWhatTheCompressionsDid) {
  auto families = ParseExposition(exposition_);
  ASSERT_TRUE(families.ok()) << families.status();
  auto family = [&](const std::string& name) -> const ExposedFamily& {
    static const ExposedFamily kEmpty;
    const auto it = families->find(name);
    return it == families->end() ? kEmpty : it->second;
  };
  const ExposedFamily& requests = family("kvcompress_requests_total");
  EXPECT_EQ(
      SampleValue(requests, "kvcompress_requests_total", {{"method", "snapkv"}, {"code", "OK"}}),
      kSnapKvRequests);
  EXPECT_EQ(
      SampleValue(requests, "kvcompress_requests_total", {{"method", "knorm"}, {"code", "OK"}}),
      kKnormRequests);
  EXPECT_EQ(SampleValue(requests, "kvcompress_requests_total",
                        {{"method", "snapkv"}, {"code", "INVALID_ARGUMENT"}}),
            1);
  EXPECT_EQ(SampleValue(requests, "kvcompress_requests_total",
                        {{"method", "unknown"}, {"code", "INVALID_ARGUMENT"}}),
            1);
  const ExposedFamily& errors = family("kvcompress_errors_total");
  EXPECT_EQ(SampleValue(errors, "kvcompress_errors_total", {{"reason", "invalid_header"}}), 1);
  EXPECT_EQ(SampleValue(errors, "kvcompress_errors_total", {{"reason", "malformed_stream"}}), 1);
  EXPECT_EQ(errors.samples.size(), 2u);

  // SmallHeader: 2 layers × 2 KV heads × 100 tokens per request.
  constexpr int kOk = kSnapKvRequests + kKnormRequests;
  EXPECT_EQ(SampleValue(family("kvcompress_tokens_in_total"), "kvcompress_tokens_in_total", {}),
            kOk * 2 * 2 * 100);
  EXPECT_EQ(SampleValue(family("kvcompress_tokens_kept_total"), "kvcompress_tokens_kept_total", {}),
            kOk * 2 * 2 * 50);
  EXPECT_EQ(SampleValue(family("kvcompress_bytes_received_total"),
                        "kvcompress_bytes_received_total", {{"transport", "inline"}}),
            static_cast<double>(bytes_received_));
  EXPECT_GT(SampleValue(family("kvcompress_bytes_sent_total"), "kvcompress_bytes_sent_total",
                        {{"transport", "inline"}}),
            0);

  const ExposedFamily& stages = family("kvcompress_request_stage_duration_seconds");
  for (const char* stage : {"receive", "queue", "score", "select", "gather", "send"}) {
    EXPECT_EQ(
        SampleValue(stages, "kvcompress_request_stage_duration_seconds_count", {{"stage", stage}}),
        kOk)
        << stage;
  }
  EXPECT_EQ(
      SampleValue(family("kvcompress_compression_ratio"), "kvcompress_compression_ratio_count", {}),
      kOk);
  EXPECT_EQ(
      SampleValue(family("kvcompress_compression_ratio"), "kvcompress_compression_ratio_sum", {}),
      kOk * 0.5);
  // Attention mass: per layer, attention scorers only (snapkv here, not knorm).
  EXPECT_EQ(SampleValue(family("kvcompress_attention_mass_kept_ratio"),
                        "kvcompress_attention_mass_kept_ratio_count", {}),
            kSnapKvRequests * 2);
  EXPECT_EQ(SampleValue(family("kvcompress_request_duration_seconds"),
                        "kvcompress_request_duration_seconds_count", {{"method", "snapkv"}}),
            kSnapKvRequests + 1);
  EXPECT_EQ(
      SampleValue(family("kvcompress_requests_in_flight"), "kvcompress_requests_in_flight", {}), 0);
}

}  // namespace
}  // namespace kvcompress::testing
