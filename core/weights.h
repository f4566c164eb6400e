// The model's weights bound by name, once, into typed structs. Names are diffusers'
// (see checkpoint.h for the Stability layout). Binding is strict: every missing,
// unexpected or mis-shaped tensor is reported, all in one error.
#pragma once

#include <optional>
#include <vector>

#include "absl/status/statusor.h"
#include "core/model_config.h"
#include "core/safetensors.h"
#include "core/tensor.h"

namespace mmdit {

struct LinearWeights {
  Tensor weight;  // [out, in]
  Tensor bias;    // [out]
  void Load() {
    weight.Load();
    bias.Load();
  }
};

// One stream's half of a joint block: the image stream (norm1, to_q/k/v, norm_q/k,
// to_out.0, ff) or the text stream (norm1_context, add_q/k/v_proj, norm_added_q/k,
// to_add_out, ff_context). Same type, so both run through one code path.
struct StreamBlockWeights {
  LinearWeights modulation;              // [6D, D], [9D, D] (dual attention) or [2D, D] (pre-only)
  LinearWeights q, k, v;                 // [D, D] each
  std::optional<Tensor> q_norm, k_norm;  // RMS gammas [hd], with qk_norm
  std::optional<LinearWeights> out;      // [D, D]; absent in a context-pre-only text stream
  std::optional<LinearWeights> ff_in;    // [mlp, D]
  std::optional<LinearWeights> ff_out;   // [D, mlp]
};

// SD3.5-medium's second, image-only self-attention (attn2).
struct SelfAttentionWeights {
  LinearWeights q, k, v, out;
  std::optional<Tensor> q_norm, k_norm;
};

struct JointBlockWeights {
  StreamBlockWeights image;
  StreamBlockWeights text;
  std::optional<SelfAttentionWeights> dual_attention;
};

struct ModelWeights {
  LinearWeights patch_embed;             // pos_embed.proj as a Linear: [D, C*p*p]
  std::optional<Tensor> pos_table;       // pos_embed.pos_embed as [M*M, D]
  LinearWeights timestep_1, timestep_2;  // [D, 256], [D, D]
  LinearWeights pooled_1, pooled_2;      // [D, P], [D, D]
  LinearWeights context_embedder;        // [D, J]
  std::vector<JointBlockWeights> blocks;
  LinearWeights norm_out;  // [2D, D], chunks scale, shift
  LinearWeights proj_out;  // [p*p*Co, D]
};

// One Linear computing all of `parts` (same input width) at once: weights stacked along the
// output, in order. Consumes the parts, loading each just before it is copied and freeing it
// after.
LinearWeights StackOutputs(std::vector<LinearWeights> parts);

// Takes the tensors `config` needs out of `tensors` (diffusers names).
// Errors: InvalidArgument listing every missing, mis-shaped and unexpected tensor.
absl::StatusOr<ModelWeights> BindWeights(const ModelConfig& config, TensorMap tensors);

// Every tensor `config` needs, diffusers names and shapes in checkpoint order; what
// `mmdit init` writes and what BindWeights expects.
std::vector<std::pair<std::string, Shape>> ExpectedTensors(const ModelConfig& config);

// The number of parameters `config` implies (the elements of ExpectedTensors).
int64_t ParameterCount(const ModelConfig& config);

}  // namespace mmdit
