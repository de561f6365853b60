// MetricsRegistry: a small Prometheus registry rendering the text exposition format 0.0.4.
//
// Families are registered once (name, help, label names) and then updated with one label
// value per label name. Counters only go up; gauges are set or moved; histograms count
// observations into fixed upper bounds (rendered cumulative, plus +Inf, _sum and _count).
// Gauge callbacks are evaluated at scrape time (for values another object owns, such as the
// scheduler's queue depth).
//
// Exposition renders families in registration order and each family's series sorted by
// label values. A family without labels always shows its single series (starting at 0);
// a labelled family shows the series that were touched.
//
// Thread safety: registration, updates and Exposition may run concurrently from any thread.
// Family references stay valid for the registry's lifetime. An update whose label count
// differs from the family's label names is ignored.
#ifndef KVCOMPRESS_SERVICE_METRICS_REGISTRY_H_
#define KVCOMPRESS_SERVICE_METRICS_REGISTRY_H_

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"

namespace kvcompress {

using LabelValues = std::vector<std::string>;

// Base of every family: name, help, label names, and rendering.
class MetricFamily {
 public:
  MetricFamily(std::string name, std::string help, std::vector<std::string> label_names)
      : name_(std::move(name)), help_(std::move(help)), label_names_(std::move(label_names)) {}
  virtual ~MetricFamily() = default;
  MetricFamily(const MetricFamily&) = delete;
  MetricFamily& operator=(const MetricFamily&) = delete;

  const std::string& name() const { return name_; }
  // Appends the HELP and TYPE lines and every series.
  virtual void AppendExposition(std::string& out) const = 0;

 protected:
  // `{a="x",b="y"}` (empty when there are no labels); `extra` is appended as a last label
  // already formatted (`le="0.5"`).
  std::string FormatLabels(const LabelValues& values, const std::string& extra = "") const;
  void AppendHeader(std::string& out, const char* type) const;
  bool LabelsMatch(const LabelValues& values) const { return values.size() == label_names_.size(); }

  const std::string name_;
  const std::string help_;
  const std::vector<std::string> label_names_;
};

class CounterFamily final : public MetricFamily {
 public:
  using MetricFamily::MetricFamily;
  // Adds `value` (ignored when negative).
  void Add(const LabelValues& labels, double value);
  void Increment(const LabelValues& labels) { Add(labels, 1.0); }
  double Value(const LabelValues& labels) const;
  void AppendExposition(std::string& out) const override;

 private:
  mutable absl::Mutex mu_;
  std::map<LabelValues, double> values_ ABSL_GUARDED_BY(mu_);
};

class GaugeFamily final : public MetricFamily {
 public:
  using MetricFamily::MetricFamily;
  void Set(const LabelValues& labels, double value);
  void Add(const LabelValues& labels, double delta);
  double Value(const LabelValues& labels) const;
  void AppendExposition(std::string& out) const override;

 private:
  mutable absl::Mutex mu_;
  std::map<LabelValues, double> values_ ABSL_GUARDED_BY(mu_);
};

// A gauge without labels whose value a callback supplies at scrape time.
class CallbackGaugeFamily final : public MetricFamily {
 public:
  CallbackGaugeFamily(std::string name, std::string help, std::function<double()> value)
      : MetricFamily(std::move(name), std::move(help), {}), value_(std::move(value)) {}
  void AppendExposition(std::string& out) const override;

 private:
  const std::function<double()> value_;
};

// A labelled gauge whose series a callback supplies at scrape time (one value per label set,
// e.g. device memory per device and state).
class LabeledCallbackGaugeFamily final : public MetricFamily {
 public:
  using Series = std::vector<std::pair<LabelValues, double>>;
  LabeledCallbackGaugeFamily(std::string name, std::string help,
                             std::vector<std::string> label_names, std::function<Series()> series)
      : MetricFamily(std::move(name), std::move(help), std::move(label_names)),
        series_(std::move(series)) {}
  void AppendExposition(std::string& out) const override;

 private:
  const std::function<Series()> series_;
};

class HistogramFamily final : public MetricFamily {
 public:
  // `upper_bounds` ascending; +Inf is implicit.
  HistogramFamily(std::string name, std::string help, std::vector<std::string> label_names,
                  std::vector<double> upper_bounds);
  void Observe(const LabelValues& labels, double value);
  void AppendExposition(std::string& out) const override;

  // Buckets 100 µs … 300 s, roughly ×2.5 apart: request latencies and per-layer stage times
  // (a layer on a GPU takes well under a millisecond).
  static std::vector<double> LatencyBuckets();
  // 0.05 … 1: fractions such as compression ratios and attention mass.
  static std::vector<double> FractionBuckets();

 private:
  struct Series {
    std::vector<uint64_t> bucket_counts;  // per bound, not cumulative; last is +Inf
    double sum = 0;
    uint64_t count = 0;
  };
  const std::vector<double> upper_bounds_;
  mutable absl::Mutex mu_;
  std::map<LabelValues, Series> series_ ABSL_GUARDED_BY(mu_);
};

class MetricsRegistry final {
 public:
  MetricsRegistry() = default;
  MetricsRegistry(const MetricsRegistry&) = delete;
  MetricsRegistry& operator=(const MetricsRegistry&) = delete;

  // Names follow Prometheus conventions: counters end in _total, units in the name
  // (_seconds, _bytes). Registering a name twice is a programming error; the second
  // registration gets a family that is not exported.
  CounterFamily& AddCounter(std::string name, std::string help,
                            std::vector<std::string> label_names = {});
  GaugeFamily& AddGauge(std::string name, std::string help,
                        std::vector<std::string> label_names = {});
  void AddGaugeCallback(std::string name, std::string help, std::function<double()> value);
  void AddLabeledGaugeCallback(std::string name, std::string help,
                               std::vector<std::string> label_names,
                               std::function<LabeledCallbackGaugeFamily::Series()> series);
  HistogramFamily& AddHistogram(std::string name, std::string help,
                                std::vector<double> upper_bounds,
                                std::vector<std::string> label_names = {});

  // The text exposition format (content type "text/plain; version=0.0.4").
  std::string Exposition() const;

 private:
  template <typename Family>
  Family& Register(std::unique_ptr<Family> family);

  mutable absl::Mutex mu_;
  std::vector<std::unique_ptr<MetricFamily>> families_ ABSL_GUARDED_BY(mu_);
  std::vector<std::unique_ptr<MetricFamily>> duplicates_ ABSL_GUARDED_BY(mu_);
};

// Prometheus number formatting: integers without a fraction, +Inf/-Inf/NaN, otherwise the
// shortest text that reads back to the same double.
std::string FormatMetricValue(double value);

}  // namespace kvcompress

#endif  // KVCOMPRESS_SERVICE_METRICS_REGISTRY_H_
