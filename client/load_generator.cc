#include "client/load_generator.h"

#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <mutex>
#include <optional>
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
    report.first_errors = first_errors_;
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
      const std::string code = absl::StatusCodeToString(static_cast<absl::StatusCode>(status.error_code()));
      ++errors_[code];
      first_errors_.emplace(code, status.error_message());  // keeps the first
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
  std::map<std::string, std::string> first_errors_;                            // guarded by mutex_
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
    ok = ok && shape_and_text.size() == 2;
    if (ok) {
      const std::vector<absl::string_view> text_and_steps = absl::StrSplit(shape_and_text[1], ':');
      ok = text_and_steps.size() <= 2 && absl::SimpleAtoi(text_and_steps[0], &shape.text_tokens) &&
           shape.text_tokens > 0;
      if (text_and_steps.size() == 2) ok = ok && absl::SimpleAtoi(text_and_steps[1], &shape.steps) && shape.steps > 0;
    }
    std::vector<int64_t> dims;
    for (absl::string_view dim : absl::StrSplit(shape_and_text[0], 'x')) {
      int64_t value = 0;
      ok = ok && absl::SimpleAtoi(dim, &value) && value > 0;
      dims.push_back(value);
    }
    ok = ok && (dims.size() == 1 || dims.size() == 3);
    if (!ok) {
      return absl::InvalidArgumentError(absl::StrCat(
          "mix entry '", entry, "': expected [weight@]CxHxW/T[:S] (image form) or [weight@]N/T[:S] (token form)"));
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
  for (const RequestShape& shape : options.mix) {
    if (shape.steps != 0) return absl::InvalidArgumentError("mix step counts (/T:S) are for generations only");
  }
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
    requests.push_back(
        MakeDenoiseRequest({img_latent, txt, timestep, pooled, "", options.wait_for_batch}, options.dtype));
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

namespace {

// `view` without its leading batch of 1. Errors: InvalidArgument naming `field` and `expected`.
absl::StatusOr<TensorView> OneSample(const TensorView& view, const std::string& field, size_t rank,
                                     const std::string& expected) {
  if (view.shape.size() != rank || view.shape[0] != 1 || view.data == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat(field, ": expected ", expected, ", got ", ShapeString(view.shape)));
  }
  return TensorView(Shape(view.shape.begin() + 1, view.shape.end()), view.data);
}

// The starting latent's per-sample shape: initial_noise's, else latent_shape ([C, H, W], or [N]
// tokens of img_dim), else init_latent's.
absl::StatusOr<Shape> LatentShape(const GenerateInputs& inputs, int64_t img_dim) {
  const std::optional<TensorView>& given = inputs.initial_noise ? inputs.initial_noise : inputs.init_latent;
  if (given) {
    if (given->shape.size() < 3 || given->shape[0] != 1) {
      return absl::InvalidArgumentError(absl::StrCat(inputs.initial_noise ? "initial_noise" : "init_latent",
                                                     ": expected [1, C, H, W] or [1, N, img_dim], got ",
                                                     ShapeString(given->shape)));
    }
    return Shape(given->shape.begin() + 1, given->shape.end());
  }
  if (inputs.latent_shape.size() == 3) return inputs.latent_shape;
  if (inputs.latent_shape.size() == 1) return Shape{inputs.latent_shape[0], img_dim};
  return absl::InvalidArgumentError(absl::StrCat("latent_shape: expected [C, H, W] or [N] (or initial_noise), got ",
                                                 ShapeString(inputs.latent_shape)));
}

// The sampler's settings: what `inputs` sets, else the server's defaults, else core's.
absl::StatusOr<GenerationOptions> ResolveOptions(const GenerateInputs& inputs, const v1::GetModelInfoResponse& info) {
  const v1::SamplerDefaults& defaults = info.sampler();
  GenerationOptions options;
  if (inputs.steps > 0) {
    options.steps = inputs.steps;
  } else if (defaults.steps() > 0) {
    options.steps = defaults.steps();
  }
  if (inputs.guidance_scale) {
    options.guidance_scale = *inputs.guidance_scale;
  } else if (info.has_sampler()) {
    options.guidance_scale = defaults.guidance_scale();
  }
  if (inputs.strength) {
    options.strength = *inputs.strength;
  } else if (inputs.init_latent) {
    options.strength = defaults.img2img_strength() > 0 ? defaults.img2img_strength() : 0.6f;
  }
  if (!inputs.skip_layers.empty()) {
    return absl::InvalidArgumentError("skip_layers: skip-layer guidance needs Generate (Denoise runs every block)");
  }
  return options;
}

FlowMatchConfig SchedulerConfig(const v1::GetModelInfoResponse& info) {
  FlowMatchConfig config;
  if (info.sampler().shift() > 0) config.shift = info.sampler().shift();
  if (info.sampler().num_train_timesteps() >= 2) config.num_train_timesteps = info.sampler().num_train_timesteps();
  return config;
}

// One step's rows as the four batched tensors of a Denoise request.
struct StackedRows {
  Tensor img_latent;   // [B, C, H, W] or [B, N, F]
  Tensor txt_embed;    // [B, T, J]
  Tensor timestep;     // [B]
  Tensor pooled_text;  // [B, P]
};

absl::StatusOr<StackedRows> StackRows(absl::Span<const SampleInput> rows) {
  const auto stack = [&](auto field) -> absl::StatusOr<Tensor> {
    const TensorView& first = rows[0].*field;
    Shape shape = first.shape;
    shape.insert(shape.begin(), static_cast<int64_t>(rows.size()));
    Tensor stacked(std::move(shape));
    const int64_t n = first.NumElements();
    for (size_t r = 0; r < rows.size(); ++r) {
      const TensorView& row = rows[r].*field;
      if (row.shape != first.shape) {
        return absl::InvalidArgumentError(
            absl::StrCat("the negative prompt's ", ShapeString(row.shape), " differs from the prompt's ",
                         ShapeString(first.shape), ": via Denoise both rows of a step travel as one batched request"));
      }
      std::copy(row.data, row.data + n, stacked.data.begin() + r * n);
    }
    return stacked;
  };
  StackedRows stacked;
  ASSIGN_OR_RETURN(stacked.img_latent, stack(&SampleInput::img_latent));
  ASSIGN_OR_RETURN(stacked.txt_embed, stack(&SampleInput::txt_embed));
  ASSIGN_OR_RETURN(stacked.pooled_text, stack(&SampleInput::pooled_text));
  stacked.timestep = Tensor({static_cast<int64_t>(rows.size())});
  for (size_t r = 0; r < rows.size(); ++r) stacked.timestep.data[r] = rows[r].timestep;
  return stacked;
}

// Sample b of a [B, ...] tensor.
Tensor Row(const Tensor& batched, int64_t b) {
  const Shape shape(batched.shape.begin() + 1, batched.shape.end());
  const int64_t n = NumElements(shape);
  return Tensor(shape, std::vector<float>(batched.data.begin() + b * n, batched.data.begin() + (b + 1) * n));
}

}  // namespace

