// Shared helpers for the core tests: golden cases, random tensors, comparisons.
#pragma once

#include <string>
#include <vector>

#include "core/engine.h"
#include "core/tensor.h"

namespace mmdit::testing {

// tests/data/golden/<name>.
std::string GoldenDir(const std::string& name);

// models/digits: the trained default model, with its text encoder.
std::string DigitsModelDir();

// The golden case's inputs (float32) and expected_f64 output.
struct GoldenCase {
  std::string name;
  Tensor img_latent, txt_embed, timestep, pooled_text, expected;
  std::vector<SampleInput> Samples() const;  // views into this case
};
GoldenCase LoadGoldenCase(const std::string& name);

// A fresh temporary directory, removed by the caller's test fixture or left in /tmp.
std::string MakeTempDir(const std::string& prefix);

Tensor RandomTensor(Shape shape, uint32_t seed, float scale = 1.0f);

// max |a - b| over all elements; infinity when shapes differ.
double MaxAbsDiff(const TensorView& a, const TensorView& b);

// Sample b of a [B, ...] tensor, as its own tensor.
Tensor SampleOf(const Tensor& batched, int64_t b);

// `text` with every character gtest does not allow in a test name replaced by '_'.
std::string SanitizedTestName(std::string text);

// Names a parameterised test after its parameter's `description` field.
struct DescriptionAsTestName {
  template <typename ParamInfo>
  std::string operator()(const ParamInfo& info) const {
    return SanitizedTestName(info.param.description);
  }
};

}  // namespace mmdit::testing
