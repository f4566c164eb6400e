// The MMDiT denoiser: loads a model and runs the forward pass of shared/MODEL_SPEC.md on
// ragged batches (samples of different image sizes and text lengths in one call).
#pragma once

#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "core/compute_dtype.h"
#include "core/linear.h"
#include "core/model_config.h"
#include "core/tensor.h"
#include "core/weights.h"

namespace mmdit {

// One sample of a batch; views of data the caller keeps alive during Forward.
struct SampleInput {
  TensorView img_latent;   // image form [C, H, W], or token form [N, C*p*p]
  TensorView txt_embed;    // [T, J]
  float timestep = 0.0f;   // on the 0..1000 scale (sigma * 1000)
  TensorView pooled_text;  // [P]
  // Joint blocks this sample passes through unchanged (skip-layer guidance's extra row); the
  // other samples of the batch still run them. Indices in [0, depth).
  absl::Span<const int64_t> skip_layers;
};

// Token counts of one sample, for FLOP and memory estimates.
struct SampleTokens {
  int64_t image_tokens;
  int64_t text_tokens;
};

// Multiply-adds x 2 of one forward pass over `samples`: every Linear and both attention
// products (softmax and element-wise work excluded).
double ForwardFlops(const ModelConfig& config, absl::Span<const SampleTokens> samples);

struct EngineOptions {
  ComputeDType compute = ComputeDType::kF32;
};

struct EngineModel;      // prepared weights (engine.cc)
struct EngineWorkspace;  // activation buffers, grown to the largest batch seen and reused

class Engine {
 public:
  // Reads `model_dir`'s config.json and weights (either naming layout), binds and prepares
  // them. Errors: NotFound (missing files), InvalidArgument (bad config, malformed or
  // mismatched weights, with every problem listed), Internal (oneDNN).
  // Errors also: Internal when this CPU cannot run `options.compute` (bf16 needs AVX-512).
  static absl::StatusOr<std::unique_ptr<Engine>> Load(const std::string& model_dir, const EngineOptions& options = {});
  static absl::StatusOr<std::unique_ptr<Engine>> Create(const ModelConfig& config, ModelWeights weights,
                                                        const EngineOptions& options = {});
  ~Engine();

  // OK if `sample` fits the model; otherwise InvalidArgument naming the field, the expected
  // shape and the one received. Thread-safe.
  absl::Status ValidateSample(const SampleInput& sample) const;

  // The model's prediction for each sample, in the sample's form: image form [Co, H, W],
  // token form [N, p*p*Co]. Each sample's result equals that sample run alone (to float
  // rounding). Errors: InvalidArgument "sample i: ..." (see ValidateSample), Internal.
  // Thread-safe: concurrent calls run one after another.
  // `matmul_trace`, when given, receives the shape of every matrix product the pass ran, in
  // order (for benchmarks).
  absl::StatusOr<std::vector<Tensor>> Forward(absl::Span<const SampleInput> batch,
                                              std::vector<MatmulCall>* matmul_trace = nullptr);

  // Tokens of `sample` (which must be valid).
  SampleTokens TokensOf(const SampleInput& sample) const;

  const ModelConfig& config() const { return config_; }
  ComputeDType compute_dtype() const { return options_.compute; }

 private:
  Engine(const ModelConfig& config, const EngineOptions& options, std::unique_ptr<EngineModel> model);

  ModelConfig config_;
  EngineOptions options_;
  std::unique_ptr<EngineModel> model_;
  std::mutex forward_mutex_;
  std::unique_ptr<EngineWorkspace> workspace_;  // guarded by forward_mutex_
};

}  // namespace mmdit