absl::StatusOr<GenerateResult> GenerateViaDenoise(DenoiserClient& client, const v1::GetModelInfoResponse& info,
                                                  const GenerateInputs& inputs, v1::DType dtype,
                                                  std::chrono::milliseconds timeout, bool wait_for_batch) {
  using Clock = std::chrono::steady_clock;
  const Clock::time_point start = Clock::now();
  const Clock::time_point deadline = start + timeout;
  ASSIGN_OR_RETURN(const GenerationOptions options, ResolveOptions(inputs, info));
  ASSIGN_OR_RETURN(const Shape latent_shape, LatentShape(inputs, info.model().img_dim()));
  const std::string kText = "[1, T, joint_attention_dim]", kPooled = "[1, pooled_projection_dim]";
  TextCondition positive, negative;
  ASSIGN_OR_RETURN(positive.txt_embed, OneSample(inputs.txt_embed, "txt_embed", 3, kText));
  ASSIGN_OR_RETURN(positive.pooled_text, OneSample(inputs.pooled_text, "pooled_text", 2, kPooled));
  if (options.guidance_scale > 1) {
    if (!inputs.negative_txt_embed || !inputs.negative_pooled_text) {
      return absl::InvalidArgumentError(
          "negative_txt_embed and negative_pooled_text are required when guidance_scale > 1");
    }
    ASSIGN_OR_RETURN(negative.txt_embed, OneSample(*inputs.negative_txt_embed, "negative_txt_embed", 3, kText));
    ASSIGN_OR_RETURN(negative.pooled_text, OneSample(*inputs.negative_pooled_text, "negative_pooled_text", 2, kPooled));
  }
  Tensor noise = inputs.initial_noise
                     ? Tensor(latent_shape, std::vector<float>(inputs.initial_noise->data,
                                                               inputs.initial_noise->data + NumElements(latent_shape)))
                     : GaussianNoise(latent_shape, inputs.seed);
  std::optional<Tensor> init_latent;
  if (inputs.init_latent) {
    ASSIGN_OR_RETURN(TensorView x0, OneSample(*inputs.init_latent, "init_latent", latent_shape.size() + 1,
                                              "the noise's shape with a leading 1"));
    init_latent = Tensor(x0.shape, std::vector<float>(x0.data, x0.data + x0.NumElements()));
  }
  ASSIGN_OR_RETURN(FlowMatchSampler sampler, FlowMatchSampler::Create(SchedulerConfig(info), options, std::move(noise),
                                                                      init_latent ? &*init_latent : nullptr));
  GenerateResult result;
  int64_t batch_samples_sum = 0;
  while (!sampler.done()) {
    const std::vector<SampleInput> rows = StepRows(sampler, positive, negative);
    ASSIGN_OR_RETURN(const StackedRows stacked, StackRows(rows));
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
    if (left.count() <= 0) {
      return absl::DeadlineExceededError(absl::StrCat("the deadline passed after step ", sampler.steps_taken()));
    }
    const DenoiseInputs request{stacked.img_latent,  stacked.txt_embed, stacked.timestep,
                                stacked.pooled_text, inputs.request_id, wait_for_batch};
    ASSIGN_OR_RETURN(const DenoiseResult answer, client.Denoise(request, dtype, left));
    if (sampler.steps_taken() == 0) {
      result.first_progress_ms = std::chrono::duration<double, std::milli>(Clock::now() - start).count();
    }
    if (answer.prediction.shape.empty() || answer.prediction.shape[0] != static_cast<int64_t>(rows.size())) {
      return absl::InternalError(
          absl::StrCat("Denoise answered ", ShapeString(answer.prediction.shape), " for ", rows.size(), " rows"));
    }
    std::vector<Tensor> predictions;
    for (size_t r = 0; r < rows.size(); ++r) predictions.push_back(Row(answer.prediction, r));
    RETURN_IF_ERROR(sampler.Advance(predictions));
    result.queue_us += answer.queue_us;
    result.compute_us += answer.compute_us;
    batch_samples_sum += answer.batch_samples;
    result.rows = static_cast<int32_t>(rows.size());
  }
  result.steps = static_cast<int32_t>(sampler.total_steps());
  result.mean_batch_samples = result.steps > 0 ? static_cast<double>(batch_samples_sum) / result.steps : 0;
  result.latent = sampler.latent();
  result.latent.shape.insert(result.latent.shape.begin(), 1);
  result.total_ms = std::chrono::duration<double, std::milli>(Clock::now() - start).count();
  return result;
}

