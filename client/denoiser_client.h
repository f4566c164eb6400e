// The C++ client of mmdit-serve: one channel to a server (or, with a dns:/// target, to every
// replica behind a name, balanced round robin), with absl::StatusOr results whose codes are
// the gRPC status codes. Thread-safe: one client may serve many threads.
#pragma once

#include <chrono>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "core/tensor.h"
#include "mmdit/v1/denoiser.grpc.pb.h"

namespace grpc {
class Channel;
}

namespace mmdit {

struct ClientOptions {
  std::string target;                       // "host:port", or "dns:///name:port" for every replica
  std::string tls_ca_file;                  // non-empty: TLS, trusting servers this CA signed
  std::string tls_cert_file, tls_key_file;  // this client's certificate, for mutual TLS
  std::string tls_server_name;              // the name to verify the server's certificate against, if not the target's
  int64_t max_message_mb = 64;
  bool round_robin = true;  // balance calls over every address the target resolves to
};

struct DenoiseInputs {
  TensorView img_latent, txt_embed, timestep, pooled_text;  // batched, as in the request
  std::string request_id;
};

struct DenoiseResult {
  Tensor prediction;  // float32, whatever dtype travelled
  int64_t queue_us = 0, compute_us = 0;
  int32_t batch_samples = 0;
};

// Converts a gRPC status (same codes).
absl::Status FromGrpc(const class grpc::Status& status);

// Builds the request Denoise sends, with tensors encoded as `dtype`.
v1::DenoiseRequest MakeDenoiseRequest(const DenoiseInputs& inputs, v1::DType dtype);

class DenoiserClient {
 public:
  // Errors: InvalidArgument (unreadable TLS files). Does not wait for a connection.
  static absl::StatusOr<std::unique_ptr<DenoiserClient>> Connect(const ClientOptions& options);

  // One Denoise call. Errors: the server's status (INVALID_ARGUMENT, RESOURCE_EXHAUSTED, ...).
  absl::StatusOr<DenoiseResult> Denoise(const DenoiseInputs& inputs, v1::DType dtype,
                                        std::chrono::milliseconds timeout);
  absl::StatusOr<v1::GetModelInfoResponse> GetModelInfo(std::chrono::milliseconds timeout);
  // The health service's answer for the whole server: true only for SERVING.
  absl::StatusOr<bool> IsServing(std::chrono::milliseconds timeout);

  v1::Denoiser::Stub& stub() { return *stub_; }  // for asynchronous callers (the load generator)

 private:
  explicit DenoiserClient(std::shared_ptr<grpc::Channel> channel);
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::Denoiser::Stub> stub_;
};

}  // namespace mmdit
