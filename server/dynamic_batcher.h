// The dynamic batcher: merges queued requests into shared forward passes.
//
// Flush rule. A batch is taken when the queue is non-empty and
//   1. the queued requests fill a batch: together they reach max_batch_samples or
//      max_batch_tokens, or the next one in arrival order would not fit; or
//   2. the oldest queued request has waited max_queue_delay_us; or
//   3. the batcher is closed (draining): what is queued goes without waiting.
// The batch is the longest prefix of the queue, in arrival order, that fits; a request never
// splits across batches, and one larger than a batch is refused by Enqueue. Every time a batch
// is looked for, requests whose deadline has passed or whose caller cancelled are taken out of
// the queue (wherever they stand) and handed back to be answered, never computed.
//
// Thread-safety: all methods are thread-safe; the batcher owns its mutex.
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

namespace mmdit {

// Time in microseconds on a monotonic clock; injected so that tests need no sleeps.
class Clock {
 public:
  virtual ~Clock() = default;
  virtual int64_t NowUs() const = 0;
};

class SteadyClock : public Clock {
 public:
  int64_t NowUs() const override;
};

// What the batcher needs of a queued call besides its size.
class QueuedCall {
 public:
  virtual ~QueuedCall() = default;
  // True once the caller has gone; may change from false to true on any thread.
  virtual bool IsCancelled() const = 0;
};

struct BatchEntry {
  static constexpr int64_t kNoDeadline = std::numeric_limits<int64_t>::max();
  int64_t samples = 0;
  int64_t tokens = 0;  // image + text tokens of all its samples
  int64_t deadline_us = kNoDeadline;
  int64_t enqueued_us = 0;  // set by Enqueue
  std::shared_ptr<QueuedCall> call;
};

struct Batch {
  std::vector<BatchEntry> run;        // to compute together, in arrival order
  std::vector<BatchEntry> expired;    // answer DEADLINE_EXCEEDED
  std::vector<BatchEntry> cancelled;  // answer CANCELLED
  bool empty() const { return run.empty() && expired.empty() && cancelled.empty(); }
};

struct BatcherOptions {
  int64_t max_batch_samples = 8;
  int64_t max_batch_tokens = 0;  // 0: no limit
  int64_t max_queue_delay_us = 2000;
  int64_t max_queue_size = 256;  // requests waiting
};

class DynamicBatcher {
 public:
  // `clock` must outlive the batcher.
  DynamicBatcher(const BatcherOptions& options, const Clock& clock);

  // Queues `entry`. Errors: UNAVAILABLE once closed; INVALID_ARGUMENT when it is larger than
  // a batch; RESOURCE_EXHAUSTED when max_queue_size requests are already waiting.
  absl::Status Enqueue(BatchEntry entry);

  // Without blocking: the next batch by the flush rule, plus expired and cancelled entries.
  // Empty when there is nothing to do yet.
  Batch TakeBatch();

  // Blocks until TakeBatch has something, and returns it; nullopt once the batcher is closed
  // and its queue empty.
  std::optional<Batch> WaitForBatch();

  // Refuses new entries; queued ones flush at once. Wakes WaitForBatch.
  void Close();

  int64_t queue_size() const;

 private:
  Batch TakeBatchLocked(int64_t now_us);  // requires mutex_
  // When TakeBatch may next have something without a new Enqueue; requires mutex_.
  std::optional<int64_t> NextWakeUsLocked() const;

  const BatcherOptions options_;
  const Clock& clock_;
  mutable std::mutex mutex_;
  std::condition_variable changed_;
  std::deque<BatchEntry> queue_;  // guarded by mutex_, arrival order
  bool closed_ = false;           // guarded by mutex_
};

}  // namespace mmdit
