// libFuzzer: config.json parsing and validation on arbitrary text; an accepted config must
// survive its own round trip.
#include <cstdint>
#include <string_view>

#include "core/model_config.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  absl::StatusOr<mmdit::ModelConfig> config =
      mmdit::ParseModelConfig(std::string_view(reinterpret_cast<const char*>(data), size), "fuzz input");
  if (!config.ok() || !mmdit::ValidateModelConfig(*config).ok()) return 0;
  absl::StatusOr<mmdit::ModelConfig> again = mmdit::ParseModelConfig(mmdit::ModelConfigToJson(*config), "round trip");
  if (!again.ok()) __builtin_trap();
  return 0;
}
