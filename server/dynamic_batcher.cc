#include "server/dynamic_batcher.h"

#include <algorithm>
#include <chrono>

#include "absl/strings/str_cat.h"

namespace mmdit {

int64_t SteadyClock::NowUs() const {
  return std::chrono::duration_cast<std::chrono::microseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

DynamicBatcher::DynamicBatcher(const BatcherOptions& options, const Clock& clock) : options_(options), clock_(clock) {}

absl::Status DynamicBatcher::Enqueue(BatchEntry entry) {
  if (entry.samples > options_.max_batch_samples) {
    return absl::InvalidArgumentError(
        absl::StrCat("request has ", entry.samples, " samples; a batch holds at most ", options_.max_batch_samples));
  }
  if (options_.max_batch_tokens > 0 && entry.tokens > options_.max_batch_tokens) {
    return absl::InvalidArgumentError(absl::StrCat(
        "request has ", entry.tokens, " tokens (image + text); a batch holds at most ", options_.max_batch_tokens));
  }
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (closed_) return absl::UnavailableError("server is draining; retry on another replica");
    if (static_cast<int64_t>(queue_.size()) >= options_.max_queue_size) {
      return absl::ResourceExhaustedError(
          absl::StrCat("queue full: ", queue_.size(), " requests waiting; retry with backoff"));
    }
    entry.enqueued_us = clock_.NowUs();
    queue_.push_back(std::move(entry));
  }
  changed_.notify_all();
  return absl::OkStatus();
}

Batch DynamicBatcher::TakeBatchLocked(int64_t now_us) {
  Batch batch;
  // Expired and cancelled entries leave the queue wherever they stand.
  // The deadline first: gRPC also cancels a call whose deadline passed.
  std::erase_if(queue_, [&](BatchEntry& entry) {
    if (entry.deadline_us <= now_us) {
      batch.expired.push_back(std::move(entry));
      return true;
    }
    if (entry.call->IsCancelled()) {
      batch.cancelled.push_back(std::move(entry));
      return true;
    }
    return false;
  });
  if (queue_.empty()) return batch;

  // The longest arrival-order prefix that fits, and whether it fills a batch.
  int64_t samples = 0, tokens = 0;
  size_t count = 0;
  bool full = false;
  for (const BatchEntry& entry : queue_) {
    const bool fits = samples + entry.samples <= options_.max_batch_samples &&
                      (options_.max_batch_tokens == 0 || tokens + entry.tokens <= options_.max_batch_tokens);
    if (!fits) {
      full = true;
      break;
    }
    samples += entry.samples;
    tokens += entry.tokens;
    ++count;
  }
  full = full || samples == options_.max_batch_samples ||
         (options_.max_batch_tokens > 0 && tokens == options_.max_batch_tokens);
  const bool waited = now_us - queue_.front().enqueued_us >= options_.max_queue_delay_us;
  if (!full && !waited && !closed_) return batch;
  for (size_t i = 0; i < count; ++i) {
    batch.run.push_back(std::move(queue_.front()));
    queue_.pop_front();
  }
  return batch;
}

Batch DynamicBatcher::TakeBatch() {
  std::lock_guard<std::mutex> lock(mutex_);
  return TakeBatchLocked(clock_.NowUs());
}

std::optional<int64_t> DynamicBatcher::NextWakeUsLocked() const {
  if (queue_.empty()) return std::nullopt;
  int64_t wake = queue_.front().enqueued_us + options_.max_queue_delay_us;
  for (const BatchEntry& entry : queue_) wake = std::min(wake, entry.deadline_us);
  return wake;
}

std::optional<Batch> DynamicBatcher::WaitForBatch() {
  // Cancellations arrive without a notification; poll for them at least this often.
  constexpr int64_t kCancellationPollUs = 50'000;
  std::unique_lock<std::mutex> lock(mutex_);
  while (true) {
    const int64_t now_us = clock_.NowUs();
    Batch batch = TakeBatchLocked(now_us);
    if (!batch.empty()) return batch;
    if (closed_ && queue_.empty()) return std::nullopt;
    const std::optional<int64_t> wake_us = NextWakeUsLocked();
    if (!wake_us) {
      changed_.wait(lock);
    } else {
      const int64_t wait_us = std::clamp<int64_t>(*wake_us - now_us, 1, kCancellationPollUs);
      changed_.wait_for(lock, std::chrono::microseconds(wait_us));
    }
  }
}

void DynamicBatcher::Close() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    closed_ = true;
  }
  changed_.notify_all();
}

int64_t DynamicBatcher::queue_size() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return static_cast<int64_t>(queue_.size());
}

}  // namespace mmdit
