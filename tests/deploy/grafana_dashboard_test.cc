// deploy/grafana/kvcompress-dashboard.json cannot rot silently: it is a dashboard Grafana
// imports (panels, grid, a templated Prometheus datasource), and every metric and label its
// panels query exists on a real kvcd's /metrics page, apart from the few only a GPU backend
// feeds. (prometheus_scrape_test also evaluates every expression in a real Prometheus.)
#include "tests/integration/grafana_dashboard.h"

#include <chrono>
#include <map>
#include <regex>
#include <set>
#include <string>
#include <thread>

#include "gmock/gmock.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "kvcompress/v1/kvcompress.grpc.pb.h"
#include "tests/integration/kvcd_process.h"
#include "tests/integration/metrics_exposition.h"
#include "tests/integration/raw_stream.h"

namespace kvcompress::testing {
namespace {

// Metrics that have series only with the GPU backend, with their label names. A CPU-only
// kvcd may declare them without series (so without labels to check) or not at all.
const std::map<std::string, std::set<std::string>>& GpuOnlyMetrics() {
  static const std::map<std::string, std::set<std::string>> kMetrics = {
      {"kvcompress_device_memory_bytes", {"device", "state"}}};
  return kMetrics;
}

// Labels Prometheus adds to every scraped series, and the histogram bucket label.
const std::set<std::string>& TargetLabels() {
  static const std::set<std::string> kLabels = {"job", "instance", "le"};
  return kLabels;
}

class GrafanaDashboardTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto dashboard = LoadDashboard(DashboardPath());
    ASSERT_TRUE(dashboard.ok()) << dashboard.status();
    dashboard_ = *std::move(dashboard);
  }

  nlohmann::json dashboard_;
};

TEST_F(GrafanaDashboardTest, IsAnImportableDashboard) {
  EXPECT_FALSE(dashboard_.value("title", "").empty());
  EXPECT_FALSE(dashboard_.value("uid", "").empty());
  ASSERT_TRUE(dashboard_["schemaVersion"].is_number_integer());
  EXPECT_GE(dashboard_["schemaVersion"].get<int>(), 36);  // Grafana 9+ datasource references
  // A numeric id would make an import overwrite whatever dashboard has that id.
  EXPECT_TRUE(!dashboard_.contains("id") || dashboard_["id"].is_null());

  // The datasource is a template variable, so the same file imports through the UI and
  // provisions through a ConfigMap (where `${DS_…}` inputs would stay unresolved).
  std::set<std::string> variables;
  bool datasource_variable = false;
  for (const nlohmann::json& variable : dashboard_["templating"]["list"]) {
    variables.insert(variable.value("name", ""));
    if (variable.value("name", "") == "datasource") {
      datasource_variable =
          variable.value("type", "") == "datasource" && variable.value("query", "") == "prometheus";
    }
  }
  EXPECT_TRUE(datasource_variable) << "needs a `datasource` variable of type datasource";

  ASSERT_TRUE(dashboard_["panels"].is_array());
  std::set<int> ids;
  int graphs = 0;
  for (const nlohmann::json& panel : dashboard_["panels"]) {
    const std::string title = panel.value("title", "");
    SCOPED_TRACE("panel \"" + title + "\"");
    EXPECT_FALSE(title.empty());
    ASSERT_TRUE(panel["id"].is_number_integer());
    EXPECT_TRUE(ids.insert(panel["id"].get<int>()).second) << "duplicate panel id";
    const nlohmann::json& grid = panel["gridPos"];
    ASSERT_TRUE(grid.is_object());
    for (const char* key : {"h", "w", "x", "y"}) {
      ASSERT_TRUE(grid[key].is_number_integer()) << key;
    }
    EXPECT_LE(grid["x"].get<int>() + grid["w"].get<int>(), 24);
    const std::string type = panel.value("type", "");
    if (type == "row") continue;
    ++graphs;
    EXPECT_EQ(panel["datasource"].value("uid", ""), "${datasource}");
    ASSERT_TRUE(panel["targets"].is_array());
    ASSERT_FALSE(panel["targets"].empty());
    std::set<std::string> ref_ids;
    for (const nlohmann::json& target : panel["targets"]) {
      EXPECT_TRUE(ref_ids.insert(target.value("refId", "")).second) << "duplicate refId";
      EXPECT_EQ(target["datasource"].value("uid", ""), "${datasource}");
      const std::string expr = target.value("expr", "");
      EXPECT_FALSE(expr.empty());
      // Every variable is defined by the dashboard or built into Grafana.
      static const std::regex kVariable(R"(\$\{?([a-zA-Z_][a-zA-Z0-9_]*))");
      for (auto it = std::sregex_iterator(expr.begin(), expr.end(), kVariable);
           it != std::sregex_iterator(); ++it) {
        const std::string name = (*it)[1].str();
        EXPECT_TRUE(variables.count(name) > 0 || name.rfind("__", 0) == 0)
            << "undefined variable $" << name;
      }
    }
  }
  EXPECT_GE(graphs, 10);
}

