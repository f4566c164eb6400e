#include "tests/core/test_util.h"

#include <gtest/gtest.h>
#include <stdlib.h>

#include <cmath>
#include <filesystem>
#include <limits>
#include <random>

#include "core/batch.h"
#include "core/npy.h"

namespace mmdit::testing {

std::string GoldenDir(const std::string& name) { return std::string(MMDIT_TEST_DATA_DIR) + "/golden/" + name; }

std::string DigitsModelDir() { return std::string(MMDIT_MODELS_DIR) + "/digits"; }

GoldenCase LoadGoldenCase(const std::string& name) {
  GoldenCase c;
  c.name = name;
  const std::string dir = GoldenDir(name);
  auto read = [&](const std::string& file) {
    auto tensor = ReadNpy(dir + "/" + file);
    EXPECT_TRUE(tensor.ok()) << tensor.status();
    return tensor.ok() ? *std::move(tensor) : Tensor();
  };
  c.img_latent = read("img_latent.npy");
  c.txt_embed = read("txt_embed.npy");
  c.timestep = read("timestep.npy");
  c.pooled_text = read("pooled_text.npy");
  c.expected = read("expected_f64.npy");
  return c;
}

std::vector<SampleInput> GoldenCase::Samples() const {
  auto samples = SplitBatch(img_latent, txt_embed, timestep, pooled_text);
  EXPECT_TRUE(samples.ok()) << samples.status();
  return samples.ok() ? *samples : std::vector<SampleInput>();
}

std::string MakeTempDir(const std::string& prefix) {
  std::string pattern = (std::filesystem::temp_directory_path() / (prefix + "XXXXXX")).string();
  const char* dir = ::mkdtemp(pattern.data());
  EXPECT_NE(dir, nullptr);
  return pattern;
}

Tensor RandomTensor(Shape shape, uint32_t seed, float scale) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, scale);
  Tensor t(std::move(shape));
  for (float& v : t.data) v = normal(rng);
  return t;
}

double MaxAbsDiff(const TensorView& a, const TensorView& b) {
  if (a.shape != b.shape) return std::numeric_limits<double>::infinity();
  double worst = 0;
  for (int64_t i = 0; i < a.NumElements(); ++i) {
    const double diff = std::abs(static_cast<double>(a.data[i]) - b.data[i]);
    if (!(diff <= worst)) worst = diff;  // NaN propagates as "worse"
  }
  return worst;
}

Tensor SampleOf(const Tensor& batched, int64_t b) {
  const Shape inner(batched.shape.begin() + 1, batched.shape.end());
  const int64_t size = NumElements(inner);
  return Tensor(inner, std::vector<float>(batched.data.begin() + b * size, batched.data.begin() + (b + 1) * size));
}

std::string SanitizedTestName(std::string text) {
  for (char& ch : text) {
    if (!std::isalnum(static_cast<unsigned char>(ch))) ch = '_';
  }
  return text;
}

}  // namespace mmdit::testing
