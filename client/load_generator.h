// A load generator in the spirit of perf_analyzer: closed loop (a fixed number of calls in
// flight) or open loop (Poisson arrivals at a fixed rate), over a weighted mix of request
// shapes, bounded by a request count or a duration.
#pragma once

#include <map>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "client/denoiser_client.h"
#include "nlohmann/json.hpp"

namespace mmdit {

// One kind of request: `batch` samples of `img_latent` ([C, H, W] or [N, img_dim]) with
// `text_tokens` text tokens, drawn with probability weight / total weight.
struct RequestShape {
  double weight = 1;
  int64_t batch = 1;
  Shape img_latent;
  int64_t text_tokens = 77;
};

// "3@16x32x32/77;1@64/32": weight@shape/T entries; shape CxHxW (image form) or N (token form).
absl::StatusOr<std::vector<RequestShape>> ParseMix(const std::string& spec, int64_t batch, int64_t img_dim);

struct LoadOptions {
  int64_t concurrency = 0;  // closed loop: calls in flight (exactly one of concurrency, rate)
  double rate = 0;          // open loop: requests per second, Poisson arrivals
  int64_t requests = 0;     // stop after this many (exactly one of requests, duration_s)
  double duration_s = 0;
  std::vector<RequestShape> mix;
  v1::DType dtype = v1::FP32;
  int64_t timeout_ms = 60'000;
  uint32_t seed = 1;
};

struct LoadReport {
  int64_t requests = 0;                   // answered, successfully or not
  std::map<std::string, int64_t> errors;  // gRPC code name -> count
  double throughput_rps = 0, throughput_samples_per_s = 0;
  double p50_ms = 0, p90_ms = 0, p95_ms = 0, p99_ms = 0;  // over successful calls
  double mean_batch_samples = 0, server_queue_us_mean = 0, server_compute_us_mean = 0;
  double wall_s = 0;
  nlohmann::json ToJson() const;  // exactly the keys `mmdit-client bench --json` promises
};

// Runs the load against `client`'s server (the model's geometry from GetModelInfo fixes the
// text and pooled widths). Errors: InvalidArgument (options), or GetModelInfo's error.
absl::StatusOr<LoadReport> RunLoad(DenoiserClient& client, const LoadOptions& options);

}  // namespace mmdit
