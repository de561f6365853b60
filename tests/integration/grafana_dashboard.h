// Reading deploy/grafana/kvcompress-dashboard.json for tests: every PromQL expression of every
// panel, Grafana's variables expanded so that Prometheus can evaluate it, and the metric names
// an expression selects. Pure functions, thread-compatible.
#ifndef KVCOMPRESS_TESTS_INTEGRATION_GRAFANA_DASHBOARD_H_
#define KVCOMPRESS_TESTS_INTEGRATION_GRAFANA_DASHBOARD_H_

#include <set>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "nlohmann/json.hpp"

namespace kvcompress::testing {

// The dashboard's path in the source tree ($KVC_SOURCE_DIR, set by ctest, or the working
// directory).
std::string DashboardPath();

// Parses the dashboard file. INVALID_ARGUMENT when it is not a JSON object.
absl::StatusOr<nlohmann::json> LoadDashboard(const std::string& path);

struct DashboardQuery {
  std::string panel;   // the panel's title
  std::string ref_id;  // the target's refId
  std::string expr;    // as written in the dashboard
};

// Every target expression of every panel, including panels nested in collapsed rows.
std::vector<DashboardQuery> DashboardQueries(const nlohmann::json& dashboard);

// `expr` with the dashboard's variables replaced as Grafana would for one scrape target:
// $job and $instance by `.+` (the "All" value), $__rate_interval and $__interval by
// `rate_interval`.
std::string ExpandGrafanaVariables(const std::string& expr, const std::string& rate_interval);

// The kvcompress_* metric names `expr` selects.
std::set<std::string> KvcompressMetricNames(const std::string& expr);

// Label names `expr` groups by (`by (...)`, `without (...)`) or matches on (`{name=...}`).
std::set<std::string> LabelNamesUsed(const std::string& expr);

}  // namespace kvcompress::testing

#endif  // KVCOMPRESS_TESTS_INTEGRATION_GRAFANA_DASHBOARD_H_
