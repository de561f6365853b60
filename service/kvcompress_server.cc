#include "service/kvcompress_server.h"

#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/health_check_service_interface.h>
#include <unistd.h>

#include <algorithm>
#include <thread>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "kernels/cuda_backend.h"
#include "service/internal/server_info.h"
#include "service/internal/service_metrics.h"

#ifndef KVC_VERSION
#define KVC_VERSION "0.0.0"
#endif

namespace kvcompress {
namespace {

// Requests carry at most 4 MiB − 1 KiB of tensor data per message plus a few fields;
// headers with many sequences stay far below the margin.
constexpr int kMaxReceiveMessageBytes = 4 * 1024 * 1024 + 64 * 1024;

constexpr char kServiceName[] = "kvcompress.v1.KvCompress";

uint64_t HalfOfPhysicalMemory() {
  const long pages = sysconf(_SC_PHYS_PAGES);
  const long page_size = sysconf(_SC_PAGESIZE);
  if (pages <= 0 || page_size <= 0) return 0;
  return static_cast<uint64_t>(pages) * static_cast<uint64_t>(page_size) / 2;
}

int ThreadsOrHardware(int threads) {
  if (threads > 0) return threads;
  const unsigned hardware = std::thread::hardware_concurrency();
  return hardware > 0 ? static_cast<int>(hardware) : 1;
}

// The backends of options.backend_kind, in order of preference. `note` receives why "auto"
// fell back to the CPU.
absl::StatusOr<std::vector<std::unique_ptr<Backend>>> MakeBackends(ServerOptions& options,
                                                                   int backend_threads,
                                                                   std::string& note) {
  std::vector<std::unique_ptr<Backend>> backends;
  if (options.backend != nullptr) {
    backends.push_back(std::move(options.backend));
    return backends;
  }
  const std::string& kind = options.backend_kind;
  if (kind != "cpu" && kind != "cuda" && kind != "auto") {
    return absl::InvalidArgumentError(
        absl::StrCat("backend \"", kind, "\" is unknown; expected cpu, cuda or auto"));
  }
  if (kind != "cpu") {
    CudaBackendOptions cuda_options;
    cuda_options.device = options.cuda_device;
    cuda_options.memory_budget_bytes = options.cuda_memory_budget_bytes;
    absl::StatusOr<std::unique_ptr<Backend>> cuda = MakeCudaBackend(cuda_options);
    if (cuda.ok()) {
      backends.push_back(std::move(cuda).value());
    } else if (kind == "cuda") {
      return absl::Status(cuda.status().code(),
                          absl::StrCat("--backend=cuda: ", cuda.status().message()));
    } else {
      note = absl::StrCat("no usable GPU, running the cpu backend: ", cuda.status().message());
    }
  }
  // The CPU reference always follows: it runs every stage, so requests the GPU declines
  // still get the exact answer.
  backends.push_back(MakeCpuBackend(backend_threads));
  return backends;
}

}  // namespace

absl::StatusOr<std::unique_ptr<KvcServer>> KvcServer::Start(ServerOptions options) {
  if (options.worker_threads < 0 || options.backend_threads < 0) {
    return absl::InvalidArgumentError(absl::StrCat("worker_threads ", options.worker_threads,
                                                   " and backend_threads ", options.backend_threads,
                                                   " must be >= 0 (0: hardware threads)"));
  }
  if (options.limits.max_concurrent_streams == 0 || options.limits.max_sequences == 0 ||
      options.limits.max_layers == 0 || options.limits.max_tokens == 0 ||
      options.limits.max_request_bytes == 0) {
    return absl::InvalidArgumentError("every --max_* limit must be >= 1");
  }
  std::unique_ptr<KvcServer> server(new KvcServer());
  const int worker_threads = ThreadsOrHardware(options.worker_threads);
  // Layer jobs already run in parallel; by default they share the cores instead of each
  // starting a full set of backend threads.
  const int backend_threads = options.backend_threads > 0
                                  ? options.backend_threads
                                  : std::max(1, ThreadsOrHardware(0) / worker_threads);
  absl::StatusOr<std::vector<std::unique_ptr<Backend>>> backends =
      MakeBackends(options, backend_threads, server->backend_note_);
  if (!backends.ok()) return backends.status();
  server->backends_ = std::make_unique<BackendRouter>(std::move(backends).value());
  server->scheduler_ = std::make_unique<LayerScheduler>(worker_threads);
  server->memory_ = std::make_unique<MemoryBudget>(
      options.max_buffered_bytes > 0 ? options.max_buffered_bytes : HalfOfPhysicalMemory());

  server->service_metrics_ = std::make_unique<ServiceMetrics>(server->registry_);
  LayerScheduler* scheduler = server->scheduler_.get();
  MemoryBudget* memory = server->memory_.get();
  server->registry_.AddGaugeCallback(
      "kvcompress_queue_depth", "Layer jobs waiting for a worker.",
      [scheduler] { return static_cast<double>(scheduler->queue_depth()); });
  server->registry_.AddGaugeCallback(
      "kvcompress_layers_running", "Layer jobs being compressed now.",
      [scheduler] { return static_cast<double>(scheduler->running()); });
  server->registry_.AddGaugeCallback(
      "kvcompress_buffered_bytes", "Host bytes held by request tensor buffers.",
      [memory] { return static_cast<double>(memory->in_use_bytes()); });
  server->registry_.AddGaugeCallback(
      "kvcompress_buffered_limit_bytes",
      "Budget for request tensor buffers (--max_buffered_bytes).",
      [memory] { return static_cast<double>(memory->limit_bytes()); });

  CompressEnvironment environment;
  environment.backends = server->backends_.get();
  environment.scheduler = scheduler;
  environment.memory = memory;
  environment.metrics = server->service_metrics_.get();
  environment.limits = options.limits;
  environment.stream_buffer_bytes = options.stream_buffer_bytes;
  server->log_ = options.log != nullptr ? options.log : std::make_shared<StructuredLog>(stderr);
  server->authenticator_ = std::make_unique<CallAuthenticator>(
      std::move(options.auth_token), options.security.client_certificates_verified);
  server->tls_ = options.security.tls;
  server->client_certificates_verified_ = options.security.client_certificates_verified;
  environment.authenticator = server->authenticator_.get();
  environment.log = server->log_.get();

  ChannelRegistryOptions channel_options;
  channel_options.max_channels = options.max_channels;
  channel_options.idle_timeout = absl::FromChrono(options.channel_idle_timeout);
  server->channels_ = std::make_unique<ChannelRegistry>(channel_options);
  // Idle channels hold the client's device memory open: reap them promptly, not only when
  // the next channel call comes.
  server->channels_->StartReaper(
      std::clamp(channel_options.idle_timeout / 4, absl::Milliseconds(100), absl::Seconds(10)));
  environment.channels.registry = server->channels_.get();
  environment.channels.device_backend = &server->backends_->preferred();
  if (environment.channels.device_backend->name() != "cuda") {
    environment.channels.device_backend = nullptr;
  }
  environment.channels.allow_cuda_ipc = options.allow_cuda_ipc;
  environment.channels.allow_nccl = options.allow_nccl;
  environment.channels.nccl_timeout = absl::FromChrono(options.nccl_timeout);
  if (options.channel_resources_for_testing) {
    environment.channels.cuda_ipc_resources = std::move(options.channel_resources_for_testing);
    environment.channels.cuda_ipc_compiled = true;
    environment.channels.device_backend = &server->backends_->preferred();
  }
  environment.channels.authentication_configured =
      server->authenticator_->token_required() || options.security.client_certificates_verified;
  if (options.allow_cuda_ipc && !environment.channels.cuda_ipc_compiled) {
    server->log_->Emit("warning", {{"message",
                                    "--allow_cuda_ipc: this kvcd was built without CUDA; "
                                    "OpenChannel answers UNIMPLEMENTED"}});
  } else if (options.allow_cuda_ipc && environment.channels.device_backend == nullptr) {
    server->log_->Emit("warning", {{"message",
                                    "--allow_cuda_ipc: kvcd runs the cpu backend; OpenChannel "
                                    "answers FAILED_PRECONDITION until kvcd runs --backend=cuda"}});
  }
  if (options.allow_nccl && !environment.channels.nccl_compiled) {
    server->log_->Emit("warning", {{"message",
                                    "--allow_nccl: this kvcd was built without CUDA or NCCL; "
                                    "nccl channels answer UNIMPLEMENTED"}});
  } else if (options.allow_nccl && environment.channels.device_backend == nullptr) {
    server->log_->Emit("warning", {{"message",
                                    "--allow_nccl: kvcd runs the cpu backend; nccl channels "
                                    "answer FAILED_PRECONDITION until kvcd runs --backend=cuda"}});
  }
  if ((options.allow_cuda_ipc || options.allow_nccl) &&
      !environment.channels.authentication_configured) {
    server->log_->Emit(
        "warning",
        {{"message",
          "--allow_cuda_ipc/--allow_nccl without --auth_token_file or --tls_client_ca: every "
          "peer that reaches the gRPC port may open GPU channels; listen on localhost or "
          "require authentication"}});
  }
  const ChannelRegistry* channels = server->channels_.get();
  server->registry_.AddLabeledGaugeCallback(
      "kvcompress_channels_open", "Open data-plane channels of GPU transports, by transport.",
      {"transport"}, [channels] {
        LabeledCallbackGaugeFamily::Series series;
        for (const char* transport : {"cuda_ipc", "nccl"}) {
          series.push_back({{transport}, static_cast<double>(channels->OpenChannels(transport))});
        }
        return series;
      });
  const BackendRouter* router = server->backends_.get();
  server->registry_.AddLabeledGaugeCallback(
      "kvcompress_device_memory_bytes",
      "Device memory of the GPU backend: state=in_use (held by requests now) or budget "
      "(--cuda_memory_budget_bytes).",
      {"device", "state"}, [router] {
        LabeledCallbackGaugeFamily::Series series;
        for (const Backend* backend : router->backends()) {
          for (const BackendDevice& device : backend->Devices()) {
            const std::string ordinal = absl::StrCat(device.ordinal);
            series.push_back({{ordinal, "in_use"}, static_cast<double>(device.in_use_bytes)});
            series.push_back({{ordinal, "budget"}, static_cast<double>(device.budget_bytes)});
          }
        }
        return series;
      });
  server->service_ = std::make_unique<KvCompressService>(
      environment,
      [router, limits = options.limits, threads = scheduler->num_threads(),
       cuda_ipc = environment.channels.allow_cuda_ipc && environment.channels.cuda_ipc_compiled &&
                  environment.channels.device_backend != nullptr,
       nccl = environment.channels.allow_nccl && environment.channels.nccl_compiled &&
              environment.channels.device_backend != nullptr] {
        v1::ServerInfo info = BuildServerInfo(KVC_VERSION, router->backends(), limits, threads);
        // Transports a client can use here: GPU ones when built, enabled and on the GPU.
        if (cuda_ipc) info.add_transports(v1::TRANSPORT_CUDA_IPC);
        if (nccl) info.add_transports(v1::TRANSPORT_NCCL);
        return info;
      });

  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  builder.AddListeningPort(options.address,
                           options.security.credentials != nullptr
                               ? options.security.credentials
                               : grpc::InsecureServerCredentials(),
                           &server->port_);
  builder.RegisterService(server->service_.get());
  builder.SetMaxReceiveMessageSize(kMaxReceiveMessageBytes);
  // A second kvcd on a busy port must fail, not silently share it.
  builder.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, 0);
  server->server_ = builder.BuildAndStart();
  if (server->server_ == nullptr || server->port_ == 0) {
    server->scheduler_->Shutdown();
    return absl::UnavailableError(
        absl::StrCat("cannot listen on ", options.address, " (address in use or invalid?)"));
  }
  grpc::HealthCheckServiceInterface* health = server->server_->GetHealthCheckService();
  if (health != nullptr) {
    health->SetServingStatus("", true);
    health->SetServingStatus(kServiceName, true);
  }

