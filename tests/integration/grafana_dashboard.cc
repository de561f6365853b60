#include "tests/integration/grafana_dashboard.h"

#include <cstdlib>
#include <fstream>
#include <regex>
#include <sstream>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"

namespace kvcompress::testing {
namespace {

void CollectQueries(const nlohmann::json& panels, std::vector<DashboardQuery>& out) {
  if (!panels.is_array()) return;
  for (const nlohmann::json& panel : panels) {
    if (!panel.is_object()) continue;
    const std::string title = panel.value("title", "");
    if (panel.contains("targets") && panel["targets"].is_array()) {
      for (const nlohmann::json& target : panel["targets"]) {
        if (!target.is_object() || !target.contains("expr")) continue;
        out.push_back({title, target.value("refId", ""), target.value("expr", "")});
      }
    }
    if (panel.contains("panels")) CollectQueries(panel["panels"], out);
  }
}

}  // namespace

std::string DashboardPath() {
  const char* source = std::getenv("KVC_SOURCE_DIR");
  return absl::StrCat(source != nullptr ? source : ".",
                      "/deploy/grafana/kvcompress-dashboard.json");
}

absl::StatusOr<nlohmann::json> LoadDashboard(const std::string& path) {
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot open ", path));
  std::stringstream text;
  text << in.rdbuf();
  nlohmann::json dashboard = nlohmann::json::parse(text.str(), nullptr, false);
  if (dashboard.is_discarded() || !dashboard.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": not a JSON object"));
  }
  return dashboard;
}

std::vector<DashboardQuery> DashboardQueries(const nlohmann::json& dashboard) {
  std::vector<DashboardQuery> queries;
  if (dashboard.contains("panels")) CollectQueries(dashboard["panels"], queries);
  return queries;
}

std::string ExpandGrafanaVariables(const std::string& expr, const std::string& rate_interval) {
  // Longer names first: $__rate_interval contains $__interval's spelling.
  return absl::StrReplaceAll(expr, {{"$__rate_interval", rate_interval},
                                    {"$__interval", rate_interval},
                                    {"$job", ".+"},
                                    {"$instance", ".+"}});
}

std::set<std::string> KvcompressMetricNames(const std::string& expr) {
  static const std::regex kName(R"((^|[^a-zA-Z0-9_:])(kvcompress_[a-zA-Z0-9_:]*))");
  std::set<std::string> names;
  for (auto it = std::sregex_iterator(expr.begin(), expr.end(), kName);
       it != std::sregex_iterator(); ++it) {
    names.insert((*it)[2].str());
  }
  return names;
}

std::set<std::string> LabelNamesUsed(const std::string& expr) {
  std::set<std::string> names;
  static const std::regex kGrouping(R"(\b(by|without)\s*\(([^)]*)\))");
  for (auto it = std::sregex_iterator(expr.begin(), expr.end(), kGrouping);
       it != std::sregex_iterator(); ++it) {
    for (absl::string_view name : absl::StrSplit((*it)[2].str(), ',', absl::SkipWhitespace())) {
      names.insert(std::string(absl::StripAsciiWhitespace(name)));
    }
  }
  static const std::regex kSelector(R"(\{([^}]*)\})");
  static const std::regex kMatcher(R"(([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=))");
  for (auto it = std::sregex_iterator(expr.begin(), expr.end(), kSelector);
       it != std::sregex_iterator(); ++it) {
    const std::string matchers = (*it)[1].str();
    // Only names before an operator, outside quoted values.
    std::string unquoted;
    bool quoted = false;
    for (size_t i = 0; i < matchers.size(); ++i) {
      if (matchers[i] == '\\' && quoted) {
        ++i;
        continue;
      }
      if (matchers[i] == '"') {
        quoted = !quoted;
        unquoted += ' ';
        continue;
      }
      if (!quoted) unquoted += matchers[i];
    }
    for (auto m = std::sregex_iterator(unquoted.begin(), unquoted.end(), kMatcher);
         m != std::sregex_iterator(); ++m) {
      names.insert((*m)[1].str());
    }
  }
  return names;
}

}  // namespace kvcompress::testing
