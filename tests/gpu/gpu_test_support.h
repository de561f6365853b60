// What the multi-process GPU tests share: kvcd's device memory in use (from GetServerInfo),
// this test binary re-run as a child process (a client to kill mid-request), and waiting for
// the file a child writes when it is ready.
#ifndef KVCOMPRESS_TESTS_GPU_GPU_TEST_SUPPORT_H_
#define KVCOMPRESS_TESTS_GPU_GPU_TEST_SUPPORT_H_

#include <sys/types.h>
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

#include "client/client.h"
#include "gtest/gtest.h"

extern char** environ;

namespace kvcompress::testing {

// Device memory kvcd's backends hold now, over every device.
inline uint64_t DeviceMemoryInUse(Client& client) {
  absl::StatusOr<v1::ServerInfo> info = client.GetServerInfo();
  EXPECT_TRUE(info.ok()) << info.status();
  uint64_t in_use = 0;
  if (info.ok()) {
    for (const v1::DeviceInfo& device : info->devices()) in_use += device.memory_in_use_bytes();
  }
  return in_use;
}

// Starts this test binary again with `--gtest_filter=<gtest_filter>` and `extra_environment`
// ("NAME=value") added to this process's environment; returns the child's pid (the caller
// kills and reaps it), or -1 when fork fails. Everything the child needs is made before fork:
// between fork and exec only async-signal-safe calls (this process has gRPC threads and a
// CUDA context the child must not touch).
inline pid_t SpawnSelf(const std::string& gtest_filter,
                       const std::vector<std::string>& extra_environment) {
  std::vector<std::string> environment;
  for (char** entry = environ; *entry != nullptr; ++entry) environment.emplace_back(*entry);
  environment.insert(environment.end(), extra_environment.begin(), extra_environment.end());
  std::vector<char*> envp;
  for (std::string& entry : environment) envp.push_back(entry.data());
  envp.push_back(nullptr);
  std::string self = "/proc/self/exe";
  std::string filter = "--gtest_filter=" + gtest_filter;
  char* argv[] = {self.data(), filter.data(), nullptr};
  const pid_t child = fork();
  if (child == 0) {
    execve(self.c_str(), argv, envp.data());
    _exit(127);
  }
  return child;
}

// Whether `path` exists within a minute.
inline bool WaitForFile(const std::string& path) {
  for (int i = 0; i < 600; ++i) {
    if (std::ifstream(path).good()) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  return false;
}

}  // namespace kvcompress::testing

#endif  // KVCOMPRESS_TESTS_GPU_GPU_TEST_SUPPORT_H_