namespace {

// One kind of generation of the mix, with its random prompts (batch 1).
struct GenerationKind {
  Tensor txt_embed, pooled_text, negative_txt_embed, negative_pooled_text;
  Shape latent_shape;  // [C, H, W] or [N]
  int64_t steps = 0;
};

// Shared by the callers' threads: what has been started and what came back.
class GenerateLoad {
 public:
  GenerateLoad(DenoiserClient& client, const GenerateLoadOptions& options, v1::GetModelInfoResponse info,
               std::vector<GenerationKind> kinds)
      : client_(client), options_(options), info_(std::move(info)), kinds_(std::move(kinds)), rng_(options.seed) {
    std::vector<double> weights;
    for (const RequestShape& shape : options.mix) weights.push_back(shape.weight);
    pick_ = std::discrete_distribution<size_t>(weights.begin(), weights.end());
    start_ = Clock::now();
  }

  struct Claim {
    size_t kind;
    int64_t index;
  };

  // The next generation to run if the budget (count or duration) allows another. The check and
  // the count are one step, so concurrent callers never overshoot --requests.
  std::optional<Claim> TryClaim() {
    std::lock_guard<std::mutex> lock(mutex_);
    const bool allowed = options_.requests > 0
                             ? sent_ < options_.requests
                             : Clock::now() - start_ < std::chrono::duration<double>(options_.duration_s);
    if (!allowed) return std::nullopt;
    return Claim{pick_(rng_), sent_++};
  }

