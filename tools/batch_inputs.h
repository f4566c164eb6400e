// The four batched model inputs read from the .npy files named by --img_latent, --txt_embed,
// --timestep and --pooled_text: what `mmdit forward` and `mmdit-client denoise` both take.
#pragma once

#include "absl/status/statusor.h"
#include "core/tensor.h"
#include "tools/flags.h"

namespace mmdit {

struct BatchInputs {
  Tensor img_latent, txt_embed, timestep, pooled_text;
};

// Errors: InvalidArgument (a flag missing, a file not a float32 .npy), NotFound (no file).
absl::StatusOr<BatchInputs> ReadBatchInputs(const Flags& flags);

}  // namespace mmdit
