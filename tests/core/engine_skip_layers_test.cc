// SampleInput::skip_layers (SD3.5 skip-layer guidance): a sample passes the listed joint blocks
// unchanged, as diffusers' SD3Transformer2DModel.forward(skip_layers=...) does not run them,
// while the other samples of the same ragged batch still run every block.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <memory>
#include <numeric>

#include "core/engine.h"
#include "core/random_model.h"
#include "core/safetensors.h"
#include "tests/core/reference_model.h"
#include "tests/core/test_util.h"

namespace mmdit {
namespace {

using ::mmdit::testing::GoldenCase;
using ::mmdit::testing::GoldenDir;
using ::mmdit::testing::LoadGoldenCase;
using ::mmdit::testing::MaxAbsDiff;
using ::mmdit::testing::RandomTensor;
using ::mmdit::testing::ReferenceForward;
using ::testing::HasSubstr;

// shared/golden/README.md: float32 within 1e-4 of float64; a sample in a batch equal to its solo
// run within 1e-5.
constexpr double kGoldenTolerance = 1e-4;
constexpr double kBatchInvariance = 1e-5;
// Skipping a block must change the prediction by far more than rounding.
constexpr double kSkipChangesResult = 1e-3;

// "sd35_random": SD3.5-medium's structure (dual attention in blocks 0 and 1, qk-norm, a
// context-pre-only last block) at tiny sizes, which no golden case has.
constexpr char kDualAttentionModel[] = "sd35_random";

// A model, its checkpoint's tensors for the reference, and samples of it.
struct TestModel {
  std::string dir;
  ModelConfig config;
  TensorMap weights;
  std::unique_ptr<Engine> engine;
  GoldenCase golden;
  std::vector<Tensor> storage;       // what `samples` view, besides `golden`
  std::vector<SampleInput> samples;  // the golden case's samples, or two random ones
};

std::unique_ptr<TestModel> LoadTestModel(const std::string& name, const EngineOptions& options = {}) {
  auto model = std::make_unique<TestModel>();
  model->storage.reserve(16);
  if (name == kDualAttentionModel) {
    ModelConfig config = *PresetConfig("sd35-medium");
    config.num_layers = 3;
    config.num_attention_heads = 2;
    config.attention_head_dim = 16;
    config.caption_projection_dim = 32;
    config.joint_attention_dim = 24;
    config.pooled_projection_dim = 12;
    config.in_channels = config.out_channels = 4;
    config.pos_embed_max_size = 6;
    std::erase_if(config.dual_attention_layers, [](int64_t layer) { return layer >= 2; });
    model->dir = testing::MakeTempDir("skip") + "/model";
    EXPECT_TRUE(WriteRandomModel(model->dir, config, 13, DType::kF32).ok());
    for (const auto& [img, text_length, seed] : {std::tuple<Shape, int64_t, uint32_t>{{4, 6, 8}, 5, 1},
                                                 std::tuple<Shape, int64_t, uint32_t>{{4, 4, 4}, 2, 4}}) {
      model->storage.push_back(RandomTensor(img, seed));
      model->storage.push_back(RandomTensor({text_length, 24}, seed + 1));
      model->storage.push_back(RandomTensor({12}, seed + 2));
      const size_t at = model->storage.size() - 3;
      model->samples.push_back({model->storage[at], model->storage[at + 1], 400.0f + seed, model->storage[at + 2]});
    }
  } else {
    model->dir = GoldenDir(name);
    model->golden = LoadGoldenCase(name);
    model->samples = model->golden.Samples();
  }
  auto config = ReadModelConfig(model->dir + "/config.json");
  EXPECT_TRUE(config.ok()) << config.status();
  if (config.ok()) model->config = *config;
  auto weights = ReadSafetensors(model->dir + "/model.safetensors");
  EXPECT_TRUE(weights.ok()) << weights.status();
  if (weights.ok()) model->weights = *std::move(weights);
  auto engine = Engine::Load(model->dir, options);
  if (engine.ok()) {
    model->engine = std::move(*engine);
  } else {
    ADD_FAILURE() << name << ": " << engine.status();
  }
  return model;
}

// A sample of another shape than `model`'s (other image size, other text length), kept in
// `model->storage`.
SampleInput OtherShapeSample(TestModel& model, uint32_t seed) {
  const ModelConfig& c = model.config;
  const int64_t p = c.patch_size;
  const Shape img = c.has_positions() ? Shape{c.in_channels, 2 * p, 3 * p} : Shape{5, c.patch_features()};
  model.storage.push_back(RandomTensor(img, seed));
  model.storage.push_back(RandomTensor({3, c.joint_attention_dim}, seed + 1));
  model.storage.push_back(RandomTensor({c.pooled_projection_dim}, seed + 2));
  const size_t at = model.storage.size() - 3;
  return {model.storage[at], model.storage[at + 1], 777.0f, model.storage[at + 2]};
}

SampleInput Skipping(SampleInput sample, const std::vector<int64_t>& layers) {
  sample.skip_layers = layers;
  return sample;
}

std::vector<int64_t> AllLayers(const ModelConfig& config) {
  std::vector<int64_t> layers(config.num_layers);
  std::iota(layers.begin(), layers.end(), 0);
  return layers;
}

struct SkipCase {
  std::string description;
  std::string model;
  std::vector<int64_t> layers;
  friend void PrintTo(const SkipCase& c, std::ostream* os) { *os << c.description; }
};

class EngineSkipLayersTest : public ::testing::TestWithParam<SkipCase> {};

// Every sample of the model skipping the case's blocks, in one batch: each equals the float64
// reference with those blocks removed, and differs from the reference that runs them.
TEST_P(EngineSkipLayersTest, MatchesTheReferenceWithoutTheSkippedBlocks) {
  const SkipCase& param = GetParam();
  std::unique_ptr<TestModel> model = LoadTestModel(param.model);
  ASSERT_NE(model->engine, nullptr);
  std::vector<SampleInput> skipping;
  for (const SampleInput& sample : model->samples) skipping.push_back(Skipping(sample, param.layers));
  auto outputs = model->engine->Forward(skipping);
  ASSERT_TRUE(outputs.ok()) << outputs.status();
  for (size_t b = 0; b < skipping.size(); ++b) {
    const Tensor reference = ReferenceForward(model->config, model->weights, skipping[b]);
    const Tensor unskipped = ReferenceForward(model->config, model->weights, model->samples[b]);
    const double error = MaxAbsDiff((*outputs)[b], reference);
    EXPECT_LE(error, kGoldenTolerance) << param.description << " sample " << b;
    EXPECT_GT(MaxAbsDiff(reference, unskipped), kSkipChangesResult) << "skipping changed nothing: sample " << b;
    std::printf("[skip] %s sample %zu: max |out - reference without the blocks| = %.3g\n", param.description.c_str(), b,
                error);
  }
}

// In one ragged batch: a sample, the same sample skipping the case's blocks, and a sample of
// another shape running every block. Each equals its solo run; the skipping one differs from
// the one that does not skip.
TEST_P(EngineSkipLayersTest, RaggedBatchWithASkippingSampleEqualsSoloRuns) {
  const SkipCase& param = GetParam();
  std::unique_ptr<TestModel> model = LoadTestModel(param.model);
  ASSERT_NE(model->engine, nullptr);
  const SampleInput sample = model->samples[0];
  const std::vector<SampleInput> batch = {sample, Skipping(sample, param.layers), OtherShapeSample(*model, 50)};
  auto batched = model->engine->Forward(batch);
  ASSERT_TRUE(batched.ok()) << batched.status();
  for (size_t i = 0; i < batch.size(); ++i) {
    auto solo = model->engine->Forward({batch[i]});
    ASSERT_TRUE(solo.ok()) << solo.status();
    EXPECT_LE(MaxAbsDiff((*batched)[i], (*solo)[0]), kBatchInvariance) << "sample " << i;
  }
  EXPECT_GT(MaxAbsDiff((*batched)[0], (*batched)[1]), kSkipChangesResult) << "the skip mask did nothing";
}

INSTANTIATE_TEST_SUITE_P(
    Skips, EngineSkipLayersTest,
    ::testing::Values(SkipCase{"seed_tiny first block", "seed_tiny", {0}},
                      SkipCase{"seed_tiny last block", "seed_tiny", {1}},
                      SkipCase{"sd3_tiny middle block", "sd3_tiny", {1}},
                      SkipCase{"sd3_tiny context-pre-only last block", "sd3_tiny", {2}},
                      SkipCase{"sd3_tiny first and last, unordered", "sd3_tiny", {2, 0}},
                      SkipCase{"sd35_tiny first block", "sd35_tiny", {0}},
                      SkipCase{"sd35_tiny context-pre-only last block", "sd35_tiny", {1}},
                      SkipCase{"dual attention block", kDualAttentionModel, {0}},
                      SkipCase{"second dual attention block and the pre-only last", kDualAttentionModel, {1, 2}}),
    testing::DescriptionAsTestName());

// One sample skipping every block (its prediction is the final layer over its embedded
// patches), the other none: each as its solo run and as the reference.
TEST(EngineSkipLayers, OneSampleSkipsEveryBlockAndTheOtherNone) {
  for (const std::string name : {"sd3_tiny", "seed_tiny", kDualAttentionModel}) {
    std::unique_ptr<TestModel> model = LoadTestModel(name);
    ASSERT_NE(model->engine, nullptr);
    const std::vector<int64_t> all = AllLayers(model->config);
    const std::vector<SampleInput> batch = {Skipping(model->samples[0], all), OtherShapeSample(*model, 60)};
    auto batched = model->engine->Forward(batch);
    ASSERT_TRUE(batched.ok()) << batched.status();
    for (size_t i = 0; i < batch.size(); ++i) {
      auto solo = model->engine->Forward({batch[i]});
      ASSERT_TRUE(solo.ok()) << solo.status();
      EXPECT_LE(MaxAbsDiff((*batched)[i], (*solo)[0]), kBatchInvariance) << name << " sample " << i;
      EXPECT_LE(MaxAbsDiff((*batched)[i], ReferenceForward(model->config, model->weights, batch[i])), kGoldenTolerance)
          << name << " sample " << i;
    }
    auto unskipped = model->engine->Forward({model->samples[0]});
    ASSERT_TRUE(unskipped.ok());
    EXPECT_GT(MaxAbsDiff((*batched)[0], (*unskipped)[0]), kSkipChangesResult) << name;
  }
}

// A block listed twice is skipped once: the same result as listing it once.
TEST(EngineSkipLayers, ARepeatedIndexSkipsTheBlockOnce) {
  std::unique_ptr<TestModel> model = LoadTestModel("sd3_tiny");
  ASSERT_NE(model->engine, nullptr);
  const std::vector<int64_t> once = {1}, twice = {1, 1};
  auto outputs = model->engine->Forward({Skipping(model->samples[0], once), Skipping(model->samples[0], twice)});
  ASSERT_TRUE(outputs.ok()) << outputs.status();
  EXPECT_LE(MaxAbsDiff((*outputs)[0], (*outputs)[1]), kBatchInvariance);
}

TEST(EngineSkipLayers, RefusesAnIndexOutsideTheBlocksNamingTheField) {
  std::unique_ptr<TestModel> model = LoadTestModel("sd3_tiny");  // 3 blocks
  ASSERT_NE(model->engine, nullptr);
  const SampleInput sample = model->samples[0];
  for (const auto& [layer, message] : {std::pair<int64_t, std::string>{40, "skip_layers: layer 40 outside [0, 3)"},
                                       std::pair<int64_t, std::string>{3, "skip_layers: layer 3 outside [0, 3)"},
                                       std::pair<int64_t, std::string>{-1, "skip_layers: layer -1 outside [0, 3)"}}) {
    const std::vector<int64_t> layers = {0, layer};
    const absl::Status status = model->engine->ValidateSample(Skipping(sample, layers));
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << layer;
    EXPECT_THAT(std::string(status.message()), HasSubstr(message));
    // In a batch, after a good sample: the error names the bad one and nothing runs.
    auto result = model->engine->Forward({sample, Skipping(sample, layers)});
    ASSERT_EQ(result.status().code(), absl::StatusCode::kInvalidArgument) << layer;
    EXPECT_THAT(std::string(result.status().message()), ::testing::StartsWith("sample 1: skip_layers: "));
  }
  const std::vector<int64_t> last = {2};
  EXPECT_TRUE(model->engine->ValidateSample(Skipping(sample, last)).ok());
}

// bf16 compute: the mask works the same way, ragged batch against solo runs.
TEST(EngineSkipLayers, Bfloat16RaggedBatchWithASkippingSampleEqualsSoloRuns) {
  auto probe = Engine::Load(GoldenDir("sd3_tiny"), {.compute = ComputeDType::kBF16});
  if (!probe.ok() && probe.status().code() == absl::StatusCode::kInternal) {
    GTEST_SKIP() << "this CPU cannot run bf16 compute, so the bf16 skip mask is untested here: " << probe.status();
  }
  ASSERT_TRUE(probe.ok()) << probe.status();
  for (const std::string name : {"sd3_tiny", kDualAttentionModel}) {
    std::unique_ptr<TestModel> model = LoadTestModel(name, {.compute = ComputeDType::kBF16});
    ASSERT_NE(model->engine, nullptr);
    std::unique_ptr<TestModel> f32 = LoadTestModel(name);
    ASSERT_NE(f32->engine, nullptr);
    const std::vector<int64_t> layers = {1};
    const SampleInput sample = model->samples[0];
    const std::vector<SampleInput> batch = {sample, Skipping(sample, layers), OtherShapeSample(*model, 70)};
    auto batched = model->engine->Forward(batch);
    ASSERT_TRUE(batched.ok()) << batched.status();
    for (size_t i = 0; i < batch.size(); ++i) {
      auto solo = model->engine->Forward({batch[i]});
      ASSERT_TRUE(solo.ok()) << solo.status();
      EXPECT_LE(MaxAbsDiff((*batched)[i], (*solo)[0]), kBatchInvariance) << name << " sample " << i;
    }
    EXPECT_GT(MaxAbsDiff((*batched)[0], (*batched)[1]), kSkipChangesResult) << name << ": the skip mask did nothing";
    // It really ran in bf16 (its rounding shows against float32), and near the float32 skip.
    auto f32_skip = f32->engine->Forward({batch[1]});
    ASSERT_TRUE(f32_skip.ok()) << f32_skip.status();
    EXPECT_GT(MaxAbsDiff((*batched)[1], (*f32_skip)[0]), kBatchInvariance) << name << ": bf16 gave the f32 result";
    double diff_sq = 0, ref_sq = 0;
    for (int64_t e = 0; e < (*f32_skip)[0].NumElements(); ++e) {
      diff_sq += std::pow(double((*batched)[1].data[e]) - (*f32_skip)[0].data[e], 2);
      ref_sq += std::pow(double((*f32_skip)[0].data[e]), 2);
    }
    EXPECT_LE(std::sqrt(diff_sq / ref_sq), 2e-2) << name;
  }
}

}  // namespace
}  // namespace mmdit
