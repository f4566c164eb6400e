// safetensors files: an 8-byte little-endian header length, a JSON header mapping each
// tensor name to {dtype, shape, data_offsets}, then the data area.
#pragma once

#include <functional>
#include <map>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "core/dtype.h"
#include "core/tensor.h"

namespace mmdit {

// Tensors by checkpoint name, ordered so that error lists are stable.
using TensorMap = std::map<std::string, Tensor>;

// Memory-maps `path` and validates the whole header before trusting any of it (length within
// the file, well-formed JSON, known dtype, offsets inside the data area and consistent with
// shape x dtype, no two tensors overlapping). The tensors are returned unread (Tensor::Load
// converts each to float32 and drops its file pages); the file stays mapped while any is.
// Errors: NotFound (no file), InvalidArgument (any violation, naming file and tensor).
absl::StatusOr<TensorMap> OpenSafetensors(const std::string& path);

// OpenSafetensors, with every tensor loaded.
absl::StatusOr<TensorMap> ReadSafetensors(const std::string& path);

// The same on bytes already in memory; `what` names them in error messages.
absl::StatusOr<TensorMap> ParseSafetensors(std::string_view bytes, const std::string& what);

// Writes `tensors` stored as `dtype`, in the order given. Errors: Internal on I/O failure.
absl::Status WriteSafetensors(const std::string& path, const std::vector<std::pair<std::string, TensorView>>& tensors,
                              DType dtype);

// The same for tensors too large to hold at once: `produce(i, values)` fills the float32
// values of `layout[i]` just before they are written.
absl::Status WriteSafetensors(const std::string& path, const std::vector<std::pair<std::string, Shape>>& layout,
                              DType dtype, const std::function<void(size_t, std::vector<float>&)>& produce);

}  // namespace mmdit
