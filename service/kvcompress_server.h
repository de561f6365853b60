// KvcServer: kvcd as a library — the gRPC server (KvCompress service, grpc.health.v1 health,
// reflection), the layer scheduler, the backend and the Prometheus /metrics endpoint.
//
// Start binds the addresses (port 0 picks a free port; port() reports the bound one) and
// returns once the server accepts calls, with health SERVING for "" and
// "kvcompress.v1.KvCompress". Shutdown drains: health turns NOT_SERVING, new streams are
// refused, streams still open at the deadline are cancelled, then the workers stop.
//
// Thread safety: port accessors are thread-safe; Shutdown may be called from any thread
// (once is enough; later calls do nothing) and is also run by the destructor.
#ifndef KVCOMPRESS_SERVICE_KVCOMPRESS_SERVER_H_
#define KVCOMPRESS_SERVICE_KVCOMPRESS_SERVER_H_

#include <grpcpp/grpcpp.h>

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "kernels/backend.h"
#include "service/backend_router.h"
#include "service/call_authenticator.h"
#include "service/channel_registry.h"
#include "service/channel_rpcs.h"
#include "service/kvcompress_service.h"
#include "service/layer_scheduler.h"
#include "service/memory_budget.h"
#include "service/metrics_http_server.h"
#include "service/metrics_registry.h"
#include "service/server_credentials.h"
#include "service/server_limits.h"
#include "service/structured_log.h"

namespace kvcompress {

struct ServiceMetrics;

struct ServerOptions {
  std::string address = "0.0.0.0:50051";         // gRPC listen address
  std::string metrics_address = "0.0.0.0:9464";  // /metrics; empty disables
  int worker_threads = 0;                        // layer jobs in parallel; 0: hardware threads
  int backend_threads = 0;  // CPU backend threads; 0: hardware threads / worker_threads
  ServerLimits limits;
  uint64_t max_buffered_bytes = 0;  // server-wide request buffer budget; 0: half of RAM
  uint64_t stream_buffer_bytes = uint64_t{512} << 20;  // per stream, before reads pause
  // The gRPC listener's credentials (MakeServerSecurity); default: plaintext. /metrics is
  // plain HTTP whatever this says.
  ServerSecurity security;
  // The bearer token every KvCompress call must carry; empty: none (call_authenticator.h).
  std::string auth_token;
  // Where events go (streams, auth failures, drain); null: a log writing to stderr.
  std::shared_ptr<StructuredLog> log;
  // Which backends to run: "cpu" (the CPU reference alone); "cuda" (the GPU, with the CPU
  // reference for the stages the GPU lacks; Start fails without a usable GPU); "auto" (as
  // "cuda" when a GPU is usable, else as "cpu").
  std::string backend_kind = "cpu";
  int cuda_device = 0;
  uint64_t cuda_memory_budget_bytes = 0;  // 0: 90% of the device memory free at start
  // Data-plane channels of GPU transports (service/channel_rpcs.h says who may open them).
  bool allow_cuda_ipc = false;                     // --allow_cuda_ipc
  bool allow_nccl = false;                         // --allow_nccl
  std::chrono::seconds nccl_timeout{120};          // --nccl_timeout
  std::chrono::seconds channel_idle_timeout{300};  // --channel_idle_timeout
  size_t max_channels = 64;                        // --max_channels
  // Tests: cuda_ipc channels get their resources from this (host memory), as if the build had
  // cuda_ipc and kvcd ran a cuda backend, so the channel rules run over gRPC without a GPU.
  ChannelResourceFactory channel_resources_for_testing;
  // Tests: run exactly this backend (backend_kind is then ignored).
  std::unique_ptr<Backend> backend;
};

class KvcServer final {
 public:
  // UNAVAILABLE when an address cannot be bound; INVALID_ARGUMENT for bad options.
  static absl::StatusOr<std::unique_ptr<KvcServer>> Start(ServerOptions options);
  ~KvcServer();
  KvcServer(const KvcServer&) = delete;
  KvcServer& operator=(const KvcServer&) = delete;

  int port() const { return port_; }
  // 0 when metrics are disabled.
  int metrics_port() const { return metrics_port_; }
  bool tls() const { return tls_; }
  bool client_certificates_verified() const { return client_certificates_verified_; }
  bool auth_token_required() const { return authenticator_->token_required(); }
  const MetricsRegistry& metrics() const { return registry_; }
  int worker_threads() const { return scheduler_->num_threads(); }
  // The preferred backend ("cuda" or "cpu").
  std::string backend_name() const { return std::string(backends_->preferred().name()); }
  // Why "auto" settled on the CPU (empty otherwise), for the start-up log.
  const std::string& backend_note() const { return backend_note_; }

  // Drains and stops; streams still open after `deadline` are cancelled.
  void Shutdown(std::chrono::milliseconds deadline);

 private:
  KvcServer() = default;

  MetricsRegistry registry_;
  std::unique_ptr<ServiceMetrics> service_metrics_;
  std::unique_ptr<BackendRouter> backends_;
  std::string backend_note_;
  std::unique_ptr<MemoryBudget> memory_;
  std::unique_ptr<LayerScheduler> scheduler_;
  std::shared_ptr<StructuredLog> log_;
  std::unique_ptr<CallAuthenticator> authenticator_;
  // After the service and the gRPC server in destruction order: streams lease channels.
  std::unique_ptr<ChannelRegistry> channels_;
  std::unique_ptr<KvCompressService> service_;
  std::unique_ptr<grpc::Server> server_;
  std::unique_ptr<MetricsHttpServer> metrics_http_;
  int port_ = 0;
  int metrics_port_ = 0;
  bool tls_ = false;
  bool client_certificates_verified_ = false;

  absl::Mutex shutdown_mu_;
  bool shut_down_ ABSL_GUARDED_BY(shutdown_mu_) = false;
};

}  // namespace kvcompress

#endif  // KVCOMPRESS_SERVICE_KVCOMPRESS_SERVER_H_
