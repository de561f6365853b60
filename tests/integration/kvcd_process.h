// KvcdProcess: starts a real `kvcd` binary on loopback ports for integration tests and
// stops it when destroyed.
//
// The binary is found through $KVC_BIN_DIR (set by ctest). The server binds port 0 and
// reports the chosen ports through --port_file / --metrics_port_file, so tests can run in
// parallel. Not thread-safe; one owner.
#ifndef KVCOMPRESS_TESTS_INTEGRATION_KVCD_PROCESS_H_
#define KVCOMPRESS_TESTS_INTEGRATION_KVCD_PROCESS_H_

#include <sys/types.h>

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace kvcompress::testing {

class KvcdProcess final {
 public:
  // Starts kvcd with `extra_flags` appended and waits (up to 60 s) until it listens.
  static absl::StatusOr<std::unique_ptr<KvcdProcess>> Start(
      const std::vector<std::string>& extra_flags = {});
  // Same, with `environment` ("NAME=value" entries) added to kvcd's environment.
  static absl::StatusOr<std::unique_ptr<KvcdProcess>> StartWithEnvironment(
      const std::vector<std::string>& extra_flags, const std::vector<std::string>& environment);
  ~KvcdProcess();

  KvcdProcess(const KvcdProcess&) = delete;
  KvcdProcess& operator=(const KvcdProcess&) = delete;

  std::string target() const { return "127.0.0.1:" + std::to_string(port_); }
  int metrics_port() const { return metrics_port_; }
  pid_t pid() const { return pid_; }
  // kvcd's stdout and stderr (its structured log), written as it runs.
  std::string log_path() const { return scratch_dir_ + "/kvcd.log"; }
  // Whether the process is still running (it must be after every malformed request).
  bool Alive();
  // Sends SIGTERM and waits up to `timeout_seconds` for exit; returns the exit status as
  // waitpid reports it, or an error when it did not exit in time.
  absl::StatusOr<int> Terminate(double timeout_seconds);

 private:
  KvcdProcess() = default;

  pid_t pid_ = -1;
  int port_ = 0;
  int metrics_port_ = 0;
  std::string scratch_dir_;
};

// The directory holding kvcd and kvc ($KVC_BIN_DIR).
std::string BinDir();

// Runs a command (argv[0] resolved by the caller), captures stdout+stderr, returns the exit
// code and output. Fails only when the process could not be started.
struct CommandResult {
  int exit_code = -1;
  std::string output;
};
absl::StatusOr<CommandResult> RunCommand(const std::vector<std::string>& argv);

// Starts argv[0] (a path) with stdout and stderr written to `output_path` (created or
// truncated). The caller owns the child: it must stop and reap it.
absl::StatusOr<pid_t> SpawnProcess(const std::vector<std::string>& argv,
                                   const std::string& output_path);

// The path of `name` found in $PATH (or in /usr/sbin, /usr/bin); empty when absent.
std::string FindProgram(const std::string& name);

// Fetches http://127.0.0.1:port/path with a plain HTTP/1.0 GET; returns the body. A status
// other than 200 is an error carrying the status line and the start of the body.
absl::StatusOr<std::string> HttpGet(int port, const std::string& path);

// A fresh empty directory under $TMPDIR, removed by the caller if it wishes.
std::string MakeScratchDir();

}  // namespace kvcompress::testing

#endif  // KVCOMPRESS_TESTS_INTEGRATION_KVCD_PROCESS_H_
