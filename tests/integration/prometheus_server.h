// PrometheusServer: a real Prometheus server (the `prometheus` binary of the Debian package)
// for integration tests, scraping one /metrics endpoint every second, queried through its
// HTTP API.
//
// It listens on a free loopback port and keeps its TSDB in a fresh temporary directory,
// both removed when the object is destroyed (SIGTERM, then SIGKILL after 30 s). Not
// thread-safe; one owner.
#ifndef KVCOMPRESS_TESTS_INTEGRATION_PROMETHEUS_SERVER_H_
#define KVCOMPRESS_TESTS_INTEGRATION_PROMETHEUS_SERVER_H_

#include <sys/types.h>

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "nlohmann/json.hpp"

namespace kvcompress::testing {

class PrometheusServer final {
 public:
  // Starts prometheus scraping http://127.0.0.1:<metrics_port>/metrics as job `job` with
  // scrape and evaluation intervals of 1 s, and waits (up to 60 s) until it is ready.
  // FAILED_PRECONDITION when no `prometheus` binary is installed; INTERNAL with its log when
  // it exits or never becomes ready.
  static absl::StatusOr<std::unique_ptr<PrometheusServer>> Start(int metrics_port,
                                                                 const std::string& job);
  ~PrometheusServer();
  PrometheusServer(const PrometheusServer&) = delete;
  PrometheusServer& operator=(const PrometheusServer&) = delete;

  int port() const { return port_; }

  // Evaluates `promql` as an instant query now (GET /api/v1/query) and returns `data`
  // ({"resultType": ..., "result": ...}). An HTTP or API error (a bad expression) is an
  // error carrying Prometheus's message.
  absl::StatusOr<nlohmann::json> Query(const std::string& promql);

  // Sends SIGTERM and waits up to `timeout_seconds`; the exit status as waitpid reports it.
  absl::StatusOr<int> Terminate(double timeout_seconds);

  // The last part of Prometheus's log, for failure messages.
  std::string LogTail() const;

 private:
  PrometheusServer() = default;
  bool Alive();

  pid_t pid_ = -1;
  int port_ = 0;
  std::string dir_;  // config, TSDB and log
};

// Percent-encodes `text` for a URL query parameter (everything but RFC 3986 unreserved).
std::string UrlEncode(const std::string& text);

}  // namespace kvcompress::testing

#endif  // KVCOMPRESS_TESTS_INTEGRATION_PROMETHEUS_SERVER_H_
