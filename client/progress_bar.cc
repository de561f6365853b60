#include "client/progress_bar.h"

#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <utility>

#include "absl/time/time.h"

namespace kvcompress {

bool ProgressBar::Enabled() { return ::isatty(STDERR_FILENO) == 1; }

ProgressBar::ProgressBar(std::function<double()> fraction, std::function<std::string()> text)
    : fraction_(std::move(fraction)), text_(std::move(text)) {
  if (!Enabled()) return;
  thread_ = std::thread([this] {
    while (!stop_.WaitForNotificationWithTimeout(absl::Milliseconds(100))) Draw();
  });
}

ProgressBar::~ProgressBar() {
  if (!thread_.joinable()) return;
  stop_.Notify();
  thread_.join();
  std::fprintf(stderr, "\r\033[K");
  std::fflush(stderr);
}

void ProgressBar::Draw() const {
  constexpr int kWidth = 30;
  const double fraction = std::clamp(fraction_(), 0.0, 1.0);
  const int filled = static_cast<int>(fraction * kWidth);
  std::string bar(filled, '#');
  bar.append(kWidth - filled, '.');
  std::fprintf(stderr, "\r\033[K[%s] %3d%% %s", bar.c_str(), static_cast<int>(fraction * 100),
               text_().c_str());
  std::fflush(stderr);
}

}  // namespace kvcompress
