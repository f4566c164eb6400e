// The mmdit-client command line against an in-process server.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <array>
#include <cstdio>

#include "core/npy.h"
#include "nlohmann/json.hpp"
#include "tests/server/server_test_util.h"

namespace mmdit {
namespace {

using ::mmdit::testing::GoldenDir;
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

}  // namespace
}  // namespace mmdit
