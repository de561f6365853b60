// kvcd: the kvcompress gRPC server.
//
//   kvcd --address=0.0.0.0:50051 --metrics_address=0.0.0.0:9464
//
// Listens until SIGINT or SIGTERM, then drains (--shutdown_deadline) and exits 0.
// With --port_file (and --metrics_port_file) the bound ports are written once listening,
// which is how tests using port 0 find them.
#include <signal.h>
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <string>
#include <thread>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "service/kvcompress_server.h"

namespace {
const kvcompress::ServerLimits kDefaultLimits;
}  // namespace

ABSL_FLAG(std::string, address, "0.0.0.0:50051",
          "gRPC listen address (host:port; port 0 picks one)");
ABSL_FLAG(std::string, metrics_address, "0.0.0.0:9464",
          "Prometheus /metrics listen address (host:port; port 0 picks one; empty disables)");
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
ABSL_FLAG(std::string, port_file, "", "write the bound gRPC port to this file once listening");
ABSL_FLAG(std::string, metrics_port_file, "",
          "write the bound metrics port to this file once listening");
ABSL_FLAG(absl::Duration, shutdown_deadline, absl::Seconds(5),
          "on SIGINT/SIGTERM, how long open streams may finish before they are cancelled");

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

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage("kvcd: the kvcompress KV-cache compression server");
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
  options.limits.max_request_bytes = absl::GetFlag(FLAGS_max_request_bytes);
  options.limits.max_tokens = absl::GetFlag(FLAGS_max_tokens);
  options.limits.max_layers = absl::GetFlag(FLAGS_max_layers);
  options.limits.max_sequences = absl::GetFlag(FLAGS_max_sequences);
  options.limits.max_concurrent_streams = absl::GetFlag(FLAGS_max_concurrent_streams);
  options.max_buffered_bytes = absl::GetFlag(FLAGS_max_buffered_bytes);
  options.stream_buffer_bytes = absl::GetFlag(FLAGS_stream_buffer_bytes);

  absl::StatusOr<std::unique_ptr<kvcompress::KvcServer>> server =
      kvcompress::KvcServer::Start(std::move(options));
  if (!server.ok()) {
    std::fprintf(stderr, "kvcd: %s\n", server.status().ToString().c_str());
    return 1;
  }
  kvcompress::KvcServer& kvcd = **server;

  const std::string port_file = absl::GetFlag(FLAGS_port_file);
  if (!port_file.empty() && !WritePortFile(port_file, kvcd.port())) {
    std::fprintf(stderr, "kvcd: cannot write --port_file %s\n", port_file.c_str());
    return 1;
  }
  const std::string metrics_port_file = absl::GetFlag(FLAGS_metrics_port_file);
  if (!metrics_port_file.empty() && kvcd.metrics_port() > 0 &&
      !WritePortFile(metrics_port_file, kvcd.metrics_port())) {
    std::fprintf(stderr, "kvcd: cannot write --metrics_port_file %s\n", metrics_port_file.c_str());
    return 1;
  }

  const std::string address = absl::GetFlag(FLAGS_address);
  const std::string host = address.substr(0, address.rfind(':'));
  const std::string metrics_address = absl::GetFlag(FLAGS_metrics_address);
  std::fprintf(stderr,
               "kvcd %s listening on %s:%d (gRPC), metrics %s, backend %s, %d worker threads\n",
               KVC_VERSION, host.c_str(), kvcd.port(),
               metrics_address.empty()
                   ? "disabled"
                   : absl::StrCat("http://", metrics_address.substr(0, metrics_address.rfind(':')),
                                  ":", kvcd.metrics_port(), "/metrics")
                         .c_str(),
               kvcd.backend_name().c_str(), kvcd.worker_threads());
  std::fflush(stderr);

  int signal_number = 0;
  sigwait(&signals, &signal_number);
  std::fprintf(stderr, "kvcd: %s received, draining\n",
               signal_number == SIGINT ? "SIGINT" : "SIGTERM");
  std::fflush(stderr);
  const auto drain_start = std::chrono::steady_clock::now();
  kvcd.Shutdown(
      std::chrono::milliseconds(absl::ToInt64Milliseconds(absl::GetFlag(FLAGS_shutdown_deadline))));
  server->reset();
  std::fprintf(
      stderr, "kvcd: stopped after %.3f s\n",
      std::chrono::duration<double>(std::chrono::steady_clock::now() - drain_start).count());
  return 0;
}
