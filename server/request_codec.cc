#include "server/request_codec.h"

#include "absl/strings/str_cat.h"
#include "core/batch.h"
#include "core/status_macros.h"

namespace mmdit {

absl::StatusOr<DecodedRequest> DecodeRequest(const v1::DenoiseRequest& request, const Engine& engine,
                                             const RequestLimits& limits) {
  // The sample count first: a request of many tiny samples must be refused before it is
  // decoded and split.
  if (request.img_latent().shape_size() > 0 && request.img_latent().shape(0) > limits.max_samples_per_request) {
    return absl::InvalidArgumentError(absl::StrCat("img_latent: batch of ", request.img_latent().shape(0),
                                                   " samples; this server takes at most ",
                                                   limits.max_samples_per_request, " per request"));
  }
  DecodedRequest decoded;
  ASSIGN_OR_RETURN(decoded.img_latent, DecodeTensor(request.img_latent(), "img_latent"));
  ASSIGN_OR_RETURN(decoded.txt_embed, DecodeTensor(request.txt_embed(), "txt_embed"));
  ASSIGN_OR_RETURN(decoded.timestep, DecodeTensor(request.timestep(), "timestep"));
  ASSIGN_OR_RETURN(decoded.pooled_text, DecodeTensor(request.pooled_text(), "pooled_text"));
  decoded.output_dtype = request.img_latent().dtype();
  ASSIGN_OR_RETURN(decoded.samples,
                   SplitBatch(decoded.img_latent, decoded.txt_embed, decoded.timestep, decoded.pooled_text));

  const int64_t batch = decoded.samples.size();
  const ModelConfig& config = engine.config();
  const int64_t table_side = config.pos_embed_max_size.value_or(0) * config.patch_size;
  const int64_t max_height = limits.max_latent_height > 0 ? limits.max_latent_height : table_side;
  const int64_t max_width = limits.max_latent_width > 0 ? limits.max_latent_width : table_side;
  for (int64_t b = 0; b < batch; ++b) {
    const SampleInput& sample = decoded.samples[b];
    if (sample.txt_embed.shape[0] > limits.max_text_tokens) {
      return absl::InvalidArgumentError(absl::StrCat("txt_embed: ", sample.txt_embed.shape[0],
                                                     " text tokens; this server takes at most ",
                                                     limits.max_text_tokens));
    }
    const Shape& img = sample.img_latent.shape;
    if (img.size() == 3 && ((max_height > 0 && img[1] > max_height) || (max_width > 0 && img[2] > max_width))) {
      return absl::InvalidArgumentError(absl::StrCat("img_latent: latent ", img[1], "x", img[2],
                                                     " exceeds this server's maximum ", max_height, "x", max_width));
    }
    if (absl::Status status = engine.ValidateSample(sample); !status.ok()) {
      return absl::InvalidArgumentError(batch == 1 ? std::string(status.message())
                                                   : absl::StrCat("sample ", b, ": ", status.message()));
    }
    const SampleTokens tokens = engine.TokensOf(sample);
    if (tokens.image_tokens > limits.max_image_tokens) {
      return absl::InvalidArgumentError(absl::StrCat("img_latent: ", tokens.image_tokens,
                                                     " image tokens per sample; this server takes at most ",
                                                     limits.max_image_tokens));
    }
    decoded.tokens += tokens.image_tokens + tokens.text_tokens;
  }
  return decoded;
}

}  // namespace mmdit
