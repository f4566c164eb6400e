#include "server/request_codec.h"

#include <cmath>

#include "absl/strings/str_cat.h"
#include "core/batch.h"
#include "core/status_macros.h"

namespace mmdit {
namespace {

// The server's limits and the model's shapes for one sample; its tokens when it passes.
absl::StatusOr<SampleTokens> CheckSample(const SampleInput& sample, const Engine& engine, const RequestLimits& limits) {
  const ModelConfig& config = engine.config();
  const int64_t table_side = config.pos_embed_max_size.value_or(0) * config.patch_size;
  const int64_t max_height = limits.max_latent_height > 0 ? limits.max_latent_height : table_side;
  const int64_t max_width = limits.max_latent_width > 0 ? limits.max_latent_width : table_side;
  if (sample.txt_embed.shape.size() == 2 && sample.txt_embed.shape[0] > limits.max_text_tokens) {
    return absl::InvalidArgumentError(absl::StrCat("txt_embed: ", sample.txt_embed.shape[0],
                                                   " text tokens; this server takes at most ", limits.max_text_tokens));
  }
  const Shape& img = sample.img_latent.shape;
  if (img.size() == 3 && ((max_height > 0 && img[1] > max_height) || (max_width > 0 && img[2] > max_width))) {
    return absl::InvalidArgumentError(absl::StrCat("img_latent: latent ", img[1], "x", img[2],
                                                   " exceeds this server's maximum ", max_height, "x", max_width));
  }
  RETURN_IF_ERROR(engine.ValidateSample(sample));
  const SampleTokens tokens = engine.TokensOf(sample);
  if (tokens.image_tokens > limits.max_image_tokens) {
    return absl::InvalidArgumentError(absl::StrCat("img_latent: ", tokens.image_tokens,
                                                   " image tokens per sample; this server takes at most ",
                                                   limits.max_image_tokens));
  }
  return tokens;
}

// A [1, ...] wire tensor as its one sample. Errors: INVALID_ARGUMENT naming `field`.
absl::StatusOr<Tensor> DecodeSingle(const v1::Tensor& wire, const std::string& field, const char* layout) {
  ASSIGN_OR_RETURN(Tensor tensor, DecodeTensor(wire, field));
  if (tensor.shape.size() < 2 || tensor.shape[0] != 1) {
    return absl::InvalidArgumentError(absl::StrCat(field, ": expected ", layout, " (a batch of 1), got ",
                                                   ShapeString(tensor.shape)));
  }
  tensor.shape.erase(tensor.shape.begin());
  return tensor;
}

absl::Status RenameField(const absl::Status& status, const std::string& from, const std::string& to) {
  std::string message(status.message());
  if (message.rfind(from, 0) == 0) message = to + message.substr(from.size());
  return absl::Status(status.code(), message);
}

// Generate's conditioning as embeddings: txt_embed and pooled_text, and the negative pair for CFG.
absl::Status DecodeEmbeddings(const v1::GenerateRequest& request, bool cfg, float guidance_scale,
                              DecodedGenerate& decoded) {
  ASSIGN_OR_RETURN(decoded.txt_embed, DecodeSingle(request.txt_embed(), "txt_embed", "[1, T, J]"));
  ASSIGN_OR_RETURN(decoded.pooled_text, DecodeSingle(request.pooled_text(), "pooled_text", "[1, P]"));
  if (cfg) {
    if (!request.has_negative_txt_embed() || !request.has_negative_pooled_text()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "negative_txt_embed and negative_pooled_text: required with guidance_scale ", guidance_scale,
          " > 1 (classifier-free guidance); send the empty prompt's embeddings, or guidance_scale <= 1"));
    }
    ASSIGN_OR_RETURN(decoded.negative_txt_embed,
                     DecodeSingle(request.negative_txt_embed(), "negative_txt_embed", "[1, T, J]"));
    ASSIGN_OR_RETURN(decoded.negative_pooled_text,
                     DecodeSingle(request.negative_pooled_text(), "negative_pooled_text", "[1, P]"));
  }

  return absl::OkStatus();
}

