// mmdit-server's core: the Denoiser gRPC service (Denoise, Generate, GetModelInfo), health,
// reflection, metrics, and the step loop that runs the scheduler's passes through the engine.
//
// Life cycle: Start (listening; health NOT_SERVING; calls answer UNAVAILABLE) ->
// Serve(engine) (warm-up shapes run once, then SERVING) -> BeginDrain (NOT_SERVING; new
// requests UNAVAILABLE; everything accepted still runs: queued Denoise calls, queued and
// running generations) -> Shutdown (after drain_timeout_s what is left ends UNAVAILABLE,
// a generation's message naming the step it reached).
#pragma once

#include <algorithm>
#include <atomic>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "core/engine.h"
#include "core/sampler.h"
#include "core/text_encoder.h"
#include "server/health_service.h"
#include "server/http_endpoints.h"
#include "server/metrics.h"
#include "server/reflection_service.h"
#include "server/request_codec.h"
#include "server/step_scheduler.h"

namespace grpc {
class Server;
}

namespace mmdit {

// One shape to run once before reporting SERVING: `batch` samples of `img_latent`
// ([C, H, W] or [N, img_dim]) with `text_tokens` text tokens.
struct WarmupShape {
  int64_t batch = 1;
  Shape img_latent;
  int64_t text_tokens = 77;
};

// "1x16x128x128/333,4x64/32": B x C x H x W (image form) or B x N (token form), then /T.
// Errors: InvalidArgument naming the entry.
absl::StatusOr<std::vector<WarmupShape>> ParseWarmupShapes(const std::string& spec, int64_t img_dim);

struct TlsOptions {
  std::string cert_file, key_file;  // both or neither: TLS
  std::string client_ca_file;       // also: mutual TLS, clients must present a certificate it signed
};

struct ServerOptions {
  std::string model_dir;  // reported by GetModelInfo
  // The model's name in the Open Inference Protocol (version "1"); empty: model_dir's last part.
  std::string model_name;
  std::string host = "0.0.0.0";
  int port = 50051;         // 0: any free port (see DenoiserServer::port())
  int metrics_port = 9090;  // 0: any free port; < 0: no metrics endpoint
  StepPolicyOptions scheduler;
  RequestLimits limits;
  int64_t max_receive_message_mb = 64;
  int64_t keepalive_time_s = 30;
  int64_t max_connection_age_s = 300;  // 0: unlimited; clients reconnect and re-balance
  int64_t drain_timeout_s = 30;
  TlsOptions tls;
};

class DenoiserServer {
 public:
  // Listens on host:port (and the metrics port). Errors: InvalidArgument (TLS files),
  // Unavailable (cannot listen).
  static absl::StatusOr<std::unique_ptr<DenoiserServer>> Start(const ServerOptions& options);
  ~DenoiserServer();

  // Takes the engine, the sampler's settings (the model's scheduler_config.json) and the
  // model's text encoder (nullptr: none; Generate's `prompt` is then refused), runs each
  // warm-up shape once (so that no request pays for first-touch allocation or primitive
  // creation), starts the step loop, reports SERVING.
  // Errors: from the warm-up (the server stays NOT_SERVING).
  absl::Status Serve(std::unique_ptr<Engine> engine, const std::vector<WarmupShape>& warmup,
                     const FlowMatchConfig& flow_match = {}, std::unique_ptr<TextEncoder> text_encoder = nullptr);

  // Health NOT_SERVING, new requests UNAVAILABLE; queued ones are still computed and answered.
  void BeginDrain();

  // Waits up to drain_timeout_s for accepted requests to be answered, then stops gRPC.
  // Calls BeginDrain if it was not called. Idempotent.
  void Shutdown();

  int port() const { return port_; }
  // The largest message taken or sent: --max_receive_message_mb, capped at gRPC's int limit.
  int64_t MaxMessageBytes() const { return std::min<int64_t>(options_.max_receive_message_mb << 20, INT32_MAX); }
  int64_t queue_size() const { return scheduler_.queue_size(); }
  int64_t running_generations() const { return scheduler_.running_generations(); }
  int metrics_port() const { return metrics_http_ ? metrics_http_->port() : -1; }
  const ServerMetrics& metrics() const { return *metrics_; }
  std::string RenderMetrics() const;

  class Service;           // the mmdit.v1.Denoiser callback service (denoiser_server.cc)
  class InferenceService;  // inference.GRPCInferenceService, on Denoise's path (denoiser_server.cc)

 private:
  explicit DenoiserServer(const ServerOptions& options);
  void StepLoop();
  void RunPass(PassPlan& plan);

  const ServerOptions options_;
  const std::string model_name_;  // options_.model_name, or model_dir's last part
  SteadyClock clock_;
  StepScheduler scheduler_;
  std::unique_ptr<ServerMetrics> metrics_;
  std::atomic<Engine*> engine_{nullptr};  // set once by Serve; owned by owned_engine_
  FlowMatchConfig flow_match_;            // set by Serve before engine_ is published
  std::unique_ptr<TextEncoder> text_encoder_;  // likewise; nullptr: the model has none
  std::unique_ptr<Engine> owned_engine_;
  HealthService health_;              // outlives server_
  std::unique_ptr<Service> service_;  // outlives server_
  std::unique_ptr<InferenceService> inference_;    // outlives server_
  std::unique_ptr<ReflectionService> reflection_;  // outlives server_
  std::unique_ptr<grpc::Server> server_;
  std::unique_ptr<HttpEndpoints> metrics_http_;
  int64_t channelz_id_ = 0;  // our server in gRPC's channelz; 0: not found
  int port_ = 0;
  std::thread step_thread_;
  std::atomic<bool> step_loop_done_{false};
  std::atomic<bool> shut_down_{false};
};

}  // namespace mmdit
