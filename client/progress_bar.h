// ProgressBar: a one-line progress display on stderr for long `kvc` transfers.
//
// Draws only when stderr is a terminal, so logs and pipes stay clean. A background thread
// redraws every 100 ms from the callbacks; the destructor stops it and clears the line.
// The callbacks run on that thread and must be thread-safe (read atomics).
#ifndef KVCOMPRESS_CLIENT_PROGRESS_BAR_H_
#define KVCOMPRESS_CLIENT_PROGRESS_BAR_H_

#include <functional>
#include <string>
#include <thread>

#include "absl/synchronization/notification.h"

namespace kvcompress {

class ProgressBar final {
 public:
  // `fraction` returns the share done in [0, 1]; `text` what to print after the bar.
  ProgressBar(std::function<double()> fraction, std::function<std::string()> text);
  ~ProgressBar();

  ProgressBar(const ProgressBar&) = delete;
  ProgressBar& operator=(const ProgressBar&) = delete;

  // Whether bars are drawn at all (stderr is a terminal).
  static bool Enabled();

 private:
  void Draw() const;

  std::function<double()> fraction_;
  std::function<std::string()> text_;
  absl::Notification stop_;
  std::thread thread_;
};

}  // namespace kvcompress

#endif  // KVCOMPRESS_CLIENT_PROGRESS_BAR_H_
