// MetricsHttpServer: serves a MetricsRegistry's exposition at GET /metrics over HTTP
// (civetweb), content type "text/plain; version=0.0.4".
//
// Thread safety: civetweb's own threads render the registry (which is thread-safe). The
// registry must outlive the server. Destruction stops the listener and joins its threads.
#ifndef KVCOMPRESS_SERVICE_METRICS_HTTP_SERVER_H_
#define KVCOMPRESS_SERVICE_METRICS_HTTP_SERVER_H_

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "service/metrics_registry.h"

struct mg_context;
struct mg_connection;

namespace kvcompress {

class MetricsHttpServer final {
 public:
  // Listens on `address` ("host:port"; port 0 picks a free one). UNAVAILABLE with
  // civetweb's reason when the address cannot be bound; INVALID_ARGUMENT when it has no port.
  static absl::StatusOr<std::unique_ptr<MetricsHttpServer>> Start(const std::string& address,
                                                                  const MetricsRegistry* registry);
  ~MetricsHttpServer();
  MetricsHttpServer(const MetricsHttpServer&) = delete;
  MetricsHttpServer& operator=(const MetricsHttpServer&) = delete;

  // The bound TCP port.
  int port() const { return port_; }

 private:
  explicit MetricsHttpServer(const MetricsRegistry* registry) : registry_(registry) {}
  static int HandleMetrics(mg_connection* connection, void* self);

  const MetricsRegistry* const registry_;
  mg_context* context_ = nullptr;
  int port_ = 0;
  std::string wake_host_;  // where a connection reaches the listener (for a quick stop)
};

}  // namespace kvcompress

#endif  // KVCOMPRESS_SERVICE_METRICS_HTTP_SERVER_H_
