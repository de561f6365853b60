#include "kernels/cpu/internal/thread_pool.h"

#include <atomic>
#include <thread>
#include <vector>

#include "gtest/gtest.h"

namespace kvcompress::cpu {
namespace {

TEST(ThreadPoolTest, RunsEveryIndexExactlyOnce) {
  for (int workers : {0, 1, 3}) {
    ThreadPool pool(workers);
    for (int64_t count : {0, 1, 2, 7, 1000}) {
      std::vector<std::atomic<int>> runs(count);
      pool.ParallelFor(count, [&](int64_t i) { runs[i].fetch_add(1); });
      for (int64_t i = 0; i < count; ++i) ASSERT_EQ(runs[i].load(), 1) << i;
    }
  }
}

TEST(ThreadPoolTest, ConcurrentAndNestedCallersDoNotDeadlock) {
  ThreadPool pool(2);
  std::atomic<int64_t> total{0};
  std::vector<std::thread> callers;
  for (int c = 0; c < 8; ++c) {
    callers.emplace_back([&] {
      for (int repeat = 0; repeat < 20; ++repeat) {
        pool.ParallelFor(6, [&](int64_t) {
          // A body that itself fans out, as a backend called from a pool thread would.
          pool.ParallelFor(5, [&](int64_t j) { total.fetch_add(j + 1); });
        });
      }
    });
  }
  for (std::thread& caller : callers) caller.join();
  EXPECT_EQ(total.load(), 8 * 20 * 6 * 15);
}

TEST(ThreadPoolTest, UsesTheWorkers) {
  ThreadPool pool(3);
  EXPECT_EQ(pool.num_workers(), 3);
  std::atomic<int> concurrent{0};
  std::atomic<int> peak{0};
  pool.ParallelFor(64, [&](int64_t) {
    const int now = concurrent.fetch_add(1) + 1;
    int seen = peak.load();
    while (now > seen && !peak.compare_exchange_weak(seen, now)) {
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
    concurrent.fetch_sub(1);
  });
  EXPECT_GE(peak.load(), 2);
}

}  // namespace
}  // namespace kvcompress::cpu