TEST_F(GrafanaDashboardTest, EveryQueriedMetricAndLabelExistsInKvcdsExposition) {
  // A kvcd that has served a compression and refused one, so labelled families have series.
  auto kvcd = KvcdProcess::Start();
  ASSERT_TRUE(kvcd.ok()) << kvcd.status();
  auto stub = v1::KvCompress::NewStub(
      grpc::CreateChannel((*kvcd)->target(), grpc::InsecureChannelCredentials()));
  ASSERT_TRUE(RunStream(*stub, ValidRequests(SmallHeader())).status.ok());
  v1::CompressHeader bad = SmallHeader();
  bad.mutable_method()->set_keep_ratio(1.5);
  ASSERT_EQ(RunStream(*stub, {HeaderRequest(bad)}).status.error_code(),
            grpc::StatusCode::INVALID_ARGUMENT);
  auto page = HttpGet((*kvcd)->metrics_port(), "/metrics");
  ASSERT_TRUE(page.ok()) << page.status();
  auto families = ParseExposition(*page);
  ASSERT_TRUE(families.ok()) << families.status();
  const std::set<std::string> selectable = SelectableNames(*families);

  // Label names per selectable name.
  std::map<std::string, std::set<std::string>> labels;
  for (const auto& [name, family] : *families) {
    for (const ExposedSample& sample : family.samples) {
      labels[sample.name].insert(family.label_names.begin(), family.label_names.end());
    }
  }
  for (const auto& [name, names] : GpuOnlyMetrics())
    labels[name].insert(names.begin(), names.end());

  std::set<std::string> used;
  for (const DashboardQuery& query : DashboardQueries(dashboard_)) {
    SCOPED_TRACE("panel \"" + query.panel + "\" target " + query.ref_id + ": " + query.expr);
    const std::set<std::string> names = KvcompressMetricNames(query.expr);
    EXPECT_FALSE(names.empty()) << "queries no kvcompress metric";
    std::set<std::string> known_labels = TargetLabels();
    for (const std::string& name : names) {
      used.insert(name);
      EXPECT_TRUE(selectable.count(name) > 0 || GpuOnlyMetrics().count(name) > 0)
          << name << " is not on kvcd's /metrics";
      known_labels.insert(labels[name].begin(), labels[name].end());
    }
    for (const std::string& label : LabelNamesUsed(query.expr)) {
      EXPECT_TRUE(known_labels.count(label) > 0)
          << "label " << label << " is on none of the metrics this expression queries";
    }
  }

  // The dashboard shows DESIGN §7's metric set.
  for (const char* name :
       {"kvcompress_requests_total", "kvcompress_errors_total",
        "kvcompress_request_duration_seconds_bucket",
        "kvcompress_request_stage_duration_seconds_bucket", "kvcompress_tokens_in_total",
        "kvcompress_tokens_kept_total", "kvcompress_bytes_received_total",
        "kvcompress_bytes_sent_total", "kvcompress_compression_ratio_bucket",
        "kvcompress_attention_mass_kept_ratio_bucket", "kvcompress_requests_in_flight",
        "kvcompress_queue_depth", "kvcompress_device_memory_bytes"}) {
    EXPECT_TRUE(used.count(name) > 0) << "no panel shows " << name;
  }
}

}  // namespace
}  // namespace kvcompress::testing
