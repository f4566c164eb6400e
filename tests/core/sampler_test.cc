// The sampler (core/sampler.h) against diffusers' FlowMatchEulerDiscreteScheduler and
// StableDiffusion3Pipeline, written out again here: the schedule computed independently in
// double, the Euler step, classifier-free and skip-layer guidance and img2img's start worked by
// hand in float32, and RunSampler against a loop over Engine::Forward on a golden model.
#include "core/sampler.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <functional>

#include "core/engine.h"
#include "tests/core/test_util.h"

namespace mmdit {
namespace {

using ::mmdit::testing::GoldenDir;
using ::mmdit::testing::MaxAbsDiff;
using ::mmdit::testing::RandomTensor;
using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::IsEmpty;

// ---------------------------------------------------------------------------------------------
// The schedule.

// diffusers, step by step: __init__ builds the training table in float32 (torch),
// t = linspace(1, T, T) reversed, s = t / T, s = shift*s / (1 + (shift-1)*s); set_timesteps takes
// linspace(sigma_max*T, sigma_min*T, steps) in float64 (numpy), divides by T, shifts again in
// float64, rounds to float32 and appends 0.
std::vector<double> DiffusersSigmas(double shift, int64_t steps) {
  constexpr int kTrain = 1000;
  const float shift_f = static_cast<float>(shift), shift_minus_one_f = static_cast<float>(shift - 1.0);
  auto training_sigma = [&](int t) {
    const float s = static_cast<float>(t) / static_cast<float>(kTrain);
    return shift_f * s / (1.0f + shift_minus_one_f * s);
  };
  const double sigma_max = training_sigma(kTrain), sigma_min = training_sigma(1);
  // np.linspace(start, stop, num): start + k * step, the last one exactly stop.
  const double start = sigma_max * kTrain, stop = sigma_min * kTrain;
  const double step = steps > 1 ? (stop - start) / static_cast<double>(steps - 1) : 0.0;
  std::vector<double> sigmas;
  for (int64_t k = 0; k < steps; ++k) {
    const double t = steps > 1 && k == steps - 1 ? stop : start + static_cast<double>(k) * step;
    const double s = t / kTrain;
    sigmas.push_back(static_cast<float>(shift * s / (1.0 + (shift - 1.0) * s)));
  }
  sigmas.push_back(0.0);
  return sigmas;
}

// |actual - expected| within half a unit of `expected`'s 5th significant digit.
void ExpectFiveSignificantDigits(double actual, double expected, const std::string& what) {
  const double unit = std::pow(10.0, std::floor(std::log10(std::abs(expected))) - 4);
  EXPECT_LE(std::abs(actual - expected), 0.5 * unit) << what << ": " << actual << " vs " << expected;
}

struct ScheduleCase {
  double shift;
  int64_t steps;
};

class SigmaScheduleTest : public ::testing::TestWithParam<ScheduleCase> {};

TEST_P(SigmaScheduleTest, MatchesDiffusersComputedInDouble) {
  const auto [shift, steps] = GetParam();
  const std::vector<float> sigmas = SigmaSchedule({.shift = shift, .num_train_timesteps = 1000}, steps);
  const std::vector<double> expected = DiffusersSigmas(shift, steps);
  ASSERT_EQ(sigmas.size(), static_cast<size_t>(steps + 1));
  EXPECT_EQ(sigmas.back(), 0.0f);
  EXPECT_EQ(sigmas.front(), 1.0f);  // sigma_max = shift(1) = 1, for every shift
  for (int64_t i = 0; i <= steps; ++i) {
    EXPECT_NEAR(sigmas[i], expected[i], 1e-6) << "sigma " << i;
    if (i > 0) {
      EXPECT_LT(sigmas[i], sigmas[i - 1]) << "sigma " << i;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(ShiftsAndSteps, SigmaScheduleTest,
                         ::testing::Values(ScheduleCase{3.0, 1}, ScheduleCase{3.0, 2}, ScheduleCase{3.0, 4},
                                           ScheduleCase{3.0, 28}, ScheduleCase{3.0, 50}, ScheduleCase{1.0, 1},
                                           ScheduleCase{1.0, 2}, ScheduleCase{1.0, 4}, ScheduleCase{1.0, 28},
                                           ScheduleCase{1.0, 50}),
                         [](const ::testing::TestParamInfo<ScheduleCase>& info) {
                           return "shift" + std::to_string(static_cast<int>(info.param.shift)) + "_" +
                                  std::to_string(info.param.steps) + "steps";
                         });

// SD3's 28 steps at shift 3, as diffusers prints them.
TEST(SigmaSchedule, Sd3TwentyEightStepsAsDiffusersGivesThem) {
  const std::vector<float> s = SigmaSchedule(FlowMatchConfig{}, 28);
  ASSERT_EQ(s.size(), 29u);
  EXPECT_EQ(s[0], 1.0f);
  ExpectFiveSignificantDigits(s[1], 0.98738, "sigma 1");
  ExpectFiveSignificantDigits(s[2], 0.97411, "sigma 2");
  ExpectFiveSignificantDigits(s[25], 0.19983, "sigma 25");
  ExpectFiveSignificantDigits(s[26], 0.11091, "sigma 26");
  ExpectFiveSignificantDigits(s[27], 0.0089286, "sigma 27");
  EXPECT_EQ(s[28], 0.0f);
}

// The training table's sigma_min is shift(1/1000) = 0.0029940. Every schedule ends on it shifted
// a second time (set_timesteps shifts the linspace of already shifted values), so undoing one
// shift, s = sigma / (shift - (shift - 1) * sigma), of a schedule's last nonzero sigma gives it.
TEST(SigmaSchedule, LastNonzeroSigmaIsTheTrainingTablesSigmaMinShiftedAgain) {
  for (int64_t steps : {2, 28, 1000}) {
    const std::vector<float> s = SigmaSchedule(FlowMatchConfig{.shift = 3.0}, steps);
    ASSERT_EQ(s.size(), static_cast<size_t>(steps + 1));
    const double last = s[steps - 1];
    ExpectFiveSignificantDigits(last / (3.0 - 2.0 * last), 0.0029940, "sigma_min");
  }
  // Unshifted, the table's sigma_min is 1/1000 itself.
  const std::vector<float> plain = SigmaSchedule(FlowMatchConfig{.shift = 1.0}, 1000);
  EXPECT_NEAR(plain[999], 0.001, 1e-9);
  EXPECT_NEAR(plain[998], 0.002, 1e-9);
}

// ---------------------------------------------------------------------------------------------
// scheduler_config.json.

class LoadFlowMatchConfigTest : public ::testing::Test {
 protected:
  void SetUp() override { dir_ = testing::MakeTempDir("scheduler"); }
  void TearDown() override { std::filesystem::remove_all(dir_); }
  void Write(const std::string& json) { std::ofstream(dir_ + "/scheduler_config.json") << json; }
  std::string dir_;
};

TEST_F(LoadFlowMatchConfigTest, AbsentFileGivesTheDefaults) {
  auto config = LoadFlowMatchConfig(dir_);
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->shift, 3.0);
  EXPECT_EQ(config->num_train_timesteps, 1000);
}

TEST_F(LoadFlowMatchConfigTest, ReadsShiftFromDiffusersLayout) {
  Write(R"({"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 1.5, "num_train_timesteps": 1000})");
  auto config = LoadFlowMatchConfig(dir_);
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->shift, 1.5);
  EXPECT_EQ(config->num_train_timesteps, 1000);
}

TEST_F(LoadFlowMatchConfigTest, IgnoresOtherKeysOfSd35sFile) {
  Write(R"({"_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": "0.31.0",
            "base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 4096, "max_shift": 1.15,
            "num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": false})");
  auto config = LoadFlowMatchConfig(dir_);
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->shift, 3.0);
}

