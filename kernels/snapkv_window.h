// SnapKV window arithmetic shared by both backends: which window queries score, where they
// sit, and which prefix scores a pooling window covers.
//
// Window query i (0 ≤ i < W_eff) of a sequence of T tokens sits at position T − W_eff + i and
// attends causally to keys 0 … T − W_eff + i. The prefix is P = T − W_eff.
#ifndef KVCOMPRESS_KERNELS_SNAPKV_WINDOW_H_
#define KVCOMPRESS_KERNELS_SNAPKV_WINDOW_H_

#include <cstdint>

#include "kernels/host_device.h"

namespace kvcompress {

// W_eff: the window that scores, the last min(window_size, sent) of the queries sent.
KVC_HOST_DEVICE inline int EffectiveWindowSize(int window_size, int num_window_queries_sent) {
  return window_size < num_window_queries_sent ? window_size : num_window_queries_sent;
}

// Inclusive range of prefix positions pooled into position j: [j − k/2, j + k/2] clipped to
// [0, P). Padding outside the prefix counts as zero (avg still divides by kernel_size, as
// torch's avg_pool1d with count_include_pad does).
struct PoolingWindow {
  int64_t first = 0;
  int64_t last = 0;
};

KVC_HOST_DEVICE inline PoolingWindow PoolingWindowAt(int64_t j, int kernel_size,
                                                     int64_t prefix_length) {
  const int64_t half = kernel_size / 2;
  PoolingWindow window;
  window.first = j - half < 0 ? 0 : j - half;
  window.last = j + half > prefix_length - 1 ? prefix_length - 1 : j + half;
  return window;
}

}  // namespace kvcompress

#endif  // KVCOMPRESS_KERNELS_SNAPKV_WINDOW_H_
