// Batched tensors (a leading batch dimension, as in .npy files and requests) to and from
// the engine's per-sample inputs and outputs.
#pragma once

#include <vector>

#include "absl/status/statusor.h"
#include "core/engine.h"

namespace mmdit {

// Views sample b of each batched input: img_latent [B, C, H, W] or [B, N, img_dim],
// txt_embed [B, T, J], timestep [B], pooled_text [B, P]. The views borrow the inputs' data.
// Errors: InvalidArgument naming the field whose rank or batch size is wrong.
absl::StatusOr<std::vector<SampleInput>> SplitBatch(const TensorView& img_latent, const TensorView& txt_embed,
                                                    const TensorView& timestep, const TensorView& pooled_text);

// Stacks per-sample outputs of one shape into [B, ...]. Errors: InvalidArgument if shapes differ.
absl::StatusOr<Tensor> StackBatch(const std::vector<Tensor>& samples);

}  // namespace mmdit
