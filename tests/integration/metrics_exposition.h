// A reader of the Prometheus text exposition format (0.0.4) for tests: which families a
// /metrics page declares, their types, the label names their samples carry and the samples.
//
// Strict about what kvcd must get right (every sample belongs to a declared family, label
// values are quoted and escaped, values parse as numbers); it does not replace promtool.
// Pure functions, thread-compatible.
#ifndef KVCOMPRESS_TESTS_INTEGRATION_METRICS_EXPOSITION_H_
#define KVCOMPRESS_TESTS_INTEGRATION_METRICS_EXPOSITION_H_

#include <map>
#include <set>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace kvcompress::testing {

struct ExposedSample {
  std::string name;  // as written: a histogram's samples end in _bucket, _sum or _count
  std::map<std::string, std::string> labels;
  double value = 0;
};

struct ExposedFamily {
  std::string type;  // counter, gauge, histogram, summary or untyped
  std::string help;
  // Label names over every sample, without the histogram's `le`.
  std::set<std::string> label_names;
  std::vector<ExposedSample> samples;
};

// Family name → family. INVALID_ARGUMENT names the line that does not parse, a sample whose
// family has no TYPE line, or a TYPE declared twice.
absl::StatusOr<std::map<std::string, ExposedFamily>> ParseExposition(const std::string& text);

// The names a PromQL selector can use for these families: counters' and gauges' own names,
// histograms' name_bucket, name_sum and name_count.
std::set<std::string> SelectableNames(const std::map<std::string, ExposedFamily>& families);

}  // namespace kvcompress::testing

#endif  // KVCOMPRESS_TESTS_INTEGRATION_METRICS_EXPOSITION_H_
