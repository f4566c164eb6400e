#include "server/denoiser_server.h"

#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/grpcpp.h>
#include <spdlog/spdlog.h>

#include <chrono>
#include <fstream>
#include <sstream>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "core/status_macros.h"
#include "mmdit/v1/denoiser.grpc.pb.h"

namespace mmdit {
namespace {

grpc::Status ToGrpc(const absl::Status& status) {
  return grpc::Status(static_cast<grpc::StatusCode>(status.code()), std::string(status.message()));
}

// One Denoise call from arrival to answer; what the batcher queues.
class DenoiseCall final : public QueuedCall {
 public:
  DenoiseCall(v1::DenoiseResponse* response, ServerMetrics& metrics, int64_t arrival_us, std::string request_id)
      : response(response), arrival_us(arrival_us), request_id(std::move(request_id)), metrics_(metrics) {}

  bool IsCancelled() const override { return cancelled_.load(std::memory_order_acquire); }
  void MarkCancelled() { cancelled_.store(true, std::memory_order_release); }
  void set_reactor(grpc::ServerUnaryReactor* reactor) { reactor_ = reactor; }

  // Answers the call. Only the first Finish has effect: after it, gRPC may delete the reactor.
  void Finish(const grpc::Status& status) {
    if (finished_.exchange(true)) return;
    metrics_.CountRequest(status.error_code());
    if (!status.ok()) {
      spdlog::debug("request '{}': {} {}", request_id, static_cast<int>(status.error_code()), status.error_message());
    }
    reactor_->Finish(status);
  }

  DecodedRequest request;
  v1::DenoiseResponse* const response;  // owned by gRPC, valid until Finish
  const int64_t arrival_us;
  const std::string request_id;

 private:
  ServerMetrics& metrics_;
  grpc::ServerUnaryReactor* reactor_ = nullptr;
  std::atomic<bool> cancelled_{false};
  std::atomic<bool> finished_{false};
};

class DenoiseReactor final : public grpc::ServerUnaryReactor {
 public:
  explicit DenoiseReactor(std::shared_ptr<DenoiseCall> call) : call_(std::move(call)) {}
  void OnCancel() override { call_->MarkCancelled(); }
  void OnDone() override { delete this; }

 private:
  const std::shared_ptr<DenoiseCall> call_;
};

// The deadline of `context` on `clock`'s time line.
int64_t DeadlineUs(const grpc::CallbackServerContext& context, int64_t now_us) {
  const auto deadline = context.deadline();
  if (deadline == std::chrono::system_clock::time_point::max()) return BatchEntry::kNoDeadline;
  const int64_t remaining_us =
      std::chrono::duration_cast<std::chrono::microseconds>(deadline - std::chrono::system_clock::now()).count();
  return remaining_us > BatchEntry::kNoDeadline - now_us ? BatchEntry::kNoDeadline : now_us + remaining_us;
}

absl::StatusOr<std::string> ReadFile(const std::string& path, const std::string& what) {
  std::ifstream file(path);
  if (!file) return absl::InvalidArgumentError(absl::StrCat(what, ": cannot read ", path));
  std::stringstream text;
  text << file.rdbuf();
  return text.str();
}

absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> Credentials(const TlsOptions& tls) {
  if (tls.cert_file.empty() && tls.key_file.empty()) {
    if (!tls.client_ca_file.empty())
      return absl::InvalidArgumentError("--tls_client_ca needs --tls_cert and --tls_key");
    return grpc::InsecureServerCredentials();
  }
  if (tls.cert_file.empty() || tls.key_file.empty()) {
    return absl::InvalidArgumentError("TLS needs both --tls_cert and --tls_key");
  }
  grpc::SslServerCredentialsOptions ssl(tls.client_ca_file.empty()
                                            ? GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE
                                            : GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY);
  ASSIGN_OR_RETURN(std::string cert, ReadFile(tls.cert_file, "--tls_cert"));
  ASSIGN_OR_RETURN(std::string key, ReadFile(tls.key_file, "--tls_key"));
  ssl.pem_key_cert_pairs.push_back({key, cert});
  if (!tls.client_ca_file.empty()) {
    ASSIGN_OR_RETURN(ssl.pem_root_certs, ReadFile(tls.client_ca_file, "--tls_client_ca"));
  }
  return grpc::SslServerCredentials(ssl);
}

}  // namespace

absl::StatusOr<std::vector<WarmupShape>> ParseWarmupShapes(const std::string& spec, int64_t img_dim) {
  std::vector<WarmupShape> shapes;
  for (absl::string_view entry : absl::StrSplit(spec, ',', absl::SkipEmpty())) {
    const std::vector<absl::string_view> parts = absl::StrSplit(entry, '/');
    std::vector<int64_t> dims;
    bool ok = parts.size() == 2;
    for (absl::string_view dim : absl::StrSplit(parts[0], 'x')) {
      int64_t value = 0;
      ok = ok && absl::SimpleAtoi(dim, &value) && value > 0;
      dims.push_back(value);
    }
    WarmupShape shape;
    ok = ok && absl::SimpleAtoi(parts.back(), &shape.text_tokens) && shape.text_tokens > 0 &&
         (dims.size() == 2 || dims.size() == 4);
    if (!ok) {
      return absl::InvalidArgumentError(
          absl::StrCat("--warmup entry '", entry, "': expected BxCxHxW/T (image form) or BxN/T (token form)"));
    }
    shape.batch = dims[0];
    shape.img_latent = dims.size() == 4 ? Shape{dims[1], dims[2], dims[3]} : Shape{dims[1], img_dim};
    shapes.push_back(shape);
  }
  return shapes;
}

// ---------------------------------------------------------------------------------------------

class DenoiserServer::Service final : public v1::Denoiser::CallbackService {
 public:
  explicit Service(DenoiserServer& server) : server_(server) {}

