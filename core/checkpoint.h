// Finding and reading a model directory's weights, and mapping checkpoint names from the
// original Stability/ComfyUI layout to diffusers' names (MODEL_SPEC section 4).
#pragma once

#include <string>

#include "absl/status/statusor.h"
#include "core/safetensors.h"

namespace mmdit {

// Reads the weights of `model_dir`: `model.safetensors`, else diffusers'
// `diffusion_pytorch_model.safetensors`, else the shards listed in
// `diffusion_pytorch_model.safetensors.index.json`. Names are returned as stored, tensors
// unread (see OpenSafetensors).
// Errors: NotFound (none of these files), InvalidArgument (a malformed file or index, a
// tensor missing from its shard or present in two).
absl::StatusOr<TensorMap> ReadCheckpoint(const std::string& model_dir);

// Returns diffusers-named tensors. Original Stability/ComfyUI names (with or without the
// `model.diffusion_model.` prefix) are renamed, fused qkv split into q, k, v rows, and the
// two [shift, scale] modulations swapped to [scale, shift]. Diffusers names pass unchanged;
// names neither layout knows pass unchanged too, for the binder to report. `hidden` is the
// model's D (it tells the last block's [2D, D] text modulation from a full one).
// Errors: InvalidArgument when two stored tensors map to one name (e.g. `X` beside
// `model.diffusion_model.X`).
absl::StatusOr<TensorMap> ToDiffusersNames(TensorMap tensors, int64_t hidden);

}  // namespace mmdit