TEST_F(LoadFlowMatchConfigTest, RefusesMalformedFilesNamingFileAndKey) {
  const std::pair<std::string, std::string> cases[] = {
      {R"({"shift": 3.0,)", "scheduler_config.json"},
      {"[1, 2]", "scheduler_config.json"},
      {R"({"shift": 0})", "shift"},
      {R"({"shift": -1.5})", "shift"},
      {R"({"shift": 3.0, "num_train_timesteps": 1})", "num_train_timesteps"},
  };
  for (const auto& [json, named] : cases) {
    Write(json);
    auto config = LoadFlowMatchConfig(dir_);
    EXPECT_EQ(config.status().code(), absl::StatusCode::kInvalidArgument) << json;
    EXPECT_THAT(std::string(config.status().message()), HasSubstr(named)) << json;
  }
}

// ---------------------------------------------------------------------------------------------
// Noise.

TEST(GaussianNoise, IsStandardNormalAndTheSameForTheSameSeed) {
  const Shape shape = {4, 250, 100};  // 100k values
  const Tensor a = GaussianNoise(shape, 42), again = GaussianNoise(shape, 42), other = GaussianNoise(shape, 43);
  EXPECT_EQ(a.shape, shape);
  ASSERT_EQ(a.NumElements(), 100000);
  EXPECT_EQ(a.data, again.data);
  int64_t equal = 0;
  for (int64_t i = 0; i < a.NumElements(); ++i) equal += a.data[i] == other.data[i];
  EXPECT_LT(equal, 10) << "seeds 42 and 43 give the same noise";
  double sum = 0, sum_sq = 0;
  int64_t within_one = 0, beyond_three = 0;
  for (float v : a.data) {
    ASSERT_TRUE(std::isfinite(v));
    sum += v;
    sum_sq += double(v) * v;
    within_one += std::abs(v) < 1.0f;
    beyond_three += std::abs(v) > 3.0f;
  }
  const double n = a.NumElements(), mean = sum / n, variance = sum_sq / n - mean * mean;
  EXPECT_NEAR(mean, 0.0, 0.02);  // standard error 0.003
  EXPECT_NEAR(variance, 1.0, 0.03);
  EXPECT_NEAR(within_one / n, 0.6827, 0.01);
  EXPECT_NEAR(beyond_three / n, 0.0027, 0.0015);
}

