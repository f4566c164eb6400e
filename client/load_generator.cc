#include "client/load_generator.h"

#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <random>
#include <thread>

#include "absl/status/status.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "core/status_macros.h"

namespace mmdit {
namespace {

using Clock = std::chrono::steady_clock;

double Percentile(std::vector<double>& sorted, double q) {
  if (sorted.empty()) return 0;
  return sorted[std::min(sorted.size() - 1, static_cast<size_t>(q * sorted.size()))];
}

// Shared by all in-flight calls: what has been sent and what came back.
class LoadState {
 public:
  LoadState(DenoiserClient& client, const LoadOptions& options, std::vector<v1::DenoiseRequest> requests,
            std::vector<int64_t> samples)
      : client_(client),
        options_(options),
        requests_(std::move(requests)),
        samples_(std::move(samples)),
        rng_(options.seed) {
    std::vector<double> weights;
    for (const RequestShape& shape : options.mix) weights.push_back(shape.weight);
    pick_ = std::discrete_distribution<size_t>(weights.begin(), weights.end());
    start_ = Clock::now();
  }

  // Starts one call if the budget (count or duration) allows another, and returns whether it
  // did; `then` runs after the call completes (closed loop: the next call). The check and the
  // count are one step, so concurrent completions never overshoot --requests.
  bool TrySend(std::function<void()> then) {
    size_t kind;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      const bool allowed = options_.requests > 0
                               ? sent_ < options_.requests
                               : Clock::now() - start_ < std::chrono::duration<double>(options_.duration_s);
      if (!allowed) return false;
      ++sent_;
      ++in_flight_;
      kind = pick_(rng_);
    }
    auto* call = new Call{{}, {}, Clock::now(), kind};
    call->context.set_deadline(std::chrono::system_clock::now() + std::chrono::milliseconds(options_.timeout_ms));
    client_.stub().async()->Denoise(&call->context, &requests_[kind], &call->response,
                                    [this, call, then = std::move(then)](grpc::Status status) {
                                      Record(*call, status);
                                      delete call;
                                      if (then) then();
                                      Done();
                                    });
    return true;
  }

  void WaitForAll() {
    std::unique_lock<std::mutex> lock(mutex_);
    all_done_.wait(lock, [&] { return in_flight_ == 0; });
  }

  LoadReport Report() {
    std::lock_guard<std::mutex> lock(mutex_);
    LoadReport report;
    report.wall_s = std::chrono::duration<double>(Clock::now() - start_).count();
    report.requests = answered_;
    report.errors = errors_;
    report.throughput_rps = ok_ / report.wall_s;
    report.throughput_samples_per_s = ok_samples_ / report.wall_s;
    std::sort(latencies_ms_.begin(), latencies_ms_.end());
    report.p50_ms = Percentile(latencies_ms_, 0.50);
    report.p90_ms = Percentile(latencies_ms_, 0.90);
    report.p95_ms = Percentile(latencies_ms_, 0.95);
    report.p99_ms = Percentile(latencies_ms_, 0.99);
    if (ok_ > 0) {
      report.mean_batch_samples = batch_samples_sum_ / ok_;
      report.server_queue_us_mean = queue_us_sum_ / ok_;
      report.server_compute_us_mean = compute_us_sum_ / ok_;
    }
    return report;
  }

 private:
  struct Call {
    grpc::ClientContext context;
    v1::DenoiseResponse response;
    Clock::time_point start;
    size_t kind;
  };

  void Record(const Call& call, const grpc::Status& status) {
    const double ms = std::chrono::duration<double, std::milli>(Clock::now() - call.start).count();
    std::lock_guard<std::mutex> lock(mutex_);
    ++answered_;
    if (!status.ok()) {
      ++errors_[absl::StatusCodeToString(static_cast<absl::StatusCode>(status.error_code()))];
      return;
    }
    ++ok_;
    ok_samples_ += samples_[call.kind];
    latencies_ms_.push_back(ms);
    batch_samples_sum_ += call.response.batch_samples();
    queue_us_sum_ += call.response.queue_us();
    compute_us_sum_ += call.response.compute_us();
  }

  void Done() {
    std::lock_guard<std::mutex> lock(mutex_);
    if (--in_flight_ == 0) all_done_.notify_all();
  }

  DenoiserClient& client_;
  const LoadOptions& options_;
  const std::vector<v1::DenoiseRequest> requests_;
  const std::vector<int64_t> samples_;
  std::mutex mutex_;
  std::condition_variable all_done_;
  std::mt19937 rng_;                         // guarded by mutex_
  std::discrete_distribution<size_t> pick_;  // guarded by mutex_
  Clock::time_point start_;
  int64_t sent_ = 0, in_flight_ = 0, answered_ = 0, ok_ = 0, ok_samples_ = 0;  // guarded by mutex_
  double batch_samples_sum_ = 0, queue_us_sum_ = 0, compute_us_sum_ = 0;       // guarded by mutex_
  std::vector<double> latencies_ms_;                                           // guarded by mutex_
  std::map<std::string, int64_t> errors_;                                      // guarded by mutex_
};

// Closed loop: each completion starts the next call while the budget lasts.
bool SendAndChain(LoadState& state) {
  return state.TrySend([&state] { SendAndChain(state); });
}

}  // namespace