  grpc::ServerUnaryReactor* Denoise(grpc::CallbackServerContext* context, const v1::DenoiseRequest* request,
                                    v1::DenoiseResponse* response) override {
    const int64_t arrival_us = server_.clock_.NowUs();
    const int64_t deadline_us = DeadlineUs(*context, arrival_us);  // before decoding eats into it
    auto call = std::make_shared<DenoiseCall>(response, *server_.metrics_, arrival_us, request->request_id());
    auto* reactor = new DenoiseReactor(call);
    call->set_reactor(reactor);
    const Engine* engine = server_.engine_.load(std::memory_order_acquire);
    if (engine == nullptr) {
      call->Finish(grpc::Status(grpc::StatusCode::UNAVAILABLE, "the model is still loading; retry shortly"));
      return reactor;
    }
    absl::StatusOr<DecodedRequest> decoded = DecodeRequest(*request, *engine, server_.options_.limits);
    if (!decoded.ok()) {
      call->Finish(ToGrpc(decoded.status()));
      return reactor;
    }
    call->request = *std::move(decoded);
    BatchEntry entry;
    entry.samples = static_cast<int64_t>(call->request.samples.size());
    entry.tokens = call->request.tokens;
    entry.deadline_us = deadline_us;
    entry.call = call;
    if (absl::Status status = server_.batcher_.Enqueue(std::move(entry)); !status.ok()) {
      call->Finish(ToGrpc(status));
    }
    return reactor;
  }

  grpc::ServerUnaryReactor* GetModelInfo(grpc::CallbackServerContext* context, const v1::GetModelInfoRequest*,
                                         v1::GetModelInfoResponse* response) override {
    grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
    const Engine* engine = server_.engine_.load(std::memory_order_acquire);
    if (engine == nullptr) {
      reactor->Finish(grpc::Status(grpc::StatusCode::UNAVAILABLE, "the model is still loading; retry shortly"));
      return reactor;
    }
    const ModelConfig& c = engine->config();
    v1::ModelInfo* model = response->mutable_model();
    const int64_t parameters = ParameterCount(c);
    model->set_img_dim(c.patch_features());
    model->set_txt_dim(c.joint_attention_dim);
    model->set_hidden_size(c.hidden());
    model->set_depth(c.num_layers);
    model->set_num_heads(c.num_attention_heads);
    model->set_mlp_ratio(c.mlp_ratio);
    model->set_cond_dim(c.pooled_projection_dim);
    model->set_patch_size(c.patch_size);
    model->set_in_channels(c.in_channels);
    model->set_out_channels(c.out_channels);
    model->set_pos_embed_max_size(c.pos_embed_max_size.value_or(0));
    model->set_qk_norm(c.qk_norm);
    for (int64_t layer : c.dual_attention_layers) model->add_dual_attention_layers(layer);
    model->set_parameter_count(parameters);
    model->set_weight_bytes(parameters * 4);
    model->set_model_dir(server_.options_.model_dir);
    model->set_compute_dtype(ComputeDTypeName(engine->compute_dtype()));
    const ServerOptions& o = server_.options_;
    v1::ServerLimits* limits = response->mutable_limits();
    limits->set_max_samples_per_request(std::min(o.limits.max_samples_per_request, o.batcher.max_batch_samples));
    limits->set_max_batch_samples(o.batcher.max_batch_samples);
    limits->set_max_batch_tokens(o.batcher.max_batch_tokens);
    limits->set_max_text_tokens(o.limits.max_text_tokens);
    const int64_t table_side = c.pos_embed_max_size.value_or(0) * c.patch_size;
    limits->set_max_latent_height(o.limits.max_latent_height > 0 ? o.limits.max_latent_height : table_side);
    limits->set_max_latent_width(o.limits.max_latent_width > 0 ? o.limits.max_latent_width : table_side);
    limits->set_max_image_tokens(o.limits.max_image_tokens);
    for (v1::DType dtype : {v1::FP32, v1::FP16, v1::BF16}) limits->add_dtypes(dtype);
    limits->add_forms("image");
    if (!c.has_positions()) limits->add_forms("token");
    limits->set_max_receive_message_bytes(o.max_receive_message_mb << 20);
    reactor->Finish(grpc::Status::OK);
    return reactor;
  }