TEST(GaussianNoise, KeepsTheShape) {
  for (const Shape& shape : {Shape{16, 4, 6}, Shape{7, 64}, Shape{1}}) {
    const Tensor noise = GaussianNoise(shape, 1);
    EXPECT_EQ(noise.shape, shape);
    EXPECT_EQ(noise.NumElements(), NumElements(shape));
  }
}

// ---------------------------------------------------------------------------------------------
// FlowMatchSampler, worked by hand on a latent of 4 floats.

Tensor Latent(std::vector<float> values) { return Tensor({1, static_cast<int64_t>(values.size())}, std::move(values)); }
Tensor Constant(float value) { return Latent({value, value, value, value}); }

const Tensor kNoise = Latent({0.5f, -1.25f, 2.0f, 0.1f});

GenerationOptions Options(int64_t steps, float guidance) {
  GenerationOptions options;
  options.steps = steps;
  options.guidance_scale = guidance;
  return options;
}

TEST(FlowMatchSampler, WithoutGuidanceTakesEulerStepsOnThePrediction) {
  const FlowMatchConfig config;
  const std::vector<float> s = SigmaSchedule(config, 2);
  auto sampler = FlowMatchSampler::Create(config, Options(2, 1.0f), kNoise);
  ASSERT_TRUE(sampler.ok()) << sampler.status();
  EXPECT_EQ(sampler->total_steps(), 2);
  EXPECT_EQ(sampler->steps_taken(), 0);
  EXPECT_EQ(sampler->schedule_index(), 0);
  EXPECT_EQ(sampler->sigma(), s[0]);
  EXPECT_FLOAT_EQ(sampler->timestep(), s[0] * 1000.0f);
  EXPECT_EQ(sampler->latent().shape, kNoise.shape);
  EXPECT_EQ(sampler->latent().data, kNoise.data);  // text-to-image starts at the noise (sigma 1)
  EXPECT_THAT(sampler->Rows(), ElementsAre(RowRole::kPositive));

  // x1 = x0 + (s1 - s0) * v, in float32.
  const Tensor v0 = Constant(0.375f);
  ASSERT_TRUE(sampler->Advance({v0}).ok());
  Tensor expected = kNoise;
  for (float& x : expected.data) x = x + (s[1] - s[0]) * 0.375f;
  EXPECT_EQ(sampler->latent().data, expected.data);
  EXPECT_EQ(sampler->schedule_index(), 1);
  EXPECT_EQ(sampler->steps_taken(), 1);
  EXPECT_EQ(sampler->sigma(), s[1]);
  EXPECT_FLOAT_EQ(sampler->timestep(), s[1] * 1000.0f);
  EXPECT_FALSE(sampler->done());

  const Tensor v1 = Latent({-0.5f, 0.25f, 1.0f, -2.0f});
  ASSERT_TRUE(sampler->Advance({v1}).ok());
  for (int k = 0; k < 4; ++k) expected.data[k] = expected.data[k] + (s[2] - s[1]) * v1.data[k];
  EXPECT_EQ(sampler->latent().data, expected.data);
  EXPECT_TRUE(sampler->done());
  EXPECT_EQ(sampler->steps_taken(), 2);
  EXPECT_EQ(sampler->sigma(), 0.0f);
  EXPECT_THAT(sampler->Rows(), IsEmpty());

  const absl::Status after_the_end = sampler->Advance({v1});
  EXPECT_EQ(after_the_end.code(), absl::StatusCode::kFailedPrecondition) << after_the_end;
  EXPECT_EQ(sampler->latent().data, expected.data);
}

