// A load generator in the spirit of perf_analyzer: closed loop (a fixed number of calls in
// flight) or open loop (Poisson arrivals at a fixed rate), over a weighted mix of request
// shapes, bounded by a request count or a duration. RunLoad sends Denoise calls (one step
// each); RunGenerateLoad whole images, either by the server's Generate or by a client-side
// sampler that calls Denoise once per step (GenerateViaDenoise), for comparing the two.
#pragma once

#include <chrono>
#include <map>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "client/denoiser_client.h"
#include "core/sampler.h"
#include "nlohmann/json.hpp"

namespace mmdit {

// One kind of request: `batch` samples of `img_latent` ([C, H, W] or [N, img_dim]) with
// `text_tokens` text tokens, drawn with probability weight / total weight; for a generation,
// `steps` sampling steps (0: the load's default).
struct RequestShape {
  double weight = 1;
  int64_t batch = 1;
  Shape img_latent;
  int64_t text_tokens = 77;
  int64_t steps = 0;
};

// "3@16x32x32/77:28;1@64/32": weight@shape/T[:S] entries; shape CxHxW (image form) or N (token
// form); the weight defaults to 1, the step count S (generations only) to the load's default.
absl::StatusOr<std::vector<RequestShape>> ParseMix(const std::string& spec, int64_t batch, int64_t img_dim);

struct LoadOptions {
  int64_t concurrency = 0;  // closed loop: calls in flight (exactly one of concurrency, rate)
  double rate = 0;          // open loop: requests per second, Poisson arrivals
  int64_t requests = 0;     // stop after this many (exactly one of requests, duration_s)
  double duration_s = 0;
  std::vector<RequestShape> mix;
  v1::DType dtype = v1::FP32;
  bool wait_for_batch = false;  // DenoiseRequest.wait_for_batch
  int64_t timeout_ms = 60'000;
  uint32_t seed = 1;
};

struct LoadReport {
  int64_t requests = 0;                   // answered, successfully or not
  std::map<std::string, int64_t> errors;  // gRPC code name -> count
  std::map<std::string, std::string> first_errors;  // gRPC code name -> the first such call's message
  double throughput_rps = 0, throughput_samples_per_s = 0;
  double p50_ms = 0, p90_ms = 0, p95_ms = 0, p99_ms = 0;  // over successful calls
  double mean_batch_samples = 0, server_queue_us_mean = 0, server_compute_us_mean = 0;
  double wall_s = 0;
  nlohmann::json ToJson() const;  // exactly the keys `mmdit-client bench --json` promises
};

// Runs the load against `client`'s server (the model's geometry from GetModelInfo fixes the
// text and pooled widths). Errors: InvalidArgument (options; a mix with step counts), or
// GetModelInfo's error.
absl::StatusOr<LoadReport> RunLoad(DenoiserClient& client, const LoadOptions& options);

// One generation sampled by this client: core/sampler.h's FlowMatchSampler with the server's
// SamplerDefaults (`info`, from GetModelInfo) for what `inputs` leaves unset, and one Denoise
// call per step whose batch is the step's rows ([negative, positive] with CFG, B = 2). The
// result's first_progress_ms is the first Denoise's answer; queue_us, compute_us and
// mean_batch_samples add up (average) the Denoise responses'. The starting noise is
// initial_noise, else GaussianNoise(per-sample shape, seed). Errors: InvalidArgument (inputs
// the sampler refuses; skip-layer guidance, which Denoise cannot run; a negative prompt of
// another text length than the prompt's, which cannot share one batched request), or the first
// failed Denoise's status.
absl::StatusOr<GenerateResult> GenerateViaDenoise(DenoiserClient& client, const v1::GetModelInfoResponse& info,
                                                  const GenerateInputs& inputs, v1::DType dtype,
                                                  std::chrono::milliseconds timeout, bool wait_for_batch = false);

enum class GenerateVia {
  kGenerate,  // the server runs the sampling loop (one Generate stream per image)
  kDenoise,   // this client runs it (GenerateViaDenoise)
};

struct GenerateLoadOptions {
  int64_t concurrency = 0;  // closed loop: generations in flight (exactly one of concurrency, rate)
  double rate = 0;          // open loop: generations per second, Poisson arrivals
  int64_t requests = 0;     // stop after this many (exactly one of requests, duration_s)
  double duration_s = 0;
  std::vector<RequestShape> mix;  // each entry's batch is ignored: one image per request
  int64_t steps = 0;              // for mix entries without :S; 0: the server's default
  float guidance_scale = 7.0f;    // > 1: classifier-free guidance (a negative prompt, 2 rows a step)
  GenerateVia via = GenerateVia::kGenerate;
  bool wait_for_batch = false;  // kDenoise: DenoiseRequest.wait_for_batch on every step
  v1::DType dtype = v1::FP32;
  int64_t timeout_ms = 600'000;  // per generation
  uint32_t seed = 1;             // text embeddings, shape choice, arrivals; image i's noise seed + i
};

struct GenerateLoadReport {
  GenerateVia via = GenerateVia::kGenerate;
  int64_t requests = 0;                   // answered, successfully or not
  std::map<std::string, int64_t> errors;  // status code name -> count
  std::map<std::string, std::string> first_errors;  // status code name -> the first such call's message
  double images_per_s = 0, steps_per_s = 0;
  // Over successful generations: time to the first step's answer, and to the final latent.
  double ttfs_p50_ms = 0, ttfs_p90_ms = 0, ttfs_p99_ms = 0;
  double p50_ms = 0, p90_ms = 0, p99_ms = 0;
  double mean_batch_samples = 0;  // rows per forward pass, over every step of every success
  double server_queue_us_mean = 0, server_compute_us_mean = 0;  // per image
  double wall_s = 0;
  nlohmann::json ToJson() const;  // exactly the keys `mmdit-client bench --generate --json` promises
};

// Runs generations against `client`'s server, with seeded random text embeddings of the
// model's widths (GetModelInfo); blocks until all are answered. Each generation runs on a thread
// of its own (closed loop: `concurrency` threads; open loop: one per arrival, joined at the end).
// Errors: InvalidArgument (options), or GetModelInfo's error.
absl::StatusOr<GenerateLoadReport> RunGenerateLoad(DenoiserClient& client, const GenerateLoadOptions& options);

}  // namespace mmdit