 private:
  DenoiserServer& server_;
};

// ---------------------------------------------------------------------------------------------

DenoiserServer::DenoiserServer(const ServerOptions& options)
    : options_(options),
      batcher_(options.batcher, clock_),
      metrics_(std::make_unique<ServerMetrics>([this] { return batcher_.queue_size(); })) {}

DenoiserServer::~DenoiserServer() { Shutdown(); }

absl::StatusOr<std::unique_ptr<DenoiserServer>> DenoiserServer::Start(const ServerOptions& options) {
  std::unique_ptr<DenoiserServer> server(new DenoiserServer(options));
  ASSIGN_OR_RETURN(std::shared_ptr<grpc::ServerCredentials> credentials, Credentials(options.tls));
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  const std::string address = absl::StrCat(options.host.find(':') != std::string::npos ? "[" : "", options.host,
                                           options.host.find(':') != std::string::npos ? "]" : "", ":", options.port);
  builder.AddListeningPort(address, credentials, &server->port_);
  builder.SetMaxReceiveMessageSize(
      static_cast<int>(std::min<int64_t>(options.max_receive_message_mb << 20, INT32_MAX)));
  builder.SetMaxSendMessageSize(static_cast<int>(std::min<int64_t>(options.max_receive_message_mb << 20, INT32_MAX)));
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_TIME_MS, static_cast<int>(options.keepalive_time_s * 1000));
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_TIMEOUT_MS, 10'000);
  builder.AddChannelArgument(GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS, 10'000);
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS, 1);
  if (options.max_connection_age_s > 0) {
    builder.AddChannelArgument(GRPC_ARG_MAX_CONNECTION_AGE_MS, static_cast<int>(options.max_connection_age_s * 1000));
    builder.AddChannelArgument(GRPC_ARG_MAX_CONNECTION_AGE_GRACE_MS, static_cast<int>(options.drain_timeout_s * 1000));
  }
  server->service_ = std::make_unique<Service>(*server);
  builder.RegisterService(server->service_.get());
  builder.RegisterService(&server->health_);
  server->server_ = builder.BuildAndStart();
  if (server->server_ == nullptr || server->port_ == 0) {
    return absl::UnavailableError(absl::StrCat("cannot listen on ", address));
  }
  if (options.metrics_port >= 0) {
    DenoiserServer* self = server.get();
    ASSIGN_OR_RETURN(server->metrics_http_, MetricsHttpServer::Start(options.host, options.metrics_port,
                                                                     [self] { return self->RenderMetrics(); }));
  }
  return server;
}

std::string DenoiserServer::RenderMetrics() const { return metrics_->Render(clock_.NowUs() / 1e6); }

absl::Status DenoiserServer::Serve(std::unique_ptr<Engine> engine, const std::vector<WarmupShape>& warmup) {
  const ModelConfig& c = engine->config();
  for (const WarmupShape& shape : warmup) {
    const Tensor img(shape.img_latent), txt({shape.text_tokens, c.joint_attention_dim}),
        pooled({c.pooled_projection_dim});
    const std::vector<SampleInput> samples(shape.batch, SampleInput{img, txt, 500.0f, pooled});
    const auto start = std::chrono::steady_clock::now();
    auto outputs = engine->Forward(samples);
    if (!outputs.ok()) {
      return absl::Status(outputs.status().code(),
                          absl::StrCat("warm-up shape ", shape.batch, "x", ShapeString(shape.img_latent), "/",
                                       shape.text_tokens, ": ", outputs.status().message()));
    }
    spdlog::info("warm-up: {} x {} with {} text tokens in {:.1f} ms", shape.batch, ShapeString(shape.img_latent),
                 shape.text_tokens,
                 std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count());
  }
  owned_engine_ = std::move(engine);
  engine_.store(owned_engine_.get(), std::memory_order_release);
  batch_thread_ = std::thread([this] { BatchLoop(); });
  health_.SetServing(true);
  return absl::OkStatus();
}