TEST(FlowMatchSampler, GuidanceScaleAtMostOneRunsOnlyThePrompt) {
  for (float guidance : {1.0f, 0.5f, 0.0f}) {
    auto sampler = FlowMatchSampler::Create(FlowMatchConfig{}, Options(4, guidance), kNoise);
    ASSERT_TRUE(sampler.ok()) << sampler.status();
    EXPECT_THAT(sampler->Rows(), ElementsAre(RowRole::kPositive)) << guidance;
  }
}

TEST(FlowMatchSampler, ClassifierFreeGuidanceCombinesNegativeAndPositive) {
  const FlowMatchConfig config;
  const std::vector<float> s = SigmaSchedule(config, 2);
  auto sampler = FlowMatchSampler::Create(config, Options(2, 7.0f), kNoise);
  ASSERT_TRUE(sampler.ok()) << sampler.status();
  EXPECT_THAT(sampler->Rows(), ElementsAre(RowRole::kNegative, RowRole::kPositive));
  const Tensor negative = Latent({0.1f, 0.2f, -0.3f, 0.4f}), positive = Latent({0.5f, -0.6f, 0.7f, 0.8f});
  ASSERT_TRUE(sampler->Advance({negative, positive}).ok());
  for (int k = 0; k < 4; ++k) {
    const float v = negative.data[k] + 7.0f * (positive.data[k] - negative.data[k]);
    EXPECT_FLOAT_EQ(sampler->latent().data[k], kNoise.data[k] + (s[1] - s[0]) * v) << k;
  }
}

