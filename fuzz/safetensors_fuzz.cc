// libFuzzer: the safetensors parser (header length, JSON header, dtypes, offsets, overlaps)
// on arbitrary bytes, then every tensor it accepts converted to float32.
#include <cstdint>
#include <string_view>

#include "core/safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  absl::StatusOr<mmdit::TensorMap> tensors =
      mmdit::ParseSafetensors(std::string_view(reinterpret_cast<const char*>(data), size), "fuzz input");
  if (!tensors.ok()) return 0;
  for (auto& [name, tensor] : *tensors) {
    tensor.Load();
    if (static_cast<int64_t>(tensor.data.size()) != tensor.NumElements()) __builtin_trap();
  }
  return 0;
}