void DenoiserServer::BatchLoop() {
  while (std::optional<Batch> batch = batcher_.WaitForBatch()) {
    for (BatchEntry& entry : batch->expired) {
      static_cast<DenoiseCall*>(entry.call.get())
          ->Finish(
              grpc::Status(grpc::StatusCode::DEADLINE_EXCEEDED, "deadline passed while queued; nothing was computed"));
    }
    for (BatchEntry& entry : batch->cancelled) {
      static_cast<DenoiseCall*>(entry.call.get())
          ->Finish(grpc::Status(grpc::StatusCode::CANCELLED, "cancelled by the client while queued"));
    }
    if (batch->run.empty()) continue;
    if (shut_down_.load()) {  // the drain timed out: answer without computing
      for (BatchEntry& entry : batch->run) {
        static_cast<DenoiseCall*>(entry.call.get())
            ->Finish(grpc::Status(grpc::StatusCode::UNAVAILABLE, "server shut down before this request ran"));
      }
      continue;
    }
    RunBatch(batch->run);
  }
  batch_loop_done_.store(true);
}

void DenoiserServer::RunBatch(std::vector<BatchEntry>& entries) {
  const int64_t start_us = clock_.NowUs();
  std::vector<SampleInput> samples;
  int64_t tokens = 0, oldest_wait_us = 0;
  for (const BatchEntry& entry : entries) {
    const auto* call = static_cast<const DenoiseCall*>(entry.call.get());
    samples.insert(samples.end(), call->request.samples.begin(), call->request.samples.end());
    tokens += call->request.tokens;
    oldest_wait_us = std::max(oldest_wait_us, start_us - call->arrival_us);
  }
  absl::StatusOr<std::vector<Tensor>> outputs = engine_.load()->Forward(samples);
  const int64_t end_us = clock_.NowUs();
  const int64_t compute_us = end_us - start_us;
  metrics_->ObserveBatch(static_cast<int64_t>(samples.size()), tokens, compute_us / 1e6, end_us / 1e6);
  spdlog::info("batch: {} requests, {} samples, {} tokens, oldest waited {} us, compute {} us{}", entries.size(),
               samples.size(), tokens, oldest_wait_us, compute_us,
               outputs.ok() ? "" : absl::StrCat(", failed: ", outputs.status().ToString()));
  size_t offset = 0;
  for (BatchEntry& entry : entries) {
    auto* call = static_cast<DenoiseCall*>(entry.call.get());
    const size_t count = call->request.samples.size();
    if (!outputs.ok()) {
      call->Finish(ToGrpc(absl::InternalError(absl::StrCat("forward pass failed: ", outputs.status().message()))));
      continue;
    }
    const std::vector<Tensor> own(std::make_move_iterator(outputs->begin() + offset),
                                  std::make_move_iterator(outputs->begin() + offset + count));
    offset += count;
    if (call->IsCancelled()) {  // nobody to read it
      call->Finish(grpc::Status(grpc::StatusCode::CANCELLED, "cancelled by the client"));
      continue;
    }
    v1::DenoiseResponse* response = call->response;
    EncodePrediction(own, call->request.output_dtype, response->mutable_prediction());
    response->set_request_id(call->request_id);
    response->set_queue_us(start_us - call->arrival_us);
    response->set_compute_us(compute_us);
    response->set_batch_samples(static_cast<int32_t>(samples.size()));
    metrics_->ObserveQueueTime((start_us - call->arrival_us) / 1e6);
    spdlog::debug("request '{}': {} samples, queue {} us, compute {} us", call->request_id, count,
                  start_us - call->arrival_us, compute_us);
    call->Finish(grpc::Status::OK);
  }
}

void DenoiserServer::BeginDrain() {
  health_.SetServing(false);
  batcher_.Close();
}

void DenoiserServer::Shutdown() {
  if (shut_down_.load() || server_ == nullptr) return;
  BeginDrain();
  const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(options_.drain_timeout_s);
  while (batch_thread_.joinable() && !batch_loop_done_.load() && std::chrono::steady_clock::now() < give_up) {
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  if (batch_thread_.joinable() && !batch_loop_done_.load()) {
    spdlog::warn("drain timeout ({} s) reached with {} requests queued", options_.drain_timeout_s,
                 batcher_.queue_size());
  }
  shut_down_.store(true);
  server_->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(1));
  if (batch_thread_.joinable()) batch_thread_.join();
  server_->Wait();
  metrics_http_.reset();
}

}  // namespace mmdit
