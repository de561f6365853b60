#include "service/metrics_registry.h"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <utility>

#include "absl/strings/str_cat.h"

namespace kvcompress {
namespace {

// Label values escape backslash, double quote and newline; HELP text backslash and newline.
std::string Escape(const std::string& text, bool escape_quotes) {
  std::string out;
  out.reserve(text.size());
  for (char c : text) {
    if (c == '\\') {
      out += "\\\\";
    } else if (c == '\n') {
      out += "\\n";
    } else if (c == '"' && escape_quotes) {
      out += "\\\"";
    } else {
      out += c;
    }
  }
  return out;
}

}  // namespace

std::string FormatMetricValue(double value) {
  if (std::isnan(value)) return "NaN";
  if (std::isinf(value)) return value > 0 ? "+Inf" : "-Inf";
  if (value == std::floor(value) && std::fabs(value) < 1e15) {
    return absl::StrCat(static_cast<int64_t>(value));
  }
  char buffer[64];
  const auto result = std::to_chars(buffer, buffer + sizeof(buffer), value);
  return std::string(buffer, result.ptr);
}

std::string MetricFamily::FormatLabels(const LabelValues& values, const std::string& extra) const {
  if (label_names_.empty() && extra.empty()) return "";
  std::string out = "{";
  for (size_t i = 0; i < label_names_.size(); ++i) {
    if (i > 0) out += ",";
    absl::StrAppend(&out, label_names_[i], "=\"", Escape(values[i], true), "\"");
  }
  if (!extra.empty()) {
    if (!label_names_.empty()) out += ",";
    out += extra;
  }
  out += "}";
  return out;
}

void MetricFamily::AppendHeader(std::string& out, const char* type) const {
  absl::StrAppend(&out, "# HELP ", name_, " ", Escape(help_, false), "\n");
  absl::StrAppend(&out, "# TYPE ", name_, " ", type, "\n");
}

void CounterFamily::Add(const LabelValues& labels, double value) {
  if (!LabelsMatch(labels) || !(value >= 0)) return;
  absl::MutexLock lock(&mu_);
  values_[labels] += value;
}

double CounterFamily::Value(const LabelValues& labels) const {
  absl::MutexLock lock(&mu_);
  const auto it = values_.find(labels);
  return it == values_.end() ? 0 : it->second;
}

void CounterFamily::AppendExposition(std::string& out) const {
  AppendHeader(out, "counter");
  absl::MutexLock lock(&mu_);
  if (label_names_.empty() && values_.empty()) absl::StrAppend(&out, name_, " 0\n");
  for (const auto& [labels, value] : values_) {
    absl::StrAppend(&out, name_, FormatLabels(labels), " ", FormatMetricValue(value), "\n");
  }
}

void GaugeFamily::Set(const LabelValues& labels, double value) {
  if (!LabelsMatch(labels)) return;
  absl::MutexLock lock(&mu_);
  values_[labels] = value;
}

void GaugeFamily::Add(const LabelValues& labels, double delta) {
  if (!LabelsMatch(labels)) return;
  absl::MutexLock lock(&mu_);
  values_[labels] += delta;
}

double GaugeFamily::Value(const LabelValues& labels) const {
  absl::MutexLock lock(&mu_);
  const auto it = values_.find(labels);
  return it == values_.end() ? 0 : it->second;
}

void GaugeFamily::AppendExposition(std::string& out) const {
  AppendHeader(out, "gauge");
  absl::MutexLock lock(&mu_);
  if (label_names_.empty() && values_.empty()) absl::StrAppend(&out, name_, " 0\n");
  for (const auto& [labels, value] : values_) {
    absl::StrAppend(&out, name_, FormatLabels(labels), " ", FormatMetricValue(value), "\n");
  }
}

void CallbackGaugeFamily::AppendExposition(std::string& out) const {
  AppendHeader(out, "gauge");
  absl::StrAppend(&out, name_, " ", FormatMetricValue(value_()), "\n");
}

void LabeledCallbackGaugeFamily::AppendExposition(std::string& out) const {
  AppendHeader(out, "gauge");
  for (const auto& [labels, value] : series_()) {
    if (!LabelsMatch(labels)) continue;
    absl::StrAppend(&out, name_, FormatLabels(labels), " ", FormatMetricValue(value), "\n");
  }
}

HistogramFamily::HistogramFamily(std::string name, std::string help,
                                 std::vector<std::string> label_names,
                                 std::vector<double> upper_bounds)
    : MetricFamily(std::move(name), std::move(help), std::move(label_names)),
      upper_bounds_(std::move(upper_bounds)) {}

std::vector<double> HistogramFamily::LatencyBuckets() {
  return {0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
          0.25,   0.5,     1,      2.5,   5,      10,    25,   50,    100,  300};
}

std::vector<double> HistogramFamily::FractionBuckets() {
  return {0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1};
}

void HistogramFamily::Observe(const LabelValues& labels, double value) {
  if (!LabelsMatch(labels)) return;
  // The first bound ≥ value (Prometheus buckets are "less than or equal"); +Inf otherwise.
  const size_t bucket = static_cast<size_t>(
      std::lower_bound(upper_bounds_.begin(), upper_bounds_.end(), value) - upper_bounds_.begin());
  absl::MutexLock lock(&mu_);
  Series& series = series_[labels];
  if (series.bucket_counts.empty()) series.bucket_counts.assign(upper_bounds_.size() + 1, 0);
  ++series.bucket_counts[bucket];
  series.sum += value;
  ++series.count;
}

void HistogramFamily::AppendExposition(std::string& out) const {
  AppendHeader(out, "histogram");
  absl::MutexLock lock(&mu_);
  auto append_series = [&](const LabelValues& labels, const Series* series) {
    uint64_t cumulative = 0;
    for (size_t i = 0; i <= upper_bounds_.size(); ++i) {
      if (series != nullptr) cumulative += series->bucket_counts[i];
      const std::string bound =
          i < upper_bounds_.size() ? FormatMetricValue(upper_bounds_[i]) : "+Inf";
      absl::StrAppend(&out, name_, "_bucket", FormatLabels(labels, "le=\"" + bound + "\""), " ",
                      cumulative, "\n");
    }
    absl::StrAppend(&out, name_, "_sum", FormatLabels(labels), " ",
                    FormatMetricValue(series != nullptr ? series->sum : 0), "\n");
    absl::StrAppend(&out, name_, "_count", FormatLabels(labels), " ",
                    series != nullptr ? series->count : 0, "\n");
  };
  if (label_names_.empty() && series_.empty()) append_series({}, nullptr);
  for (const auto& [labels, series] : series_) append_series(labels, &series);
}

template <typename Family>
Family& MetricsRegistry::Register(std::unique_ptr<Family> family) {
  Family& result = *family;
  absl::MutexLock lock(&mu_);
  const bool duplicate = std::any_of(families_.begin(), families_.end(), [&](const auto& existing) {
    return existing->name() == family->name();
  });
  (duplicate ? duplicates_ : families_).push_back(std::move(family));
  return result;
}

CounterFamily& MetricsRegistry::AddCounter(std::string name, std::string help,
                                           std::vector<std::string> label_names) {
  return Register(
      std::make_unique<CounterFamily>(std::move(name), std::move(help), std::move(label_names)));
}

GaugeFamily& MetricsRegistry::AddGauge(std::string name, std::string help,
                                       std::vector<std::string> label_names) {
  return Register(
      std::make_unique<GaugeFamily>(std::move(name), std::move(help), std::move(label_names)));
}

void MetricsRegistry::AddGaugeCallback(std::string name, std::string help,
                                       std::function<double()> value) {
  Register(
      std::make_unique<CallbackGaugeFamily>(std::move(name), std::move(help), std::move(value)));
}

void MetricsRegistry::AddLabeledGaugeCallback(
    std::string name, std::string help, std::vector<std::string> label_names,
    std::function<LabeledCallbackGaugeFamily::Series()> series) {
  Register(std::make_unique<LabeledCallbackGaugeFamily>(std::move(name), std::move(help),
                                                        std::move(label_names), std::move(series)));
}

HistogramFamily& MetricsRegistry::AddHistogram(std::string name, std::string help,
                                               std::vector<double> upper_bounds,
                                               std::vector<std::string> label_names) {
  return Register(std::make_unique<HistogramFamily>(
      std::move(name), std::move(help), std::move(label_names), std::move(upper_bounds)));
}

std::string MetricsRegistry::Exposition() const {
  std::string out;
  absl::MutexLock lock(&mu_);
  for (const auto& family : families_) family->AppendExposition(out);
  return out;
}

}  // namespace kvcompress
