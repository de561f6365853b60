#include "service/layer_scheduler.h"

#include <atomic>
#include <chrono>
#include <memory>
#include <thread>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace kvcompress {
namespace {

using ::testing::ElementsAre;

TEST(LayerSchedulerTest, OneWorkerRunsJobsInFifoOrder) {
  LayerScheduler scheduler(1);
  absl::Mutex mu;
  std::vector<int> order;
  for (int i = 0; i < 5; ++i) {
    ASSERT_TRUE(scheduler
                    .Enqueue([&, i] {
                      absl::MutexLock lock(&mu);
                      order.push_back(i);
                    })
                    .ok());
  }
  scheduler.Shutdown();
  EXPECT_THAT(order, ElementsAre(0, 1, 2, 3, 4));
}

TEST(LayerSchedulerTest, ReportsQueueDepthAndRunningJobs) {
  LayerScheduler scheduler(2);
  EXPECT_EQ(scheduler.num_threads(), 2);
  absl::Notification release;
  std::atomic<int> started{0};
  for (int i = 0; i < 5; ++i) {
    ASSERT_TRUE(scheduler
                    .Enqueue([&] {
                      started.fetch_add(1);
                      release.WaitForNotification();
                    })
                    .ok());
  }
  // Both workers pick a job and block; three wait in the queue.
  const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while ((started.load() < 2 || scheduler.queue_depth() != 3) &&
         std::chrono::steady_clock::now() < give_up) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  EXPECT_EQ(started.load(), 2);
  EXPECT_EQ(scheduler.queue_depth(), 3u);
  EXPECT_EQ(scheduler.running(), 2u);
  release.Notify();
  scheduler.Shutdown();
  EXPECT_EQ(started.load(), 5);
  EXPECT_EQ(scheduler.queue_depth(), 0u);
  EXPECT_EQ(scheduler.running(), 0u);
}

TEST(LayerSchedulerTest, JobsRunInParallelOnAllWorkers) {
  constexpr int kWorkers = 4;
  LayerScheduler scheduler(kWorkers);
  std::atomic<int> arrived{0};
  absl::Notification all_arrived;
  for (int i = 0; i < kWorkers; ++i) {
    ASSERT_TRUE(scheduler
                    .Enqueue([&] {
                      if (arrived.fetch_add(1) + 1 == kWorkers) all_arrived.Notify();
                      // Each job waits for the others: only parallel workers get here.
                      EXPECT_TRUE(all_arrived.WaitForNotificationWithTimeout(absl::Seconds(10)));
                    })
                    .ok());
  }
  scheduler.Shutdown();
  EXPECT_EQ(arrived.load(), kWorkers);
}

TEST(LayerSchedulerTest, ShutdownRunsQueuedJobsThenRefusesNewOnes) {
  LayerScheduler scheduler(1);
  std::atomic<int> ran{0};
  for (int i = 0; i < 100; ++i) {
    ASSERT_TRUE(scheduler.Enqueue([&] { ran.fetch_add(1); }).ok());
  }
  scheduler.Shutdown();
  EXPECT_EQ(ran.load(), 100);
  auto owned = std::make_shared<int>(1);
  const absl::Status refused = scheduler.Enqueue([owned, &ran] { ran.fetch_add(1); });
  EXPECT_EQ(refused.code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(owned.use_count(), 1);  // the refused job was destroyed, not leaked
  EXPECT_EQ(ran.load(), 100);
  scheduler.Shutdown();  // idempotent
}

TEST(LayerSchedulerTest, MoveOnlyJobsAreSupported) {
  LayerScheduler scheduler(2);
  std::atomic<int> sum{0};
  for (int i = 1; i <= 10; ++i) {
    auto value = std::make_unique<int>(i);
    ASSERT_TRUE(
        scheduler.Enqueue([value = std::move(value), &sum] { sum.fetch_add(*value); }).ok());
  }
  scheduler.Shutdown();
  EXPECT_EQ(sum.load(), 55);
}

TEST(LayerSchedulerTest, ZeroThreadsMeansOne) {
  LayerScheduler scheduler(0);
  EXPECT_EQ(scheduler.num_threads(), 1);
  absl::Notification done;
  ASSERT_TRUE(scheduler.Enqueue([&] { done.Notify(); }).ok());
  EXPECT_TRUE(done.WaitForNotificationWithTimeout(absl::Seconds(10)));
}

}  // namespace
}  // namespace kvcompress
