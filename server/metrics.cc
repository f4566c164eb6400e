#include "server/metrics.h"

#include <algorithm>
#include <charconv>
#include <chrono>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace mmdit {
namespace {

std::vector<double> Exponential(double first, double factor, int count) {
  std::vector<double> bounds;
  for (double b = first; count-- > 0; b *= factor) bounds.push_back(b);
  return bounds;
}

// The shortest decimal text that reads back as exactly `value`, without an exponent
// (absl::StrCat keeps 6 significant digits, which would print a sum of 1014560.25 as
// 1.01456e+06).
std::string Exact(double value) {
  char text[512];  // enough for any double in fixed notation
  const auto [end, error] = std::to_chars(text, text + sizeof(text), value, std::chars_format::fixed);
  return std::string(text, end);
}

// `text` as a label value of the text format: backslash, double quote and newline escaped.
std::string LabelValue(const std::string& text) {
  std::string escaped;
  for (const char c : text) {
    if (c == '\\' || c == '"') escaped += '\\';
    escaped += c == '\n' ? std::string("\\n") : std::string(1, c);
  }
  return escaped;
}

void Header(std::string& out, const std::string& name, const char* type, const char* help) {
  absl::StrAppend(&out, "# HELP ", name, " ", help, "\n# TYPE ", name, " ", type, "\n");
}

}  // namespace

Histogram::Histogram(std::vector<double> upper_bounds)
    : upper_bounds_(std::move(upper_bounds)), counts_(upper_bounds_.size() + 1, 0) {}

void Histogram::Observe(double value) {
  const size_t bucket = std::lower_bound(upper_bounds_.begin(), upper_bounds_.end(), value) - upper_bounds_.begin();
  std::lock_guard<std::mutex> lock(mutex_);
  ++counts_[bucket];
  sum_ += value;
}

void Histogram::Render(const std::string& name, std::string& out) const {
  std::lock_guard<std::mutex> lock(mutex_);
  uint64_t cumulative = 0;
  for (size_t i = 0; i < upper_bounds_.size(); ++i) {
    cumulative += counts_[i];
    absl::StrAppend(&out, name, "_bucket{le=\"", Exact(upper_bounds_[i]), "\"} ", cumulative, "\n");
  }
  cumulative += counts_.back();
  absl::StrAppend(&out, name, "_bucket{le=\"+Inf\"} ", cumulative, "\n", name, "_sum ", Exact(sum_), "\n", name, "_count ",
                  cumulative, "\n");
}

ServerMetrics::ServerMetrics(std::function<int64_t()> queue_depth, std::function<int64_t()> running_generations)
    : queue_depth_(std::move(queue_depth)),
      running_generations_(std::move(running_generations)),
      queue_seconds_(Exponential(100e-6, 2, 16)),       // 100 us .. 3.3 s
      compute_seconds_(Exponential(1e-3, 2, 14)),       // 1 ms .. 8 s
      batch_samples_(Exponential(1, 2, 10)),            // 1 .. 512
      batch_tokens_(Exponential(16, 2, 14)),            // 16 .. 131072
      step_queue_seconds_(Exponential(100e-6, 2, 16)),  // 100 us .. 3.3 s
      first_step_seconds_(Exponential(1e-3, 2, 16)),    // 1 ms .. 33 s
      generation_seconds_(Exponential(10e-3, 2, 16)) {} // 10 ms .. 5.5 min

void ServerMetrics::CountRequest(int code) {
  if (code < 0 || code >= 17) code = static_cast<int>(absl::StatusCode::kUnknown);
  requests_by_code_[code].fetch_add(1);
}

void ServerMetrics::CountCall(const std::string& method, int code) {
  if (code < 0 || code >= 17) code = static_cast<int>(absl::StatusCode::kUnknown);
  std::lock_guard<std::mutex> lock(calls_mutex_);
  // A client chooses the method path: past a bound, new names share one series, so that a
  // flood of made-up paths cannot grow the page (or memory) without end.
  const bool known = methods_seen_.contains(method);
  if (!known && methods_seen_.size() >= kMaxMethods) {
    ++calls_[{"other", code}];
    return;
  }
  if (!known) methods_seen_.insert(method);
  ++calls_[{method, code}];
}

void ServerMetrics::Record(std::deque<std::pair<double, int64_t>>& window, double now_s, int64_t count) {
  window.emplace_back(now_s, count);
  while (!window.empty() && window.front().first < now_s - kRateWindowSeconds) window.pop_front();
}

double ServerMetrics::Rate(const std::deque<std::pair<double, int64_t>>& window, double now_s) {
  int64_t recent = 0;
  for (const auto& [time_s, count] : window) {
    if (time_s >= now_s - kRateWindowSeconds) recent += count;
  }
  return recent / kRateWindowSeconds;
}

void ServerMetrics::ObserveInference(bool ok, int64_t samples, int64_t total_us, int64_t queue_us,
                                     int64_t compute_us) {
  const int64_t now_ms = std::chrono::duration_cast<std::chrono::milliseconds>(
                             std::chrono::system_clock::now().time_since_epoch())
                             .count();
  const auto positive = [](int64_t us) { return static_cast<uint64_t>(std::max<int64_t>(us, 0)); };
  std::lock_guard<std::mutex> lock(inference_mutex_);
  if (ok) {
    ++inference_.success_count;
    inference_.success_us += positive(total_us);
    inference_.queue_us += positive(queue_us);
    inference_.compute_us += positive(compute_us);
    inference_.inference_count += positive(samples);
    inference_.last_inference_ms = now_ms;
  } else {
    ++inference_.fail_count;
    inference_.fail_us += positive(total_us);
  }
}