// Generate's conditioning as text, through the model's encoder.
absl::Status EncodePrompts(const v1::GenerateRequest& request, const TextEncoder* text_encoder, bool cfg,
                           DecodedGenerate& decoded) {
  const char* field = request.has_prompt() ? "prompt" : "negative_prompt";
  if (text_encoder == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat(
        field, ": this model has no text encoder (no text_encoder/ in its directory); send txt_embed and pooled_text"));
  }
  if (!request.has_prompt()) return absl::InvalidArgumentError("negative_prompt: only with prompt");
  for (const auto& [given, name] : {std::pair{request.has_txt_embed(), "txt_embed"},
                                    std::pair{request.has_pooled_text(), "pooled_text"},
                                    std::pair{request.has_negative_txt_embed(), "negative_txt_embed"},
                                    std::pair{request.has_negative_pooled_text(), "negative_pooled_text"}}) {
    if (given) return absl::InvalidArgumentError(absl::StrCat(name, ": send either prompt or embeddings, not both"));
  }
  absl::StatusOr<EncodedPrompt> positive = text_encoder->Encode(request.prompt());
  if (!positive.ok()) return absl::InvalidArgumentError(absl::StrCat("prompt: ", positive.status().message()));
  decoded.txt_embed = std::move(positive->txt_embed);
  decoded.pooled_text = std::move(positive->pooled_text);
  if (!cfg) return absl::OkStatus();
  absl::StatusOr<EncodedPrompt> negative = text_encoder->Encode(request.negative_prompt());  // unset: ""
  if (!negative.ok()) return absl::InvalidArgumentError(absl::StrCat("negative_prompt: ", negative.status().message()));
  decoded.negative_txt_embed = std::move(negative->txt_embed);
  decoded.negative_pooled_text = std::move(negative->pooled_text);
  return absl::OkStatus();
}

}  // namespace

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
  for (int64_t b = 0; b < batch; ++b) {
    const absl::StatusOr<SampleTokens> tokens = CheckSample(decoded.samples[b], engine, limits);
    if (!tokens.ok()) {
      return absl::InvalidArgumentError(batch == 1 ? std::string(tokens.status().message())
                                                   : absl::StrCat("sample ", b, ": ", tokens.status().message()));
    }
    decoded.tokens += tokens->image_tokens + tokens->text_tokens;
  }
  return decoded;
}

absl::StatusOr<DecodedGenerate> DecodeGenerateRequest(const v1::GenerateRequest& request, const Engine& engine,
                                                      const TextEncoder* text_encoder, const RequestLimits& limits,
                                                      const FlowMatchConfig& flow_match) {
  const ModelConfig& config = engine.config();
  DecodedGenerate decoded;
  GenerationOptions options;
  if (request.steps() < 0 || request.steps() > limits.max_steps) {
    return absl::InvalidArgumentError(
        absl::StrCat("steps: ", request.steps(), " outside 1..", limits.max_steps, " (0: the default 28)"));
  }
  if (request.steps() > 0) options.steps = request.steps();
  if (request.has_guidance_scale()) {
    if (!std::isfinite(request.guidance_scale()) || request.guidance_scale() < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("guidance_scale: must be finite and >= 0, got ", request.guidance_scale()));
    }
    options.guidance_scale = request.guidance_scale();
  }
  const bool cfg = options.guidance_scale > 1.0f;
  if (request.preview_every() < 0) {
    return absl::InvalidArgumentError(absl::StrCat("preview_every: must be >= 0, got ", request.preview_every()));
  }
  decoded.preview_every = request.preview_every();
  switch (request.output_dtype()) {
    case v1::DTYPE_UNSPECIFIED: decoded.output_dtype = v1::FP32; break;
    case v1::FP32: case v1::FP16: case v1::BF16: decoded.output_dtype = request.output_dtype(); break;
    default:
      return absl::InvalidArgumentError(
          absl::StrCat("output_dtype: unknown dtype ", static_cast<int>(request.output_dtype())));
  }

  // The conditioning: the prompt, and the negative prompt for CFG (ignored without it, as in
  // diffusers); as text for the model's encoder, or as embeddings.
  if (request.has_prompt() || request.has_negative_prompt()) {
    RETURN_IF_ERROR(EncodePrompts(request, text_encoder, cfg, decoded));
  } else {
    RETURN_IF_ERROR(DecodeEmbeddings(request, cfg, options.guidance_scale, decoded));
  }

  // The latent's shape: latent_shape, initial_noise or init_latent, which must agree.
  std::optional<Tensor> noise, init_latent;
  if (request.has_initial_noise()) {
    ASSIGN_OR_RETURN(noise, DecodeSingle(request.initial_noise(), "initial_noise", "[1, C, H, W] or [1, N, img_dim]"));
  }
  if (request.has_init_latent()) {
    ASSIGN_OR_RETURN(init_latent,
                     DecodeSingle(request.init_latent(), "init_latent", "[1, C, H, W] or [1, N, img_dim]"));
  }
  Shape latent_shape(request.latent_shape().begin(), request.latent_shape().end());
  if (latent_shape.size() == 1) latent_shape.push_back(config.patch_features());  // [N] tokens
  if (!latent_shape.empty() && latent_shape.size() != 3 && latent_shape.size() != 2) {
    return absl::InvalidArgumentError(absl::StrCat("latent_shape: expected [C, H, W] or [N], got ",
                                                   ShapeString(latent_shape)));
  }
  for (const auto& [given, name] : {std::pair{&noise, "initial_noise"}, std::pair{&init_latent, "init_latent"}}) {
    if (!given->has_value()) continue;
    if (latent_shape.empty()) latent_shape = (*given)->shape;
    if ((*given)->shape != latent_shape) {
      return absl::InvalidArgumentError(absl::StrCat(name, ": per-sample shape ", ShapeString((*given)->shape),
                                                     " differs from the latent's ", ShapeString(latent_shape)));
    }
  }
  if (latent_shape.empty() && config.has_positions() && config.sample_size > 0) {
    latent_shape = {config.in_channels, config.sample_size, config.sample_size};  // the model's nominal size
  }
  if (latent_shape.empty()) {
    return absl::InvalidArgumentError("latent_shape: required ([C, H, W] or [N]) unless initial_noise or init_latent "
                                      "gives the shape (image-form models with a sample_size default to it)");
  }
  for (int64_t dim : latent_shape) {
    if (dim < 1 || dim > (int64_t{1} << 20)) {
      return absl::InvalidArgumentError(absl::StrCat("latent_shape: dimensions must be 1..2^20, got ",
                                                     ShapeString(latent_shape)));
    }
  }
  if (request.has_strength() && !init_latent) {
    return absl::InvalidArgumentError("strength: only with init_latent (img2img)");
  }
  options.strength = request.has_strength() ? request.strength() : (init_latent ? 0.6f : 1.0f);

  const v1::SkipLayerGuidance& slg = request.skip_layer_guidance();
  options.skip_layer_guidance.layers.assign(slg.layers().begin(), slg.layers().end());
  if (slg.has_scale()) options.skip_layer_guidance.scale = slg.scale();
  if (slg.has_start()) options.skip_layer_guidance.start = slg.start();
  if (slg.has_stop()) options.skip_layer_guidance.stop = slg.stop();
  for (int64_t layer : options.skip_layer_guidance.layers) {
    if (layer < 0 || layer >= config.num_layers) {
      return absl::InvalidArgumentError(absl::StrCat("skip_layer_guidance.layers: layer ", layer, " outside [0, ",
                                                     config.num_layers, ")"));
    }
  }

  // Every row the generation will send through the model, checked as a Denoise sample is.
  const TensorView shape_only(latent_shape, nullptr);  // the checks read shapes only; nothing allocated yet
  int64_t rows = 0, tokens = 0;
  const struct {
    const TextCondition text;
    const char* txt_field;
    const char* pooled_field;
    bool used;
  } row_kinds[] = {
      {decoded.Positive(), "txt_embed", "pooled_text", true},
      {decoded.Negative(), "negative_txt_embed", "negative_pooled_text", cfg},
      {decoded.Positive(), "txt_embed", "pooled_text", cfg && !options.skip_layer_guidance.layers.empty()},
  };
  for (const auto& row : row_kinds) {
    if (!row.used) continue;
    const SampleInput sample{shape_only, row.text.txt_embed, 1000.0f, row.text.pooled_text, {}};
    absl::StatusOr<SampleTokens> sample_tokens = CheckSample(sample, engine, limits);
    if (!sample_tokens.ok()) {
      absl::Status status = sample_tokens.status();
      status = RenameField(status, "txt_embed", row.txt_field);
      status = RenameField(status, "pooled_text", row.pooled_field);
      // The latent is not a tensor of the request: name the field that gave its shape.
      status = RenameField(status, "img_latent", request.has_initial_noise() ? "initial_noise"
                                                 : request.has_init_latent() ? "init_latent"
                                                                             : "latent_shape");
      return status;
    }
    ++rows;
    tokens += sample_tokens->image_tokens + sample_tokens->text_tokens;
  }
  decoded.max_rows = rows;
  decoded.max_tokens = tokens;

  Tensor start = noise ? *std::move(noise) : GaussianNoise(latent_shape, request.seed());
  ASSIGN_OR_RETURN(FlowMatchSampler sampler, FlowMatchSampler::Create(flow_match, options, std::move(start),
                                                                       init_latent ? &*init_latent : nullptr));
  decoded.sampler.emplace(std::move(sampler));
  return decoded;
}