// SLG's extra row runs while steps * start < i < steps * stop: for 28 steps, 0.28 < i < 5.6.
TEST(FlowMatchSampler, SkipLayerGuidanceAddsItsRowOnlyInItsWindow) {
  const FlowMatchConfig config;
  GenerationOptions options = Options(28, 7.0f);
  options.skip_layer_guidance.layers = {7, 8, 9};
  options.skip_layer_guidance.scale = 2.8f;
  const std::vector<float> s = SigmaSchedule(config, 28);
  auto sampler = FlowMatchSampler::Create(config, options, kNoise);
  ASSERT_TRUE(sampler.ok()) << sampler.status();
  Tensor expected = kNoise;
  std::vector<int64_t> active_steps;
  for (int64_t i = 0; i < 28; ++i) {
    ASSERT_EQ(sampler->schedule_index(), i);
    const bool active = 28 * 0.01 < i && i < 28 * 0.2;
    if (active) active_steps.push_back(i);
    const std::vector<RowRole> rows = sampler->Rows();
    if (active) {
      EXPECT_THAT(rows, ElementsAre(RowRole::kNegative, RowRole::kPositive, RowRole::kSkipLayers)) << "step " << i;
    } else {
      EXPECT_THAT(rows, ElementsAre(RowRole::kNegative, RowRole::kPositive)) << "step " << i;
    }
    const float f = 0.01f * static_cast<float>(i);
    const Tensor negative = Latent({0.1f + f, -0.2f, 0.3f, f}), positive = Latent({0.4f, 0.5f - f, -0.6f, 0.7f}),
                 skipped = Latent({-0.3f, 0.2f, f, 0.9f});
    std::vector<Tensor> predictions = {negative, positive};
    if (active) predictions.push_back(skipped);
    ASSERT_TRUE(sampler->Advance(predictions).ok()) << "step " << i;
    for (int k = 0; k < 4; ++k) {
      float v = negative.data[k] + 7.0f * (positive.data[k] - negative.data[k]);
      if (active) v = v + (positive.data[k] - skipped.data[k]) * 2.8f;
      expected.data[k] = expected.data[k] + (s[i + 1] - s[i]) * v;
    }
    EXPECT_LE(MaxAbsDiff(sampler->latent(), expected), 1e-5) << "step " << i;
  }
  EXPECT_THAT(active_steps, ElementsAre(1, 2, 3, 4, 5));
  EXPECT_TRUE(sampler->done());
}

// img2img: steps 10 at strength 0.6 start at schedule index int(10 - 10 * 0.6) = 4 (diffusers
// computes it from the Python float 0.6), from sigma * noise + (1 - sigma) * x0.
TEST(FlowMatchSampler, Img2ImgStartsAtTheStrengthsIndexFromNoisedInput) {
  const FlowMatchConfig config;
  const std::vector<float> s = SigmaSchedule(config, 10);
  const Tensor x0 = Latent({1.0f, 2.0f, -0.5f, 0.25f});
  GenerationOptions options = Options(10, 1.0f);
  options.strength = 0.6f;
  auto sampler = FlowMatchSampler::Create(config, options, kNoise, &x0);
  ASSERT_TRUE(sampler.ok()) << sampler.status();
  EXPECT_EQ(sampler->schedule_index(), 4);
  EXPECT_EQ(sampler->total_steps(), 6);
  EXPECT_EQ(sampler->steps_taken(), 0);
  EXPECT_EQ(sampler->sigma(), s[4]);
  for (int k = 0; k < 4; ++k) {
    EXPECT_FLOAT_EQ(sampler->latent().data[k], s[4] * kNoise.data[k] + (1.0f - s[4]) * x0.data[k]) << k;
  }
  for (int step = 0; step < 6; ++step) {
    ASSERT_FALSE(sampler->done()) << step;
    ASSERT_TRUE(sampler->Advance({Constant(1.0f)}).ok()) << step;
  }
  EXPECT_TRUE(sampler->done());
  EXPECT_EQ(sampler->steps_taken(), 6);

  // A small strength still takes the last step: int(10 - 0.5) = 9.
  options.strength = 0.05f;
  auto last_step_only = FlowMatchSampler::Create(config, options, kNoise, &x0);
  ASSERT_TRUE(last_step_only.ok()) << last_step_only.status();
  EXPECT_EQ(last_step_only->schedule_index(), 9);
  EXPECT_EQ(last_step_only->total_steps(), 1);
  // Strength 1 is text-to-image from x0's noise: index 0, the noise itself.
  options.strength = 1.0f;
  auto full = FlowMatchSampler::Create(config, options, kNoise, &x0);
  ASSERT_TRUE(full.ok()) << full.status();
  EXPECT_EQ(full->schedule_index(), 0);
  EXPECT_EQ(full->latent().data, kNoise.data);
}

