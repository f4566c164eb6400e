// NumPy .npy files (format versions 1-3), C order, little-endian float32 or float64.
#pragma once

#include <string>

#include "absl/status/statusor.h"
#include "core/tensor.h"

namespace mmdit {

// Reads `path`. float64 data is rounded to float32. Errors: NotFound (no file),
// InvalidArgument (not an .npy, Fortran order, another dtype, truncated data).
absl::StatusOr<Tensor> ReadNpy(const std::string& path);

// Parses an .npy image held in memory; `what` names it in error messages.
absl::StatusOr<Tensor> ParseNpy(std::string_view bytes, const std::string& what);

// Writes `tensor` as a float32 .npy (format 1.0). Errors: Internal on I/O failure.
absl::Status WriteNpy(const std::string& path, const TensorView& tensor);

}  // namespace mmdit