absl::Status CheckAnswer(absl::Span<const Tensor> answer, v1::DType dtype,
                         const std::vector<std::vector<NamedInput>>& inputs, absl::string_view what) {
  for (size_t b = 0; b < answer.size(); ++b) {
    const std::optional<int64_t> at = FirstUnencodable(answer[b], dtype);
    if (!at) continue;
    const std::string sample = answer.size() == 1 ? std::string(what) : absl::StrCat(what, " of sample ", b);
    const float value = answer[b].data[*at];
    if (std::isfinite(value)) {  // finite in float32, not in the 16-bit dtype asked for
      return absl::InvalidArgumentError(absl::StrCat(sample, " holds ", value, ", beyond ", v1::DType_Name(dtype),
                                                     "'s range; ask for FP32 or BF16 output"));
    }
    // Which input is the likely cause: the one of largest magnitude (all are finite: decoding
    // refused NaN and Inf).
    absl::string_view largest = "none";
    float largest_magnitude = -1.0f;
    for (const NamedInput& input : inputs.at(b)) {
      for (int64_t i = 0; i < input.values.NumElements(); ++i) {
        if (std::fabs(input.values.data[i]) > largest_magnitude) {
          largest_magnitude = std::fabs(input.values.data[i]);
          largest = input.field;
        }
      }
    }
    return absl::InvalidArgumentError(absl::StrCat(
        sample, " is not finite (", value, " at element ", *at,
        "): finite inputs overflowed float32 inside the model; the input of largest magnitude is ", largest,
        " (|value| up to ", largest_magnitude, ")"));
  }
  return absl::OkStatus();
}

}  // namespace mmdit
