// StructuredLog: kvcd's event log, one JSON object per line.
//
// Every line has "ts" (RFC 3339 UTC, microseconds), "event" and the event's own fields, e.g.
//
//   {"ts":"2024-05-01T12:00:00.123456Z","event":"compress","request_id":"r-1","code":"OK",...}
//
// Lines are what operators grep and what log pipelines (Loki, Cloud Logging, ...) parse, so
// an event is one complete line written with one call: concurrent Emits never interleave.
// Strings are escaped by nlohmann-json; invalid UTF-8 is replaced, never a reason to fail.
// Callers must not put secrets into fields: the log is not access-controlled.
//
// Thread safety: Emit may be called from any thread. Ownership: the sink is borrowed and must
// outlive the log (stderr by default).
#ifndef KVCOMPRESS_SERVICE_STRUCTURED_LOG_H_
#define KVCOMPRESS_SERVICE_STRUCTURED_LOG_H_

#include <cstdio>
#include <functional>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "nlohmann/json.hpp"

namespace kvcompress {

class StructuredLog final {
 public:
  // Receives one complete line, newline included.
  using Sink = std::function<void(absl::string_view line)>;

  // Writes to `stream` (flushed after every line, so a crash loses nothing already logged).
  explicit StructuredLog(std::FILE* stream = stderr);
  // Hands every line to `sink` (tests, other transports). The sink is called under the
  // log's lock, one line at a time.
  explicit StructuredLog(Sink sink);

  StructuredLog(const StructuredLog&) = delete;
  StructuredLog& operator=(const StructuredLog&) = delete;

  // Writes {"ts":..., "event": event, ...fields}. `fields` should be a JSON object; any
  // other value is logged under "value". Keys "ts" and "event" in `fields` are ignored.
  // Never fails and never throws.
  void Emit(absl::string_view event, const nlohmann::json& fields = nlohmann::json::object());

  // The line Emit would write at time `unix_micros`, without the newline (for tests).
  static std::string FormatLine(absl::string_view event, const nlohmann::json& fields,
                                int64_t unix_micros);

 private:
  absl::Mutex mu_;
  Sink sink_ ABSL_GUARDED_BY(mu_);
};

}  // namespace kvcompress

#endif  // KVCOMPRESS_SERVICE_STRUCTURED_LOG_H_