  if (!options.metrics_address.empty()) {
    absl::StatusOr<std::unique_ptr<MetricsHttpServer>> http =
        MetricsHttpServer::Start(options.metrics_address, &server->registry_);
    if (!http.ok()) {
      server->Shutdown(std::chrono::milliseconds(0));
      return http.status();
    }
    server->metrics_http_ = std::move(http).value();
    server->metrics_port_ = server->metrics_http_->port();
  }
  return server;
}

void KvcServer::Shutdown(std::chrono::milliseconds deadline) {
  {
    absl::MutexLock lock(&shutdown_mu_);
    if (shut_down_) return;
    shut_down_ = true;
  }
  const auto drain_start = std::chrono::steady_clock::now();
  // A server that never started (Start failed) has nothing to drain.
  if (log_ != nullptr && server_ != nullptr) {
    log_->Emit("drain_start", {{"open_streams", service_ != nullptr ? service_->open_streams() : 0},
                               {"deadline_ms", deadline.count()}});
  }
  uint32_t cancelled_streams = 0;
  if (server_ != nullptr) {
    if (grpc::HealthCheckServiceInterface* health = server_->GetHealthCheckService()) {
      health->Shutdown();  // NOT_SERVING for every service from now on
    }
  }
  if (service_ != nullptr) service_->StartDraining();
  if (server_ != nullptr) {
    // Open streams get until the deadline. gRPC's own deadline would also wait for idle
    // client connections to close, so wait for the streams here and then shut down at once:
    // what is left is cancelled and connections are closed. Shutdown returns once every
    // reactor is done (reactors finish only after their layer jobs did).
    const auto give_up = std::chrono::steady_clock::now() + deadline;
    while (service_->open_streams() > 0 && std::chrono::steady_clock::now() < give_up) {
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
    cancelled_streams = service_->open_streams();
    server_->Shutdown(std::chrono::system_clock::now());
    server_->Wait();
  }
  if (scheduler_ != nullptr) scheduler_->Shutdown();
  metrics_http_.reset();
  if (log_ != nullptr && server_ != nullptr) {
    log_->Emit("drain_end", {{"duration_ms", std::chrono::duration<double, std::milli>(
                                                 std::chrono::steady_clock::now() - drain_start)
                                                 .count()},
                             {"streams_cancelled", cancelled_streams}});
  }
}

KvcServer::~KvcServer() { Shutdown(std::chrono::milliseconds(0)); }

}  // namespace kvcompress
