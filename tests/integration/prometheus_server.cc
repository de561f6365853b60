#include "tests/integration/prometheus_server.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "tests/integration/kvcd_process.h"

namespace kvcompress::testing {
namespace {

// A loopback port that was free a moment ago (bind port 0, read it, close). Another process
// may take it before prometheus binds it; Start retries with a new one then.
absl::StatusOr<int> FreeLoopbackPort() {
  const int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return absl::InternalError("socket() failed");
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_port = 0;
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t length = sizeof(address);
  if (bind(fd, reinterpret_cast<sockaddr*>(&address), sizeof(address)) != 0 ||
      getsockname(fd, reinterpret_cast<sockaddr*>(&address), &length) != 0) {
    close(fd);
    return absl::InternalError("cannot bind a loopback port");
  }
  close(fd);
  return static_cast<int>(ntohs(address.sin_port));
}

std::string ConfigFor(int metrics_port, const std::string& job) {
  return absl::StrCat(
      "global:\n"
      "  scrape_interval: 1s\n"
      "  evaluation_interval: 1s\n"
      "scrape_configs:\n"
      "  - job_name: ",
      job,
      "\n"
      "    scrape_interval: 1s\n"
      "    scrape_timeout: 1s\n"
      "    metrics_path: /metrics\n"
      "    static_configs:\n"
      "      - targets: ['127.0.0.1:",
      metrics_port, "']\n");
}

}  // namespace

std::string UrlEncode(const std::string& text) {
  static constexpr char kHex[] = "0123456789ABCDEF";
  std::string out;
  for (unsigned char c : text) {
    if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-' ||
        c == '_' || c == '.' || c == '~') {
      out += static_cast<char>(c);
    } else {
      out += '%';
      out += kHex[c >> 4];
      out += kHex[c & 15];
    }
  }
  return out;
}

absl::StatusOr<std::unique_ptr<PrometheusServer>> PrometheusServer::Start(int metrics_port,
                                                                          const std::string& job) {
  const std::string binary = FindProgram("prometheus");
  if (binary.empty()) {
    return absl::FailedPreconditionError(
        "no `prometheus` binary in PATH: install the Debian package prometheus "
        "(scripts/install_deps.sh does)");
  }
  std::unique_ptr<PrometheusServer> server(new PrometheusServer());
  server->dir_ = MakeScratchDir();
  const std::string config = server->dir_ + "/prometheus.yml";
  std::ofstream(config) << ConfigFor(metrics_port, job);

  absl::Status last_error;
  for (int attempt = 0; attempt < 3; ++attempt) {
    absl::StatusOr<int> port = FreeLoopbackPort();
    if (!port.ok()) return port.status();
    server->port_ = *port;
    absl::StatusOr<pid_t> pid = SpawnProcess(
        {binary, "--config.file=" + config, "--storage.tsdb.path=" + server->dir_ + "/data",
         absl::StrCat("--web.listen-address=127.0.0.1:", server->port_),
         "--storage.tsdb.retention.time=1h"},
        server->dir_ + "/prometheus.log");
    if (!pid.ok()) return pid.status();
    server->pid_ = *pid;

    const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(60);
    while (std::chrono::steady_clock::now() < give_up && server->Alive()) {
      if (HttpGet(server->port_, "/-/ready").ok()) return server;
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
    last_error =
        absl::InternalError(absl::StrCat(server->Alive() ? "prometheus was not ready within 60 s"
                                                         : "prometheus exited during start-up",
                                         "; its log ends:\n", server->LogTail()));
    if (server->Alive()) break;  // hung, not a lost port race: do not try again
  }
  return last_error;
}

bool PrometheusServer::Alive() {
  if (pid_ <= 0) return false;
  if (waitpid(pid_, nullptr, WNOHANG) == pid_) {
    pid_ = -1;
    return false;
  }
  return true;
}

absl::StatusOr<nlohmann::json> PrometheusServer::Query(const std::string& promql) {
  absl::StatusOr<std::string> body = HttpGet(port_, "/api/v1/query?query=" + UrlEncode(promql));
  if (!body.ok()) return body.status();
  nlohmann::json reply = nlohmann::json::parse(*body, nullptr, /*allow_exceptions=*/false);
  if (reply.is_discarded() || !reply.is_object()) {
    return absl::InternalError(absl::StrCat("query ", promql, ": not JSON: ", *body));
  }
  if (reply.value("status", "") != "success" || !reply.contains("data")) {
    return absl::InvalidArgumentError(absl::StrCat("query ", promql, ": ", reply.dump()));
  }
  return reply["data"];
}

absl::StatusOr<int> PrometheusServer::Terminate(double timeout_seconds) {
  if (pid_ <= 0) return absl::FailedPreconditionError("prometheus is not running");
  kill(pid_, SIGTERM);
  const auto give_up = std::chrono::steady_clock::now() +
                       std::chrono::milliseconds(static_cast<int64_t>(timeout_seconds * 1000));
  while (std::chrono::steady_clock::now() < give_up) {
    int status = 0;
    if (waitpid(pid_, &status, WNOHANG) == pid_) {
      pid_ = -1;
      return status;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return absl::DeadlineExceededError("prometheus did not exit after SIGTERM");
}

std::string PrometheusServer::LogTail() const {
  std::ifstream log(dir_ + "/prometheus.log");
  std::stringstream text;
  text << log.rdbuf();
  const std::string all = text.str();
  return all.size() > 4000 ? all.substr(all.size() - 4000) : all;
}

PrometheusServer::~PrometheusServer() {
  if (pid_ > 0 && !Terminate(30).ok() && pid_ > 0) {
    kill(pid_, SIGKILL);
    waitpid(pid_, nullptr, 0);
  }
  std::error_code ignored;
  if (!dir_.empty() && dir_ != "/tmp") std::filesystem::remove_all(dir_, ignored);
}

}  // namespace kvcompress::testing