TEST(FlowMatchSampler, RefusesWrongPredictionsAndKeepsTheLatent) {
  auto sampler = FlowMatchSampler::Create(FlowMatchConfig{}, Options(4, 7.0f), kNoise);  // 2 rows
  ASSERT_TRUE(sampler.ok()) << sampler.status();
  const Tensor good = Constant(0.5f), wide = Tensor({1, 5}), flat = Tensor({4});
  const std::vector<std::vector<Tensor>> wrong = {{good}, {good, good, good}, {good, wide}, {wide, good}, {good, flat}};
  for (size_t c = 0; c < wrong.size(); ++c) {
    const absl::Status status = sampler->Advance(wrong[c]);
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << "case " << c << ": " << status;
    EXPECT_EQ(sampler->latent().data, kNoise.data) << "case " << c;
    EXPECT_EQ(sampler->schedule_index(), 0) << "case " << c;
  }
  EXPECT_TRUE(sampler->Advance({good, good}).ok());
}

struct BadOptionsCase {
  std::string description;
  std::function<void(GenerationOptions&)> change;
  bool img2img;
  std::string named;
  friend void PrintTo(const BadOptionsCase& c, std::ostream* os) { *os << c.description; }
};

class FlowMatchSamplerRejectsTest : public ::testing::TestWithParam<BadOptionsCase> {};

TEST_P(FlowMatchSamplerRejectsTest, NamesTheOption) {
  GenerationOptions options = Options(28, 7.0f);
  GetParam().change(options);
  const Tensor x0 = Latent({1, 2, 3, 4});
  auto sampler = FlowMatchSampler::Create(FlowMatchConfig{}, options, kNoise, GetParam().img2img ? &x0 : nullptr);
  EXPECT_EQ(sampler.status().code(), absl::StatusCode::kInvalidArgument) << sampler.status();
  EXPECT_THAT(std::string(sampler.status().message()), HasSubstr(GetParam().named));
}

INSTANTIATE_TEST_SUITE_P(
    BadOptions, FlowMatchSamplerRejectsTest,
    ::testing::Values(BadOptionsCase{"no steps", [](GenerationOptions& o) { o.steps = 0; }, false, "steps"},
                      BadOptionsCase{"negative steps", [](GenerationOptions& o) { o.steps = -3; }, false, "steps"},
                      BadOptionsCase{"NaN guidance", [](GenerationOptions& o) { o.guidance_scale = NAN; }, false,
                                     "guidance_scale"},
                      BadOptionsCase{"strength 0", [](GenerationOptions& o) { o.strength = 0.0f; }, true, "strength"},
                      BadOptionsCase{"strength 1.5", [](GenerationOptions& o) { o.strength = 1.5f; }, true, "strength"},
                      BadOptionsCase{"skip layers without CFG",
                                     [](GenerationOptions& o) {
                                       o.guidance_scale = 1.0f;
                                       o.skip_layer_guidance.layers = {7, 8, 9};
                                     },
                                     false, "skip_layer_guidance"},
                      BadOptionsCase{"skip layer scale NaN",
                                     [](GenerationOptions& o) {
                                       o.skip_layer_guidance.layers = {7};
                                       o.skip_layer_guidance.scale = NAN;
                                     },
                                     false, "skip_layer_guidance"},
                      BadOptionsCase{"skip layer start below 0",
                                     [](GenerationOptions& o) {
                                       o.skip_layer_guidance.layers = {7};
                                       o.skip_layer_guidance.start = -0.1;
                                     },
                                     false, "skip_layer_guidance"},
                      BadOptionsCase{"skip layer stop above 1",
                                     [](GenerationOptions& o) {
                                       o.skip_layer_guidance.layers = {7};
                                       o.skip_layer_guidance.stop = 1.5;
                                     },
                                     false, "skip_layer_guidance"}),
    testing::DescriptionAsTestName());

