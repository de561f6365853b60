// kvcd: the kvcompress gRPC server.
//
//   kvcd --address=0.0.0.0:50051 --metrics_address=0.0.0.0:9464
//
// Listens until SIGINT or SIGTERM, then drains (--shutdown_deadline) and exits 0.
// With --port_file (and --metrics_port_file) the bound ports are written once listening,
// which is how tests using port 0 find them. Every flag may also come from the environment
// (KVCD_<FLAG>, flags_from_env.h); the command line wins. Events go to stderr as JSON lines
// (structured_log.h); a start-up failure is a "start_failed" line and exit status 1.
#include <grpc/support/log.h>
#include <signal.h>
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/flags/commandlineflag.h"
#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/flags/usage_config.h"
#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "service/call_authenticator.h"
#include "service/flags_from_env.h"
#include "service/kvcompress_server.h"
#include "service/server_credentials.h"
#include "service/structured_log.h"

namespace {
const kvcompress::ServerLimits kDefaultLimits;
}  // namespace

ABSL_FLAG(std::string, address, "0.0.0.0:50051",
          "gRPC listen address (host:port; port 0 picks one)");
ABSL_FLAG(std::string, metrics_address, "0.0.0.0:9464",
          "Prometheus /metrics listen address (host:port; port 0 picks one; empty disables)");
ABSL_FLAG(std::string, backend, "auto",
          "cpu: the CPU reference backend only; cuda: the GPU (fails to start without one), "
          "with the CPU backend for methods the GPU does not run; auto: cuda when a GPU is "
          "usable, else cpu");
ABSL_FLAG(int, cuda_device, 0, "CUDA device ordinal of the cuda backend");
ABSL_FLAG(uint64_t, cuda_memory_budget_bytes, 0,
          "device memory the cuda backend may hold at once; requests beyond it get "
          "RESOURCE_EXHAUSTED (0: 90% of the device memory free at start)");
ABSL_FLAG(int, worker_threads, 0, "layer jobs compressed in parallel (0: hardware threads)");
ABSL_FLAG(int, backend_threads, 0,
          "threads of the CPU backend, shared by all layer jobs (0: hardware threads divided "
          "by --worker_threads, at least 1)");
ABSL_FLAG(uint64_t, max_request_bytes, kDefaultLimits.max_request_bytes,
          "most tensor bytes one Compress stream may announce");
ABSL_FLAG(uint64_t, max_tokens, kDefaultLimits.max_tokens, "most tokens per sequence");
ABSL_FLAG(uint32_t, max_layers, kDefaultLimits.max_layers, "most layers per request");
ABSL_FLAG(uint32_t, max_sequences, kDefaultLimits.max_sequences, "most sequences per request");
ABSL_FLAG(uint32_t, max_concurrent_streams, kDefaultLimits.max_concurrent_streams,
          "Compress streams open at once; further streams get RESOURCE_EXHAUSTED");
ABSL_FLAG(uint64_t, max_buffered_bytes, 0,
          "host bytes all request tensor buffers may hold together (0: half of RAM)");
ABSL_FLAG(uint64_t, stream_buffer_bytes, uint64_t{512} << 20,
          "bytes one stream may hold before the server stops reading it until layers finish");
ABSL_FLAG(
    bool, allow_cuda_ipc, false,
    "enable the cuda_ipc transport (same-node GPU-direct; needs --backend=cuda). Channels are "
    "for authenticated peers only, unless kvcd requires no authentication at all");
ABSL_FLAG(bool, allow_nccl, false,
          "enable the nccl transport and forwarding to decode workers (GPU-direct over NCCL; "
          "needs --backend=cuda). Same access rule as --allow_cuda_ipc");
ABSL_FLAG(absl::Duration, nccl_timeout, absl::Seconds(120),
          "the longest any NCCL transfer of a stream may wait (peer joining, stalled or dead "
          "peers), when the stream's own deadline is later; the channel is aborted past it");
ABSL_FLAG(absl::Duration, channel_idle_timeout, absl::Minutes(5),
          "close a data-plane channel unused for this long (also the most a client may ask for)");
ABSL_FLAG(uint64_t, max_channels, 64, "most data-plane channels open at once");
ABSL_FLAG(std::string, port_file, "", "write the bound gRPC port to this file once listening");
ABSL_FLAG(std::string, metrics_port_file, "",
          "write the bound metrics port to this file once listening");
ABSL_FLAG(absl::Duration, shutdown_deadline, absl::Seconds(5),
          "on SIGINT/SIGTERM, how long open streams may finish before they are cancelled");
ABSL_FLAG(std::string, tls_cert, "",
          "PEM certificate chain of the gRPC listener (server certificate first); with "
          "--tls_key turns TLS on. /metrics stays plain HTTP");
