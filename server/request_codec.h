// Wire tensors (mmdit.v1.Tensor) to engine inputs and back, with every check a request
// must pass before it may join a batch.
#pragma once

#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

#include "core/engine.h"
#include "core/sampler.h"
#include "core/text_encoder.h"
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
  int64_t max_steps = 1000;          // per Generate
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

// A Generate request that passed every check: its conditioning (per sample, without the
// batch dimension), its sampler at the first step, and what one of its passes needs at most.
struct DecodedGenerate {
  Tensor txt_embed, pooled_text;                    // [T, J], [P]
  Tensor negative_txt_embed, negative_pooled_text;  // empty without CFG
  std::optional<FlowMatchSampler> sampler;
  int64_t preview_every = 0;
  v1::DType output_dtype = v1::FP32;
  int64_t max_rows = 1;    // per step: 1, 2 with CFG, 3 with skip-layer guidance
  int64_t max_tokens = 0;  // per step, over those rows
  TextCondition Positive() const { return {txt_embed, pooled_text}; }
  TextCondition Negative() const { return {negative_txt_embed, negative_pooled_text}; }
};

// Decodes and validates `request` for `engine` (the same checks as Denoise's for every tensor
// and the latent, plus the sampler's options). Errors: INVALID_ARGUMENT naming the field.
// `text_encoder` (nullptr: the model has none) encodes `prompt` and `negative_prompt`.
absl::StatusOr<DecodedGenerate> DecodeGenerateRequest(const v1::GenerateRequest& request, const Engine& engine,
                                                      const TextEncoder* text_encoder, const RequestLimits& limits,
                                                      const FlowMatchConfig& flow_match);

// One input of a request by its field name, for naming the likely cause of an overflow.
struct NamedInput {
  absl::string_view field;  // a literal: building the list allocates nothing per step
  TensorView values;
};

// Checks values about to be answered (`what`: "prediction" or "latent"; one tensor per sample,
// with that sample's inputs in `inputs`)
// before they are encoded as `dtype`: no response carries NaN or Inf. Finite inputs can still
// overflow float32 inside the model (a pooled_text of 3e19 does); such a request is refused
// rather than answered OK with NaN. Errors: INVALID_ARGUMENT naming the sample, the value, and
// the input of largest magnitude (the likely cause), or the dtype whose range it exceeds.
absl::Status CheckAnswer(absl::Span<const Tensor> answer, v1::DType dtype,
                         const std::vector<std::vector<NamedInput>>& inputs, absl::string_view what);

}  // namespace mmdit
