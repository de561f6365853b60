#include "service/metrics_registry.h"

#include <limits>
#include <thread>
#include <vector>

#include "gtest/gtest.h"

namespace kvcompress {
namespace {

TEST(MetricsRegistryTest, ExactExposition) {
  MetricsRegistry registry;
  CounterFamily& requests = registry.AddCounter("kvcompress_requests_total",
                                                "Compress streams finished.", {"method", "code"});
  CounterFamily& bytes = registry.AddCounter("kvcompress_bytes_received_total", "Bytes in.");
  GaugeFamily& in_flight = registry.AddGauge("kvcompress_requests_in_flight", "Open streams.");
  registry.AddGaugeCallback("kvcompress_queue_depth", "Jobs waiting.", [] { return 7.0; });
  HistogramFamily& duration = registry.AddHistogram("kvcompress_request_duration_seconds",
                                                    "Stream duration.", {0.1, 1, 10}, {"method"});

  requests.Increment({"snapkv", "OK"});
  requests.Increment({"snapkv", "OK"});
  requests.Increment({"knorm", "INVALID_ARGUMENT"});
  bytes.Add({}, 4193280);
  in_flight.Add({}, 3);
  in_flight.Add({}, -1);
  duration.Observe({"snapkv"}, 0.05);
  duration.Observe({"snapkv"}, 0.1);  // le is inclusive
  duration.Observe({"snapkv"}, 2.5);
  duration.Observe({"snapkv"}, 100);
  duration.Observe({"knorm"}, 0.5);

  EXPECT_EQ(registry.Exposition(),
            "# HELP kvcompress_requests_total Compress streams finished.\n"
            "# TYPE kvcompress_requests_total counter\n"
            "kvcompress_requests_total{method=\"knorm\",code=\"INVALID_ARGUMENT\"} 1\n"
            "kvcompress_requests_total{method=\"snapkv\",code=\"OK\"} 2\n"
            "# HELP kvcompress_bytes_received_total Bytes in.\n"
            "# TYPE kvcompress_bytes_received_total counter\n"
            "kvcompress_bytes_received_total 4193280\n"
            "# HELP kvcompress_requests_in_flight Open streams.\n"
            "# TYPE kvcompress_requests_in_flight gauge\n"
            "kvcompress_requests_in_flight 2\n"
            "# HELP kvcompress_queue_depth Jobs waiting.\n"
            "# TYPE kvcompress_queue_depth gauge\n"
            "kvcompress_queue_depth 7\n"
            "# HELP kvcompress_request_duration_seconds Stream duration.\n"
            "# TYPE kvcompress_request_duration_seconds histogram\n"
            "kvcompress_request_duration_seconds_bucket{method=\"knorm\",le=\"0.1\"} 0\n"
            "kvcompress_request_duration_seconds_bucket{method=\"knorm\",le=\"1\"} 1\n"
            "kvcompress_request_duration_seconds_bucket{method=\"knorm\",le=\"10\"} 1\n"
            "kvcompress_request_duration_seconds_bucket{method=\"knorm\",le=\"+Inf\"} 1\n"
            "kvcompress_request_duration_seconds_sum{method=\"knorm\"} 0.5\n"
            "kvcompress_request_duration_seconds_count{method=\"knorm\"} 1\n"
            "kvcompress_request_duration_seconds_bucket{method=\"snapkv\",le=\"0.1\"} 2\n"
            "kvcompress_request_duration_seconds_bucket{method=\"snapkv\",le=\"1\"} 2\n"
            "kvcompress_request_duration_seconds_bucket{method=\"snapkv\",le=\"10\"} 3\n"
            "kvcompress_request_duration_seconds_bucket{method=\"snapkv\",le=\"+Inf\"} 4\n"
            "kvcompress_request_duration_seconds_sum{method=\"snapkv\"} 102.65\n"
            "kvcompress_request_duration_seconds_count{method=\"snapkv\"} 4\n");
}

TEST(MetricsRegistryTest, UntouchedFamilies) {
  MetricsRegistry registry;
  registry.AddCounter("a_total", "Unlabelled counters start at zero.");
  registry.AddCounter("b_total", "Labelled families show no series until touched.", {"code"});
  registry.AddHistogram("c_seconds", "An untouched histogram without labels.", {1});
  EXPECT_EQ(registry.Exposition(),
            "# HELP a_total Unlabelled counters start at zero.\n"
            "# TYPE a_total counter\n"
            "a_total 0\n"
            "# HELP b_total Labelled families show no series until touched.\n"
            "# TYPE b_total counter\n"
            "# HELP c_seconds An untouched histogram without labels.\n"
            "# TYPE c_seconds histogram\n"
            "c_seconds_bucket{le=\"1\"} 0\n"
            "c_seconds_bucket{le=\"+Inf\"} 0\n"
            "c_seconds_sum 0\n"
            "c_seconds_count 0\n");
}

TEST(MetricsRegistryTest, EscapingAndRejectedUpdates) {
  MetricsRegistry registry;
  CounterFamily& counter =
      registry.AddCounter("x_total", "Help with a backslash \\ and\na newline.", {"path"});
  counter.Add({"a\"b\\c\nd"}, 1);
  counter.Add({"a\"b\\c\nd"}, -5);  // counters never go down
  counter.Add({"too", "many"}, 1);  // wrong label count: ignored
  EXPECT_EQ(registry.Exposition(),
            "# HELP x_total Help with a backslash \\\\ and\\na newline.\n"
            "# TYPE x_total counter\n"
            "x_total{path=\"a\\\"b\\\\c\\nd\"} 1\n");
  EXPECT_EQ(counter.Value({"a\"b\\c\nd"}), 1);
}

TEST(MetricsRegistryTest, DuplicateNamesAreNotExportedTwice) {
  MetricsRegistry registry;
  registry.AddCounter("dup_total", "First.").Add({}, 1);
  registry.AddCounter("dup_total", "Second.").Add({}, 5);
  EXPECT_EQ(registry.Exposition(),
            "# HELP dup_total First.\n# TYPE dup_total counter\ndup_total 1\n");
}

TEST(MetricsRegistryTest, ValueFormatting) {
  EXPECT_EQ(FormatMetricValue(0), "0");
  EXPECT_EQ(FormatMetricValue(-3), "-3");
  EXPECT_EQ(FormatMetricValue(17179869184.0), "17179869184");
  EXPECT_EQ(FormatMetricValue(0.25), "0.25");
  EXPECT_EQ(FormatMetricValue(0.1 + 0.2), "0.30000000000000004");
  EXPECT_EQ(FormatMetricValue(1e300), "1e+300");
  EXPECT_EQ(FormatMetricValue(std::numeric_limits<double>::infinity()), "+Inf");
  EXPECT_EQ(FormatMetricValue(-std::numeric_limits<double>::infinity()), "-Inf");
  EXPECT_EQ(FormatMetricValue(std::numeric_limits<double>::quiet_NaN()), "NaN");
}

TEST(MetricsRegistryTest, ConcurrentUpdatesAreAllCounted) {
  MetricsRegistry registry;
  CounterFamily& counter = registry.AddCounter("n_total", "Concurrent.", {"worker"});
  HistogramFamily& histogram = registry.AddHistogram("h_seconds", "Concurrent.", {0.5});
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < 10000; ++i) {
        counter.Increment({t % 2 == 0 ? "even" : "odd"});
        histogram.Observe({}, i % 2 == 0 ? 0.25 : 1.0);
        if (i % 1000 == 0) registry.Exposition();
      }
    });
  }
  for (std::thread& thread : threads) thread.join();
  EXPECT_EQ(counter.Value({"even"}), 20000);
  EXPECT_EQ(counter.Value({"odd"}), 20000);
  const std::string text = registry.Exposition();
  EXPECT_NE(text.find("h_seconds_bucket{le=\"0.5\"} 20000\n"), std::string::npos) << text;
  EXPECT_NE(text.find("h_seconds_bucket{le=\"+Inf\"} 40000\n"), std::string::npos) << text;
  EXPECT_NE(text.find("h_seconds_count 40000\n"), std::string::npos) << text;
  EXPECT_NE(text.find("h_seconds_sum 25000\n"), std::string::npos) << text;
}

}  // namespace
}  // namespace kvcompress
