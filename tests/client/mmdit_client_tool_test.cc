// The mmdit-client command line against an in-process server.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <cstdio>
#include <filesystem>

#include "client/image.h"
#include "core/npy.h"
#include "core/sampler.h"
#include "nlohmann/json.hpp"
#include "tests/server/server_test_util.h"

namespace mmdit {
namespace {

using ::mmdit::testing::DigitsModelDir;
using ::mmdit::testing::GoldenDir;
using ::mmdit::testing::MakeTempDir;
using ::mmdit::testing::MaxAbsDiff;
using ::mmdit::testing::RandomTensor;
using ::mmdit::testing::StartModelServer;
using ::mmdit::testing::StartServer;
using ::testing::HasSubstr;

struct ToolRun {
  int exit_code = -1;
  std::string output;  // stdout then stderr
};

ToolRun Client(const std::string& args) {
  const std::string command = std::string(MMDIT_CLIENT_PATH) + " " + args + " 2>&1";
  ToolRun run;
  FILE* pipe = ::popen(command.c_str(), "r");
  std::array<char, 4096> buffer;
  while (size_t n = std::fread(buffer.data(), 1, buffer.size(), pipe)) run.output.append(buffer.data(), n);
  const int status = ::pclose(pipe);
  run.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return run;
}

std::string Target(const DenoiserServer& server) { return "--target 127.0.0.1:" + std::to_string(server.port()); }

std::string GoldenInputs(const std::string& name) {
  const std::string d = GoldenDir(name);
  return " --img_latent " + d + "/img_latent.npy --txt_embed " + d + "/txt_embed.npy --timestep " + d +
         "/timestep.npy --pooled_text " + d + "/pooled_text.npy";
}

TEST(MmditClientTool, HealthExitsZeroOnlyWhenServing) {
  auto server = StartServer({}, "sd3_tiny", /*serve=*/false);
  ToolRun run = Client("health " + Target(*server));
  EXPECT_EQ(run.exit_code, 1);
  EXPECT_THAT(run.output, HasSubstr("NOT_SERVING"));
  ASSERT_TRUE(server->Serve(Engine::Load(GoldenDir("sd3_tiny")).value(), {}).ok());
  run = Client("health " + Target(*server));
  EXPECT_EQ(run.exit_code, 0) << run.output;
  EXPECT_THAT(run.output, HasSubstr("SERVING"));
  run = Client("health --target 127.0.0.1:1 --timeout_ms 500");
  EXPECT_EQ(run.exit_code, 1);
  EXPECT_THAT(run.output, ::testing::AnyOf(HasSubstr("UNAVAILABLE"), HasSubstr("DEADLINE_EXCEEDED")));
}

TEST(MmditClientTool, InfoAndDenoiseMatchTheGoldenCase) {
  auto server = StartServer({}, "sd35_tiny");
  ToolRun run = Client("info " + Target(*server));
  ASSERT_EQ(run.exit_code, 0) << run.output;
  const auto info = nlohmann::json::parse(run.output);
  EXPECT_EQ(info["model"]["qk_norm"], true);
  const std::string out = testing::MakeTempDir("client") + "/out.npy";
  run = Client("denoise " + Target(*server) + GoldenInputs("sd35_tiny") + " --out " + out);
  ASSERT_EQ(run.exit_code, 0) << run.output;
  auto prediction = ReadNpy(out);
  auto expected = ReadNpy(GoldenDir("sd35_tiny") + "/expected_f64.npy");
  ASSERT_TRUE(prediction.ok() && expected.ok());
  EXPECT_LE(testing::MaxAbsDiff(*prediction, *expected), 1e-4);
}

TEST(MmditClientTool, DenoiseFailurePrintsTheCodeNameAndMessage) {
  auto server = StartServer({}, "sd3_tiny");
  const ToolRun run = Client("denoise " + Target(*server) + GoldenInputs("sd35_tiny") + " --out /tmp/never.npy");
  EXPECT_EQ(run.exit_code, 1);
  EXPECT_THAT(run.output, HasSubstr("INVALID_ARGUMENT: "));
  EXPECT_THAT(run.output, HasSubstr("txt_embed"));
}

TEST(MmditClientTool, BenchJsonLastLineHasExactlyThePromisedKeys) {
  auto server = StartServer({}, "sd3_tiny");
  const ToolRun run = Client("bench " + Target(*server) +
                             " --concurrency 2 --requests 6 --latent 4,8,8 --txt_tokens 7 --batch 2 --json");
  ASSERT_EQ(run.exit_code, 0) << run.output;
  const std::string trimmed = run.output.substr(0, run.output.find_last_not_of('\n') + 1);
  const std::string last_line = trimmed.substr(trimmed.rfind('\n') + 1);
  const auto report = nlohmann::json::parse(last_line);
  EXPECT_EQ(report["requests"], 6);
  EXPECT_EQ(report["throughput_samples_per_s"].get<double>(), 2 * report["throughput_rps"].get<double>());
  EXPECT_EQ(report.size(), 8u);
  EXPECT_TRUE(report["latency_ms"].contains("p99"));
}

// A bench whose every request fails says why, once per code, and exits non-zero (the report
// still prints, so the counts are there to read).
TEST(MmditClientTool, BenchThatFailsPrintsTheFirstErrorOfEachCodeAndExitsNonZero) {
  auto server = StartServer({}, "sd3_tiny");
  // More text tokens than the server's 512: every call refused.
  const ToolRun run = Client("bench " + Target(*server) + " --concurrency 2 --requests 4 --latent 4,8,8 --txt_tokens 600");
  EXPECT_EQ(run.exit_code, 1) << run.output;
  EXPECT_THAT(run.output, HasSubstr("errors: INVALID_ARGUMENT=4"));
  EXPECT_THAT(run.output, HasSubstr("first INVALID_ARGUMENT: txt_embed: 600 text tokens"));
  EXPECT_THAT(run.output, HasSubstr("4 of 4 requests failed"));
}

TEST(MmditClientTool, InfoPrints64BitIntegersAsNumbers) {
  auto server = StartServer({}, "sd3_tiny");
  const ToolRun run = Client("info " + Target(*server));
  ASSERT_EQ(run.exit_code, 0) << run.output;
  const auto info = nlohmann::json::parse(run.output);
  EXPECT_TRUE(info["model"]["parameter_count"].is_number_integer()) << info["model"]["parameter_count"];
  EXPECT_GT(info["model"]["parameter_count"].get<int64_t>(), 0);
  EXPECT_EQ(info["limits"]["max_receive_message_bytes"].get<int64_t>(), int64_t{64} << 20);
  EXPECT_EQ(info["model"]["hidden_size"].get<int64_t>(), 64);
}

TEST(MmditClientTool, AMissingRequiredFlagIsAUsageErrorExitingTwo) {
  const ToolRun run = Client("info");
  EXPECT_EQ(run.exit_code, 2) << run.output;
  EXPECT_THAT(run.output, HasSubstr("missing required flag --target"));
}

// The last line of `output`, parsed as JSON.
nlohmann::json LastLineJson(const std::string& output) {
  const std::string trimmed = output.substr(0, output.find_last_not_of('\n') + 1);
  return nlohmann::json::parse(trimmed.substr(trimmed.rfind('\n') + 1));
}

// Prompt files for sd3_tiny (batch 1) in a fresh directory, and the image core's reference
// loop samples from them.
struct GenerateFiles {
  std::string dir = testing::MakeTempDir("client_generate");
  Tensor txt = RandomTensor({1, 7, 40}, 21), pooled = RandomTensor({1, 24}, 22);
  Tensor negative_txt = RandomTensor({1, 5, 40}, 23), negative_pooled = RandomTensor({1, 24}, 24);

