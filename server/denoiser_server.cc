#include "server/denoiser_server.h"

#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpc/grpc.h>
#include <grpcpp/grpcpp.h>
#include <spdlog/spdlog.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "core/status_macros.h"
#include "server/inference_codec.h"
#include "inference/grpc_predict_v2.grpc.pb.h"
#include "mmdit/v1/denoiser.grpc.pb.h"
#include "nlohmann/json.hpp"

namespace mmdit {
namespace {

grpc::Status ToGrpc(const absl::Status& status) {
  return grpc::Status(static_cast<grpc::StatusCode>(status.code()), std::string(status.message()));
}

// Denoise and Generate are raw methods (bytes in, bytes out) so that a body that is not the
// request message is our INVALID_ARGUMENT with a message, not gRPC's bare UNIMPLEMENTED.
template <typename Message>
absl::Status ParseRequest(const grpc::ByteBuffer& wire, Message& message) {
  grpc::ByteBuffer body(wire);  // shares the slices; Deserialize consumes its argument
  if (!grpc::SerializationTraits<Message>::Deserialize(&body, &message).ok()) {
    return absl::InvalidArgumentError(absl::StrCat("the request body (", wire.Length(), " bytes) is not a valid ",
                                                   Message::descriptor()->full_name(), " message"));
  }
  return absl::OkStatus();
}

grpc::ByteBuffer Serialized(const google::protobuf::Message& message) {
  grpc::ByteBuffer wire;
  bool own_buffer = false;
  grpc::SerializationTraits<google::protobuf::Message>::Serialize(message, &wire, &own_buffer);
  return wire;
}

// Counts every finished call by method and status code as its status is sent, including the
// calls gRPC answers without our handlers (an unknown method). A message over the size limit
// is refused by gRPC's core before any interceptor exists (see grpc_core_server_calls_total).
// A call that ends without sending a status (the client cancelled, its deadline passed, the
// connection broke) is counted CANCELLED when gRPC destroys its interceptors.
class CallCounter final : public grpc::experimental::Interceptor {
 public:
  CallCounter(std::string method, ServerMetrics& metrics) : method_(std::move(method)), metrics_(metrics) {}
  ~CallCounter() override {
    if (!counted_) metrics_.CountCall(method_, grpc::StatusCode::CANCELLED);
  }
  void Intercept(grpc::experimental::InterceptorBatchMethods* methods) override {
    if (methods->QueryInterceptionHookPoint(grpc::experimental::InterceptionHookPoints::PRE_SEND_STATUS)) {
      metrics_.CountCall(method_, methods->GetSendStatus().error_code());
      counted_ = true;
    }
    methods->Proceed();
  }

 private:
  const std::string method_;
  ServerMetrics& metrics_;
  bool counted_ = false;  // hooks of one call run one at a time
};

class CallCounterFactory final : public grpc::experimental::ServerInterceptorFactoryInterface {
 public:
  explicit CallCounterFactory(ServerMetrics& metrics) : metrics_(metrics) {}
  grpc::experimental::Interceptor* CreateServerInterceptor(grpc::experimental::ServerRpcInfo* info) override {
    return new CallCounter(info->method() != nullptr ? info->method() : "", metrics_);
  }

 private:
  ServerMetrics& metrics_;
};

// One forward pass, as the work that shared it sees it.
struct PassStats {
  int64_t start_us = 0, end_us = 0;
  int32_t rows = 0;  // all work together
};

// What the step loop runs: a Denoise call (one pass) or a generation (one pass per step).
class StepWork : public QueuedCall {
 public:
  // Appends this work's rows of the next pass: views that stay valid until Consume or Fail.
  virtual void AppendRows(std::vector<SampleInput>& rows) = 0;
  // Takes this work's outputs of the pass (as many as it appended); true when it is complete
  // and answered.
  virtual bool Consume(std::vector<Tensor> outputs, const PassStats& pass) = 0;
  // Ends the work with an error; `reason` is completed with what had been computed.
  virtual void Fail(grpc::StatusCode code, absl::string_view reason) = 0;
};

StepWork& WorkOf(const WorkItem& item) { return static_cast<StepWork&>(*item.call); }

// One Denoise call from arrival to answer.
class DenoiseCall final : public StepWork {
 public:
  DenoiseCall(grpc::ByteBuffer* wire_response, ServerMetrics& metrics, const Clock& clock, int64_t arrival_us)
      : wire_response(wire_response), arrival_us(arrival_us), metrics_(metrics), clock_(clock) {}

  bool IsCancelled() const override { return cancelled_.load(std::memory_order_acquire); }
  void MarkCancelled() { cancelled_.store(true, std::memory_order_release); }
  void set_reactor(grpc::ServerUnaryReactor* reactor) { reactor_ = reactor; }

  void AppendRows(std::vector<SampleInput>& rows) override {
    rows.insert(rows.end(), request.samples.begin(), request.samples.end());
  }

