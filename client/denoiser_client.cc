#include "client/denoiser_client.h"

#include <grpcpp/grpcpp.h>

#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "core/status_macros.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "proto/tensor_codec.h"

namespace mmdit {
namespace {

absl::StatusOr<std::string> ReadFile(const std::string& path) {
  std::ifstream file(path);
  if (!file) return absl::InvalidArgumentError(absl::StrCat("cannot read ", path));
  std::stringstream text;
  text << file.rdbuf();
  return text.str();
}

void SetTimeout(grpc::ClientContext& context, std::chrono::milliseconds timeout) {
  context.set_deadline(std::chrono::system_clock::now() + timeout);
}

}  // namespace

absl::Status FromGrpc(const grpc::Status& status) {
  return absl::Status(static_cast<absl::StatusCode>(status.error_code()), status.error_message());
}

v1::DenoiseRequest MakeDenoiseRequest(const DenoiseInputs& inputs, v1::DType dtype) {
  v1::DenoiseRequest request;
  EncodeTensor(inputs.img_latent, dtype, request.mutable_img_latent());
  EncodeTensor(inputs.txt_embed, dtype, request.mutable_txt_embed());
  EncodeTensor(inputs.timestep, v1::FP32, request.mutable_timestep());  // timesteps reach 999: keep them exact
  EncodeTensor(inputs.pooled_text, dtype, request.mutable_pooled_text());
  request.set_request_id(inputs.request_id);
  request.set_wait_for_batch(inputs.wait_for_batch);
  return request;
}

v1::GenerateRequest MakeGenerateRequest(const GenerateInputs& inputs, v1::DType dtype) {
  v1::GenerateRequest request;
  if (inputs.prompt) request.set_prompt(*inputs.prompt);
  if (inputs.negative_prompt) request.set_negative_prompt(*inputs.negative_prompt);
  if (inputs.txt_embed.data != nullptr) EncodeTensor(inputs.txt_embed, dtype, request.mutable_txt_embed());
  if (inputs.pooled_text.data != nullptr) EncodeTensor(inputs.pooled_text, dtype, request.mutable_pooled_text());
  if (inputs.negative_txt_embed) EncodeTensor(*inputs.negative_txt_embed, dtype, request.mutable_negative_txt_embed());
  if (inputs.negative_pooled_text) {
    EncodeTensor(*inputs.negative_pooled_text, dtype, request.mutable_negative_pooled_text());
  }
  for (int64_t d : inputs.latent_shape) request.add_latent_shape(d);
  request.set_steps(inputs.steps);
  if (inputs.guidance_scale) request.set_guidance_scale(*inputs.guidance_scale);
  request.set_seed(inputs.seed);
  if (inputs.initial_noise) EncodeTensor(*inputs.initial_noise, dtype, request.mutable_initial_noise());
  if (inputs.init_latent) EncodeTensor(*inputs.init_latent, dtype, request.mutable_init_latent());
  if (inputs.strength) request.set_strength(*inputs.strength);
  if (!inputs.skip_layers.empty() || inputs.skip_layer_scale || inputs.skip_layer_start || inputs.skip_layer_stop) {
    v1::SkipLayerGuidance& slg = *request.mutable_skip_layer_guidance();
    for (int64_t layer : inputs.skip_layers) slg.add_layers(layer);
    if (inputs.skip_layer_scale) slg.set_scale(*inputs.skip_layer_scale);
    if (inputs.skip_layer_start) slg.set_start(*inputs.skip_layer_start);
    if (inputs.skip_layer_stop) slg.set_stop(*inputs.skip_layer_stop);
  }
  request.set_preview_every(inputs.preview_every);
  request.set_output_dtype(dtype);
  request.set_request_id(inputs.request_id);
  return request;
}

absl::StatusOr<std::unique_ptr<DenoiserClient>> DenoiserClient::Connect(const ClientOptions& options) {
  std::shared_ptr<grpc::ChannelCredentials> credentials = grpc::InsecureChannelCredentials();
  grpc::ChannelArguments arguments;
  if (!options.tls_ca_file.empty()) {
    grpc::SslCredentialsOptions ssl;
    ASSIGN_OR_RETURN(ssl.pem_root_certs, ReadFile(options.tls_ca_file));
    if (!options.tls_cert_file.empty()) {
      ASSIGN_OR_RETURN(ssl.pem_cert_chain, ReadFile(options.tls_cert_file));
      ASSIGN_OR_RETURN(ssl.pem_private_key, ReadFile(options.tls_key_file));
    }
    credentials = grpc::SslCredentials(ssl);
    if (!options.tls_server_name.empty()) arguments.SetSslTargetNameOverride(options.tls_server_name);
  } else if (!options.tls_cert_file.empty()) {
    return absl::InvalidArgumentError("a client certificate needs --tls_ca (the CA that signed the server's)");
  }
  const int max_bytes = static_cast<int>(std::min<int64_t>(options.max_message_mb << 20, INT32_MAX));
  arguments.SetMaxReceiveMessageSize(max_bytes);
  arguments.SetMaxSendMessageSize(max_bytes);
  if (options.round_robin) arguments.SetLoadBalancingPolicyName("round_robin");
  return std::unique_ptr<DenoiserClient>(
      new DenoiserClient(grpc::CreateCustomChannel(options.target, credentials, arguments)));
}

DenoiserClient::DenoiserClient(std::shared_ptr<grpc::Channel> channel)
    : channel_(std::move(channel)), stub_(v1::Denoiser::NewStub(channel_)) {}

absl::StatusOr<DenoiseResult> DenoiserClient::Denoise(const DenoiseInputs& inputs, v1::DType dtype,
                                                      std::chrono::milliseconds timeout) {
  const v1::DenoiseRequest request = MakeDenoiseRequest(inputs, dtype);
  v1::DenoiseResponse response;
  grpc::ClientContext context;
  SetTimeout(context, timeout);
  RETURN_IF_ERROR(FromGrpc(stub_->Denoise(&context, request, &response)));
  DenoiseResult result;
  ASSIGN_OR_RETURN(result.prediction, DecodeTensor(response.prediction(), "prediction"));
  result.queue_us = response.queue_us();
  result.compute_us = response.compute_us();
  result.batch_samples = response.batch_samples();
  return result;
}

absl::StatusOr<GenerateResult> DenoiserClient::Generate(
    const GenerateInputs& inputs, v1::DType dtype, std::chrono::milliseconds timeout,
    const std::function<void(const v1::GenerateProgress&)>& on_progress) {
  using Clock = std::chrono::steady_clock;
  const v1::GenerateRequest request = MakeGenerateRequest(inputs, dtype);
  grpc::ClientContext context;
  SetTimeout(context, timeout);
  const Clock::time_point start = Clock::now();
  std::unique_ptr<grpc::ClientReader<v1::GenerateProgress>> reader = stub_->Generate(&context, request);
  GenerateResult result;
  v1::GenerateProgress progress;
  int64_t messages = 0, batch_samples_sum = 0;
  bool done = false;
  absl::Status decoded;
  while (reader->Read(&progress)) {
    const double ms = std::chrono::duration<double, std::milli>(Clock::now() - start).count();
    if (messages++ == 0) result.first_progress_ms = ms;
    batch_samples_sum += progress.batch_samples();
    if (on_progress) on_progress(progress);
    if (progress.done() && !done) {
      done = true;
      result.total_ms = ms;
      result.steps = progress.total_steps();
      result.queue_us = progress.queue_us();
      result.compute_us = progress.compute_us();
      result.rows = progress.rows();
      absl::StatusOr<Tensor> latent = DecodeTensor(progress.latent(), "latent");
      if (latent.ok()) {
        result.latent = std::move(*latent);
      } else {
        decoded = absl::InternalError(absl::StrCat("the final latent: ", latent.status().message()));
      }
    }
  }
  RETURN_IF_ERROR(FromGrpc(reader->Finish()));
  if (!done) {
    return absl::InternalError(
        absl::StrCat("Generate ended without a done message after ", messages, " progress messages"));
  }
  RETURN_IF_ERROR(decoded);
  result.mean_batch_samples = static_cast<double>(batch_samples_sum) / messages;
  return result;
}

absl::StatusOr<v1::GetModelInfoResponse> DenoiserClient::GetModelInfo(std::chrono::milliseconds timeout) {
  v1::GetModelInfoResponse response;
  grpc::ClientContext context;
  SetTimeout(context, timeout);
  RETURN_IF_ERROR(FromGrpc(stub_->GetModelInfo(&context, v1::GetModelInfoRequest(), &response)));
  return response;
}

absl::StatusOr<bool> DenoiserClient::IsServing(std::chrono::milliseconds timeout) {
  auto health = grpc::health::v1::Health::NewStub(channel_);
  grpc::health::v1::HealthCheckResponse response;
  grpc::ClientContext context;
  SetTimeout(context, timeout);
  RETURN_IF_ERROR(FromGrpc(health->Check(&context, grpc::health::v1::HealthCheckRequest(), &response)));
  return response.status() == grpc::health::v1::HealthCheckResponse::SERVING;
}

}  // namespace mmdit
