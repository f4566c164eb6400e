// The batcher alone, driven step by step with an injected clock: no sleeps.
#include "server/dynamic_batcher.h"

#include <gtest/gtest.h>

#include <atomic>
#include <set>
#include <thread>

namespace mmdit {
namespace {

class FakeClock : public Clock {
 public:
  int64_t NowUs() const override { return now_us; }
  int64_t now_us = 1'000'000;
};

class FakeCall : public QueuedCall {
 public:
  explicit FakeCall(int id) : id(id) {}
  bool IsCancelled() const override { return cancelled.load(); }
  const int id;
  std::atomic<bool> cancelled{false};
};

class DynamicBatcherTest : public ::testing::Test {
 protected:
  BatchEntry Entry(int id, int64_t samples, int64_t tokens = 10, int64_t deadline_us = BatchEntry::kNoDeadline) {
    auto call = std::make_shared<FakeCall>(id);
    calls.push_back(call);
    BatchEntry entry;
    entry.samples = samples;
    entry.tokens = tokens;
    entry.deadline_us = deadline_us;
    entry.call = call;
    return entry;
  }
  static std::vector<int> Ids(const std::vector<BatchEntry>& entries) {
    std::vector<int> ids;
    for (const BatchEntry& e : entries) ids.push_back(static_cast<const FakeCall*>(e.call.get())->id);
    return ids;
  }
  FakeClock clock;
  std::vector<std::shared_ptr<FakeCall>> calls;
  BatcherOptions options{
      .max_batch_samples = 4, .max_batch_tokens = 0, .max_queue_delay_us = 1000, .max_queue_size = 5};
};

TEST_F(DynamicBatcherTest, WaitsUntilTheOldestRequestHasWaitedMaxQueueDelay) {
  DynamicBatcher batcher(options, clock);
  ASSERT_TRUE(batcher.Enqueue(Entry(1, 1)).ok());
  clock.now_us += 500;
  ASSERT_TRUE(batcher.Enqueue(Entry(2, 1)).ok());
  clock.now_us += 499;
  EXPECT_TRUE(batcher.TakeBatch().empty());
  clock.now_us += 1;  // the oldest has now waited 1000 us
  EXPECT_EQ(Ids(batcher.TakeBatch().run), (std::vector<int>{1, 2}));
  EXPECT_EQ(batcher.queue_size(), 0);
}

TEST_F(DynamicBatcherTest, FlushesAtOnceWhenTheQueueFillsABatch) {
  DynamicBatcher batcher(options, clock);
  ASSERT_TRUE(batcher.Enqueue(Entry(1, 2)).ok());
  EXPECT_TRUE(batcher.TakeBatch().empty());
  ASSERT_TRUE(batcher.Enqueue(Entry(2, 2)).ok());  // 4 samples: full
  EXPECT_EQ(Ids(batcher.TakeBatch().run), (std::vector<int>{1, 2}));
}

TEST_F(DynamicBatcherTest, FlushesWhenTheNextRequestWouldNotFitAndKeepsItWhole) {
  DynamicBatcher batcher(options, clock);
  ASSERT_TRUE(batcher.Enqueue(Entry(1, 3)).ok());
  ASSERT_TRUE(batcher.Enqueue(Entry(2, 2)).ok());  // 3 + 2 > 4: 1 goes alone, 2 is not split
  EXPECT_EQ(Ids(batcher.TakeBatch().run), (std::vector<int>{1}));
  EXPECT_TRUE(batcher.TakeBatch().empty());  // 2 waits for company or the delay
  clock.now_us += 1000;
  EXPECT_EQ(Ids(batcher.TakeBatch().run), (std::vector<int>{2}));
}

TEST_F(DynamicBatcherTest, KeepsArrivalOrderEvenWhenALaterRequestWouldFit) {
  DynamicBatcher batcher(options, clock);
  ASSERT_TRUE(batcher.Enqueue(Entry(1, 2)).ok());
  ASSERT_TRUE(batcher.Enqueue(Entry(2, 4)).ok());
  ASSERT_TRUE(batcher.Enqueue(Entry(3, 1)).ok());
  EXPECT_EQ(Ids(batcher.TakeBatch().run), (std::vector<int>{1}));  // 3 does not jump ahead of 2
  EXPECT_EQ(Ids(batcher.TakeBatch().run), (std::vector<int>{2}));
}

TEST_F(DynamicBatcherTest, HonoursTheTokenBudget) {
  options.max_batch_tokens = 100;
  DynamicBatcher batcher(options, clock);
  ASSERT_TRUE(batcher.Enqueue(Entry(1, 1, 60)).ok());
  ASSERT_TRUE(batcher.Enqueue(Entry(2, 1, 50)).ok());
  EXPECT_EQ(Ids(batcher.TakeBatch().run), (std::vector<int>{1}));
  ASSERT_TRUE(batcher.Enqueue(Entry(3, 1, 50)).ok());  // 50 + 50 = 100: full
  EXPECT_EQ(Ids(batcher.TakeBatch().run), (std::vector<int>{2, 3}));
}

TEST_F(DynamicBatcherTest, RefusesARequestLargerThanABatch) {
  options.max_batch_tokens = 100;
  DynamicBatcher batcher(options, clock);
  EXPECT_EQ(batcher.Enqueue(Entry(1, 5)).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(batcher.Enqueue(Entry(2, 1, 101)).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(batcher.queue_size(), 0);
}

TEST_F(DynamicBatcherTest, AFullQueueIsResourceExhaustedAtOnce) {
  DynamicBatcher batcher(options, clock);
  for (int i = 0; i < 5; ++i) ASSERT_TRUE(batcher.Enqueue(Entry(i, 1)).ok());
  const absl::Status status = batcher.Enqueue(Entry(9, 1));
  EXPECT_EQ(status.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(batcher.queue_size(), 5);
}

TEST_F(DynamicBatcherTest, HandsBackExpiredAndCancelledRequestsWithoutRunningThem) {
  DynamicBatcher batcher(options, clock);
  ASSERT_TRUE(batcher.Enqueue(Entry(1, 1, 10, clock.now_us + 300)).ok());
  ASSERT_TRUE(batcher.Enqueue(Entry(2, 1)).ok());
  ASSERT_TRUE(batcher.Enqueue(Entry(3, 1)).ok());
  calls[2]->cancelled = true;
  calls[0]->cancelled = true;  // gRPC cancels a call whose deadline passed: still an expiry
  clock.now_us += 300;
  Batch batch = batcher.TakeBatch();
  EXPECT_EQ(Ids(batch.expired), (std::vector<int>{1}));
  EXPECT_EQ(Ids(batch.cancelled), (std::vector<int>{3}));
  EXPECT_TRUE(batch.run.empty());  // 2 has waited 300 of 1000 us
  EXPECT_EQ(batcher.queue_size(), 1);
  clock.now_us += 700;
  EXPECT_EQ(Ids(batcher.TakeBatch().run), (std::vector<int>{2}));
}

TEST_F(DynamicBatcherTest, CloseRefusesNewRequestsAndFlushesTheQueueWithoutWaiting) {
  DynamicBatcher batcher(options, clock);
  ASSERT_TRUE(batcher.Enqueue(Entry(1, 3)).ok());
  ASSERT_TRUE(batcher.Enqueue(Entry(2, 3)).ok());
  batcher.Close();
  EXPECT_EQ(batcher.Enqueue(Entry(3, 1)).code(), absl::StatusCode::kUnavailable);
  std::optional<Batch> first = batcher.WaitForBatch();  // returns at once: closed
  ASSERT_TRUE(first.has_value());
  EXPECT_EQ(Ids(first->run), (std::vector<int>{1}));
  std::optional<Batch> second = batcher.WaitForBatch();
  ASSERT_TRUE(second.has_value());
  EXPECT_EQ(Ids(second->run), (std::vector<int>{2}));
  EXPECT_FALSE(batcher.WaitForBatch().has_value());  // closed and empty
}

// Real threads, no gRPC: what the ThreadSanitizer build checks of the batcher's locking.
// Four producers enqueue (some of their calls cancel themselves), one consumer takes batches
// until the batcher is closed and empty; every entry comes out exactly once.
TEST(DynamicBatcherThreads, ConcurrentProducersAndAConsumerLoseAndDuplicateNothing) {
  SteadyClock clock;
  DynamicBatcher batcher(
      {.max_batch_samples = 8, .max_batch_tokens = 0, .max_queue_delay_us = 200, .max_queue_size = 100000}, clock);
  constexpr int kProducers = 4, kPerProducer = 500;
  std::vector<std::shared_ptr<FakeCall>> calls;
  for (int i = 0; i < kProducers * kPerProducer; ++i) calls.push_back(std::make_shared<FakeCall>(i));
  std::multiset<int> run, cancelled;
  std::thread consumer([&] {
    while (std::optional<Batch> batch = batcher.WaitForBatch()) {
      int64_t samples = 0;
      for (const BatchEntry& e : batch->run) {
        run.insert(static_cast<const FakeCall*>(e.call.get())->id);
        samples += e.samples;
      }
      EXPECT_LE(samples, 8);
      for (const BatchEntry& e : batch->cancelled) cancelled.insert(static_cast<const FakeCall*>(e.call.get())->id);
    }
  });
  std::vector<std::thread> producers;
  for (int p = 0; p < kProducers; ++p) {
    producers.emplace_back([&, p] {
      for (int i = p * kPerProducer; i < (p + 1) * kPerProducer; ++i) {
        BatchEntry entry;
        entry.samples = 1 + i % 3;
        entry.call = calls[i];
        ASSERT_TRUE(batcher.Enqueue(std::move(entry)).ok());
        if (i % 7 == 0) calls[i]->cancelled = true;  // may land before or after its batch forms
      }
    });
  }
  for (std::thread& t : producers) t.join();
  batcher.Close();
  consumer.join();
  EXPECT_EQ(run.size() + cancelled.size(), calls.size());
  for (const auto& call : calls) EXPECT_EQ(run.count(call->id) + cancelled.count(call->id), 1u) << call->id;
  for (int id : cancelled) EXPECT_EQ(id % 7, 0);
}

}  // namespace
}  // namespace mmdit