  bool Consume(std::vector<Tensor> outputs, const PassStats& pass) override {
    if (IsCancelled()) {  // nobody to read it
      Finish(grpc::Status(grpc::StatusCode::CANCELLED, "cancelled by the client"));
      return true;
    }
    if (absl::Status finite = CheckAnswer(outputs, request.output_dtype, NamedInputs(), "prediction"); !finite.ok()) {
      Finish(ToGrpc(finite));
      return true;
    }
    if (infer_model_name.empty()) {
      v1::DenoiseResponse response;
      EncodePrediction(outputs, request.output_dtype, response.mutable_prediction());
      response.set_request_id(request_id);
      response.set_queue_us(pass.start_us - arrival_us);
      response.set_compute_us(pass.end_us - pass.start_us);
      response.set_batch_samples(pass.rows);
      *wire_response = Serialized(response);
    } else {
      inference::ModelInferResponse response;
      response.set_model_name(infer_model_name);
      response.set_model_version("1");
      response.set_id(request_id);
      EncodeInferResponse(outputs, request.output_dtype, response);
      *wire_response = Serialized(response);
    }
    metrics_.ObserveQueueTime((pass.start_us - arrival_us) / 1e6);
    metrics_.ObserveInference(true, static_cast<int64_t>(outputs.size()), pass.end_us - arrival_us,
                              pass.start_us - arrival_us, pass.end_us - pass.start_us);
    spdlog::debug("request '{}': {} samples, queue {} us, compute {} us", request_id, outputs.size(),
                  pass.start_us - arrival_us, pass.end_us - pass.start_us);
    Finish(grpc::Status::OK);
    return true;
  }

  void Fail(grpc::StatusCode code, absl::string_view reason) override {
    Finish(grpc::Status(code, std::string(reason)));
  }

  // Answers the call. Only the first Finish has effect: after it, gRPC may delete the reactor.
  void Finish(const grpc::Status& status) {
    if (finished_.exchange(true)) return;
    metrics_.CountRequest(status.error_code());
    if (!status.ok()) {
      metrics_.ObserveInference(false, 0, clock_.NowUs() - arrival_us, 0, 0);
      spdlog::debug("request '{}': {} {}", request_id, static_cast<int>(status.error_code()), status.error_message());
    }
    reactor_->Finish(status);
  }

  // Each sample's inputs by field name, for CheckAnswer.
  std::vector<std::vector<NamedInput>> NamedInputs() const {
    std::vector<std::vector<NamedInput>> inputs;
    for (size_t b = 0; b < request.samples.size(); ++b) {
      const SampleInput& sample = request.samples[b];
      inputs.push_back({{"img_latent", sample.img_latent},
                        {"txt_embed", sample.txt_embed},
                        {"timestep", TensorView({1}, &request.timestep.data[b])},
                        {"pooled_text", sample.pooled_text}});
    }
    return inputs;
  }

  DecodedRequest request;
  grpc::ByteBuffer* const wire_response;  // owned by gRPC, valid until Finish
  const int64_t arrival_us;
  std::string request_id;        // once parsed
  std::string infer_model_name;  // set: a ModelInfer call, answered as ModelInferResponse

 private:
  ServerMetrics& metrics_;
  const Clock& clock_;
  grpc::ServerUnaryReactor* reactor_ = nullptr;
  std::atomic<bool> cancelled_{false};
  std::atomic<bool> finished_{false};
};

class DenoiseReactor final : public grpc::ServerUnaryReactor {
 public:
  DenoiseReactor(std::shared_ptr<DenoiseCall> call, StepScheduler& scheduler)
      : call_(std::move(call)), scheduler_(scheduler) {}
  void OnCancel() override {
    call_->MarkCancelled();
    scheduler_.Notify();
  }
  void OnDone() override { delete this; }

 private:
  const std::shared_ptr<DenoiseCall> call_;
  StepScheduler& scheduler_;
};

// One Generate call: its sampler, and the stream of progress messages back to the caller.
// Messages are written one at a time, in order (gRPC allows one write in flight); every step's
// message is kept until written, which bounds the outbox by the request's own steps.
class GenerateCall final : public StepWork {
 public:
  GenerateCall(ServerMetrics& metrics, StepScheduler& scheduler, int64_t arrival_us)
      : arrival_us_(arrival_us),
        last_event_us_(arrival_us),
        metrics_(metrics),
        scheduler_(scheduler) {}

  void set_reactor(grpc::ServerWriteReactor<grpc::ByteBuffer>* reactor) { reactor_ = reactor; }
  void set_request_id(std::string request_id) { request_id_ = std::move(request_id); }
  void set_request(DecodedGenerate request) { request_ = std::move(request); }

  bool IsCancelled() const override { return cancelled_.load(std::memory_order_acquire); }
  void MarkCancelled() {
    cancelled_.store(true, std::memory_order_release);
    scheduler_.Notify();
  }

  void AppendRows(std::vector<SampleInput>& rows) override {
    step_rows_ = StepRows(*request_.sampler, request_.Positive(), request_.Negative());
    rows.insert(rows.end(), step_rows_.begin(), step_rows_.end());
  }

