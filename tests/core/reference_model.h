// A second, deliberately naive implementation of MODEL_SPEC's forward pass, in double
// precision, one sample at a time, straight from the checkpoint's tensors by name. It checks
// the engine where no golden case reaches (SD3.5-medium's dual attention, other MLP ratios)
// and is itself checked against the golden cases.
#pragma once

#include "core/engine.h"
#include "core/model_config.h"
#include "core/safetensors.h"

namespace mmdit::testing {

// The prediction for one sample, in the sample's form (see Engine::Forward).
// The blocks in `sample.skip_layers` are not run (skip-layer guidance).
Tensor ReferenceForward(const ModelConfig& config, const TensorMap& weights, const SampleInput& sample);

}  // namespace mmdit::testing
