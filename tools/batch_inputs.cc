#include "tools/batch_inputs.h"

#include "core/npy.h"
#include "core/status_macros.h"

namespace mmdit {

absl::StatusOr<BatchInputs> ReadBatchInputs(const Flags& flags) {
  BatchInputs inputs;
  const std::pair<const char*, Tensor*> fields[] = {{"img_latent", &inputs.img_latent},
                                                     {"txt_embed", &inputs.txt_embed},
                                                     {"timestep", &inputs.timestep},
                                                     {"pooled_text", &inputs.pooled_text}};
  for (const auto& [name, tensor] : fields) {
    ASSIGN_OR_RETURN(std::string path, flags.RequiredString(name));
    ASSIGN_OR_RETURN(*tensor, ReadNpy(path));
  }
  return inputs;
}

}  // namespace mmdit
