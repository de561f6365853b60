#include "tests/integration/kvcd_process.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string_view>
#include <thread>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"

extern char** environ;

namespace kvcompress::testing {
namespace {

// Reads a port number written by kvcd once it listens; 0 while absent or incomplete.
int ReadPortFile(const std::string& path) {
  std::ifstream in(path);
  int port = 0;
  if (in >> port) return port;
  return 0;
}

// `environment` ("NAME=value" entries) is added to this process's environment, replacing
// variables of the same name.
absl::StatusOr<pid_t> Spawn(const std::vector<std::string>& argv, const char* output_path,
                            const std::vector<std::string>& environment = {}) {
  std::vector<char*> env;
  for (char** entry = environ; *entry != nullptr; ++entry) {
    const std::string_view existing(*entry);
    const bool replaced = std::any_of(environment.begin(), environment.end(), [&](const auto& e) {
      const size_t equals = e.find('=');
      return existing.substr(0, existing.find('=')) == std::string_view(e).substr(0, equals);
    });
    if (!replaced) env.push_back(*entry);
  }
  for (const std::string& entry : environment) env.push_back(const_cast<char*>(entry.c_str()));
  env.push_back(nullptr);
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  if (output_path != nullptr) {
    posix_spawn_file_actions_addopen(&actions, 1, output_path, O_WRONLY | O_CREAT | O_TRUNC,
                                     0644);
    posix_spawn_file_actions_adddup2(&actions, 1, 2);
  }
  std::vector<char*> args;
  for (const std::string& arg : argv) args.push_back(const_cast<char*>(arg.c_str()));
  args.push_back(nullptr);
  pid_t pid = -1;
  const int error = posix_spawn(&pid, args[0], &actions, nullptr, args.data(), env.data());
  posix_spawn_file_actions_destroy(&actions);
  if (error != 0) return absl::InternalError(absl::StrCat("cannot start ", argv[0], ": ", error));
  return pid;
}

}  // namespace

absl::StatusOr<pid_t> SpawnProcess(const std::vector<std::string>& argv,
                                   const std::string& output_path) {
  return Spawn(argv, output_path.c_str());
}

std::string FindProgram(const std::string& name) {
  const char* path = std::getenv("PATH");
  std::vector<std::string> dirs =
      absl::StrSplit(path != nullptr ? path : "", ':', absl::SkipEmpty());
  dirs.push_back("/usr/sbin");
  dirs.push_back("/usr/bin");
  for (const std::string& dir : dirs) {
    const std::string candidate = dir + "/" + name;
    if (access(candidate.c_str(), X_OK) == 0) return candidate;
  }
  return "";
}

std::string BinDir() {
  const char* dir = std::getenv("KVC_BIN_DIR");
  return dir != nullptr ? dir : "build/bin";
}

std::string MakeScratchDir() {
  const char* tmp = std::getenv("TMPDIR");
  std::string pattern = absl::StrCat(tmp != nullptr ? tmp : "/tmp", "/kvc_test_XXXXXX");
  if (mkdtemp(pattern.data()) == nullptr) return "/tmp";
  return pattern;
}

absl::StatusOr<std::unique_ptr<KvcdProcess>> KvcdProcess::Start(
    const std::vector<std::string>& extra_flags) {
  return StartWithEnvironment(extra_flags, {});
}

absl::StatusOr<std::unique_ptr<KvcdProcess>> KvcdProcess::StartWithEnvironment(
    const std::vector<std::string>& extra_flags, const std::vector<std::string>& environment) {
  std::unique_ptr<KvcdProcess> process(new KvcdProcess());
  process->scratch_dir_ = MakeScratchDir();
  const std::string port_file = process->scratch_dir_ + "/port";
  const std::string metrics_port_file = process->scratch_dir_ + "/metrics_port";
  const std::string log_file = process->log_path();
  std::vector<std::string> argv = {BinDir() + "/kvcd",
                                   "--address=127.0.0.1:0",
                                   "--port_file=" + port_file,
                                   "--metrics_address=127.0.0.1:0",
                                   "--metrics_port_file=" + metrics_port_file,
                                   "--worker_threads=2",
                                   "--backend_threads=2",
                                   // The CPU reference, which these tests compare with
                                   // byte for byte, also on GPU machines (a later
                                   // --backend in extra_flags wins).
                                   "--backend=cpu"};
  argv.insert(argv.end(), extra_flags.begin(), extra_flags.end());
  auto pid = Spawn(argv, log_file.c_str(), environment);
  if (!pid.ok()) return pid.status();
  process->pid_ = *pid;

  const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  while (std::chrono::steady_clock::now() < give_up) {
    process->port_ = ReadPortFile(port_file);
    process->metrics_port_ = ReadPortFile(metrics_port_file);
    if (process->port_ > 0 && process->metrics_port_ > 0) return process;
    if (!process->Alive()) {
      std::ifstream log(log_file);
      std::stringstream text;
      text << log.rdbuf();
      return absl::InternalError(absl::StrCat("kvcd exited during start-up: ", text.str()));
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return absl::DeadlineExceededError("kvcd did not report its ports within 60 s");
}

bool KvcdProcess::Alive() {
  if (pid_ <= 0) return false;
  int status = 0;
  const pid_t result = waitpid(pid_, &status, WNOHANG);
  if (result == pid_) {
    pid_ = -1;
    return false;
  }
  return true;
}

absl::StatusOr<int> KvcdProcess::Terminate(double timeout_seconds) {
  if (pid_ <= 0) return absl::FailedPreconditionError("kvcd is not running");
  kill(pid_, SIGTERM);
  const auto give_up = std::chrono::steady_clock::now() +
                       std::chrono::milliseconds(static_cast<int>(timeout_seconds * 1000));
  while (std::chrono::steady_clock::now() < give_up) {
    int status = 0;
    if (waitpid(pid_, &status, WNOHANG) == pid_) {
      pid_ = -1;
      return status;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return absl::DeadlineExceededError("kvcd did not exit after SIGTERM");
}

KvcdProcess::~KvcdProcess() {
  if (pid_ <= 0) return;
  if (!Terminate(10).ok() && pid_ > 0) {
    kill(pid_, SIGKILL);
    waitpid(pid_, nullptr, 0);
  }
}

absl::StatusOr<CommandResult> RunCommand(const std::vector<std::string>& argv) {
  const std::string output_path = MakeScratchDir() + "/output.txt";
  auto pid = Spawn(argv, output_path.c_str());
  if (!pid.ok()) return pid.status();
  int status = 0;
  waitpid(*pid, &status, 0);
  CommandResult result;
  result.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  std::ifstream in(output_path);
  std::stringstream text;
  text << in.rdbuf();
  result.output = text.str();
  return result;
}

absl::StatusOr<std::string> HttpGet(int port, const std::string& path) {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) return absl::InternalError("socket() failed");
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_port = htons(static_cast<uint16_t>(port));
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (connect(fd, reinterpret_cast<sockaddr*>(&address), sizeof(address)) != 0) {
    close(fd);
    return absl::UnavailableError(absl::StrCat("cannot connect to 127.0.0.1:", port));
  }
  const std::string request = absl::StrCat("GET ", path, " HTTP/1.0\r\nHost: localhost\r\n\r\n");
  if (write(fd, request.data(), request.size()) != static_cast<ssize_t>(request.size())) {
    close(fd);
    return absl::InternalError("short write");
  }
  std::string response;
  char buffer[4096];
  ssize_t got = 0;
  while ((got = read(fd, buffer, sizeof(buffer))) > 0) response.append(buffer, got);
  close(fd);
  const size_t body = response.find("\r\n\r\n");
  if (body == std::string::npos) return absl::InternalError("malformed HTTP response");
  const std::string status_line = response.substr(0, response.find("\r\n"));
  if (status_line.rfind("HTTP/1.", 0) != 0 || status_line.find(" 200 ") == std::string::npos) {
    return absl::InternalError(
        absl::StrCat("GET ", path, ": ", status_line, ": ", response.substr(body + 4, 2000)));
  }
  return response.substr(body + 4);
}

}  // namespace kvcompress::testing
