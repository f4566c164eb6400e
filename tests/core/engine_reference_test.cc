// The engine against the naive double-precision reference (tests/core/reference_model.h) on
// geometries no golden case covers; the reference itself against the golden cases first.
#include <gtest/gtest.h>

#include "core/random_model.h"
#include "core/safetensors.h"
#include "tests/core/reference_model.h"
#include "tests/core/test_util.h"

namespace mmdit {
namespace {

using ::mmdit::testing::MaxAbsDiff;
using ::mmdit::testing::RandomTensor;
using ::mmdit::testing::ReferenceForward;

TEST(ReferenceModel, AgreesWithEveryGoldenCase) {
  for (const char* name : {"seed_tiny", "sd3_tiny", "sd35_tiny"}) {
    const ModelConfig config = *ReadModelConfig(testing::GoldenDir(name) + "/config.json");
    const TensorMap weights = *ReadSafetensors(testing::GoldenDir(name) + "/model.safetensors");
    const testing::GoldenCase c = testing::LoadGoldenCase(name);
    const std::vector<SampleInput> samples = c.Samples();
    for (size_t b = 0; b < samples.size(); ++b) {
      EXPECT_LE(MaxAbsDiff(ReferenceForward(config, weights, samples[b]), testing::SampleOf(c.expected, b)), 1e-5)
          << name << " sample " << b;
    }
  }
}

struct GeometryCase {
  std::string description;
  std::string preset;
  std::function<void(ModelConfig&)> shape;
  Shape img_latent;  // per sample
  friend void PrintTo(const GeometryCase& c, std::ostream* os) { *os << c.description; }
};

class EngineReferenceTest : public ::testing::TestWithParam<GeometryCase> {};

TEST_P(EngineReferenceTest, MatchesTheNaiveReference) {
  ModelConfig config = *PresetConfig(GetParam().preset);
  // Tiny sizes; the preset keeps its structure (qk-norm, dual layers, pre-only last block).
  config.num_layers = 3;
  config.num_attention_heads = 2;
  config.attention_head_dim = 16;
  config.caption_projection_dim = 32;
  config.joint_attention_dim = 24;
  config.pooled_projection_dim = 12;
  config.in_channels = config.out_channels = 4;
  if (config.pos_embed_max_size) config.pos_embed_max_size = 6;
  std::erase_if(config.dual_attention_layers, [](int64_t layer) { return layer >= 2; });
  GetParam().shape(config);
  const std::string dir = testing::MakeTempDir("ref") + "/model";
  ASSERT_TRUE(WriteRandomModel(dir, config, 11, DType::kF32).ok());
  auto engine = Engine::Load(dir);
  ASSERT_TRUE(engine.ok()) << engine.status();
  const TensorMap weights = *ReadSafetensors(dir + "/model.safetensors");
  const Tensor img = RandomTensor(GetParam().img_latent, 1), txt = RandomTensor({5, 24}, 2),
               pooled = RandomTensor({12}, 3);
  const SampleInput sample{img, txt, 637.0f, pooled};
  auto outputs = (*engine)->Forward({sample, sample});
  ASSERT_TRUE(outputs.ok()) << outputs.status();
  const Tensor reference = ReferenceForward(config, weights, sample);
  EXPECT_LE(MaxAbsDiff((*outputs)[0], reference), 1e-4);
  EXPECT_EQ((*outputs)[0].data, (*outputs)[1].data);
}

INSTANTIATE_TEST_SUITE_P(
    Geometries, EngineReferenceTest,
    ::testing::Values(
        GeometryCase{"sd35-medium dual attention", "sd35-medium", [](ModelConfig&) {}, {4, 6, 8}},
        GeometryCase{
            "dual attention without qk-norm", "sd35-medium", [](ModelConfig& c) { c.qk_norm = false; }, {4, 4, 4}},
        GeometryCase{"mlp ratio 2.5, context-pre-only off",
                     "sd3-medium",
                     [](ModelConfig& c) {
                       c.mlp_ratio = 2.5;
                       c.context_pre_only_last = false;
                     },
                     {4, 8, 6}},
        GeometryCase{
            "token form with patch 2", "sd3-medium", [](ModelConfig& c) { c.pos_embed_max_size.reset(); }, {7, 16}},
        GeometryCase{"seed token form, pre-only last",
                     "seed-default",
                     [](ModelConfig& c) {
                       c.context_pre_only_last = true;
                       c.patch_size = 1;
                     },
                     {9, 4}}),
    testing::DescriptionAsTestName());

}  // namespace
}  // namespace mmdit