  // Runs one generation on the calling thread and records it.
  void Run(const Claim& claim) {
    const GenerationKind& kind = kinds_[claim.kind];
    GenerateInputs inputs;
    inputs.txt_embed = kind.txt_embed;
    inputs.pooled_text = kind.pooled_text;
    if (options_.guidance_scale > 1) {
      inputs.negative_txt_embed = kind.negative_txt_embed;
      inputs.negative_pooled_text = kind.negative_pooled_text;
    }
    inputs.latent_shape = kind.latent_shape;
    inputs.steps = static_cast<int32_t>(kind.steps);
    inputs.guidance_scale = options_.guidance_scale;
    inputs.seed = options_.seed + claim.index;
    inputs.request_id = absl::StrCat("bench-", claim.index);
    const std::chrono::milliseconds timeout(options_.timeout_ms);
    const Clock::time_point start = Clock::now();
    const absl::StatusOr<GenerateResult> result =
        options_.via == GenerateVia::kGenerate
            ? client_.Generate(inputs, options_.dtype, timeout)
            : GenerateViaDenoise(client_, info_, inputs, options_.dtype, timeout, options_.wait_for_batch);
    const double ms = std::chrono::duration<double, std::milli>(Clock::now() - start).count();
    std::lock_guard<std::mutex> lock(mutex_);
    ++answered_;
    if (!result.ok()) {
      const std::string code = absl::StatusCodeToString(result.status().code());
      ++errors_[code];
      first_errors_.emplace(code, result.status().message());  // keeps the first
      return;
    }
    ++ok_;
    steps_ += result->steps;
    latencies_ms_.push_back(ms);
    ttfs_ms_.push_back(result->first_progress_ms);
    batch_samples_sum_ += result->mean_batch_samples * result->steps;
    queue_us_sum_ += result->queue_us;
    compute_us_sum_ += result->compute_us;
  }

  GenerateLoadReport Report() {
    std::lock_guard<std::mutex> lock(mutex_);
    GenerateLoadReport report;
    report.via = options_.via;
    report.wall_s = std::chrono::duration<double>(Clock::now() - start_).count();
    report.requests = answered_;
    report.errors = errors_;
    report.first_errors = first_errors_;
    report.images_per_s = ok_ / report.wall_s;
    report.steps_per_s = steps_ / report.wall_s;
    std::sort(latencies_ms_.begin(), latencies_ms_.end());
    std::sort(ttfs_ms_.begin(), ttfs_ms_.end());
    report.ttfs_p50_ms = Percentile(ttfs_ms_, 0.50);
    report.ttfs_p90_ms = Percentile(ttfs_ms_, 0.90);
    report.ttfs_p99_ms = Percentile(ttfs_ms_, 0.99);
    report.p50_ms = Percentile(latencies_ms_, 0.50);
    report.p90_ms = Percentile(latencies_ms_, 0.90);
    report.p99_ms = Percentile(latencies_ms_, 0.99);
    if (steps_ > 0) report.mean_batch_samples = batch_samples_sum_ / steps_;
    if (ok_ > 0) {
      report.server_queue_us_mean = queue_us_sum_ / ok_;
      report.server_compute_us_mean = compute_us_sum_ / ok_;
    }
    return report;
  }

 private:
  DenoiserClient& client_;
  const GenerateLoadOptions& options_;
  const v1::GetModelInfoResponse info_;
  const std::vector<GenerationKind> kinds_;
  std::mutex mutex_;
  std::mt19937 rng_;                         // guarded by mutex_
  std::discrete_distribution<size_t> pick_;  // guarded by mutex_
  Clock::time_point start_;
  int64_t sent_ = 0, answered_ = 0, ok_ = 0, steps_ = 0;                  // guarded by mutex_
  double batch_samples_sum_ = 0, queue_us_sum_ = 0, compute_us_sum_ = 0;  // guarded by mutex_
  std::vector<double> latencies_ms_, ttfs_ms_;                            // guarded by mutex_
  std::map<std::string, int64_t> errors_;                                 // guarded by mutex_
  std::map<std::string, std::string> first_errors_;                       // guarded by mutex_
};

const char* ViaName(GenerateVia via) { return via == GenerateVia::kGenerate ? "generate" : "denoise"; }

}  // namespace