  GenerateFiles() {
    EXPECT_TRUE(WriteNpy(dir + "/txt.npy", txt).ok());
    EXPECT_TRUE(WriteNpy(dir + "/pooled.npy", pooled).ok());
    EXPECT_TRUE(WriteNpy(dir + "/negative_txt.npy", negative_txt).ok());
    EXPECT_TRUE(WriteNpy(dir + "/negative_pooled.npy", negative_pooled).ok());
  }
  std::string Flags() const {
    return " --txt_embed " + dir + "/txt.npy --pooled_text " + dir + "/pooled.npy --negative_txt_embed " + dir +
           "/negative_txt.npy --negative_pooled_text " + dir + "/negative_pooled.npy";
  }
  // [1, 4, 8, 8]: RunSampler from `noise` ([4, 8, 8]) on the default scheduler (as StartServer serves).
  Tensor Reference(Tensor noise, int64_t steps, float guidance) const {
    auto engine = Engine::Load(GoldenDir("sd3_tiny"));
    EXPECT_TRUE(engine.ok()) << engine.status();
    GenerationOptions options;
    options.steps = steps;
    options.guidance_scale = guidance;
    auto sampler = FlowMatchSampler::Create(FlowMatchConfig{}, options, std::move(noise));
    EXPECT_TRUE(sampler.ok()) << sampler.status();
    const TextCondition positive{TensorView({7, 40}, txt.data.data()), TensorView({24}, pooled.data.data())};
    const TextCondition negative{TensorView({5, 40}, negative_txt.data.data()),
                                 TensorView({24}, negative_pooled.data.data())};
    const absl::Status status = RunSampler(**engine, *sampler, positive, negative);
    EXPECT_TRUE(status.ok()) << status;
    return Tensor({1, 4, 8, 8}, sampler->latent().data);
  }
};

TEST(MmditClientTool, GenerateWritesTheSampledLatentAndALineAStep) {
  auto server = StartServer({}, "sd3_tiny");
  const GenerateFiles files;
  const Tensor noise = RandomTensor({1, 4, 8, 8}, 25);
  ASSERT_TRUE(WriteNpy(files.dir + "/noise.npy", noise).ok());
  const std::string out = files.dir + "/out.npy";
  // No --latent: the noise gives the shape.
  const ToolRun run = Client("generate " + Target(*server) + files.Flags() + " --initial_noise " + files.dir +
                             "/noise.npy --steps 3 --guidance 4.5 --out " + out);
  ASSERT_EQ(run.exit_code, 0) << run.output;
  EXPECT_THAT(run.output, HasSubstr("step 1/3 sigma "));
  EXPECT_THAT(run.output, HasSubstr("step 3/3 sigma 0.0000 rows 2 batch "));
  EXPECT_EQ(run.output.find('\r'), std::string::npos);  // stderr is a pipe: lines, not a bar
  auto latent = ReadNpy(out);
  ASSERT_TRUE(latent.ok()) << latent.status();
  EXPECT_EQ(latent->shape, (Shape{1, 4, 8, 8}));
  EXPECT_LE(MaxAbsDiff(*latent, files.Reference(Tensor({4, 8, 8}, noise.data), 3, 4.5f)), 1e-5);
}

TEST(MmditClientTool, GenerateFromASeedStartsFromItsGaussianNoise) {
  auto server = StartServer({}, "sd3_tiny");
  const GenerateFiles files;
  const std::string out = files.dir + "/seeded.npy";
  const ToolRun run = Client("generate " + Target(*server) + files.Flags() +
                             " --latent 4,8,8 --seed 42 --steps 2 --guidance 3 --out " + out);
  ASSERT_EQ(run.exit_code, 0) << run.output;
  auto latent = ReadNpy(out);
  ASSERT_TRUE(latent.ok()) << latent.status();
  EXPECT_LE(MaxAbsDiff(*latent, files.Reference(GaussianNoise({4, 8, 8}, 42), 2, 3.0f)), 1e-5);
}

TEST(MmditClientTool, GenerateWithoutALatentShapeSamplesTheModelsNominalSize) {
  auto server = StartServer({}, "sd3_tiny");
  const GenerateFiles files;
  const std::string out = files.dir + "/nominal.npy";
  const ToolRun run = Client("generate " + Target(*server) + files.Flags() + " --seed 42 --steps 2 --guidance 3 --out " + out);
  ASSERT_EQ(run.exit_code, 0) << run.output;
  auto latent = ReadNpy(out);
  ASSERT_TRUE(latent.ok()) << latent.status();
  EXPECT_EQ(latent->shape, (Shape{1, 4, 8, 8}));  // sd3_tiny: in_channels 4, sample_size 8
  EXPECT_LE(MaxAbsDiff(*latent, files.Reference(GaussianNoise({4, 8, 8}, 42), 2, 3.0f)), 1e-5);
}

TEST(MmditClientTool, GenerateFailuresNameTheProblem) {
  auto server = StartServer({}, "sd3_tiny");
  const GenerateFiles files;
  ToolRun run = Client("generate " + Target(*server) + files.Flags() + " --latent 4,7,8 --steps 2 --out /tmp/never.npy");
  EXPECT_EQ(run.exit_code, 1);
  EXPECT_THAT(run.output, HasSubstr("INVALID_ARGUMENT: "));
  run = Client("generate " + Target(*server) + " --txt_embed " + files.dir + "/txt.npy --pooled_text " + files.dir +
               "/pooled.npy --latent 4,8,8 --steps 2 --out /tmp/never.npy");  // CFG by default, no negative
  EXPECT_EQ(run.exit_code, 1);
  EXPECT_THAT(run.output, HasSubstr("negative"));
  run = Client("generate " + Target(*server) + files.Flags() + " --latent 4,8,8 --stps 2 --out /tmp/never.npy");
  EXPECT_EQ(run.exit_code, 2);
  EXPECT_THAT(run.output, HasSubstr("stps"));
}

// The digits model: a prompt in, a picture out.
TEST(MmditClientTool, GenerateWritesThePromptsImageAsAPngAndTheSameLatentAsNpy) {
  auto server = StartModelServer({}, DigitsModelDir());
  ASSERT_NE(server, nullptr);
  const std::string dir = MakeTempDir("client_png");
  const std::string common = "generate " + Target(*server) + " --prompt 7 --seed 3 --steps 8";
  ToolRun run = Client(common + " --png_scale 4 --out " + dir + "/seven.png");
  ASSERT_EQ(run.exit_code, 0) << run.output;
  run = Client(common + " --out " + dir + "/seven.npy");
  ASSERT_EQ(run.exit_code, 0) << run.output;
  auto png = ReadPng(dir + "/seven.png");
  ASSERT_TRUE(png.ok()) << png.status();
  EXPECT_EQ(png->width, 32);  // 8 x 8, each pixel 4 x 4
  EXPECT_EQ(png->height, 32);
  EXPECT_EQ(png->channels, 1);
  auto latent = ReadNpy(dir + "/seven.npy");
  ASSERT_TRUE(latent.ok()) << latent.status();
  ASSERT_EQ(latent->shape, (Shape{1, 1, 8, 8}));
  auto image = LatentToImage(*latent);
  ASSERT_TRUE(image.ok()) << image.status();
  EXPECT_EQ(png->pixels, Upscale(*image, 4).pixels);  // same seed, same image
  // Not a blank: a digit has ink and paper.
  const auto [darkest, lightest] = std::minmax_element(image->pixels.begin(), image->pixels.end());
  EXPECT_LT(*darkest, 64);
  EXPECT_GT(*lightest, 192);

  run = Client(common + " --out " + dir + "/seven.jpg");
  EXPECT_EQ(run.exit_code, 1);
  EXPECT_THAT(run.output, HasSubstr("--out must end in .npy or .png"));
  run = Client("generate " + Target(*server) + " --prompt banana --out " + dir + "/x.png");
  EXPECT_EQ(run.exit_code, 1);
  EXPECT_THAT(run.output, HasSubstr("INVALID_ARGUMENT: prompt: word 'banana'"));
  std::filesystem::remove_all(dir);
}

TEST(MmditClientTool, GenerateGridIsOneTilePerDigitEachTheSingleDigitsImage) {
  auto server = StartModelServer({}, DigitsModelDir());
  ASSERT_NE(server, nullptr);
  const std::string dir = MakeTempDir("client_grid");
  ToolRun run = Client("generate " + Target(*server) + " --grid 10 --seed 5 --steps 8 --out " + dir + "/grid.png");
  ASSERT_EQ(run.exit_code, 0) << run.output;
  EXPECT_THAT(run.output, HasSubstr("image 9 (prompt \"9\")"));
  auto grid = ReadPng(dir + "/grid.png");
  ASSERT_TRUE(grid.ok()) << grid.status();
  EXPECT_EQ(grid->width, 80);
  EXPECT_EQ(grid->height, 8);
  for (int digit : {0, 7}) {
    const std::string one = dir + "/" + std::to_string(digit) + ".png";
    run = Client("generate " + Target(*server) + " --prompt " + std::to_string(digit) + " --seed 5 --steps 8 --out " +
                 one);
    ASSERT_EQ(run.exit_code, 0) << run.output;
    auto single = ReadPng(one);
    ASSERT_TRUE(single.ok()) << single.status();
    // The grid's steps ran in passes shared by ten images, the single one's alone: the same
    // image up to float rounding, so at most one grey level apart.
    int max_difference = 0;
    for (int64_t y = 0; y < 8; ++y) {
      for (int64_t x = 0; x < 8; ++x) {
        const int in_grid = grid->pixels[y * 80 + digit * 8 + x], alone = single->pixels[y * 8 + x];
        max_difference = std::max(max_difference, std::abs(in_grid - alone));
      }
    }
    EXPECT_LE(max_difference, 1) << "digit " << digit;
  }
  run = Client("generate " + Target(*server) + " --grid 11 --out " + dir + "/x.png");
  EXPECT_EQ(run.exit_code, 1);
  EXPECT_THAT(run.output, HasSubstr("at most 10"));
  std::filesystem::remove_all(dir);
}

TEST(MmditClientTool, BenchGenerateBothWaysCountsEveryImageWithCfgRows) {
  auto server = StartServer({}, "sd3_tiny");
  for (const std::string via : {"generate", "denoise"}) {
    const ToolRun run = Client("bench --generate --via " + via + " " + Target(*server) +
                               " --concurrency 2 --requests 5 --mix '2@4x8x8/7:3;1@4x4x12/5' --steps 2 --json");
    ASSERT_EQ(run.exit_code, 0) << run.output;
    EXPECT_THAT(run.output, HasSubstr("time to first step ms p50 "));
    const nlohmann::json report = LastLineJson(run.output);
    EXPECT_EQ(report["via"], via);
    EXPECT_EQ(report["requests"], 5) << via;
    EXPECT_TRUE(report["errors"].empty()) << report.dump();
    EXPECT_GE(report["mean_batch_samples"].get<double>(), 2.0) << via;  // --guidance defaults to 7: CFG rows
    EXPECT_GT(report["images_per_s"].get<double>(), 0);
    EXPECT_TRUE(report["ttfs_ms"].contains("p99"));
    EXPECT_TRUE(report["latency_ms"].contains("p99"));
  }
}

TEST(MmditClientTool, BenchGenerateWithoutGuidanceRunsOneRowAStep) {
  auto server = StartServer({}, "sd3_tiny");
  const ToolRun run =
      Client("bench --generate " + Target(*server) +
             " --concurrency 1 --requests 2 --latent 4,8,8 --txt_tokens 7 --steps 2 --guidance 1 --json");
  ASSERT_EQ(run.exit_code, 0) << run.output;
  const nlohmann::json report = LastLineJson(run.output);
  EXPECT_EQ(report["requests"], 2);
  EXPECT_EQ(report["mean_batch_samples"].get<double>(), 1.0);
  EXPECT_EQ(server->metrics().samples_computed(), 4u);  // 2 images x 2 steps x 1 row
}

}  // namespace
}  // namespace mmdit
