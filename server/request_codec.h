// Wire tensors (mmdit.v1.Tensor) to engine inputs and back, with every check a request
// must pass before it may join a batch.
#pragma once

#include <vector>

#include "absl/status/statusor.h"
#include "core/engine.h"
#include "mmdit/v1/denoiser.pb.h"
#include "proto/tensor_codec.h"

namespace mmdit {

// What one request may hold; the server's flags.
struct RequestLimits {
  int64_t max_samples_per_request = 8;
  int64_t max_text_tokens = 512;
  int64_t max_latent_height = 0;  // latent pixels; 0: the position table's size (or no limit)
  int64_t max_latent_width = 0;
  int64_t max_image_tokens = 16384;  // per sample, after patching
};

// A request that passed every check: float32 copies of its tensors, and per-sample views
// into them (the views stay valid when a DecodedRequest is moved: vectors keep their buffers).
struct DecodedRequest {
  Tensor img_latent, txt_embed, timestep, pooled_text;
  std::vector<SampleInput> samples;
  v1::DType output_dtype = v1::FP32;  // img_latent's
  int64_t tokens = 0;                 // image + text tokens over all samples
};

// Decodes and validates `request` for `engine`. Errors: INVALID_ARGUMENT naming the field and
// what was expected: a missing or empty tensor, an unknown dtype, bytes not equal to shape x
// dtype, a rank or batch size that disagrees, NaN or Inf, more samples or text tokens than
// `limits` allow, a latent larger than allowed, or a sample that does not fit the model.
absl::StatusOr<DecodedRequest> DecodeRequest(const v1::DenoiseRequest& request, const Engine& engine,
                                             const RequestLimits& limits);

}  // namespace mmdit