nlohmann::json GenerateLoadReport::ToJson() const {
  return {{"via", ViaName(via)},
          {"requests", requests},
          {"errors", errors},
          {"images_per_s", images_per_s},
          {"steps_per_s", steps_per_s},
          {"ttfs_ms", {{"p50", ttfs_p50_ms}, {"p90", ttfs_p90_ms}, {"p99", ttfs_p99_ms}}},
          {"latency_ms", {{"p50", p50_ms}, {"p90", p90_ms}, {"p99", p99_ms}}},
          {"mean_batch_samples", mean_batch_samples},
          {"server_queue_us_mean", server_queue_us_mean},
          {"server_compute_us_mean", server_compute_us_mean},
          {"wall_s", wall_s}};
}

absl::StatusOr<GenerateLoadReport> RunGenerateLoad(DenoiserClient& client, const GenerateLoadOptions& options) {
  if ((options.concurrency > 0) == (options.rate > 0)) {
    return absl::InvalidArgumentError("give exactly one of --concurrency C (closed loop) or --rate R (open loop)");
  }
  if ((options.requests > 0) == (options.duration_s > 0)) {
    return absl::InvalidArgumentError("give exactly one of --requests N or --duration S");
  }
  if (options.mix.empty()) return absl::InvalidArgumentError("no request shapes");
  if (options.steps < 0) return absl::InvalidArgumentError("--steps must be >= 1 (0: the server's default)");
  if (!std::isfinite(options.guidance_scale)) return absl::InvalidArgumentError("--guidance must be finite");
  ASSIGN_OR_RETURN(v1::GetModelInfoResponse info, client.GetModelInfo(std::chrono::seconds(10)));
  // Both ways run the same step counts: the load's default resolved here, not by the server.
  const int64_t default_steps = options.steps > 0            ? options.steps
                                : info.sampler().steps() > 0 ? info.sampler().steps()
                                                             : GenerationOptions().steps;
  std::mt19937 rng(options.seed);
  std::normal_distribution<float> normal;
  const auto random = [&](Shape dims) {
    Tensor t(std::move(dims));
    for (float& v : t.data) v = normal(rng);
    return t;
  };
  std::vector<GenerationKind> kinds;
  for (const RequestShape& shape : options.mix) {
    GenerationKind kind;
    kind.txt_embed = random({1, shape.text_tokens, info.model().txt_dim()});
    kind.pooled_text = random({1, info.model().cond_dim()});
    kind.negative_txt_embed = random({1, shape.text_tokens, info.model().txt_dim()});
    kind.negative_pooled_text = random({1, info.model().cond_dim()});
    kind.latent_shape = shape.img_latent.size() == 3 ? shape.img_latent : Shape{shape.img_latent[0]};
    kind.steps = shape.steps > 0 ? shape.steps : default_steps;
    kinds.push_back(std::move(kind));
  }
  GenerateLoad load(client, options, std::move(info), std::move(kinds));
  std::vector<std::thread> callers;
  if (options.concurrency > 0) {
    for (int64_t i = 0; i < options.concurrency; ++i) {
      callers.emplace_back([&load] {
        while (const std::optional<GenerateLoad::Claim> claim = load.TryClaim()) load.Run(*claim);
      });
    }
  } else {
    std::mt19937 arrival_rng(options.seed + 1);
    std::exponential_distribution<double> gap_s(options.rate);
    Clock::time_point next = Clock::now();
    while (true) {
      std::this_thread::sleep_until(next);
      next += std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(gap_s(arrival_rng)));
      const std::optional<GenerateLoad::Claim> claim = load.TryClaim();
      if (!claim) break;
      callers.emplace_back([&load, claim = *claim] { load.Run(claim); });
    }
  }
  for (std::thread& caller : callers) caller.join();
  return load.Report();
}

}  // namespace mmdit
