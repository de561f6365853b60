#include "tests/integration/metrics_exposition.h"

#include <cmath>
#include <cstring>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/string_view.h"

namespace kvcompress::testing {
namespace {

bool IsNameChar(char c, bool first) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_' || c == ':' ||
         (!first && c >= '0' && c <= '9');
}

// Reads a metric or label name at `pos`; empty when there is none.
std::string ReadName(absl::string_view line, size_t& pos) {
  const size_t start = pos;
  while (pos < line.size() && IsNameChar(line[pos], pos == start)) ++pos;
  return std::string(line.substr(start, pos - start));
}

// `{a="x",b="y"}` at `pos` (which points at '{').
absl::Status ReadLabels(absl::string_view line, size_t& pos,
                        std::map<std::string, std::string>& labels) {
  ++pos;
  while (pos < line.size() && line[pos] != '}') {
    const std::string name = ReadName(line, pos);
    if (name.empty() || pos + 1 >= line.size() || line[pos] != '=' || line[pos + 1] != '"') {
      return absl::InvalidArgumentError("expected name=\"value\"");
    }
    pos += 2;
    std::string value;
    while (pos < line.size() && line[pos] != '"') {
      if (line[pos] == '\\' && pos + 1 < line.size()) {
        ++pos;
        value += line[pos] == 'n' ? '\n' : line[pos];
      } else {
        value += line[pos];
      }
      ++pos;
    }
    if (pos >= line.size()) return absl::InvalidArgumentError("unterminated label value");
    ++pos;
    if (!labels.emplace(name, value).second) {
      return absl::InvalidArgumentError(absl::StrCat("label ", name, " twice"));
    }
    if (pos < line.size() && line[pos] == ',') ++pos;
  }
  if (pos >= line.size()) return absl::InvalidArgumentError("unterminated label set");
  ++pos;
  return absl::OkStatus();
}

bool ParseValue(absl::string_view text, double& value) {
  if (text == "+Inf") {
    value = HUGE_VAL;
    return true;
  }
  if (text == "-Inf") {
    value = -HUGE_VAL;
    return true;
  }
  if (text == "NaN") {
    value = NAN;
    return true;
  }
  return absl::SimpleAtod(text, &value);
}

// The family a sample name belongs to: itself, or a histogram's base name.
std::string FamilyOf(const std::string& sample,
                     const std::map<std::string, ExposedFamily>& families) {
  if (families.count(sample) > 0) return sample;
  for (const char* suffix : {"_bucket", "_sum", "_count"}) {
    const absl::string_view view(sample);
    if (absl::EndsWith(view, suffix)) {
      const std::string base(view.substr(0, view.size() - std::strlen(suffix)));
      const auto it = families.find(base);
      if (it != families.end() && it->second.type == "histogram") return base;
    }
  }
  return "";
}

}  // namespace

absl::StatusOr<std::map<std::string, ExposedFamily>> ParseExposition(const std::string& text) {
  std::map<std::string, ExposedFamily> families;
  int number = 0;
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    ++number;
    auto error = [&](absl::string_view what) {
      return absl::InvalidArgumentError(absl::StrCat("line ", number, " \"", line, "\": ", what));
    };
    if (line.empty()) continue;
    if (line[0] == '#') {
      const std::vector<std::string> words = absl::StrSplit(line, absl::MaxSplits(' ', 3));
      if (words.size() < 3 || (words[1] != "TYPE" && words[1] != "HELP")) continue;
      ExposedFamily& family = families[words[2]];
      if (words[1] == "HELP") {
        family.help = words.size() > 3 ? words[3] : "";
        continue;
      }
      if (words.size() != 4) return error("TYPE without a type");
      if (!family.type.empty()) return error("a second TYPE line for the family");
      family.type = words[3];
      continue;
    }
    size_t pos = 0;
    ExposedSample sample;
    sample.name = ReadName(line, pos);
    if (sample.name.empty()) return error("no metric name");
    if (pos < line.size() && line[pos] == '{') {
      if (absl::Status labels = ReadLabels(line, pos, sample.labels); !labels.ok()) {
        return error(labels.message());
      }
    }
    if (pos >= line.size() || line[pos] != ' ') return error("expected a space before the value");
    const std::vector<absl::string_view> rest =
        absl::StrSplit(line.substr(pos + 1), ' ', absl::SkipEmpty());
    if (rest.empty() || rest.size() > 2 || !ParseValue(rest[0], sample.value)) {
      return error("expected a value and an optional timestamp");
    }
    const std::string family_name = FamilyOf(sample.name, families);
    if (family_name.empty() || families[family_name].type.empty()) {
      return error("sample of a family without a TYPE line");
    }
    ExposedFamily& family = families[family_name];
    for (const auto& [name, value] : sample.labels) {
      if (name != "le" || family.type != "histogram") family.label_names.insert(name);
    }
    family.samples.push_back(std::move(sample));
  }
  for (const auto& [name, family] : families) {
    if (family.type.empty())
      return absl::InvalidArgumentError(absl::StrCat(name, ": HELP without TYPE"));
  }
  return families;
}

std::set<std::string> SelectableNames(const std::map<std::string, ExposedFamily>& families) {
  std::set<std::string> names;
  for (const auto& [name, family] : families) {
    if (family.type == "histogram") {
      for (const char* suffix : {"_bucket", "_sum", "_count"}) names.insert(name + suffix);
    } else {
      names.insert(name);
    }
  }
  return names;
}

}  // namespace kvcompress::testing