  bool Consume(std::vector<Tensor> outputs, const PassStats& pass) override {
    FlowMatchSampler& sampler = *request_.sampler;
    if (absl::Status status = sampler.Advance(outputs); !status.ok()) {
      Fail(grpc::StatusCode::INTERNAL, absl::StrCat("sampler step failed: ", status.message()));
      return true;
    }
    // Checked every step, so that an overflow ends the generation when it happens; the final
    // latent and previews are checked again in the dtype they are sent in.
    const std::vector<std::vector<NamedInput>> inputs = {{{"txt_embed", request_.txt_embed},
                                                          {"pooled_text", request_.pooled_text},
                                                          {"negative_txt_embed", request_.negative_txt_embed},
                                                          {"negative_pooled_text", request_.negative_pooled_text}}};
    const bool done = sampler.done();
    const bool preview = request_.preview_every > 0 && sampler.steps_taken() % request_.preview_every == 0;
    const v1::DType checked_as = done || preview ? request_.output_dtype : v1::FP32;
    if (absl::Status finite = CheckAnswer(absl::MakeConstSpan(&sampler.latent(), 1), checked_as, inputs, "latent");
        !finite.ok()) {
      Fail(grpc::StatusCode::INVALID_ARGUMENT, finite.message());
      return true;
    }
    const int64_t step_queue_us = pass.start_us - last_event_us_;
    queue_us_ += step_queue_us;
    compute_us_ += pass.end_us - pass.start_us;
    last_event_us_ = pass.end_us;
    metrics_.ObserveGenerationStep(step_queue_us / 1e6, pass.end_us / 1e6);
    if (sampler.steps_taken() == 1) metrics_.ObserveFirstStep((pass.end_us - arrival_us_) / 1e6);

    v1::GenerateProgress progress;
    progress.set_step(static_cast<int32_t>(sampler.steps_taken()));
    progress.set_total_steps(static_cast<int32_t>(sampler.total_steps()));
    progress.set_sigma(sampler.sigma());
    progress.set_queue_us(queue_us_);
    progress.set_compute_us(compute_us_);
    progress.set_batch_samples(pass.rows);
    progress.set_rows(static_cast<int32_t>(outputs.size()));
    progress.set_request_id(request_id_);
    if (done || preview) EncodePrediction({sampler.latent()}, request_.output_dtype, progress.mutable_latent());
    progress.set_done(done);
    Send(progress);
    if (done) {
      metrics_.ObserveGeneration((pass.end_us - arrival_us_) / 1e6);
      spdlog::debug("generation '{}': {} steps, queue {} us, compute {} us", request_id_, sampler.total_steps(),
                    queue_us_, compute_us_);
      Finish(grpc::Status::OK);
    }
    return done;
  }

  void Fail(grpc::StatusCode code, absl::string_view reason) override {
    const FlowMatchSampler& sampler = *request_.sampler;
    Finish(grpc::Status(code, sampler.steps_taken() == 0
                                  ? absl::StrCat(reason, " before its first step; nothing was computed")
                                  : absl::StrCat(reason, " at step ", sampler.steps_taken(), " of ",
                                                 sampler.total_steps())));
  }

  // Ends the stream with `status` once the messages before it are written (all of them when
  // OK; only the one in flight otherwise). Only the first Finish has effect.
  void Finish(const grpc::Status& status) {
    bool finish_now = false;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (finish_status_) return;
      finish_status_ = status;
      if (!status.ok()) {
        while (outbox_.size() > (writing_ ? 1u : 0u)) outbox_.pop_back();
      }
      finish_now = !writing_;
    }
    metrics_.CountRequest(status.error_code());
    if (!status.ok()) {
      spdlog::debug("generation '{}': {} {}", request_id_, static_cast<int>(status.error_code()),
                    status.error_message());
    }
    if (finish_now) reactor_->Finish(status);
  }

  // The reactor's OnWriteDone: the next message, or the deferred Finish.
  void OnWriteDone(bool ok) {
    const grpc::ByteBuffer* next = nullptr;
    std::optional<grpc::Status> finish;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      outbox_.pop_front();
      writing_ = false;
      if (!ok) outbox_.clear();  // the stream is broken: the caller is gone
      if (!outbox_.empty()) {
        writing_ = true;
        next = &outbox_.front();
      } else if (finish_status_) {
        finish = finish_status_;
      }
    }
    if (!ok) MarkCancelled();
    if (next != nullptr) reactor_->StartWrite(next);
    if (finish) reactor_->Finish(*finish);
  }

 private:
  void Send(const v1::GenerateProgress& progress) {
    grpc::ByteBuffer wire = Serialized(progress);
    const grpc::ByteBuffer* next = nullptr;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (finish_status_) return;
      outbox_.push_back(std::move(wire));  // a deque: the message in flight does not move
      if (!writing_) {
        writing_ = true;
        next = &outbox_.front();
      }
    }
    if (next != nullptr) reactor_->StartWrite(next);
  }

  const int64_t arrival_us_;
  int64_t last_event_us_;  // arrival, then the end of its last pass (step loop only)
  int64_t queue_us_ = 0, compute_us_ = 0;
  std::string request_id_;  // set before the call is queued
  ServerMetrics& metrics_;
  StepScheduler& scheduler_;
  DecodedGenerate request_;             // the step loop's once queued
  std::vector<SampleInput> step_rows_;  // this step's rows, viewed by the pass
  grpc::ServerWriteReactor<grpc::ByteBuffer>* reactor_ = nullptr;
  std::atomic<bool> cancelled_{false};
  std::mutex mutex_;
  std::deque<grpc::ByteBuffer> outbox_;        // guarded; the front is in flight while writing_
  bool writing_ = false;                       // guarded
  std::optional<grpc::Status> finish_status_;  // guarded: Finish was called
};

class GenerateReactor final : public grpc::ServerWriteReactor<grpc::ByteBuffer> {
 public:
  explicit GenerateReactor(std::shared_ptr<GenerateCall> call) : call_(std::move(call)) {}
  void OnWriteDone(bool ok) override { call_->OnWriteDone(ok); }
  void OnCancel() override { call_->MarkCancelled(); }
  void OnDone() override { delete this; }

 private:
  const std::shared_ptr<GenerateCall> call_;
};

// The deadline of `context` on `clock`'s time line.
int64_t DeadlineUs(const grpc::CallbackServerContext& context, int64_t now_us) {
  const auto deadline = context.deadline();
  if (deadline == std::chrono::system_clock::time_point::max()) return WorkItem::kNoDeadline;
  const int64_t remaining_us =
      std::chrono::duration_cast<std::chrono::microseconds>(deadline - std::chrono::system_clock::now()).count();
  return remaining_us > WorkItem::kNoDeadline - now_us ? WorkItem::kNoDeadline : now_us + remaining_us;
}

