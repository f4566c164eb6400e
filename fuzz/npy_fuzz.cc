// libFuzzer: the .npy reader on arbitrary bytes.
#include <cstdint>
#include <string_view>

#include "core/npy.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  absl::StatusOr<mmdit::Tensor> tensor =
      mmdit::ParseNpy(std::string_view(reinterpret_cast<const char*>(data), size), "fuzz input");
  if (tensor.ok() && static_cast<int64_t>(tensor->data.size()) != tensor->NumElements()) __builtin_trap();
  return 0;
}
