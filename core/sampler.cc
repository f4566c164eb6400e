#include "core/sampler.h"

#include <charconv>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>

#include "absl/strings/str_cat.h"
#include "core/status_macros.h"
#include "nlohmann/json.hpp"

namespace mmdit {
namespace {

using json = nlohmann::json;

constexpr double kPi = 3.14159265358979323846;

template <typename Real>
Real Shift(Real shift, Real sigma) {
  return shift * sigma / (Real(1) + (shift - Real(1)) * sigma);
}

// SplitMix64: a full-period 64-bit generator whose output is fixed by its published
// definition, so that a seed gives the same noise everywhere.
uint64_t SplitMix64(uint64_t& state) {
  uint64_t z = (state += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// Uniform in (0, 1]: 53 random bits, never 0 (Box-Muller takes its logarithm).
double UniformOpenZero(uint64_t& state) { return static_cast<double>((SplitMix64(state) >> 11) + 1) * 0x1.0p-53; }

// `value` as the shortest decimal that rounds back to it, read as a double (0.6f -> 0.6).
double ShortestDecimal(float value) {
  char text[64];
  const std::to_chars_result written = std::to_chars(text, text + sizeof(text), value);
  *written.ptr = '\0';
  return std::strtod(text, nullptr);
}

}  // namespace

absl::StatusOr<FlowMatchConfig> LoadFlowMatchConfig(const std::string& model_dir) {
  FlowMatchConfig config;
  const std::filesystem::path path = std::filesystem::path(model_dir) / "scheduler_config.json";
  if (!std::filesystem::exists(path)) return config;
  std::ifstream file(path);
  const json j = json::parse(file, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(path.string(), ": not a JSON object"));
  }
  if (j.contains("shift")) {
    if (!j["shift"].is_number() || !(j["shift"].get<double>() > 0) || !std::isfinite(j["shift"].get<double>())) {
      return absl::InvalidArgumentError(absl::StrCat(path.string(), ": \"shift\" must be a number > 0"));
    }
    config.shift = j["shift"].get<double>();
  }
  if (j.contains("num_train_timesteps")) {
    if (!j["num_train_timesteps"].is_number_integer() || j["num_train_timesteps"].get<int64_t>() < 2) {
      return absl::InvalidArgumentError(
          absl::StrCat(path.string(), ": \"num_train_timesteps\" must be an integer >= 2"));
    }
    config.num_train_timesteps = j["num_train_timesteps"].get<int64_t>();
  }
  return config;
}

std::vector<float> SigmaSchedule(const FlowMatchConfig& config, int64_t steps) {
  // The training table, in float32 as diffusers builds it: t = T..1, s = t / T, shifted.
  const float t_count = static_cast<float>(config.num_train_timesteps);
  const float shift32 = static_cast<float>(config.shift);
  const float sigma_max = Shift(shift32, t_count / t_count);
  const float sigma_min = Shift(shift32, 1.0f / t_count);
  // set_timesteps: numpy linspace in float64 between them on the timestep scale, shifted again.
  const double from = static_cast<double>(sigma_max) * config.num_train_timesteps;
  const double to = static_cast<double>(sigma_min) * config.num_train_timesteps;
  std::vector<float> sigmas;
  sigmas.reserve(steps + 1);
  for (int64_t i = 0; i < steps; ++i) {
    // numpy's linspace: from + i * step, with the last value exactly `to`.
    const double timestep = i == steps - 1 && steps > 1 ? to : from + i * ((to - from) / std::max<int64_t>(steps - 1, 1));
    sigmas.push_back(static_cast<float>(Shift(config.shift, timestep / config.num_train_timesteps)));
  }
  sigmas.push_back(0.0f);
  return sigmas;
}

Tensor GaussianNoise(const Shape& shape, uint64_t seed) {
  Tensor noise(shape);
  uint64_t state = seed;
  std::vector<float>& x = noise.data;
  for (size_t i = 0; i < x.size(); i += 2) {
    const double radius = std::sqrt(-2.0 * std::log(UniformOpenZero(state)));
    const double angle = 2.0 * kPi * UniformOpenZero(state);
    x[i] = static_cast<float>(radius * std::cos(angle));
    if (i + 1 < x.size()) x[i + 1] = static_cast<float>(radius * std::sin(angle));
  }
  return noise;
}

FlowMatchSampler::FlowMatchSampler(const GenerationOptions& options, std::vector<float> sigmas, int64_t start_index,
                                   Tensor latent)
    : options_(options),
      sigmas_(std::move(sigmas)),
      start_index_(start_index),
      index_(start_index),
      latent_(std::move(latent)) {}

absl::StatusOr<FlowMatchSampler> FlowMatchSampler::Create(const FlowMatchConfig& config,
                                                          const GenerationOptions& options, Tensor noise,
                                                          const Tensor* init_latent) {
  if (options.steps < 1) return absl::InvalidArgumentError(absl::StrCat("steps: must be >= 1, got ", options.steps));
  if (!std::isfinite(options.guidance_scale)) {
    return absl::InvalidArgumentError("guidance_scale: must be finite");
  }
  const SkipLayerGuidanceOptions& slg = options.skip_layer_guidance;
  if (!slg.layers.empty()) {
    if (options.guidance_scale <= 1.0f) {
      return absl::InvalidArgumentError(
          "skip_layer_guidance: needs classifier-free guidance (guidance_scale > 1), as in diffusers");
    }
    if (!std::isfinite(slg.scale)) return absl::InvalidArgumentError("skip_layer_guidance.scale: must be finite");
    if (!(slg.start >= 0 && slg.start <= slg.stop && slg.stop <= 1)) {
      return absl::InvalidArgumentError(absl::StrCat("skip_layer_guidance: expected 0 <= start <= stop <= 1, got ",
                                                     slg.start, " and ", slg.stop));
    }
  }
  int64_t start_index = 0;
  if (init_latent != nullptr) {
    if (!(options.strength > 0.0f && options.strength <= 1.0f)) {
      return absl::InvalidArgumentError(absl::StrCat("strength: must be in (0, 1], got ", options.strength));
    }
    if (init_latent->shape != noise.shape) {
      return absl::InvalidArgumentError(absl::StrCat("init_latent: shape ", ShapeString(init_latent->shape),
                                                     " differs from the latent's ", ShapeString(noise.shape)));
    }
    // StableDiffusion3Img2ImgPipeline.get_timesteps, on the strength the caller wrote: diffusers
    // multiplies a Python float (0.6), where ours came as float32 (0.6000000238, which would
    // start one step early at 10 steps). The shortest decimal that round-trips recovers it.
    const double strength = ShortestDecimal(options.strength);
    const double init_steps = std::min<double>(options.steps * strength, options.steps);
    start_index = static_cast<int64_t>(std::max<double>(options.steps - init_steps, 0));
    if (start_index >= options.steps) {
      return absl::InvalidArgumentError(
          absl::StrCat("strength: ", options.strength, " leaves no step of ", options.steps));
    }
  }
  std::vector<float> sigmas = SigmaSchedule(config, options.steps);
  Tensor latent = std::move(noise);
  if (init_latent != nullptr) {
    // FlowMatchEulerDiscreteScheduler.scale_noise: x = sigma * noise + (1 - sigma) * x0.
    const float sigma = sigmas[start_index];
    for (size_t i = 0; i < latent.data.size(); ++i) {
      latent.data[i] = sigma * latent.data[i] + (1.0f - sigma) * init_latent->data[i];
    }
  }
  FlowMatchSampler sampler(options, std::move(sigmas), start_index, std::move(latent));
  sampler.num_train_timesteps_ = static_cast<float>(config.num_train_timesteps);
  return sampler;
}

float FlowMatchSampler::timestep() const { return sigmas_[index_] * num_train_timesteps_; }

bool FlowMatchSampler::SkipLayersActive() const {
  // StableDiffusion3Pipeline: i > steps * start and i < steps * stop.
  const SkipLayerGuidanceOptions& slg = options_.skip_layer_guidance;
  const double steps = static_cast<double>(options_.steps);
  return !slg.layers.empty() && index_ > steps * slg.start && index_ < steps * slg.stop;
}

std::vector<RowRole> FlowMatchSampler::Rows() const {
  if (done()) return {};
  std::vector<RowRole> rows;
  if (options_.guidance_scale > 1.0f) rows.push_back(RowRole::kNegative);
  rows.push_back(RowRole::kPositive);
  if (SkipLayersActive()) rows.push_back(RowRole::kSkipLayers);
  return rows;
}

absl::Status FlowMatchSampler::Advance(absl::Span<const Tensor> predictions) {
  if (done()) return absl::FailedPreconditionError("the sampler has taken all its steps");
  const std::vector<RowRole> roles = Rows();
  if (predictions.size() != roles.size()) {
    return absl::InvalidArgumentError(
        absl::StrCat("expected ", roles.size(), " predictions for this step, got ", predictions.size()));
  }
  const Tensor* by_role[3] = {nullptr, nullptr, nullptr};
  for (size_t r = 0; r < roles.size(); ++r) {
    if (predictions[r].shape != latent_.shape) {
      return absl::InvalidArgumentError(absl::StrCat("prediction ", r, ": shape ",
                                                     ShapeString(predictions[r].shape), ", expected the latent's ",
                                                     ShapeString(latent_.shape)));
    }
    by_role[static_cast<int>(roles[r])] = &predictions[r];
  }
  const float* positive = by_role[static_cast<int>(RowRole::kPositive)]->data.data();
  const float* negative = by_role[static_cast<int>(RowRole::kNegative)]
                              ? by_role[static_cast<int>(RowRole::kNegative)]->data.data()
                              : nullptr;
  const float* skipped = by_role[static_cast<int>(RowRole::kSkipLayers)]
                             ? by_role[static_cast<int>(RowRole::kSkipLayers)]->data.data()
                             : nullptr;
  const float w = options_.guidance_scale, slg_scale = options_.skip_layer_guidance.scale;
  // The step size in float32, as the scheduler's float32 sigma tensor gives it.
  const float dt = sigmas_[index_ + 1] - sigmas_[index_];
  float* x = latent_.data.data();
  for (size_t i = 0; i < latent_.data.size(); ++i) {
    float v = positive[i];
    if (negative) v = negative[i] + w * (positive[i] - negative[i]);
    if (skipped) v = v + (positive[i] - skipped[i]) * slg_scale;
    x[i] = x[i] + dt * v;
  }
  ++index_;
  return absl::OkStatus();
}

std::vector<SampleInput> StepRows(const FlowMatchSampler& sampler, const TextCondition& positive,
                                  const TextCondition& negative) {
  std::vector<SampleInput> rows;
  for (RowRole role : sampler.Rows()) {
    const TextCondition& text = role == RowRole::kNegative ? negative : positive;
    SampleInput row{sampler.latent(), text.txt_embed, sampler.timestep(), text.pooled_text};
    if (role == RowRole::kSkipLayers) row.skip_layers = sampler.options().skip_layer_guidance.layers;
    rows.push_back(std::move(row));
  }
  return rows;
}

absl::Status RunSampler(Engine& engine, FlowMatchSampler& sampler, const TextCondition& positive,
                        const TextCondition& negative) {
  while (!sampler.done()) {
    const std::vector<SampleInput> rows = StepRows(sampler, positive, negative);
    ASSIGN_OR_RETURN(std::vector<Tensor> predictions, engine.Forward(rows));
    RETURN_IF_ERROR(sampler.Advance(predictions));
  }
  return absl::OkStatus();
}

}  // namespace mmdit
