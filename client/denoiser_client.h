// The C++ client of mmdit-serve: one channel to a server (or, with a dns:/// target, to every
// replica behind a name, balanced round robin), with absl::StatusOr results whose codes are
// the gRPC status codes. Thread-safe: one client may serve many threads.
#pragma once

#include <chrono>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

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
  bool wait_for_batch = false;  // may wait up to the server's --max_queue_delay_us for company
};

struct DenoiseResult {
  Tensor prediction;  // float32, whatever dtype travelled
  int64_t queue_us = 0, compute_us = 0;
  int32_t batch_samples = 0;
};

// One image for Generate. Tensors have a leading batch of 1; an absent optional is left unset
// in the request (the server's default, GetModelInfo's SamplerDefaults).
struct GenerateInputs {
  // The conditioning: a prompt for the model's text encoder, or the embeddings (left without
  // data, they are not sent).
  std::optional<std::string> prompt;               // e.g. "a seven" (the digits model)
  std::optional<std::string> negative_prompt;      // with prompt; unset: the server's "" for CFG
  TensorView txt_embed;                            // [1, T, J]
  TensorView pooled_text;                          // [1, P]
  std::optional<TensorView> negative_txt_embed;    // [1, T', J]: needed when guidance > 1
  std::optional<TensorView> negative_pooled_text;  // [1, P]
  // [C, H, W] or [N]; may be empty when initial_noise or init_latent gives it, or for the
  // model's nominal size (image form)
  Shape latent_shape;
  int32_t steps = 0;   // 0: the server's default
  std::optional<float> guidance_scale;
  uint64_t seed = 0;
  std::optional<TensorView> initial_noise;  // [1, C, H, W] or [1, N, img_dim]
  std::optional<TensorView> init_latent;    // img2img x0, the noise's shape
  std::optional<float> strength;
  std::vector<int64_t> skip_layers;  // skip-layer guidance's blocks; empty: off
  std::optional<float> skip_layer_scale, skip_layer_start, skip_layer_stop;
  int32_t preview_every = 0;  // > 0: every k-th progress message carries the latent
  std::string request_id;
};

struct GenerateResult {
  Tensor latent;                         // float32 [1, C, H, W] or [1, N, F], whatever dtype travelled
  int32_t steps = 0;                     // steps run (the done message's total_steps)
  int64_t queue_us = 0, compute_us = 0;  // the done message's totals
  double mean_batch_samples = 0;         // rows per forward pass, averaged over the steps
  int32_t rows = 0;                      // this generation's own rows in its last step
  double first_progress_ms = 0;          // from the call until the first progress message
  double total_ms = 0;                   // from the call until the done message
};

// Converts a gRPC status (same codes).
absl::Status FromGrpc(const class grpc::Status& status);

// Builds the request Denoise sends, with tensors encoded as `dtype`.
v1::DenoiseRequest MakeDenoiseRequest(const DenoiseInputs& inputs, v1::DType dtype);

// Builds the request Generate sends: tensors encoded as `dtype`, latents asked back as `dtype`.
v1::GenerateRequest MakeGenerateRequest(const GenerateInputs& inputs, v1::DType dtype);

class DenoiserClient {
 public:
  // Errors: InvalidArgument (unreadable TLS files). Does not wait for a connection.
  static absl::StatusOr<std::unique_ptr<DenoiserClient>> Connect(const ClientOptions& options);

  // One Denoise call. Errors: the server's status (INVALID_ARGUMENT, RESOURCE_EXHAUSTED, ...).
  absl::StatusOr<DenoiseResult> Denoise(const DenoiseInputs& inputs, v1::DType dtype,
                                        std::chrono::milliseconds timeout);
  // One Generate call, read to its end; `on_progress` (if set) sees every message in order,
  // the done one included, on the calling thread. Errors: the server's status (decided before
  // the first step, or CANCELLED / DEADLINE_EXCEEDED / UNAVAILABLE later); Internal when the
  // stream ends OK without a done message or the final latent does not decode.
  absl::StatusOr<GenerateResult> Generate(const GenerateInputs& inputs, v1::DType dtype,
                                          std::chrono::milliseconds timeout,
                                          const std::function<void(const v1::GenerateProgress&)>& on_progress = {});
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
