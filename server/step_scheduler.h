// The step scheduler: merges Denoise calls and running generations into shared forward passes,
// one denoising step at a time.
//
// Work is one-shot (a Denoise call: one pass) or multi-step (a generation: one pass per step
// until the server Releases it). Every pass holds each running generation's rows plus the
// queued work admitted at that step boundary, within max_batch_samples rows and
// max_batch_tokens tokens. A generation is budgeted at its largest step (rows and tokens), so
// the generations admitted together always fit one pass, whatever step each is at.
//
// Policy, at each step boundary (StepPolicy::Plan):
//  1. Queued work whose deadline has passed or whose caller cancelled leaves the queue, and so
//     do running generations: nothing more is computed for them.
//  2. The queue is scanned in arrival order. Each item that fits what is left of the pass's
//     budget (and, for a generation, a free slot of max_running_generations) is admitted;
//     one that does not fit is passed over, so that small work keeps flowing behind a large
//     head (backfill).
//  3. Starvation: the oldest queued item may be passed over in at most max_bypasses plans.
//     After that it holds a reservation: nothing behind it is admitted until it fits. What is
//     running ends in a bounded number of passes, so it then starts. A large item thus waits
//     at most max_bypasses passes plus the remaining steps of what runs; a small item behind a
//     large head waits at most until the head starts.
//  4. Idle dispatch: when no generation is running, a pass goes as soon as anything is
//     admitted. The one exception is work that asked to wait for company (wait_for_batch):
//     when everything admitted asked so, the pass is held until it is full, the oldest of it
//     has waited max_queue_delay_us, or the scheduler closes.
//  5. Closed (draining): no new work is accepted; what is queued and running still runs.
//
// StepPolicy is the decision alone: a plain class on explicit times, tested step by step.
// StepScheduler puts it behind a mutex for the server's threads, waiting through the Clock.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <limits>
#include <memory>
#include <mutex>
#include <optional>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace mmdit {

// Time in microseconds on a monotonic clock, and waiting on it; injected so that tests need no
// sleeps.
class Clock {
 public:
  virtual ~Clock() = default;
  virtual int64_t NowUs() const = 0;
  // Waits on `changed` (with `lock` held) until notified or until `until_us`, if given.
  virtual void WaitUntil(std::condition_variable& changed, std::unique_lock<std::mutex>& lock,
                         std::optional<int64_t> until_us) const = 0;
};

class SteadyClock : public Clock {
 public:
  int64_t NowUs() const override;
  void WaitUntil(std::condition_variable& changed, std::unique_lock<std::mutex>& lock,
                 std::optional<int64_t> until_us) const override;
};

// What the scheduler needs of a call besides its size.
class QueuedCall {
 public:
  virtual ~QueuedCall() = default;
  // True once the caller has gone; may change from false to true on any thread (which then
  // calls StepScheduler::Notify).
  virtual bool IsCancelled() const = 0;
};

struct WorkItem {
  static constexpr int64_t kNoDeadline = std::numeric_limits<int64_t>::max();
  bool multi_step = false;  // a generation: running from admission until Release
  int64_t rows = 1;         // per pass (a generation: its largest step)
  int64_t tokens = 0;       // per pass: image + text tokens of its rows
  int64_t deadline_us = kNoDeadline;
  bool wait_for_batch = false;
  std::shared_ptr<QueuedCall> call;
  uint64_t id = 0;          // set by Enqueue
  int64_t enqueued_us = 0;  // set by Enqueue
};

// One step boundary's decision.
struct PassPlan {
  std::vector<WorkItem> running;    // generations admitted earlier: each takes its next step
  std::vector<WorkItem> admitted;   // queued work joining at this boundary (generations: first step)
  std::vector<WorkItem> expired;    // deadline passed (queued or running): answer, compute no more
  std::vector<WorkItem> cancelled;  // caller gone (queued or running): answer, compute no more
  bool has_pass() const { return !running.empty() || !admitted.empty(); }
  bool empty() const { return !has_pass() && expired.empty() && cancelled.empty(); }
  int64_t rows() const;
};

struct StepPolicyOptions {
  int64_t max_batch_samples = 8;  // rows per pass
  int64_t max_batch_tokens = 0;   // tokens per pass; 0: no limit
  int64_t max_queue_delay_us = 2000;
  int64_t max_queue_size = 256;  // queued (not yet admitted) items
  int64_t max_running_generations = 8;
  int64_t max_bypasses = 4;
};

class StepPolicy {
 public:
  explicit StepPolicy(const StepPolicyOptions& options);

  // Queues `item` at `now_us` and returns its id. Errors: UNAVAILABLE once closed;
  // INVALID_ARGUMENT when it is larger than a pass; RESOURCE_EXHAUSTED when max_queue_size
  // items are already queued.
  absl::StatusOr<uint64_t> Enqueue(WorkItem item, int64_t now_us);

  // The decision at the step boundary `now_us` (see the header comment). Admitted generations
  // are running from here on; expired and cancelled running ones are no longer.
  PassPlan Plan(int64_t now_us);

  // A running generation finished (or failed); its slot and budget are free.
  void Release(uint64_t id);

  // When Plan may next have something to do without a new event (an Enqueue, a Release, a
  // cancellation): the earliest deadline, or the end of a wait_for_batch hold. nullopt: none.
  std::optional<int64_t> NextWakeUs() const;

  void Close() { closed_ = true; }
  bool closed() const { return closed_; }
  // Everything queued and running, taken out (the drain timed out).
  std::vector<WorkItem> TakeAll();

  bool idle() const { return queue_.empty() && running_.empty(); }
  int64_t queue_size() const { return static_cast<int64_t>(queue_.size()); }
  int64_t running_generations() const { return static_cast<int64_t>(running_.size()); }

 private:
  // Moves expired and cancelled items of `items` into `plan`.
  static void TakeGone(std::deque<WorkItem>& items, int64_t now_us, PassPlan& plan);

  const StepPolicyOptions options_;
  std::deque<WorkItem> queue_;    // arrival order
  std::deque<WorkItem> running_;  // admission order
  uint64_t next_id_ = 1;
  uint64_t head_id_ = 0;       // the oldest queued item, as of the last Plan
  int64_t head_bypasses_ = 0;  // plans that admitted something behind it
  std::optional<int64_t> hold_until_us_;  // a wait_for_batch hold, as of the last Plan
  bool closed_ = false;
};

// StepPolicy for the server's threads: the step loop waits in WaitForPass while request
// threads Enqueue. Thread-safe.
class StepScheduler {
 public:
  // `clock` must outlive the scheduler.
  StepScheduler(const StepPolicyOptions& options, const Clock& clock);

  absl::StatusOr<uint64_t> Enqueue(WorkItem item);
  // Blocks until the policy has something to do and returns it; nullopt once closed and idle.
  std::optional<PassPlan> WaitForPass();
  void Release(uint64_t id);
  // A caller cancelled: plan again now rather than at the next timed wake.
  void Notify();
  void Close();
  std::vector<WorkItem> TakeAll();

  int64_t queue_size() const;
  int64_t running_generations() const;

 private:
  const Clock& clock_;
  mutable std::mutex mutex_;
  std::condition_variable changed_;
  StepPolicy policy_;  // guarded by mutex_
};

}  // namespace mmdit