TEST(FlowMatchSampler, RefusesAnInitLatentOfAnotherShape) {
  GenerationOptions options = Options(10, 1.0f);
  options.strength = 0.5f;
  const Tensor x0({1, 5});
  auto sampler = FlowMatchSampler::Create(FlowMatchConfig{}, options, kNoise, &x0);
  EXPECT_EQ(sampler.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(sampler.status().message()), HasSubstr("init_latent"));
}

// ---------------------------------------------------------------------------------------------
// StepRows.

TEST(StepRows, ViewTheLatentAndEachRolesTextAtTheSamplersTimestep) {
  const Tensor positive_txt = RandomTensor({7, 40}, 1), positive_pooled = RandomTensor({24}, 2);
  const Tensor negative_txt = RandomTensor({3, 40}, 3), negative_pooled = RandomTensor({24}, 4);
  const TextCondition positive{positive_txt, positive_pooled}, negative{negative_txt, negative_pooled};
  const FlowMatchConfig config;
  const std::vector<float> s = SigmaSchedule(config, 28);
  GenerationOptions options = Options(28, 7.0f);
  options.skip_layer_guidance.layers = {7, 8, 9};
  auto sampler = FlowMatchSampler::Create(config, options, kNoise);
  ASSERT_TRUE(sampler.ok()) << sampler.status();

  auto expect_row = [&](const SampleInput& row, const TextCondition& text, float timestep,
                        const std::vector<int64_t>& skip, const std::string& what) {
    EXPECT_EQ(row.img_latent.data, sampler->latent().data.data()) << what;
    EXPECT_EQ(row.img_latent.shape, sampler->latent().shape) << what;
    EXPECT_EQ(row.txt_embed.data, text.txt_embed.data) << what;
    EXPECT_EQ(row.txt_embed.shape, text.txt_embed.shape) << what;
    EXPECT_EQ(row.pooled_text.data, text.pooled_text.data) << what;
    EXPECT_EQ(row.pooled_text.shape, text.pooled_text.shape) << what;
    EXPECT_FLOAT_EQ(row.timestep, timestep) << what;
    EXPECT_EQ(std::vector<int64_t>(row.skip_layers.begin(), row.skip_layers.end()), skip) << what;
  };
  // Step 0: outside the SLG window.
  std::vector<SampleInput> rows = StepRows(*sampler, positive, negative);
  ASSERT_EQ(rows.size(), 2u);
  expect_row(rows[0], negative, s[0] * 1000.0f, {}, "step 0 negative");
  expect_row(rows[1], positive, s[0] * 1000.0f, {}, "step 0 positive");
  EXPECT_FLOAT_EQ(rows[0].timestep, sampler->timestep());
  ASSERT_TRUE(sampler->Advance({Constant(0.1f), Constant(0.2f)}).ok());
  // Step 1: inside it.
  rows = StepRows(*sampler, positive, negative);
  ASSERT_EQ(rows.size(), 3u);
  expect_row(rows[0], negative, s[1] * 1000.0f, {}, "step 1 negative");
  expect_row(rows[1], positive, s[1] * 1000.0f, {}, "step 1 positive");
  expect_row(rows[2], positive, s[1] * 1000.0f, {7, 8, 9}, "step 1 skip layers");

  auto finished = FlowMatchSampler::Create(config, Options(1, 1.0f), kNoise);
  ASSERT_TRUE(finished.ok());
  ASSERT_TRUE(finished->Advance({Constant(0.0f)}).ok());
  EXPECT_THAT(StepRows(*finished, positive, negative), IsEmpty());
}

// ---------------------------------------------------------------------------------------------
// RunSampler on a golden model against the loop written out.

class RunSamplerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto engine = Engine::Load(GoldenDir("sd3_tiny"));  // 3 blocks
    ASSERT_TRUE(engine.ok()) << engine.status();
    engine_ = std::move(*engine);
    golden_ = testing::LoadGoldenCase("sd3_tiny");
    const SampleInput sample = golden_.Samples()[0];
    positive_ = {sample.txt_embed, sample.pooled_text};
    negative_ = {negative_txt_, negative_pooled_};
    latent_shape_ = sample.img_latent.shape;
  }

  // The sampler's trajectory by hand: one Forward per step over [negative, positive(, skip)],
  // CFG (+ SLG) and the Euler step in float32.
  Tensor HandWrittenLoop(const GenerationOptions& options, const Tensor& noise) {
    const std::vector<float> s = SigmaSchedule(FlowMatchConfig{}, options.steps);
    const SkipLayerGuidanceOptions& slg = options.skip_layer_guidance;
    Tensor x = noise;
    for (int64_t i = 0; i < options.steps; ++i) {
      const float t = s[i] * 1000.0f;
      std::vector<SampleInput> rows = {{x, negative_.txt_embed, t, negative_.pooled_text},
                                       {x, positive_.txt_embed, t, positive_.pooled_text}};
      const bool skip = !slg.layers.empty() && options.steps * slg.start < i && i < options.steps * slg.stop;
      if (skip) rows.push_back({x, positive_.txt_embed, t, positive_.pooled_text, slg.layers});
      auto v = engine_->Forward(rows);
      EXPECT_TRUE(v.ok()) << v.status();
      if (!v.ok()) return x;
      for (int64_t k = 0; k < x.NumElements(); ++k) {
        const float neg = (*v)[0].data[k], pos = (*v)[1].data[k];
        float guided = neg + options.guidance_scale * (pos - neg);
        if (skip) guided = guided + (pos - (*v)[2].data[k]) * slg.scale;
        x.data[k] = x.data[k] + (s[i + 1] - s[i]) * guided;
      }
    }
    return x;
  }

  std::unique_ptr<Engine> engine_;
  testing::GoldenCase golden_;
  const Tensor negative_txt_ = RandomTensor({5, 40}, 11), negative_pooled_ = RandomTensor({24}, 12);
  TextCondition positive_, negative_;
  Shape latent_shape_;
};

TEST_F(RunSamplerTest, ThreeStepsWithGuidanceEqualTheLoopOverForward) {
  const GenerationOptions options = Options(3, 7.0f);
  const Tensor noise = GaussianNoise(latent_shape_, 5);
  auto sampler = FlowMatchSampler::Create(FlowMatchConfig{}, options, noise);
  ASSERT_TRUE(sampler.ok()) << sampler.status();
  ASSERT_TRUE(RunSampler(*engine_, *sampler, positive_, negative_).ok());
  EXPECT_TRUE(sampler->done());
  const Tensor expected = HandWrittenLoop(options, noise);
  EXPECT_LE(MaxAbsDiff(sampler->latent(), expected), 1e-6);
  EXPECT_GT(MaxAbsDiff(sampler->latent(), noise), 0.1) << "the sampler did not move";
}

// 10 steps: SLG's row (block 1 skipped) runs at step 1 only (0.1 < i < 2).
TEST_F(RunSamplerTest, SkipLayerGuidanceEqualsTheLoopOverForward) {
  GenerationOptions options = Options(10, 7.0f);
  options.skip_layer_guidance.layers = {1};
  const Tensor noise = GaussianNoise(latent_shape_, 6);
  auto sampler = FlowMatchSampler::Create(FlowMatchConfig{}, options, noise);
  ASSERT_TRUE(sampler.ok()) << sampler.status();
  ASSERT_TRUE(RunSampler(*engine_, *sampler, positive_, negative_).ok());
  const Tensor expected = HandWrittenLoop(options, noise);
  EXPECT_LE(MaxAbsDiff(sampler->latent(), expected), 1e-6);
  GenerationOptions without = options;
  without.skip_layer_guidance.layers.clear();
  EXPECT_GT(MaxAbsDiff(expected, HandWrittenLoop(without, noise)), 1e-4) << "SLG changed nothing";
}

}  // namespace
}  // namespace mmdit