InferenceTotals ServerMetrics::inference_totals() const {
  InferenceTotals totals;
  {
    std::lock_guard<std::mutex> lock(inference_mutex_);
    totals = inference_;
  }
  totals.execution_count = passes_total_.load();
  return totals;
}

void ServerMetrics::ObservePass(int64_t rows, int64_t tokens, double seconds, double now_s) {
  passes_total_.fetch_add(1);
  samples_total_.fetch_add(rows);
  compute_seconds_.Observe(seconds);
  batch_samples_.Observe(rows);
  batch_tokens_.Observe(tokens);
  std::lock_guard<std::mutex> lock(window_mutex_);
  Record(recent_passes_, now_s, rows);
}

void ServerMetrics::ObserveGenerationStep(double queue_seconds, double now_s) {
  generation_steps_total_.fetch_add(1);
  step_queue_seconds_.Observe(queue_seconds);
  std::lock_guard<std::mutex> lock(window_mutex_);
  Record(recent_steps_, now_s, 1);
}

std::string ServerMetrics::Render(double now_s) const {
  std::string out;
  Header(out, "mmdit_requests_total", "counter", "Denoise, Generate and ModelInfer calls answered, by gRPC status code.");
  for (int code = 0; code < 17; ++code) {
    absl::StrAppend(&out, "mmdit_requests_total{code=\"", absl::StatusCodeToString(static_cast<absl::StatusCode>(code)),
                    "\"} ", requests_by_code_[code].load(), "\n");
  }
  Header(out, "grpc_server_handled_total", "counter",
         "Every gRPC call finished, by service, method and status code, including those gRPC answered itself.");
  {
    std::lock_guard<std::mutex> lock(calls_mutex_);
    for (const auto& [key, count] : calls_) {
      const auto& [method, code] = key;
      // "/package.Service/Method"; anything else (an unknown path) keeps its whole text as the method.
      const size_t slash = method.rfind('/');
      const bool split = method.size() > 1 && method[0] == '/' && slash > 0;
      absl::StrAppend(&out, "grpc_server_handled_total{grpc_service=\"",
                      LabelValue(split ? method.substr(1, slash - 1) : ""), "\",grpc_method=\"",
                      LabelValue(split ? method.substr(slash + 1) : method), "\",grpc_code=\"",
                      absl::StatusCodeToString(static_cast<absl::StatusCode>(code)), "\"} ", count, "\n");
    }
  }
  Header(out, "mmdit_queue_seconds", "histogram", "Denoise calls: time from arrival to the start of their pass.");
  queue_seconds_.Render("mmdit_queue_seconds", out);
  Header(out, "mmdit_compute_seconds", "histogram", "Duration of each shared forward pass.");
  compute_seconds_.Render("mmdit_compute_seconds", out);
  Header(out, "mmdit_batch_samples", "histogram", "Rows (samples) per forward pass, Denoise and Generate together.");
  batch_samples_.Render("mmdit_batch_samples", out);
  Header(out, "mmdit_batch_tokens", "histogram", "Image plus text tokens per forward pass.");
  batch_tokens_.Render("mmdit_batch_tokens", out);
  Header(out, "mmdit_queue_depth", "gauge", "Requests (Denoise and Generate) waiting for admission.");
  absl::StrAppend(&out, "mmdit_queue_depth ", queue_depth_(), "\n");
  Header(out, "mmdit_samples_total", "counter", "Samples computed.");
  absl::StrAppend(&out, "mmdit_samples_total ", samples_total_.load(), "\n");
  double samples_per_second = 0, steps_per_second = 0;
  {
    std::lock_guard<std::mutex> lock(window_mutex_);
    samples_per_second = Rate(recent_passes_, now_s);
    steps_per_second = Rate(recent_steps_, now_s);
  }
  Header(out, "mmdit_samples_per_second", "gauge", "Rows computed per second over the last 10 seconds.");
  absl::StrAppend(&out, "mmdit_samples_per_second ", Exact(samples_per_second), "\n");
  Header(out, "mmdit_generations_running", "gauge", "Generations admitted and not yet finished.");
  absl::StrAppend(&out, "mmdit_generations_running ", running_generations_(), "\n");
  Header(out, "mmdit_generation_steps_total", "counter", "Generation steps computed.");
  absl::StrAppend(&out, "mmdit_generation_steps_total ", generation_steps_total_.load(), "\n");
  Header(out, "mmdit_generation_steps_per_second", "gauge", "Generation steps per second over the last 10 seconds.");
  absl::StrAppend(&out, "mmdit_generation_steps_per_second ", Exact(steps_per_second), "\n");
  Header(out, "mmdit_generation_step_queue_seconds", "histogram",
         "Per generation step: time since the generation's previous step ended (or its arrival).");
  step_queue_seconds_.Render("mmdit_generation_step_queue_seconds", out);
  Header(out, "mmdit_generation_first_step_seconds", "histogram", "Time from a Generate's arrival to its first step.");
  first_step_seconds_.Render("mmdit_generation_first_step_seconds", out);
  Header(out, "mmdit_generation_seconds", "histogram", "End-to-end time of each completed generation.");
  generation_seconds_.Render("mmdit_generation_seconds", out);
  return out;
}

}  // namespace mmdit
