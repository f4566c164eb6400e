// The SD3 sampler: diffusers' FlowMatchEulerDiscreteScheduler (shifted sigmas, Euler steps in
// float32) with StableDiffusion3Pipeline's classifier-free guidance and SD3.5's skip-layer
// guidance. A FlowMatchSampler is one generation's trajectory; it says which model rows its next
// step needs and takes their predictions. It never calls the engine itself, so that a server can
// put the rows of many generations into one forward pass (StepRows builds them), and
// RunSampler is the plain one-generation loop the server must agree with.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "core/engine.h"
#include "core/tensor.h"

namespace mmdit {

// diffusers' FlowMatchEulerDiscreteScheduler settings, from a model directory's
// scheduler_config.json (diffusers' layout).
struct FlowMatchConfig {
  double shift = 3.0;
  int64_t num_train_timesteps = 1000;
};

// Reads `model_dir`/scheduler_config.json when it exists (keys "shift", "num_train_timesteps";
// others ignored); the defaults otherwise. Errors: InvalidArgument (malformed JSON, shift <= 0,
// num_train_timesteps < 2), naming the file and key.
absl::StatusOr<FlowMatchConfig> LoadFlowMatchConfig(const std::string& model_dir);

// The steps + 1 sigmas of a `steps`-step schedule, as diffusers computes them: the training
// table t = 1000..1 (float32) shifted, s = shift*s/(1+(shift-1)*s), gives sigma_max and sigma_min;
// linspace(sigma_max*T, sigma_min*T, steps)/T in float64 is shifted again and rounded to float32;
// a final 0 is appended. The model's timestep at step i is sigmas[i] * num_train_timesteps.
// Requires steps >= 1.
std::vector<float> SigmaSchedule(const FlowMatchConfig& config, int64_t steps);

struct SkipLayerGuidanceOptions {
  std::vector<int64_t> layers;  // joint-block indices the extra row skips; empty: off
  float scale = 2.8f;
  double start = 0.01;  // active while steps * start < i < steps * stop (i: schedule index)
  double stop = 0.2;
};

struct GenerationOptions {
  int64_t steps = 28;
  float guidance_scale = 7.0f;  // <= 1: no negative row
  SkipLayerGuidanceOptions skip_layer_guidance;  // needs guidance_scale > 1, as in diffusers
  // img2img only: the trajectory starts at schedule index int(steps - steps * strength).
  float strength = 1.0f;
};

// Standard normal noise of `shape` from `seed`: SplitMix64 draws and Box-Muller, in float64
// rounded to float32. The same on every machine (std::normal_distribution is not).
Tensor GaussianNoise(const Shape& shape, uint64_t seed);

// What one model row of a step is.
enum class RowRole {
  kNegative,    // the negative (unconditional) prompt
  kPositive,    // the prompt
  kSkipLayers,  // the prompt with the skip-layer-guidance blocks skipped
};

class FlowMatchSampler {
 public:
  // `noise` is the starting noise in the latent's per-sample shape ([C, H, W] or [N, F]).
  // `init_latent`, for img2img, is x0 of the same shape: the trajectory starts at
  // x = sigma * noise + (1 - sigma) * x0 at the strength's start index.
  // Errors: InvalidArgument naming the option (steps < 1, non-finite guidance, strength outside
  // (0, 1], a strength that leaves no step, skip-layer guidance without CFG, scale or
  // start/stop out of range, init_latent's shape differing from the noise's).
  static absl::StatusOr<FlowMatchSampler> Create(const FlowMatchConfig& config, const GenerationOptions& options,
                                                 Tensor noise, const Tensor* init_latent = nullptr);

  bool done() const { return index_ >= end_index(); }
  int64_t steps_taken() const { return index_ - start_index_; }
  int64_t total_steps() const { return end_index() - start_index_; }
  int64_t schedule_index() const { return index_; }  // i, into the full `steps` schedule
  float sigma() const { return sigmas_[index_]; }    // where the latent is now
  float timestep() const;                            // what the model gets: sigma * T
  // The rows the next step needs, in this order (empty when done).
  std::vector<RowRole> Rows() const;
  const GenerationOptions& options() const { return options_; }
  const Tensor& latent() const { return latent_; }

  // Combines the predictions of Rows() (one per row, in order, each the latent's shape):
  // v = v_neg + w (v_pos - v_neg), plus (v_pos - v_skip) * slg_scale, then the Euler step
  // x += (sigma[i+1] - sigma[i]) * v, all in float32. Errors: FailedPrecondition when done,
  // InvalidArgument when the count or a shape is wrong (the latent is then unchanged).
  absl::Status Advance(absl::Span<const Tensor> predictions);

 private:
  FlowMatchSampler(const GenerationOptions& options, std::vector<float> sigmas, int64_t start_index, Tensor latent);
  int64_t end_index() const { return static_cast<int64_t>(sigmas_.size()) - 1; }
  bool SkipLayersActive() const;

  GenerationOptions options_;
  std::vector<float> sigmas_;  // steps + 1
  float num_train_timesteps_ = 1000.0f;
  int64_t start_index_ = 0;
  int64_t index_ = 0;
  Tensor latent_;
};

// A prompt's conditioning for the model: txt_embed [T, J] and pooled_text [P].
struct TextCondition {
  TensorView txt_embed;
  TensorView pooled_text;
};

// The model rows of `sampler`'s next step, in Rows() order: each row views the sampler's latent
// and `positive` or `negative` (which must outlive the rows' use) at the sampler's timestep;
// the skip-layer row carries the options' layers.
std::vector<SampleInput> StepRows(const FlowMatchSampler& sampler, const TextCondition& positive,
                                  const TextCondition& negative);

// Runs `sampler` to the end on `engine`, one Forward per step: the reference loop.
absl::Status RunSampler(Engine& engine, FlowMatchSampler& sampler, const TextCondition& positive,
                        const TextCondition& negative);

}  // namespace mmdit
