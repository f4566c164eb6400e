#include "server/step_scheduler.h"

#include <algorithm>
#include <chrono>

#include "absl/strings/str_cat.h"

namespace mmdit {

int64_t SteadyClock::NowUs() const {
  return std::chrono::duration_cast<std::chrono::microseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

void SteadyClock::WaitUntil(std::condition_variable& changed, std::unique_lock<std::mutex>& lock,
                            std::optional<int64_t> until_us) const {
  if (!until_us) {
    changed.wait(lock);
    return;
  }
  changed.wait_until(lock, std::chrono::steady_clock::time_point(std::chrono::microseconds(*until_us)));
}

int64_t PassPlan::rows() const {
  int64_t rows = 0;
  for (const WorkItem& item : running) rows += item.rows;
  for (const WorkItem& item : admitted) rows += item.rows;
  return rows;
}

StepPolicy::StepPolicy(const StepPolicyOptions& options) : options_(options) {}

absl::StatusOr<uint64_t> StepPolicy::Enqueue(WorkItem item, int64_t now_us) {
  if (closed_) return absl::UnavailableError("server is draining; retry on another replica");
  if (item.rows > options_.max_batch_samples) {
    return absl::InvalidArgumentError(absl::StrCat("request needs ", item.rows, " rows per forward pass; a pass holds at most ",
                                                   options_.max_batch_samples, " (--max_batch_samples)"));
  }
  if (options_.max_batch_tokens > 0 && item.tokens > options_.max_batch_tokens) {
    return absl::InvalidArgumentError(absl::StrCat("request needs ", item.tokens,
                                                   " tokens (image + text) per forward pass; a pass holds at most ",
                                                   options_.max_batch_tokens, " (--max_batch_tokens)"));
  }
  if (static_cast<int64_t>(queue_.size()) >= options_.max_queue_size) {
    return absl::ResourceExhaustedError(
        absl::StrCat("queue full: ", queue_.size(), " requests waiting; retry with backoff"));
  }
  item.id = next_id_++;
  item.enqueued_us = now_us;
  queue_.push_back(std::move(item));
  return queue_.back().id;
}

void StepPolicy::TakeGone(std::deque<WorkItem>& items, int64_t now_us, PassPlan& plan) {
  // The deadline first: gRPC also cancels a call whose deadline passed.
  std::erase_if(items, [&](WorkItem& item) {
    if (item.deadline_us <= now_us) {
      plan.expired.push_back(std::move(item));
      return true;
    }
    if (item.call && item.call->IsCancelled()) {
      plan.cancelled.push_back(std::move(item));
      return true;
    }
    return false;
  });
}

PassPlan StepPolicy::Plan(int64_t now_us) {
  PassPlan plan;
  TakeGone(running_, now_us, plan);
  TakeGone(queue_, now_us, plan);
  plan.running.assign(running_.begin(), running_.end());

  int64_t rows_left = options_.max_batch_samples;
  int64_t tokens_left = options_.max_batch_tokens > 0 ? options_.max_batch_tokens : std::numeric_limits<int64_t>::max();
  for (const WorkItem& item : running_) {
    rows_left -= item.rows;
    tokens_left -= item.tokens;
  }
  int64_t slots_left = options_.max_running_generations - static_cast<int64_t>(running_.size());
  hold_until_us_.reset();
  if (queue_.empty()) {
    head_id_ = 0;
    head_bypasses_ = 0;
    return plan;
  }
  if (queue_.front().id != head_id_) {
    head_id_ = queue_.front().id;
    head_bypasses_ = 0;
  }
  const bool head_reserved = head_bypasses_ >= options_.max_bypasses;

  // Arrival order; what does not fit is passed over, unless it is the reserved head.
  std::vector<size_t> taken;
  bool left_out = false;
  for (size_t i = 0; i < queue_.size(); ++i) {
    const WorkItem& item = queue_[i];
    const bool fits = item.rows <= rows_left && item.tokens <= tokens_left && (!item.multi_step || slots_left > 0);
    if (!fits) {
      left_out = true;
      if (i == 0 && head_reserved) break;
      continue;
    }
    taken.push_back(i);
    rows_left -= item.rows;
    tokens_left -= item.tokens;
    if (item.multi_step) --slots_left;
  }
  if (taken.empty()) return plan;

  // Idle dispatch, except for work that asked to wait for company.
  const bool full = left_out || rows_left == 0 || tokens_left == 0;
  if (running_.empty() && !closed_ && !full) {
    bool all_wait = true;
    int64_t oldest_us = now_us;
    for (size_t i : taken) {
      all_wait = all_wait && queue_[i].wait_for_batch;
      oldest_us = std::min(oldest_us, queue_[i].enqueued_us);
    }
    if (all_wait && now_us - oldest_us < options_.max_queue_delay_us) {
      hold_until_us_ = oldest_us + options_.max_queue_delay_us;
      return plan;
    }
  }

  if (taken.front() != 0) ++head_bypasses_;
  std::deque<WorkItem> rest;
  size_t next = 0;
  for (size_t i = 0; i < queue_.size(); ++i) {
    if (next < taken.size() && taken[next] == i) {
      ++next;
      if (queue_[i].multi_step) running_.push_back(queue_[i]);
      plan.admitted.push_back(std::move(queue_[i]));
    } else {
      rest.push_back(std::move(queue_[i]));
    }
  }
  queue_ = std::move(rest);
  return plan;
}

void StepPolicy::Release(uint64_t id) {
  std::erase_if(running_, [id](const WorkItem& item) { return item.id == id; });
}

std::optional<int64_t> StepPolicy::NextWakeUs() const {
  std::optional<int64_t> wake = hold_until_us_;
  for (const std::deque<WorkItem>* items : {&queue_, &running_}) {
    for (const WorkItem& item : *items) {
      if (item.deadline_us != WorkItem::kNoDeadline) wake = std::min(wake.value_or(item.deadline_us), item.deadline_us);
    }
  }
  return wake;
}

std::vector<WorkItem> StepPolicy::TakeAll() {
  std::vector<WorkItem> all(std::make_move_iterator(running_.begin()), std::make_move_iterator(running_.end()));
  all.insert(all.end(), std::make_move_iterator(queue_.begin()), std::make_move_iterator(queue_.end()));
  running_.clear();
  queue_.clear();
  return all;
}

// ---------------------------------------------------------------------------------------------

StepScheduler::StepScheduler(const StepPolicyOptions& options, const Clock& clock)
    : clock_(clock), policy_(options) {}

absl::StatusOr<uint64_t> StepScheduler::Enqueue(WorkItem item) {
  absl::StatusOr<uint64_t> id;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    id = policy_.Enqueue(std::move(item), clock_.NowUs());
  }
  if (id.ok()) changed_.notify_all();
  return id;
}

std::optional<PassPlan> StepScheduler::WaitForPass() {
  std::unique_lock<std::mutex> lock(mutex_);
  while (true) {
    PassPlan plan = policy_.Plan(clock_.NowUs());
    if (!plan.empty()) return plan;
    if (policy_.closed() && policy_.idle()) return std::nullopt;
    clock_.WaitUntil(changed_, lock, policy_.NextWakeUs());
  }
}

void StepScheduler::Release(uint64_t id) {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    policy_.Release(id);
  }
  changed_.notify_all();
}

void StepScheduler::Notify() {
  // Taking the mutex orders this wake after a waiter's check: no lost wake-up.
  { std::lock_guard<std::mutex> lock(mutex_); }
  changed_.notify_all();
}

void StepScheduler::Close() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    policy_.Close();
  }
  changed_.notify_all();
}

std::vector<WorkItem> StepScheduler::TakeAll() {
  std::lock_guard<std::mutex> lock(mutex_);
  return policy_.TakeAll();
}

int64_t StepScheduler::queue_size() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return policy_.queue_size();
}

int64_t StepScheduler::running_generations() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return policy_.running_generations();
}

}  // namespace mmdit