absl::StatusOr<std::string> ReadFile(const std::string& path, const std::string& what) {
  std::ifstream file(path);
  if (!file) return absl::InvalidArgumentError(absl::StrCat(what, ": cannot read ", path));
  std::stringstream text;
  text << file.rdbuf();
  return text.str();
}

// The channelz ids of the gRPC servers in this process (gRPC's core keeps call counts per server
// there, including calls it refuses before the application sees them).
std::set<int64_t> ChannelzServerIds() {
  std::set<int64_t> ids;
  char* text = grpc_channelz_get_servers(0);
  if (text == nullptr) return ids;
  const nlohmann::json servers = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  std::free(text);
  if (!servers.is_object() || !servers.contains("server")) return ids;
  for (const nlohmann::json& server : servers["server"]) {
    int64_t id = 0;
    if (server.contains("ref") && absl::SimpleAtoi(server["ref"].value("serverId", ""), &id)) ids.insert(id);
  }
  return ids;
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

class DenoiserServer::Service final
    : public v1::Denoiser::WithRawCallbackMethod_Denoise<
          v1::Denoiser::WithRawCallbackMethod_Generate<v1::Denoiser::CallbackService>> {
 public:
  explicit Service(DenoiserServer& server) : server_(server) {}

  grpc::ServerUnaryReactor* Denoise(grpc::CallbackServerContext* context, const grpc::ByteBuffer* wire_request,
                                    grpc::ByteBuffer* wire_response) override {
    const int64_t arrival_us = server_.clock_.NowUs();
    const int64_t deadline_us = DeadlineUs(*context, arrival_us);  // before decoding eats into it
    auto call = std::make_shared<DenoiseCall>(wire_response, *server_.metrics_, server_.clock_, arrival_us);
    auto* reactor = new DenoiseReactor(call, server_.scheduler_);
    call->set_reactor(reactor);
    v1::DenoiseRequest parsed;
    if (absl::Status status = ParseRequest(*wire_request, parsed); !status.ok()) {
      call->Finish(ToGrpc(status));
      return reactor;
    }
    AdmitDenoise(parsed, deadline_us, call);
    return reactor;
  }

  // Decodes `request` into `call` and queues it, or answers the call with the error. Denoise's
  // path, and ModelInfer's once its request is a DenoiseRequest.
  void AdmitDenoise(const v1::DenoiseRequest& request, int64_t deadline_us, const std::shared_ptr<DenoiseCall>& call) {
    call->request_id = request.request_id();
    const Engine* engine = server_.engine_.load(std::memory_order_acquire);
    if (engine == nullptr) {
      call->Finish(grpc::Status(grpc::StatusCode::UNAVAILABLE, "the model is still loading; retry shortly"));
      return;
    }
    absl::StatusOr<DecodedRequest> decoded = DecodeRequest(request, *engine, server_.options_.limits);
    if (!decoded.ok()) {
      call->Finish(ToGrpc(decoded.status()));
      return;
    }
    call->request = *std::move(decoded);
    WorkItem item;
    item.rows = static_cast<int64_t>(call->request.samples.size());
    item.tokens = call->request.tokens;
    item.deadline_us = deadline_us;
    item.wait_for_batch = request.wait_for_batch();
    item.call = call;
    if (absl::StatusOr<uint64_t> id = server_.scheduler_.Enqueue(std::move(item)); !id.ok()) {
      call->Finish(ToGrpc(id.status()));
    }
  }

  grpc::ServerWriteReactor<grpc::ByteBuffer>* Generate(grpc::CallbackServerContext* context,
                                                       const grpc::ByteBuffer* wire_request) override {
    const int64_t arrival_us = server_.clock_.NowUs();
    const int64_t deadline_us = DeadlineUs(*context, arrival_us);
    auto call = std::make_shared<GenerateCall>(*server_.metrics_, server_.scheduler_, arrival_us);
    auto* reactor = new GenerateReactor(call);
    call->set_reactor(reactor);
    v1::GenerateRequest parsed;
    if (absl::Status status = ParseRequest(*wire_request, parsed); !status.ok()) {
      call->Finish(ToGrpc(status));
      return reactor;
    }
    const v1::GenerateRequest* request = &parsed;
    call->set_request_id(request->request_id());
    const Engine* engine = server_.engine_.load(std::memory_order_acquire);
    if (engine == nullptr) {
      call->Finish(grpc::Status(grpc::StatusCode::UNAVAILABLE, "the model is still loading; retry shortly"));
      return reactor;
    }
    absl::StatusOr<DecodedGenerate> decoded =
        DecodeGenerateRequest(*request, *engine, server_.text_encoder_.get(), server_.options_.limits,
                              server_.flow_match_);
    if (!decoded.ok()) {
      call->Finish(ToGrpc(decoded.status()));
      return reactor;
    }
    WorkItem item;
    item.multi_step = true;
    item.rows = decoded->max_rows;
    item.tokens = decoded->max_tokens;
    item.deadline_us = deadline_us;
    item.call = call;
    call->set_request(*std::move(decoded));
    if (absl::StatusOr<uint64_t> id = server_.scheduler_.Enqueue(std::move(item)); !id.ok()) {
      call->Finish(ToGrpc(id.status()));
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
    model->set_sample_size(c.sample_size);
    if (server_.text_encoder_ != nullptr) {
      const TextEncoderSummary summary = server_.text_encoder_->Summary();
      v1::TextEncoderInfo* encoder = model->mutable_text_encoder();
      encoder->set_kind(summary.kind);
      encoder->set_description(summary.description);
      encoder->set_max_tokens(summary.max_tokens);
      for (const std::string& word : summary.words) encoder->add_vocabulary(word);
    }
    const ServerOptions& o = server_.options_;
    v1::ServerLimits* limits = response->mutable_limits();
    limits->set_max_samples_per_request(std::min(o.limits.max_samples_per_request, o.scheduler.max_batch_samples));
    limits->set_max_batch_samples(o.scheduler.max_batch_samples);
    limits->set_max_batch_tokens(o.scheduler.max_batch_tokens);
    limits->set_max_text_tokens(o.limits.max_text_tokens);
    const int64_t table_side = c.pos_embed_max_size.value_or(0) * c.patch_size;
    limits->set_max_latent_height(o.limits.max_latent_height > 0 ? o.limits.max_latent_height : table_side);
    limits->set_max_latent_width(o.limits.max_latent_width > 0 ? o.limits.max_latent_width : table_side);
    limits->set_max_image_tokens(o.limits.max_image_tokens);
    for (v1::DType dtype : {v1::FP32, v1::FP16, v1::BF16}) limits->add_dtypes(dtype);
    limits->add_forms("image");
    if (!c.has_positions()) limits->add_forms("token");
    limits->set_max_receive_message_bytes(server_.MaxMessageBytes());  // as enforced, not as asked
    limits->set_max_running_generations(o.scheduler.max_running_generations);
    limits->set_max_steps(o.limits.max_steps);
    limits->set_max_queue_size(o.scheduler.max_queue_size);
    const GenerationOptions defaults;
    v1::SamplerDefaults* sampler = response->mutable_sampler();
    sampler->set_scheduler("FlowMatchEulerDiscreteScheduler");
    sampler->set_shift(server_.flow_match_.shift);
    sampler->set_num_train_timesteps(server_.flow_match_.num_train_timesteps);
    sampler->set_steps(static_cast<int32_t>(defaults.steps));
    sampler->set_guidance_scale(defaults.guidance_scale);
    sampler->set_skip_layer_scale(defaults.skip_layer_guidance.scale);
    sampler->set_skip_layer_start(static_cast<float>(defaults.skip_layer_guidance.start));
    sampler->set_skip_layer_stop(static_cast<float>(defaults.skip_layer_guidance.stop));
    sampler->set_img2img_strength(0.6f);
    reactor->Finish(grpc::Status::OK);
    return reactor;
  }

 private:
  DenoiserServer& server_;
};

// ---------------------------------------------------------------------------------------------

// The Open Inference Protocol (KServe v2) on the same port. ModelInfer is a Denoise call in the
// protocol's tensors: same validation, same queue and passes, same answer. Readiness is health's.
class DenoiserServer::InferenceService final
    : public inference::GRPCInferenceService::WithRawCallbackMethod_ModelInfer<
          inference::GRPCInferenceService::CallbackService> {
 public:
  explicit InferenceService(DenoiserServer& server) : server_(server) {}

  grpc::ServerUnaryReactor* ServerLive(grpc::CallbackServerContext* context, const inference::ServerLiveRequest*,
                                       inference::ServerLiveResponse* response) override {
    response->set_live(true);  // answering at all is being live
    return Done(context, grpc::Status::OK);
  }

  grpc::ServerUnaryReactor* ServerReady(grpc::CallbackServerContext* context, const inference::ServerReadyRequest*,
                                        inference::ServerReadyResponse* response) override {
    response->set_ready(server_.health_.serving());
    return Done(context, grpc::Status::OK);
  }

  grpc::ServerUnaryReactor* ModelReady(grpc::CallbackServerContext* context,
                                       const inference::ModelReadyRequest* request,
                                       inference::ModelReadyResponse* response) override {
    // A model this server does not serve is not ready (Triton answers so too, without an error).
    response->set_ready(Known(request->name(), request->version()).ok() && server_.health_.serving());
    return Done(context, grpc::Status::OK);
  }

  grpc::ServerUnaryReactor* ServerMetadata(grpc::CallbackServerContext* context,
                                           const inference::ServerMetadataRequest*,
                                           inference::ServerMetadataResponse* response) override {
    response->set_name("mmdit-serve");
    response->set_version(MMDIT_SERVE_VERSION);
    response->add_extensions("model_configuration");  // Triton's names for ModelConfig
    response->add_extensions("statistics");           // and ModelStatistics
    return Done(context, grpc::Status::OK);
  }

  grpc::ServerUnaryReactor* ModelMetadata(grpc::CallbackServerContext* context,
                                          const inference::ModelMetadataRequest* request,
                                          inference::ModelMetadataResponse* response) override {
    if (absl::Status known = Known(request->name(), request->version()); !known.ok()) {
      return Done(context, ToGrpc(known));
    }
    const Engine* engine = server_.engine_.load(std::memory_order_acquire);
    if (engine == nullptr) {
      return Done(context, grpc::Status(grpc::StatusCode::UNAVAILABLE, "the model is still loading; retry shortly"));
    }
    const mmdit::ModelConfig& c = engine->config();  // (ModelConfig alone is the RPC, in this class)
    response->set_name(server_.model_name_);
    response->add_versions("1");
    response->set_platform("mmdit");
    // -1: any size; the batch in front of every tensor. FP16 and BF16 are accepted too
    // (GetModelInfo lists them); FP32 is what metadata has room to say.
    const auto add = [&c](inference::ModelMetadataResponse::TensorMetadata* tensor, absl::string_view name) {
      tensor->set_name(std::string(name));
      tensor->set_datatype("FP32");
      tensor->add_shape(-1);
      for (int64_t dim : InferSampleDims(c, name)) tensor->add_shape(dim);
    };
    for (absl::string_view name : kInferInputNames) add(response->add_inputs(), name);
    add(response->add_outputs(), kInferOutputName);
    return Done(context, grpc::Status::OK);
  }

  // Triton's model_configuration extension: what perf_analyzer reads to shape its requests.
  // Dimensions exclude the batch (max_batch_size > 0); timestep is dims [1] reshaped to [],
  // so Triton's tools send [B, 1], which ModelInfer accepts as [B].
  grpc::ServerUnaryReactor* ModelConfig(grpc::CallbackServerContext* context,
                                        const inference::ModelConfigRequest* request,
                                        inference::ModelConfigResponse* response) override {
    if (absl::Status known = Known(request->name(), request->version()); !known.ok()) {
      return Done(context, ToGrpc(known));
    }
    const Engine* engine = server_.engine_.load(std::memory_order_acquire);
    if (engine == nullptr) {
      return Done(context, grpc::Status(grpc::StatusCode::UNAVAILABLE, "the model is still loading; retry shortly"));
    }
    const mmdit::ModelConfig& c = engine->config();
    const ServerOptions& o = server_.options_;
    inference::ModelConfig* config = response->mutable_config();
    config->set_name(server_.model_name_);
    config->set_platform("mmdit");
    config->set_backend("mmdit");
    config->set_max_batch_size(
        static_cast<int32_t>(std::min(o.limits.max_samples_per_request, o.scheduler.max_batch_samples)));
    for (absl::string_view name : kInferInputNames) {
      inference::ModelInput* input = config->add_input();
      input->set_name(std::string(name));
      input->set_data_type(inference::TYPE_FP32);
      std::vector<int64_t> dims = InferSampleDims(c, name);
      if (dims.empty()) {  // a scalar per sample (timestep): Triton wants dims [1], reshaped to []
        dims = {1};
        input->mutable_reshape();
      }
      for (int64_t dim : dims) input->add_dims(dim);
    }
    inference::ModelOutput* output = config->add_output();
    output->set_name(std::string(kInferOutputName));
    output->set_data_type(inference::TYPE_FP32);
    for (int64_t dim : InferSampleDims(c, kInferOutputName)) output->add_dims(dim);
    return Done(context, grpc::Status::OK);
  }

  // Triton's statistics extension, over every inference of the model: Denoise and ModelInfer.
  grpc::ServerUnaryReactor* ModelStatistics(grpc::CallbackServerContext* context,
                                            const inference::ModelStatisticsRequest* request,
                                            inference::ModelStatisticsResponse* response) override {
    if (!request->name().empty()) {
      if (absl::Status known = Known(request->name(), request->version()); !known.ok()) {
        return Done(context, ToGrpc(known));
      }
    }
    const InferenceTotals totals = server_.metrics_->inference_totals();
    inference::ModelStatistics* stats = response->add_model_stats();
    stats->set_name(server_.model_name_);
    stats->set_version("1");
    stats->set_last_inference(static_cast<uint64_t>(totals.last_inference_ms));
    stats->set_inference_count(totals.inference_count);
    stats->set_execution_count(totals.execution_count);
    inference::InferStatistics* infer = stats->mutable_inference_stats();
    const auto duration = [](inference::StatisticDuration* d, uint64_t count, uint64_t us) {
      d->set_count(count);
      d->set_ns(us * 1000);
    };
    duration(infer->mutable_success(), totals.success_count, totals.success_us);
    duration(infer->mutable_fail(), totals.fail_count, totals.fail_us);
    duration(infer->mutable_queue(), totals.success_count, totals.queue_us);
    duration(infer->mutable_compute_infer(), totals.success_count, totals.compute_us);
    // Inputs are decoded before queueing and outputs encoded after the pass, in the handlers;
    // their time is in success, not split out.
    duration(infer->mutable_compute_input(), totals.success_count, 0);
    duration(infer->mutable_compute_output(), totals.success_count, 0);
    return Done(context, grpc::Status::OK);
  }

  grpc::ServerUnaryReactor* ModelInfer(grpc::CallbackServerContext* context, const grpc::ByteBuffer* wire_request,
                                       grpc::ByteBuffer* wire_response) override {
    const int64_t arrival_us = server_.clock_.NowUs();
    const int64_t deadline_us = DeadlineUs(*context, arrival_us);
    auto call = std::make_shared<DenoiseCall>(wire_response, *server_.metrics_, server_.clock_, arrival_us);
    auto* reactor = new DenoiseReactor(call, server_.scheduler_);
    call->set_reactor(reactor);
    call->infer_model_name = server_.model_name_;
    inference::ModelInferRequest parsed;
    if (absl::Status status = ParseRequest(*wire_request, parsed); !status.ok()) {
      call->Finish(ToGrpc(status));
      return reactor;
    }
    call->request_id = parsed.id();
    if (absl::Status known = Known(parsed.model_name(), parsed.model_version()); !known.ok()) {
      call->Finish(ToGrpc(known));
      return reactor;
    }
    absl::StatusOr<v1::DenoiseRequest> denoise = DenoiseRequestFromInfer(std::move(parsed));
    if (!denoise.ok()) {
      call->Finish(ToGrpc(denoise.status()));
      return reactor;
    }
    server_.service_->AdmitDenoise(*denoise, deadline_us, call);
    return reactor;
  }

 private:
  // NOT_FOUND unless `name` is our model and `version` is empty or "1".
  absl::Status Known(const std::string& name, const std::string& version) const {
    if (name != server_.model_name_) {
      return absl::NotFoundError(absl::StrCat("unknown model \"", name, "\"; this server serves \"",
                                              server_.model_name_, "\""));
    }
    if (!version.empty() && version != "1") {
      return absl::NotFoundError(absl::StrCat("model \"", name, "\" has no version \"", version, "\"; it has \"1\""));
    }
    return absl::OkStatus();
  }

  static grpc::ServerUnaryReactor* Done(grpc::CallbackServerContext* context, const grpc::Status& status) {
    grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
    reactor->Finish(status);
    return reactor;
  }

  DenoiserServer& server_;
};

// ---------------------------------------------------------------------------------------------

namespace {

// The model's name when none is given: the model directory's last part ("models/sd3/" -> "sd3").
std::string ModelName(const ServerOptions& options) {
  if (!options.model_name.empty()) return options.model_name;
  std::filesystem::path dir(options.model_dir);
  if (!dir.has_filename()) dir = dir.parent_path();  // a trailing separator
  const std::string last = dir.filename().string();
  return last.empty() || last == "." || last == ".." ? "mmdit" : last;
}

}  // namespace

DenoiserServer::DenoiserServer(const ServerOptions& options)
    : options_(options),
      model_name_(ModelName(options)),
      scheduler_(options.scheduler, clock_),
      metrics_(std::make_unique<ServerMetrics>([this] { return scheduler_.queue_size(); },
                                               [this] { return scheduler_.running_generations(); })) {}

DenoiserServer::~DenoiserServer() { Shutdown(); }

absl::StatusOr<std::unique_ptr<DenoiserServer>> DenoiserServer::Start(const ServerOptions& options) {
  std::unique_ptr<DenoiserServer> server(new DenoiserServer(options));
  ASSIGN_OR_RETURN(std::shared_ptr<grpc::ServerCredentials> credentials, Credentials(options.tls));
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  const std::string address = absl::StrCat(options.host.find(':') != std::string::npos ? "[" : "", options.host,
                                           options.host.find(':') != std::string::npos ? "]" : "", ":", options.port);
  builder.AddListeningPort(address, credentials, &server->port_);
  builder.SetMaxReceiveMessageSize(static_cast<int>(server->MaxMessageBytes()));
  builder.SetMaxSendMessageSize(static_cast<int>(server->MaxMessageBytes()));
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_TIME_MS, static_cast<int>(options.keepalive_time_s * 1000));
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_TIMEOUT_MS, 10'000);
  builder.AddChannelArgument(GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS, 10'000);
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS, 1);
  if (options.max_connection_age_s > 0) {
    builder.AddChannelArgument(GRPC_ARG_MAX_CONNECTION_AGE_MS, static_cast<int>(options.max_connection_age_s * 1000));
    builder.AddChannelArgument(GRPC_ARG_MAX_CONNECTION_AGE_GRACE_MS, static_cast<int>(options.drain_timeout_s * 1000));
  }
  std::vector<std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface>> interceptors;
  interceptors.push_back(std::make_unique<CallCounterFactory>(*server->metrics_));
  builder.experimental().SetInterceptorCreators(std::move(interceptors));
  server->service_ = std::make_unique<Service>(*server);
  builder.RegisterService(server->service_.get());
  builder.RegisterService(&server->health_);
  server->inference_ = std::make_unique<InferenceService>(*server);
  builder.RegisterService(server->inference_.get());
  // gRPC's plugin adds v1alpha at BuildAndStart; v1 is ours (see reflection_service.h).
  server->reflection_ = std::make_unique<ReflectionService>(std::vector<std::string>{
      v1::Denoiser::service_full_name(), inference::GRPCInferenceService::service_full_name(),
      grpc::health::v1::Health::service_full_name(),
      grpc::reflection::v1::ServerReflection::service_full_name(), "grpc.reflection.v1alpha.ServerReflection"});
  builder.RegisterService(server->reflection_.get());
  const std::set<int64_t> channelz_before = ChannelzServerIds();
  server->server_ = builder.BuildAndStart();
  // Ours is the one that was not there before (servers are built one at a time here).
  for (int64_t id : ChannelzServerIds()) {
    if (!channelz_before.contains(id)) server->channelz_id_ = id;
  }
  if (server->server_ == nullptr || server->port_ == 0) {
    return absl::UnavailableError(absl::StrCat("cannot listen on ", address));
  }
  if (options.metrics_port >= 0) {
    DenoiserServer* self = server.get();
    ASSIGN_OR_RETURN(server->metrics_http_,
                     HttpEndpoints::Start(options.host, options.metrics_port,
                                          {.render_metrics = [self] { return self->RenderMetrics(); },
                                           .ready = [self] { return self->health_.serving(); }}));
  }
  return server;
}

std::string DenoiserServer::RenderMetrics() const {
  std::string page = metrics_->Render(clock_.NowUs() / 1e6);
  if (channelz_id_ <= 0) return page;
  char* text = grpc_channelz_get_server(channelz_id_);
  if (text == nullptr) return page;
  const nlohmann::json server = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  std::free(text);
  if (!server.is_object() || !server.contains("server") || !server["server"].contains("data")) return page;
  const nlohmann::json& data = server["server"]["data"];
  absl::StrAppend(&page,
                  "# HELP grpc_core_server_calls_total Calls as gRPC's core counts them (channelz). started includes "
                  "calls the core refuses before any handler or interceptor sees them (a message over "
                  "--max_receive_message_mb), which are in no per-code counter.\n"
                  "# TYPE grpc_core_server_calls_total counter\n");
  for (const auto& [outcome, key] : {std::pair<const char*, const char*>{"started", "callsStarted"},
                                     {"succeeded", "callsSucceeded"}, {"failed", "callsFailed"}}) {
    int64_t count = 0;
    if (data.contains(key)) (void)absl::SimpleAtoi(data[key].get<std::string>(), &count);  // int64 as JSON text
    absl::StrAppend(&page, "grpc_core_server_calls_total{outcome=\"", outcome, "\"} ", count, "\n");
  }
  return page;
}

absl::Status DenoiserServer::Serve(std::unique_ptr<Engine> engine, const std::vector<WarmupShape>& warmup,
                                   const FlowMatchConfig& flow_match, std::unique_ptr<TextEncoder> text_encoder) {
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
  flow_match_ = flow_match;
  text_encoder_ = std::move(text_encoder);
  engine_.store(owned_engine_.get(), std::memory_order_release);
  step_thread_ = std::thread([this] { StepLoop(); });
  health_.SetServing(true);
  return absl::OkStatus();
}

void DenoiserServer::StepLoop() {
  while (std::optional<PassPlan> plan = scheduler_.WaitForPass()) {
    for (const WorkItem& item : plan->expired) {
      WorkOf(item).Fail(grpc::StatusCode::DEADLINE_EXCEEDED, "deadline passed");
    }
    for (const WorkItem& item : plan->cancelled) WorkOf(item).Fail(grpc::StatusCode::CANCELLED, "cancelled by the client");
    if (shut_down_.load()) {  // the drain timed out: answer what is left without computing
      for (const WorkItem& item : scheduler_.TakeAll()) {
        WorkOf(item).Fail(grpc::StatusCode::UNAVAILABLE, "server shut down (drain timeout)");
      }
      for (const WorkItem& item : plan->admitted) {
        if (!item.multi_step) WorkOf(item).Fail(grpc::StatusCode::UNAVAILABLE, "server shut down (drain timeout)");
      }
      continue;
    }
    if (plan->has_pass()) RunPass(*plan);
  }
  step_loop_done_.store(true);
}

void DenoiserServer::RunPass(PassPlan& plan) {
  std::vector<const WorkItem*> work;
  for (const WorkItem& item : plan.running) work.push_back(&item);
  for (const WorkItem& item : plan.admitted) work.push_back(&item);
  std::vector<SampleInput> rows;
  std::vector<size_t> first_row;  // per work item
  int64_t tokens = 0;
  for (const WorkItem* item : work) {
    first_row.push_back(rows.size());
    WorkOf(*item).AppendRows(rows);
    tokens += item->tokens;
  }
  first_row.push_back(rows.size());

  PassStats pass;
  pass.start_us = clock_.NowUs();
  absl::StatusOr<std::vector<Tensor>> outputs = engine_.load()->Forward(rows);
  pass.end_us = clock_.NowUs();
  pass.rows = static_cast<int32_t>(rows.size());
  metrics_->ObservePass(static_cast<int64_t>(rows.size()), tokens, (pass.end_us - pass.start_us) / 1e6,
                        pass.end_us / 1e6);
  spdlog::debug("pass: {} running generations, {} admitted, {} rows, compute {} us{}", plan.running.size(),
                plan.admitted.size(), rows.size(), pass.end_us - pass.start_us,
                outputs.ok() ? "" : absl::StrCat(", failed: ", outputs.status().ToString()));
  for (size_t w = 0; w < work.size(); ++w) {
    StepWork& step_work = WorkOf(*work[w]);
    bool complete = true;
    if (!outputs.ok()) {
      step_work.Fail(grpc::StatusCode::INTERNAL, absl::StrCat("forward pass failed: ", outputs.status().message()));
    } else {
      std::vector<Tensor> own(std::make_move_iterator(outputs->begin() + first_row[w]),
                              std::make_move_iterator(outputs->begin() + first_row[w + 1]));
      complete = step_work.Consume(std::move(own), pass);
    }
    if (complete && work[w]->multi_step) scheduler_.Release(work[w]->id);
  }
}

void DenoiserServer::BeginDrain() {
  health_.SetServing(false);
  scheduler_.Close();
}

void DenoiserServer::Shutdown() {
  if (shut_down_.load() || server_ == nullptr) return;
  using std::chrono::milliseconds;
  BeginDrain();
  // All of it within --drain_timeout_s: running work may use it less a margin (a tenth, at most
  // 200 ms) in which the last answers are sent. Those get at least 100 ms, so that even
  // --drain_timeout_s 0 answers UNAVAILABLE rather than cutting the calls off.
  const auto drain_timeout = std::chrono::duration_cast<milliseconds>(std::chrono::seconds(options_.drain_timeout_s));
  const auto end = std::chrono::steady_clock::now() + drain_timeout;
  const auto give_up = end - std::min(milliseconds(200), drain_timeout / 10);
  while (step_thread_.joinable() && !step_loop_done_.load() && std::chrono::steady_clock::now() < give_up) {
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  if (step_thread_.joinable() && !step_loop_done_.load()) {
    spdlog::warn("drain timeout ({} s) reached with {} requests queued and {} generations running",
                 options_.drain_timeout_s, scheduler_.queue_size(), scheduler_.running_generations());
  }
  shut_down_.store(true);
  scheduler_.Notify();
  health_.Shutdown();  // Watch streams end now, instead of holding the server's shutdown open
  const auto left = std::max(milliseconds(100), std::chrono::duration_cast<milliseconds>(
                                                    end - std::chrono::steady_clock::now()));
  server_->Shutdown(std::chrono::system_clock::now() + left);
  if (step_thread_.joinable()) step_thread_.join();
  server_->Wait();
  metrics_http_.reset();
}

}  // namespace mmdit
