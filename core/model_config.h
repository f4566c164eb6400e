// The model's geometry: diffusers' SD3Transformer2DModel config.json keys plus ours
// (context_pre_only_last, mlp_ratio). See shared/MODEL_SPEC.md section 4.
#pragma once

#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace mmdit {

struct ModelConfig {
  int64_t patch_size = 0;
  int64_t in_channels = 0;
  int64_t out_channels = 0;
  int64_t num_layers = 0;
  int64_t attention_head_dim = 0;
  int64_t num_attention_heads = 0;
  int64_t joint_attention_dim = 0;            // J: text feature width
  int64_t caption_projection_dim = 0;         // D: must equal heads x head_dim
  int64_t pooled_projection_dim = 0;          // P
  std::optional<int64_t> pos_embed_max_size;  // M; absent: no positional table
  int64_t sample_size = 0;                    // nominal latent size; informational
  bool qk_norm = false;                       // qk_norm: "rms_norm"
  std::vector<int64_t> dual_attention_layers;
  bool context_pre_only_last = true;
  double mlp_ratio = 4.0;

  // Derived sizes, computed here and nowhere else.
  int64_t hidden() const { return num_attention_heads * attention_head_dim; }         // D
  int64_t mlp_hidden() const { return static_cast<int64_t>(mlp_ratio * hidden()); }   // ff width
  int64_t patch_features() const { return in_channels * patch_size * patch_size; }    // img_dim
  int64_t output_features() const { return out_channels * patch_size * patch_size; }  // per token
  bool has_positions() const { return pos_embed_max_size.has_value(); }
  bool IsContextPreOnly(int64_t layer) const { return context_pre_only_last && layer == num_layers - 1; }
  bool IsDualAttention(int64_t layer) const;
};

// Parses and validates config.json text; `what` names the source in errors.
// Errors: InvalidArgument naming the key and its value (missing required key, wrong type,
// heads x head_dim != caption_projection_dim, unknown qk_norm, ...). Unknown keys are ignored.
absl::StatusOr<ModelConfig> ParseModelConfig(std::string_view json_text, const std::string& what);

// Reads `path` and parses it. Errors: NotFound, or as ParseModelConfig.
absl::StatusOr<ModelConfig> ReadModelConfig(const std::string& path);

// Checks the invariants ParseModelConfig promises; for configs built in code.
absl::Status ValidateModelConfig(const ModelConfig& config);

// diffusers-style config.json text for `config` (what `mmdit init` writes).
std::string ModelConfigToJson(const ModelConfig& config);

}  // namespace mmdit
