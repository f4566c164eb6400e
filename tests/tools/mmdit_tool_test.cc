// The `mmdit` command line as a user (or a later check) calls it.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <array>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>

#include "core/npy.h"
#include "nlohmann/json.hpp"
#include "tests/core/test_util.h"

namespace mmdit {
namespace {

using ::mmdit::testing::GoldenDir;
using ::testing::HasSubstr;

struct ToolRun {
  int exit_code;
  std::string output;  // stdout and stderr
};

ToolRun Mmdit(const std::string& args) {
  const std::string command = std::string(MMDIT_TOOL_PATH) + " " + args + " 2>&1";
  FILE* pipe = ::popen(command.c_str(), "r");
  ToolRun run{-1, ""};
  if (pipe == nullptr) return run;
  std::array<char, 4096> buffer;
  while (size_t n = std::fread(buffer.data(), 1, buffer.size(), pipe)) run.output.append(buffer.data(), n);
  const int status = ::pclose(pipe);
  run.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return run;
}

std::string ForwardArgs(const std::string& model, const std::string& inputs, const std::string& out) {
  return "forward --model " + model + " --img_latent " + inputs + "/img_latent.npy --txt_embed " + inputs +
         "/txt_embed.npy --timestep " + inputs + "/timestep.npy --pooled_text " + inputs + "/pooled_text.npy --out " +
         out;
}

TEST(MmditTool, ForwardWritesTheGoldenResult) {
  const std::string dir = testing::MakeTempDir("tool");
  for (const char* name : {"seed_tiny", "sd3_tiny", "sd35_tiny"}) {
    const ToolRun run = Mmdit(ForwardArgs(GoldenDir(name), GoldenDir(name), dir + "/out.npy"));
    ASSERT_EQ(run.exit_code, 0) << run.output;
    auto out = ReadNpy(dir + "/out.npy");
    auto expected = ReadNpy(GoldenDir(name) + "/expected_f64.npy");
    ASSERT_TRUE(out.ok() && expected.ok());
    EXPECT_LE(testing::MaxAbsDiff(*out, *expected), 1e-4) << name;
  }
}

TEST(MmditTool, ForwardInBfloat16StaysWithinTheBf16Tolerance) {
  const std::string dir = testing::MakeTempDir("tool");
  const ToolRun run =
      Mmdit(ForwardArgs(GoldenDir("sd35_tiny"), GoldenDir("sd35_tiny"), dir + "/out.npy") + " --dtype bf16");
  ASSERT_EQ(run.exit_code, 0) << run.output;
  auto out = ReadNpy(dir + "/out.npy");
  auto expected = ReadNpy(GoldenDir("sd35_tiny") + "/expected_f64.npy");
  ASSERT_TRUE(out.ok() && expected.ok());
  double diff_sq = 0, ref_sq = 0;
  for (int64_t i = 0; i < expected->NumElements(); ++i) {
    diff_sq += std::pow(double(out->data[i]) - expected->data[i], 2);
    ref_sq += std::pow(double(expected->data[i]), 2);
  }
  EXPECT_LE(std::sqrt(diff_sq / ref_sq), 2e-2);
  EXPECT_GT(testing::MaxAbsDiff(*out, *expected), 1e-5);  // really computed in bf16
  EXPECT_EQ(
      Mmdit(ForwardArgs(GoldenDir("sd35_tiny"), GoldenDir("sd35_tiny"), dir + "/o.npy") + " --dtype f16").exit_code, 1);
}

TEST(MmditTool, ForwardFailsWithOneLineNamingTheProblem) {
  const std::string dir = testing::MakeTempDir("tool");
  // sd3_tiny's inputs on seed_tiny's model: the latent has the wrong form.
  ToolRun run = Mmdit(ForwardArgs(GoldenDir("seed_tiny"), GoldenDir("sd3_tiny"), dir + "/out.npy"));
  EXPECT_EQ(run.exit_code, 1);
  EXPECT_THAT(run.output, HasSubstr("img_latent: expected"));
  EXPECT_EQ(std::count(run.output.begin(), run.output.end(), '\n'), 1) << run.output;
  EXPECT_FALSE(std::filesystem::exists(dir + "/out.npy"));

  run = Mmdit("forward --model " + GoldenDir("sd3_tiny") + " --img_latent /nonexistent.npy");
  EXPECT_NE(run.exit_code, 0);
  run = Mmdit("forward --modle x");
  EXPECT_EQ(run.exit_code, 2);
  EXPECT_THAT(run.output, HasSubstr("unknown flag --modle"));
}

TEST(MmditTool, InitInspectAndBenchASmallPreset) {
  const std::string dir = testing::MakeTempDir("tool") + "/model";
  ToolRun run = Mmdit("init --out " + dir +
                      " --preset sd35-medium --seed 7 --depth 2 --hidden_size 64 --num_heads 2 --txt_dim 32 "
                      "--cond_dim 16 --pos_embed_max_size 16 --weights_dtype bf16");
  ASSERT_EQ(run.exit_code, 0) << run.output;
  run = Mmdit("inspect --model " + dir + " --img_tokens 64");
  ASSERT_EQ(run.exit_code, 0) << run.output;
  const auto info = nlohmann::json::parse(run.output);
  EXPECT_EQ(info["hidden_size"], 64);
  EXPECT_EQ(info["depth"], 2);
  EXPECT_EQ(info["num_heads"], 2);
  EXPECT_EQ(info["img_dim"], 64);  // 16 channels x 2 x 2
  EXPECT_EQ(info["txt_dim"], 32);
  EXPECT_EQ(info["cond_dim"], 16);
  EXPECT_EQ(info["qk_norm"], "rms_norm");
  EXPECT_EQ(info["dual_attention_layers"], nlohmann::json::array({0, 1}));
  EXPECT_EQ(info["output_size"], 64 * 64);
  // bf16 weights: the checkpoint is 2 bytes a parameter plus its JSON header.
  const int64_t parameters = info["parameter_count"].get<int64_t>();
  const int64_t file_bytes = static_cast<int64_t>(std::filesystem::file_size(dir + "/model.safetensors"));
  EXPECT_GT(file_bytes, 2 * parameters);
  EXPECT_LT(file_bytes, 2 * parameters + (64 << 10));

  run = Mmdit("bench --model " + dir +
              " --batch 2 --latent 16,8,12 --txt_tokens 5 --iters 2 --warmup 1 --threads 1 --dtype bf16");
  ASSERT_EQ(run.exit_code, 0) << run.output;
  const auto bench = nlohmann::json::parse(run.output);
  for (const char* key : {"median_ms", "mean_ms", "p10_ms", "p90_ms", "gflop_per_forward", "gflops"}) {
    EXPECT_TRUE(bench.contains(key)) << key;
  }
  EXPECT_GT(bench["mean_ms"].get<double>(), 0);
  // The FLOP count is per forward: two samples of one shape are twice one sample's.
  run = Mmdit("bench --model " + dir + " --batch 1 --latent 16,8,12 --txt_tokens 5 --iters 1 --warmup 0 --threads 1");
  ASSERT_EQ(run.exit_code, 0) << run.output;
  const double one_sample_gflop = nlohmann::json::parse(run.output)["gflop_per_forward"].get<double>();
  EXPECT_GT(one_sample_gflop, 2e-9 * parameters * 0.5);  // at least the products on half the weights, once
  EXPECT_DOUBLE_EQ(bench["gflop_per_forward"].get<double>(), 2 * one_sample_gflop);
  EXPECT_EQ(bench["dtype"], "bf16");
  EXPECT_FALSE(bench.contains("throughput_over_baseline"));

  // Against an interleaved baseline batch: both timed, and samples/s compared.
  run = Mmdit("bench --model " + dir +
              " --batch 2 --baseline_batch 1 --latent 16,8,12 --txt_tokens 5 --iters 3 --warmup 0 --threads 1");
  ASSERT_EQ(run.exit_code, 0) << run.output;
  const auto compared = nlohmann::json::parse(run.output);
  EXPECT_EQ(compared["baseline_batch"], 1);
  const double baseline_ms = compared["baseline_median_ms"].get<double>(), ms = compared["median_ms"].get<double>();
  // The baseline really ran its one sample, not the full batch: it is the faster of the two.
  EXPECT_LT(baseline_ms, ms);
  const double ratio = compared["throughput_over_baseline"].get<double>();
  EXPECT_GT(ratio, 0.5);  // batching one more sample neither halves nor more than doubles samples/s
  EXPECT_LT(ratio, 2.0);
  for (const char* bad : {"3", "0"}) {
    run = Mmdit("bench --model " + dir + " --batch 2 --baseline_batch " + bad + " --latent 16,8,12 --txt_tokens 5");
    EXPECT_EQ(run.exit_code, 1);
    EXPECT_THAT(run.output, HasSubstr(std::string("--baseline_batch must be between 1 and --batch (2), got ") + bad));
  }

  // The same seed writes the same weights.
  const std::string again = dir + "_again";
  Mmdit("init --out " + again +
        " --preset sd35-medium --seed 7 --depth 2 --hidden_size 64 --num_heads 2 "
        "--txt_dim 32 --cond_dim 16 --pos_embed_max_size 16 --weights_dtype bf16");
  std::ifstream a(dir + "/model.safetensors", std::ios::binary), b(again + "/model.safetensors", std::ios::binary);
  EXPECT_TRUE(std::equal(std::istreambuf_iterator<char>(a), {}, std::istreambuf_iterator<char>(b)));
}

TEST(MmditTool, InitRejectsUnknownPresetsAndBadSizes) {
  ToolRun run = Mmdit("init --out /tmp/x --preset sd9 --seed 1");
  EXPECT_EQ(run.exit_code, 1);
  EXPECT_THAT(run.output, HasSubstr("unknown preset 'sd9'"));
  run = Mmdit("init --out /tmp/x --preset seed-default --seed 1 --hidden_size 100 --num_heads 12");
  EXPECT_EQ(run.exit_code, 1);
  EXPECT_THAT(run.output, HasSubstr("--hidden_size 100 must divide into --num_heads 12"));
}

}  // namespace
}  // namespace mmdit
