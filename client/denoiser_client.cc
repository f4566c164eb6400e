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
