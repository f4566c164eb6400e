// The dtype the engine's matrix products run in.
#pragma once

#include <string>

#include "absl/status/statusor.h"

namespace mmdit {

// kBF16: weights held in bf16, activations bf16 into each product (LayerNorm + modulation
// and the MLP's first product write them so; other inputs are converted on the way in),
// float32 accumulation. Attention's two products take bf16 inputs too where the CPU allows
// (see Bf16AttentionRuns in layers.h). Everything else (norms, softmax, residuals) computes
// in float32.
enum class ComputeDType { kF32, kBF16 };

// "f32" or "bf16". Errors: InvalidArgument naming `flag` and the accepted values.
inline absl::StatusOr<ComputeDType> ParseComputeDType(const std::string& name, const std::string& flag) {
  if (name == "f32") return ComputeDType::kF32;
  if (name == "bf16") return ComputeDType::kBF16;
  return absl::InvalidArgumentError(flag + " must be f32 or bf16, got '" + name + "'");
}

inline const char* ComputeDTypeName(ComputeDType dtype) { return dtype == ComputeDType::kBF16 ? "bf16" : "f32"; }

}  // namespace mmdit
