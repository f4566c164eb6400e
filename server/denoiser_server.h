// mmdit-server's core: the Denoiser gRPC service, health, reflection, metrics, and the batch
// worker that runs merged requests through the engine.
//
// Life cycle: Start (listening; health NOT_SERVING; Denoise answers UNAVAILABLE) ->
// Serve(engine) (warm-up shapes run once, then SERVING) -> BeginDrain (NOT_SERVING; new
// requests UNAVAILABLE; everything accepted is still answered) -> Shutdown.
#pragma once

#include <atomic>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "core/engine.h"
#include "server/dynamic_batcher.h"
#include "server/health_service.h"
#include "server/metrics.h"
#include "server/request_codec.h"

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
  std::string host = "0.0.0.0";
  int port = 50051;         // 0: any free port (see DenoiserServer::port())
  int metrics_port = 9090;  // 0: any free port; < 0: no metrics endpoint
  BatcherOptions batcher;
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

  // Takes the engine, runs each warm-up shape once (so that no request pays for first-touch
  // allocation or primitive creation), starts the batch worker, reports SERVING.
  // Errors: from the warm-up (the server stays NOT_SERVING).
  absl::Status Serve(std::unique_ptr<Engine> engine, const std::vector<WarmupShape>& warmup);

  // Health NOT_SERVING, new requests UNAVAILABLE; queued ones are still computed and answered.
  void BeginDrain();

  // Waits up to drain_timeout_s for accepted requests to be answered, then stops gRPC.
  // Calls BeginDrain if it was not called. Idempotent.
  void Shutdown();

  int port() const { return port_; }
  int64_t queue_size() const { return batcher_.queue_size(); }
  int metrics_port() const { return metrics_http_ ? metrics_http_->port() : -1; }
  const ServerMetrics& metrics() const { return *metrics_; }
  std::string RenderMetrics() const;

  class Service;  // the mmdit.v1.Denoiser callback service (denoiser_server.cc)

 private:
  explicit DenoiserServer(const ServerOptions& options);
  void BatchLoop();
  void RunBatch(std::vector<BatchEntry>& entries);

  const ServerOptions options_;
  SteadyClock clock_;
  DynamicBatcher batcher_;
  std::unique_ptr<ServerMetrics> metrics_;
  std::atomic<Engine*> engine_{nullptr};  // set once by Serve; owned by owned_engine_
  std::unique_ptr<Engine> owned_engine_;
  HealthService health_;              // outlives server_
  std::unique_ptr<Service> service_;  // outlives server_
  std::unique_ptr<grpc::Server> server_;
  std::unique_ptr<MetricsHttpServer> metrics_http_;
  int port_ = 0;
  std::thread batch_thread_;
  std::atomic<bool> batch_loop_done_{false};
  std::atomic<bool> shut_down_{false};
};

}  // namespace mmdit