ABSL_FLAG(std::string, tls_key, "", "PEM private key of --tls_cert (unencrypted)");
ABSL_FLAG(std::string, tls_client_ca, "",
          "PEM CA bundle; when set, clients must present a certificate it signed (mTLS)");
ABSL_FLAG(std::string, auth_token_file, "",
          "file holding a bearer token every KvCompress call must carry as "
          "\"authorization: Bearer <token>\" (health and reflection stay open)");

namespace {

// Written to a temporary name and renamed, so a reader never sees a partial number.
bool WritePortFile(const std::string& path, int port) {
  const std::string temporary = absl::StrCat(path, ".tmp.", getpid());
  {
    std::ofstream out(temporary, std::ios::trunc);
    out << port << "\n";
    if (!out.good()) return false;
  }
  return std::rename(temporary.c_str(), path.c_str()) == 0;
}

}  // namespace

namespace {

constexpr char kEnvironmentPrefix[] = "KVCD_";

// kvcd's own flags (not absl's --flagfile, --help, ...) may come from the environment.
bool IsKvcdFlag(const absl::CommandLineFlag& flag) {
  return kvcompress::FlagDefinedIn(flag, "service/main.cc");
}

// gRPC's own diagnostics (TLS handshake failures, ...) become "grpc" events, so that
// stderr stays one JSON object per line.
kvcompress::StructuredLog* grpc_log_target = nullptr;
void ForwardGrpcLog(gpr_log_func_args* args) {
  grpc_log_target->Emit("grpc", {{"severity", gpr_log_severity_string(args->severity)},
                                 {"file", args->file != nullptr ? args->file : ""},
                                 {"line", args->line},
                                 {"message", args->message != nullptr ? args->message : ""}});
}

int StartFailed(kvcompress::StructuredLog& log, const absl::Status& status) {
  log.Emit("start_failed", {{"code", absl::StatusCodeToString(status.code())},
                            {"error", std::string(status.message())}});
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(absl::StrCat("the kvcompress KV-cache compression server\n\n",
                                            kvcompress::EnvironmentUsage(kEnvironmentPrefix)));
  // absl's --help lists the flags of the file named like the program (kvcd.cc); ours live in
  // main.cc.
  absl::FlagsUsageConfig usage_config;
  usage_config.contains_help_flags = [](absl::string_view file) {
    return absl::EndsWith(file, "service/main.cc");
  };
  usage_config.contains_helpshort_flags = usage_config.contains_help_flags;
  usage_config.version_string = [] { return std::string("kvcd " KVC_VERSION "\n"); };
  absl::SetFlagsUsageConfig(usage_config);
  // Never destroyed: gRPC threads may still log while the process exits.
  static kvcompress::StructuredLog* const process_log = new kvcompress::StructuredLog(stderr);
  std::shared_ptr<kvcompress::StructuredLog> log(process_log, [](kvcompress::StructuredLog*) {});
  grpc_log_target = process_log;
  gpr_set_log_function(ForwardGrpcLog);
  // Before the command line, so that a flag given there overrides its variable.
  absl::StatusOr<std::vector<std::string>> from_environment =
      kvcompress::ApplyFlagsFromEnvironment(kEnvironmentPrefix, IsKvcdFlag);
  if (!from_environment.ok()) return StartFailed(*log, from_environment.status());
  absl::ParseCommandLine(argc, argv);

  // Signals are taken synchronously by sigwait below; block them before any thread starts so
  // every thread inherits the mask.
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGINT);
  sigaddset(&signals, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);

  kvcompress::ServerOptions options;
  options.address = absl::GetFlag(FLAGS_address);
  options.metrics_address = absl::GetFlag(FLAGS_metrics_address);
  options.worker_threads = absl::GetFlag(FLAGS_worker_threads);
  options.backend_threads = absl::GetFlag(FLAGS_backend_threads);
  options.backend_kind = absl::GetFlag(FLAGS_backend);
  options.cuda_device = absl::GetFlag(FLAGS_cuda_device);
  options.cuda_memory_budget_bytes = absl::GetFlag(FLAGS_cuda_memory_budget_bytes);
  options.allow_cuda_ipc = absl::GetFlag(FLAGS_allow_cuda_ipc);
  options.allow_nccl = absl::GetFlag(FLAGS_allow_nccl);
  options.nccl_timeout = std::chrono::seconds(
      std::max<int64_t>(1, absl::ToInt64Seconds(absl::GetFlag(FLAGS_nccl_timeout))));
  options.channel_idle_timeout = std::chrono::seconds(
      std::max<int64_t>(1, absl::ToInt64Seconds(absl::GetFlag(FLAGS_channel_idle_timeout))));
  options.max_channels = absl::GetFlag(FLAGS_max_channels);
  options.limits.max_request_bytes = absl::GetFlag(FLAGS_max_request_bytes);
  options.limits.max_tokens = absl::GetFlag(FLAGS_max_tokens);
  options.limits.max_layers = absl::GetFlag(FLAGS_max_layers);
  options.limits.max_sequences = absl::GetFlag(FLAGS_max_sequences);
  options.limits.max_concurrent_streams = absl::GetFlag(FLAGS_max_concurrent_streams);
  options.max_buffered_bytes = absl::GetFlag(FLAGS_max_buffered_bytes);
  options.stream_buffer_bytes = absl::GetFlag(FLAGS_stream_buffer_bytes);
  options.log = log;
  absl::StatusOr<kvcompress::ServerSecurity> security =
      kvcompress::MakeServerSecurity({absl::GetFlag(FLAGS_tls_cert), absl::GetFlag(FLAGS_tls_key),
                                      absl::GetFlag(FLAGS_tls_client_ca)});
  if (!security.ok()) return StartFailed(*log, security.status());
  options.security = *std::move(security);
  if (const std::string token_file = absl::GetFlag(FLAGS_auth_token_file); !token_file.empty()) {
    absl::StatusOr<std::string> token = kvcompress::ReadAuthTokenFile(token_file);
    if (!token.ok()) return StartFailed(*log, token.status());
    options.auth_token = *std::move(token);
  }

