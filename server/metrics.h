// The server's Prometheus metrics (served by http_endpoints.h).
// (prometheus-cpp is not packaged in Debian 12, so the text exposition format is written here.)
#pragma once

#include <array>
#include <atomic>
#include <deque>
#include <functional>
#include <map>
#include <mutex>
#include <set>
#include <string>
#include <utility>
#include <vector>

namespace mmdit {

// Cumulative histogram with fixed upper bounds. Thread-safe.
class Histogram {
 public:
  explicit Histogram(std::vector<double> upper_bounds);
  void Observe(double value);
  // Appends the `name`_bucket / _sum / _count lines.
  void Render(const std::string& name, std::string& out) const;

 private:
  const std::vector<double> upper_bounds_;
  mutable std::mutex mutex_;
  std::vector<uint64_t> counts_;  // guarded by mutex_; one per bound, then +Inf
  double sum_ = 0;                // guarded by mutex_
};

// Triton's ModelStatistics of the one model: its inferences are Denoise and ModelInfer calls.
struct InferenceTotals {
  uint64_t success_count = 0, success_us = 0;  // answered OK, arrival to answer
  uint64_t fail_count = 0, fail_us = 0;        // ended with an error
  uint64_t queue_us = 0, compute_us = 0;       // of the successful ones
  uint64_t inference_count = 0;                // samples answered OK
  uint64_t execution_count = 0;                // forward passes (all work together)
  int64_t last_inference_ms = 0;               // wall clock, since the epoch; 0: none yet
};

// Everything the server measures. Thread-safe.
class ServerMetrics {
 public:
  // `queue_depth` and `running_generations` are read at each scrape.
  ServerMetrics(std::function<int64_t()> queue_depth, std::function<int64_t()> running_generations);

  // One Denoise, Generate or ModelInfer call answered by our handlers, by its gRPC status code (0..16):
  // mmdit_requests_total, counted when the answer is given, so never missed by a race with
  // the call's cancellation.
  void CountRequest(int code);
  // One finished call of `method` ("/mmdit.v1.Denoiser/Denoise") as gRPC's interceptors see it:
  // every method, including gRPC's own answers (an unknown method). grpc_server_handled_total.
  void CountCall(const std::string& method, int code);
  // One Denoise or ModelInfer call's end: `ok` with its `samples`, its time from arrival to
  // answer and, when ok, its queue and compute parts.
  void ObserveInference(bool ok, int64_t samples, int64_t total_us, int64_t queue_us, int64_t compute_us);
  InferenceTotals inference_totals() const;
  // A Denoise call's wait from arrival to its pass.
  void ObserveQueueTime(double seconds) { queue_seconds_.Observe(seconds); }
  // One forward pass over `rows` rows and `tokens` tokens, taking `seconds`, ending at `now_s`.
  void ObservePass(int64_t rows, int64_t tokens, double seconds, double now_s);
  // One generation step, which waited `queue_seconds` since the generation's previous step
  // (or its arrival), ending at `now_s`.
  void ObserveGenerationStep(double queue_seconds, double now_s);
  void ObserveFirstStep(double seconds_since_arrival) { first_step_seconds_.Observe(seconds_since_arrival); }
  void ObserveGeneration(double seconds_since_arrival) { generation_seconds_.Observe(seconds_since_arrival); }

  // The Prometheus text format (version 0.0.4); `now_s` for the samples-per-second window.
  std::string Render(double now_s) const;

  uint64_t requests_with_code(int code) const { return requests_by_code_[code].load(); }
  uint64_t samples_computed() const { return samples_total_.load(); }
  uint64_t generation_steps() const { return generation_steps_total_.load(); }

 private:
  static constexpr double kRateWindowSeconds = 10.0;
  // Appends (now_s, count) to `window` and forgets what is older than the rate window.
  static void Record(std::deque<std::pair<double, int64_t>>& window, double now_s, int64_t count);
  static double Rate(const std::deque<std::pair<double, int64_t>>& window, double now_s);

  std::function<int64_t()> queue_depth_, running_generations_;
  std::array<std::atomic<uint64_t>, 17> requests_by_code_{};
  static constexpr size_t kMaxMethods = 32;
  mutable std::mutex calls_mutex_;
  std::map<std::pair<std::string, int>, uint64_t> calls_;  // guarded: (method, code) -> count
  std::set<std::string> methods_seen_;                     // guarded; at most kMaxMethods
  std::atomic<uint64_t> samples_total_{0};
  std::atomic<uint64_t> generation_steps_total_{0};
  std::atomic<uint64_t> passes_total_{0};
  mutable std::mutex inference_mutex_;
  InferenceTotals inference_;  // guarded by inference_mutex_ (execution_count: passes_total_)
  Histogram queue_seconds_, compute_seconds_, batch_samples_, batch_tokens_;
  Histogram step_queue_seconds_, first_step_seconds_, generation_seconds_;
  mutable std::mutex window_mutex_;
  std::deque<std::pair<double, int64_t>> recent_passes_;  // guarded: (time_s, rows)
  std::deque<std::pair<double, int64_t>> recent_steps_;   // guarded: (time_s, 1)
};

}  // namespace mmdit
