#include "service/structured_log.h"

#include <cstdint>
#include <utility>

#include "absl/time/clock.h"
#include "absl/time/time.h"

namespace kvcompress {

StructuredLog::StructuredLog(std::FILE* stream)
    : sink_([stream](absl::string_view line) {
        std::fwrite(line.data(), 1, line.size(), stream);
        std::fflush(stream);
      }) {}

StructuredLog::StructuredLog(Sink sink) : sink_(std::move(sink)) {}

std::string StructuredLog::FormatLine(absl::string_view event, const nlohmann::json& fields,
                                      int64_t unix_micros) {
  // ordered_json keeps "ts" and "event" first, which is what a human scanning the log reads.
  nlohmann::ordered_json line;
  line["ts"] = absl::FormatTime("%Y-%m-%dT%H:%M:%E6SZ", absl::FromUnixMicros(unix_micros),
                                absl::UTCTimeZone());
  line["event"] = std::string(event);
  if (fields.is_object()) {
    for (auto it = fields.begin(); it != fields.end(); ++it) {
      if (it.key() == "ts" || it.key() == "event") continue;
      line[it.key()] = it.value();
    }
  } else if (!fields.is_null()) {
    line["value"] = fields;
  }
  // Replacing invalid UTF-8 (a client's request id, a peer string) keeps dump() from
  // throwing; such bytes show as U+FFFD.
  return line.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
}

void StructuredLog::Emit(absl::string_view event, const nlohmann::json& fields) {
  std::string line;
  try {
    line = FormatLine(event, fields, absl::ToUnixMicros(absl::Now()));
  } catch (...) {
    // Only allocation failures get here; a log line must never take the server down.
    line = R"({"event":"log_error"})";
  }
  line.push_back('\n');
  absl::MutexLock lock(&mu_);
  sink_(line);
}

}  // namespace kvcompress