  absl::StatusOr<std::unique_ptr<kvcompress::KvcServer>> server =
      kvcompress::KvcServer::Start(std::move(options));
  if (!server.ok()) return StartFailed(*log, server.status());
  kvcompress::KvcServer& kvcd = **server;
  if (!kvcd.backend_note().empty()) {
    log->Emit("backend_fallback",
              {{"backend", kvcd.backend_name()}, {"reason", kvcd.backend_note()}});
  }

  const std::string port_file = absl::GetFlag(FLAGS_port_file);
  if (!port_file.empty() && !WritePortFile(port_file, kvcd.port())) {
    return StartFailed(*log,
                       absl::InternalError(absl::StrCat("cannot write --port_file ", port_file)));
  }
  const std::string metrics_port_file = absl::GetFlag(FLAGS_metrics_port_file);
  if (!metrics_port_file.empty() && kvcd.metrics_port() > 0 &&
      !WritePortFile(metrics_port_file, kvcd.metrics_port())) {
    return StartFailed(*log, absl::InternalError(absl::StrCat("cannot write --metrics_port_file ",
                                                              metrics_port_file)));
  }

  const std::string address = absl::GetFlag(FLAGS_address);
  const std::string host = address.substr(0, address.rfind(':'));
  const std::string metrics_address = absl::GetFlag(FLAGS_metrics_address);
  log->Emit("start",
            {{"version", KVC_VERSION},
             {"pid", getpid()},
             {"address", absl::StrCat(host, ":", kvcd.port())},
             {"metrics",
              metrics_address.empty()
                  ? "disabled"
                  : absl::StrCat("http://", metrics_address.substr(0, metrics_address.rfind(':')),
                                 ":", kvcd.metrics_port(), "/metrics")},
             {"backend", kvcd.backend_name()},
             {"worker_threads", kvcd.worker_threads()},
             {"channels",
              {{"cuda_ipc", absl::GetFlag(FLAGS_allow_cuda_ipc)},
               {"nccl", absl::GetFlag(FLAGS_allow_nccl)},
               {"idle_timeout_s", absl::ToInt64Seconds(absl::GetFlag(FLAGS_channel_idle_timeout))},
               {"max_channels", absl::GetFlag(FLAGS_max_channels)}}},
             {"limits",
              {{"max_request_bytes", absl::GetFlag(FLAGS_max_request_bytes)},
               {"max_tokens", absl::GetFlag(FLAGS_max_tokens)},
               {"max_layers", absl::GetFlag(FLAGS_max_layers)},
               {"max_sequences", absl::GetFlag(FLAGS_max_sequences)},
               {"max_concurrent_streams", absl::GetFlag(FLAGS_max_concurrent_streams)},
               {"max_buffered_bytes", absl::GetFlag(FLAGS_max_buffered_bytes)},
               {"stream_buffer_bytes", absl::GetFlag(FLAGS_stream_buffer_bytes)}}},
             {"tls", kvcd.tls()},
             {"mtls", kvcd.client_certificates_verified()},
             {"auth_token", kvcd.auth_token_required()},
             {"flags_from_environment", *from_environment}});

  int signal_number = 0;
  sigwait(&signals, &signal_number);
  log->Emit("signal", {{"signal", signal_number == SIGINT ? "SIGINT" : "SIGTERM"}});
  kvcd.Shutdown(
      std::chrono::milliseconds(absl::ToInt64Milliseconds(absl::GetFlag(FLAGS_shutdown_deadline))));
  server->reset();
  log->Emit("stop", {{"exit_code", 0}});
  return 0;
}
