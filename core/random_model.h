// Named model geometries and random-weight checkpoints of them: how benchmarks, tests and
// the server's built-in default model get a model without downloading one.
#pragma once

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "core/dtype.h"
#include "core/model_config.h"

namespace mmdit {

// "seed-default", "seed-recommended", "sd3-medium", "sd35-medium", "sd35-large".
std::vector<std::string> PresetNames();

// Errors: NotFound listing the known presets.
absl::StatusOr<ModelConfig> PresetConfig(const std::string& name);

// Writes `dir`/config.json and `dir`/model.safetensors (diffusers names, stored as
// `weights_dtype`) with weights drawn from `seed`: Linear weights and biases uniform in
// +-1/sqrt(fan_in) (PyTorch's default), RMS gammas 1, and the 2D sin-cos position table SD3
// uses. The same seed gives the same file. Creates `dir` if needed. Errors: Internal on I/O.
absl::Status WriteRandomModel(const std::string& dir, const ModelConfig& config, uint64_t seed, DType weights_dtype);

}  // namespace mmdit
