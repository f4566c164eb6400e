// The step scheduler's policy alone, driven step by step on explicit times: no sleeps, no
// threads. Then the threaded wrapper under real threads (what the TSan build checks).
#include "server/step_scheduler.h"

#include <gtest/gtest.h>

#include <atomic>
#include <set>
#include <thread>

namespace mmdit {
namespace {

class FakeCall : public QueuedCall {
 public:
  explicit FakeCall(int id) : id(id) {}
  bool IsCancelled() const override { return cancelled.load(); }
  const int id;
  std::atomic<bool> cancelled{false};
};

int IdOf(const WorkItem& item) { return static_cast<const FakeCall&>(*item.call).id; }

std::vector<int> Ids(const std::vector<WorkItem>& items) {
  std::vector<int> ids;
  for (const WorkItem& item : items) ids.push_back(IdOf(item));
  return ids;
}

class StepPolicyTest : public ::testing::Test {
 protected:
  // A queued item: a Denoise call of `rows` samples, or a generation with `rows` per step.
  uint64_t Add(StepPolicy& policy, int id, int64_t rows, bool generation = false, int64_t tokens = 10,
               int64_t deadline_us = WorkItem::kNoDeadline, bool wait_for_batch = false) {
    auto call = std::make_shared<FakeCall>(id);
    calls[id] = call;
    WorkItem item;
    item.multi_step = generation;
    item.rows = rows;
    item.tokens = tokens;
    item.deadline_us = deadline_us;
    item.wait_for_batch = wait_for_batch;
    item.call = call;
    absl::StatusOr<uint64_t> queued = policy.Enqueue(std::move(item), now_us);
    EXPECT_TRUE(queued.ok()) << queued.status();
    ids[id] = queued.value_or(0);
    return queued.value_or(0);
  }
  std::map<int, std::shared_ptr<FakeCall>> calls;
  std::map<int, uint64_t> ids;  // test id -> scheduler id
  int64_t now_us = 1'000'000;
};

TEST_F(StepPolicyTest, AnIdleEngineRunsALoneRequestAtOnce) {
  StepPolicy policy({.max_batch_samples = 8, .max_queue_delay_us = 2000});
  Add(policy, 1, 1);
  const PassPlan plan = policy.Plan(now_us);  // same instant: no waiting for company
  EXPECT_EQ(Ids(plan.admitted), (std::vector<int>{1}));
  EXPECT_TRUE(plan.running.empty());
  EXPECT_EQ(policy.queue_size(), 0);
  EXPECT_FALSE(policy.Plan(now_us).has_pass());
}

TEST_F(StepPolicyTest, WaitForBatchHoldsAnIdlePassUntilFullOrTheDelayPasses) {
  StepPolicy policy({.max_batch_samples = 4, .max_queue_delay_us = 2000});
  Add(policy, 1, 1, false, 10, WorkItem::kNoDeadline, /*wait_for_batch=*/true);
  EXPECT_FALSE(policy.Plan(now_us).has_pass());
  EXPECT_EQ(policy.NextWakeUs(), now_us + 2000);
  now_us += 1999;
  EXPECT_FALSE(policy.Plan(now_us).has_pass());
  Add(policy, 2, 3, false, 10, WorkItem::kNoDeadline, true);  // fills the pass: 1 + 3 = 4 rows
  EXPECT_EQ(Ids(policy.Plan(now_us).admitted), (std::vector<int>{1, 2}));

  Add(policy, 3, 1, false, 10, WorkItem::kNoDeadline, true);
  EXPECT_FALSE(policy.Plan(now_us).has_pass());
  now_us += 2000;  // its delay has passed
  EXPECT_EQ(Ids(policy.Plan(now_us).admitted), (std::vector<int>{3}));
}

TEST_F(StepPolicyTest, WaitForBatchIsNotHeldWhenOtherWorkIsAdmittedOrWhileGenerationsRun) {
  StepPolicy policy({.max_batch_samples = 8, .max_queue_delay_us = 2000});
  Add(policy, 1, 1, false, 10, WorkItem::kNoDeadline, /*wait_for_batch=*/true);
  Add(policy, 2, 1);  // does not want to wait: the pass goes, and takes 1 along
  EXPECT_EQ(Ids(policy.Plan(now_us).admitted), (std::vector<int>{1, 2}));

  Add(policy, 3, 2, /*generation=*/true);
  EXPECT_EQ(Ids(policy.Plan(now_us).admitted), (std::vector<int>{3}));
  Add(policy, 4, 1, false, 10, WorkItem::kNoDeadline, true);
  const PassPlan plan = policy.Plan(now_us);  // the generation's step runs anyway: 4 joins it
  EXPECT_EQ(Ids(plan.running), (std::vector<int>{3}));
  EXPECT_EQ(Ids(plan.admitted), (std::vector<int>{4}));
}

TEST_F(StepPolicyTest, AGenerationRunsEveryPassUntilReleasedAndQueuedWorkJoinsAtStepBoundaries) {
  StepPolicy policy({.max_batch_samples = 4});
  Add(policy, 1, 2, /*generation=*/true);
  PassPlan plan = policy.Plan(now_us);
  EXPECT_EQ(Ids(plan.admitted), (std::vector<int>{1}));
  EXPECT_EQ(policy.running_generations(), 1);
  for (int step = 1; step < 3; ++step) {
    plan = policy.Plan(now_us);
    EXPECT_EQ(Ids(plan.running), (std::vector<int>{1})) << step;
    EXPECT_TRUE(plan.admitted.empty());
  }
  // Arrivals during a step join at the next boundary, within what the generation leaves.
  Add(policy, 2, 2);
  Add(policy, 3, 1);
  plan = policy.Plan(now_us);
  EXPECT_EQ(Ids(plan.running), (std::vector<int>{1}));
  EXPECT_EQ(Ids(plan.admitted), (std::vector<int>{2}));  // 2 + 2 = 4: 3 waits
  EXPECT_EQ(plan.rows(), 4);
  plan = policy.Plan(now_us);
  EXPECT_EQ(Ids(plan.admitted), (std::vector<int>{3}));
  policy.Release(ids[1]);
  EXPECT_EQ(policy.running_generations(), 0);
  EXPECT_FALSE(policy.Plan(now_us).has_pass());
}

TEST_F(StepPolicyTest, TheTokenBudgetBoundsEachPass) {
  StepPolicy policy({.max_batch_samples = 16, .max_batch_tokens = 100});
  Add(policy, 1, 1, true, /*tokens=*/60);
  Add(policy, 2, 1, false, 50);
  Add(policy, 3, 1, false, 40);
  const PassPlan plan = policy.Plan(now_us);
  EXPECT_EQ(Ids(plan.admitted), (std::vector<int>{1, 3}));  // 2 does not fit beside 1; 3 does
  EXPECT_TRUE(policy.Plan(now_us).admitted.empty());  // 60 + 50 > 100 while 1 runs
  policy.Release(ids[1]);
  EXPECT_EQ(Ids(policy.Plan(now_us).admitted), (std::vector<int>{2}));
}

TEST_F(StepPolicyTest, MaxRunningGenerationsCapsConcurrencyAndTheRestQueue) {
  StepPolicy policy({.max_batch_samples = 16, .max_running_generations = 2});
  Add(policy, 1, 1, true);
  Add(policy, 2, 1, true);
  Add(policy, 3, 1, true);
  Add(policy, 4, 1);  // a Denoise call needs no generation slot
  PassPlan plan = policy.Plan(now_us);
  EXPECT_EQ(Ids(plan.admitted), (std::vector<int>{1, 2, 4}));
  EXPECT_EQ(policy.queue_size(), 1);
  plan = policy.Plan(now_us);
  EXPECT_EQ(Ids(plan.running), (std::vector<int>{1, 2}));
  EXPECT_TRUE(plan.admitted.empty());
  policy.Release(ids[1]);
  plan = policy.Plan(now_us);
  EXPECT_EQ(Ids(plan.running), (std::vector<int>{2}));
  EXPECT_EQ(Ids(plan.admitted), (std::vector<int>{3}));
}

// Starvation freedom, both ways. A large head that does not fit lets small work pass it
// max_bypasses times, then holds a reservation: nothing more passes it, and it starts as soon
// as what runs has ended. The small work behind it then flows again.
TEST_F(StepPolicyTest, ALargeHeadIsPassedOverAtMostMaxBypassesTimesThenStarts) {
  StepPolicy policy({.max_batch_samples = 4, .max_running_generations = 8, .max_bypasses = 2});
  Add(policy, 1, 2, /*generation=*/true);  // runs for a while
  EXPECT_EQ(Ids(policy.Plan(now_us).admitted), (std::vector<int>{1}));
  Add(policy, 2, 4, /*generation=*/true);  // the large head: needs the whole pass
  for (int pass = 0; pass < 2; ++pass) {
    Add(policy, 10 + pass, 1);  // small Denoise calls behind it
    const PassPlan plan = policy.Plan(now_us);
    EXPECT_EQ(Ids(plan.admitted), (std::vector<int>{10 + pass})) << "backfill " << pass;
  }
  Add(policy, 20, 1);
  PassPlan plan = policy.Plan(now_us);  // bypassed twice: the head's reservation holds
  EXPECT_EQ(Ids(plan.running), (std::vector<int>{1}));
  EXPECT_TRUE(plan.admitted.empty());
  EXPECT_EQ(policy.queue_size(), 2);
  policy.Release(ids[1]);  // what ran has ended
  plan = policy.Plan(now_us);
  EXPECT_EQ(Ids(plan.admitted), (std::vector<int>{2}));  // the large head starts
  plan = policy.Plan(now_us);
  EXPECT_EQ(Ids(plan.running), (std::vector<int>{2}));
  EXPECT_TRUE(plan.admitted.empty());  // a full pass: 20 waits behind the running head...
  policy.Release(ids[2]);
  EXPECT_EQ(Ids(policy.Plan(now_us).admitted), (std::vector<int>{20}));  // ...only until it ends
}

TEST_F(StepPolicyTest, SmallWorkFlowsPastALargeHeadWhileItsBypassBudgetLasts) {
  StepPolicy policy({.max_batch_samples = 4, .max_bypasses = 100});
  Add(policy, 1, 3, /*generation=*/true);
  EXPECT_EQ(Ids(policy.Plan(now_us).admitted), (std::vector<int>{1}));
  Add(policy, 2, 2);  // does not fit beside 1
  for (int pass = 0; pass < 10; ++pass) {
    Add(policy, 10 + pass, 1);
    EXPECT_EQ(Ids(policy.Plan(now_us).admitted), (std::vector<int>{10 + pass}));
  }
  policy.Release(ids[1]);
  EXPECT_EQ(Ids(policy.Plan(now_us).admitted), (std::vector<int>{2}));
}

TEST_F(StepPolicyTest, DeadlinesAndCancellationsTakeQueuedAndRunningWorkOut) {
  StepPolicy policy({.max_batch_samples = 2});
  Add(policy, 1, 1, true, 10, /*deadline_us=*/now_us + 500);
  Add(policy, 2, 1, true);
  EXPECT_EQ(Ids(policy.Plan(now_us).admitted), (std::vector<int>{1, 2}));
  Add(policy, 3, 1, false, 10, now_us + 100);  // queued behind a full pass
  Add(policy, 4, 1);
  EXPECT_EQ(policy.NextWakeUs(), now_us + 100);
  now_us += 100;
  PassPlan plan = policy.Plan(now_us);
  EXPECT_EQ(Ids(plan.expired), (std::vector<int>{3}));
  EXPECT_EQ(Ids(plan.running), (std::vector<int>{1, 2}));
  calls[2]->cancelled = true;
  calls[4]->cancelled = true;
  now_us += 400;  // and 1's deadline passes while it runs
  plan = policy.Plan(now_us);
  EXPECT_EQ(Ids(plan.expired), (std::vector<int>{1}));
  EXPECT_EQ(Ids(plan.cancelled), (std::vector<int>{2, 4}));
  EXPECT_FALSE(plan.has_pass());
  EXPECT_TRUE(policy.idle());
}

TEST_F(StepPolicyTest, RefusalsAreImmediateAndPrecise) {
  StepPolicy policy({.max_batch_samples = 4, .max_batch_tokens = 100, .max_queue_size = 2});
  auto item = [](int64_t rows, int64_t tokens) {
    WorkItem w;
    w.rows = rows;
    w.tokens = tokens;
    w.call = std::make_shared<FakeCall>(0);
    return w;
  };
  absl::StatusOr<uint64_t> status = policy.Enqueue(item(5, 10), now_us);
  EXPECT_EQ(status.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(status.status().message().find("--max_batch_samples"), std::string::npos) << status.status();
  status = policy.Enqueue(item(1, 101), now_us);
  EXPECT_EQ(status.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(status.status().message().find("--max_batch_tokens"), std::string::npos) << status.status();
  ASSERT_TRUE(policy.Enqueue(item(1, 10), now_us).ok());
  ASSERT_TRUE(policy.Enqueue(item(1, 10), now_us).ok());
  EXPECT_EQ(policy.Enqueue(item(1, 10), now_us).status().code(), absl::StatusCode::kResourceExhausted);
  policy.Close();
  EXPECT_EQ(policy.Enqueue(item(1, 10), now_us).status().code(), absl::StatusCode::kUnavailable);
}

TEST_F(StepPolicyTest, ClosingRunsWhatIsQueuedWithoutHoldsAndTakeAllEmptiesIt) {
  StepPolicy policy({.max_batch_samples = 2, .max_queue_delay_us = 1'000'000});
  Add(policy, 1, 1, false, 10, WorkItem::kNoDeadline, /*wait_for_batch=*/true);
  EXPECT_FALSE(policy.Plan(now_us).has_pass());
  policy.Close();
  EXPECT_EQ(Ids(policy.Plan(now_us).admitted), (std::vector<int>{1}));  // no hold while draining
  EXPECT_FALSE(policy.Enqueue(WorkItem{}, now_us).ok());
}

TEST_F(StepPolicyTest, TakeAllReturnsEverythingQueuedAndRunning) {
  StepPolicy policy({.max_batch_samples = 2});
  Add(policy, 1, 2, true);
  policy.Plan(now_us);
  Add(policy, 2, 1);
  std::vector<WorkItem> all = policy.TakeAll();
  EXPECT_EQ(Ids(all), (std::vector<int>{1, 2}));
  EXPECT_TRUE(policy.idle());
}

// Real threads, no gRPC: what the ThreadSanitizer build checks of the scheduler's locking.
// Four producers enqueue Denoise calls and generations (some cancel themselves); one consumer
// runs passes, stepping each generation 3 times before releasing it, until closed and idle.
// Every item comes out exactly once, and no pass exceeds its budget.
TEST(StepSchedulerThreads, ConcurrentProducersAndTheStepLoopLoseAndDuplicateNothing) {
  SteadyClock clock;
  StepScheduler scheduler({.max_batch_samples = 8,
                           .max_batch_tokens = 0,
                           .max_queue_delay_us = 200,
                           .max_queue_size = 100000,
                           .max_running_generations = 3},
                          clock);
  constexpr int kProducers = 4, kPerProducer = 300;
  std::vector<std::shared_ptr<FakeCall>> calls;
  for (int i = 0; i < kProducers * kPerProducer; ++i) calls.push_back(std::make_shared<FakeCall>(i));
  std::multiset<int> finished, gone;
  std::thread consumer([&] {
    std::map<uint64_t, int> steps;  // running generation -> steps taken
    while (std::optional<PassPlan> plan = scheduler.WaitForPass()) {
      EXPECT_LE(plan->rows(), 8);
      for (const WorkItem& item : plan->cancelled) gone.insert(IdOf(item));
      for (const WorkItem& item : plan->expired) gone.insert(IdOf(item));
      for (const std::vector<WorkItem>* items : {&plan->running, &plan->admitted}) {
        for (const WorkItem& item : *items) {
          if (!item.multi_step) {
            finished.insert(IdOf(item));
          } else if (++steps[item.id] == 3) {
            finished.insert(IdOf(item));
            scheduler.Release(item.id);
          }
        }
      }
    }
  });
  std::vector<std::thread> producers;
  for (int p = 0; p < kProducers; ++p) {
    producers.emplace_back([&, p] {
      for (int i = p * kPerProducer; i < (p + 1) * kPerProducer; ++i) {
        WorkItem item;
        item.multi_step = i % 5 == 0;
        item.rows = 1 + i % 3;
        item.wait_for_batch = i % 2 == 0;
        item.call = calls[i];
        ASSERT_TRUE(scheduler.Enqueue(std::move(item)).ok());
        if (i % 7 == 0) {
          calls[i]->cancelled = true;  // may land before, during or after its passes
          scheduler.Notify();
        }
      }
    });
  }
  for (std::thread& t : producers) t.join();
  scheduler.Close();
  consumer.join();
  for (const auto& call : calls) {
    EXPECT_EQ(finished.count(call->id) + gone.count(call->id), 1u) << call->id;
    if (gone.count(call->id)) {
      EXPECT_EQ(call->id % 7, 0);
    }
  }
}

}  // namespace
}  // namespace mmdit