absl::StatusOr<std::vector<RequestShape>> ParseMix(const std::string& spec, int64_t batch, int64_t img_dim) {
  std::vector<RequestShape> mix;
  for (absl::string_view entry : absl::StrSplit(spec, ';', absl::SkipEmpty())) {
    RequestShape shape;
    shape.batch = batch;
    std::vector<absl::string_view> weight_and_rest = absl::StrSplit(entry, absl::MaxSplits('@', 1));
    absl::string_view rest = entry;
    bool ok = true;
    if (weight_and_rest.size() == 2) {
      ok = absl::SimpleAtod(weight_and_rest[0], &shape.weight) && shape.weight > 0;
      rest = weight_and_rest[1];
    }
    const std::vector<absl::string_view> shape_and_text = absl::StrSplit(rest, '/');
    ok = ok && shape_and_text.size() == 2 && absl::SimpleAtoi(shape_and_text[1], &shape.text_tokens) &&
         shape.text_tokens > 0;
    std::vector<int64_t> dims;
    for (absl::string_view dim : absl::StrSplit(shape_and_text[0], 'x')) {
      int64_t value = 0;
      ok = ok && absl::SimpleAtoi(dim, &value) && value > 0;
      dims.push_back(value);
    }
    ok = ok && (dims.size() == 1 || dims.size() == 3);
    if (!ok) {
      return absl::InvalidArgumentError(
          absl::StrCat("mix entry '", entry, "': expected [weight@]CxHxW/T (image form) or [weight@]N/T (token form)"));
    }
    shape.img_latent = dims.size() == 3 ? dims : Shape{dims[0], img_dim};
    mix.push_back(shape);
  }
  if (mix.empty()) return absl::InvalidArgumentError("the request mix is empty");
  return mix;
}

nlohmann::json LoadReport::ToJson() const {
  return {{"requests", requests},
          {"errors", errors},
          {"throughput_rps", throughput_rps},
          {"throughput_samples_per_s", throughput_samples_per_s},
          {"latency_ms", {{"p50", p50_ms}, {"p90", p90_ms}, {"p95", p95_ms}, {"p99", p99_ms}}},
          {"mean_batch_samples", mean_batch_samples},
          {"server_queue_us_mean", server_queue_us_mean},
          {"server_compute_us_mean", server_compute_us_mean}};
}

absl::StatusOr<LoadReport> RunLoad(DenoiserClient& client, const LoadOptions& options) {
  if ((options.concurrency > 0) == (options.rate > 0)) {
    return absl::InvalidArgumentError("give exactly one of --concurrency C (closed loop) or --rate R (open loop)");
  }
  if ((options.requests > 0) == (options.duration_s > 0)) {
    return absl::InvalidArgumentError("give exactly one of --requests N or --duration S");
  }
  if (options.mix.empty()) return absl::InvalidArgumentError("no request shapes");
  ASSIGN_OR_RETURN(v1::GetModelInfoResponse info, client.GetModelInfo(std::chrono::seconds(10)));
  // One prepared request per shape, reused by every call of that shape (gRPC only reads it).
  std::mt19937 rng(options.seed);
  std::normal_distribution<float> normal;
  std::vector<v1::DenoiseRequest> requests;
  std::vector<int64_t> samples;
  for (const RequestShape& shape : options.mix) {
    auto random = [&](Shape dims) {
      Tensor t(std::move(dims));
      for (float& v : t.data) v = normal(rng);
      return t;
    };
    Shape img = shape.img_latent;
    img.insert(img.begin(), shape.batch);
    const Tensor img_latent = random(img);
    const Tensor txt = random({shape.batch, shape.text_tokens, info.model().txt_dim()});
    const Tensor pooled = random({shape.batch, info.model().cond_dim()});
    Tensor timestep({shape.batch});
    for (int64_t b = 0; b < shape.batch; ++b) timestep.data[b] = 1000.0f * (b + 1) / (shape.batch + 1);
    requests.push_back(MakeDenoiseRequest({img_latent, txt, timestep, pooled, ""}, options.dtype));
    samples.push_back(shape.batch);
  }
  LoadState state(client, options, std::move(requests), std::move(samples));
  if (options.concurrency > 0) {
    for (int64_t i = 0; i < options.concurrency; ++i) {
      if (!SendAndChain(state)) break;
    }
  } else {
    std::mt19937 arrival_rng(options.seed + 1);
    std::exponential_distribution<double> gap_s(options.rate);
    Clock::time_point next = Clock::now();
    do {
      std::this_thread::sleep_until(next);
      next += std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(gap_s(arrival_rng)));
    } while (state.TrySend(nullptr));
  }
  state.WaitForAll();
  return state.Report();
}

}  // namespace mmdit
