#include "client/load_generator.h"

#include <gmock/gmock.h>
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>

#include "core/sampler.h"
#include "tests/server/server_test_util.h"

namespace mmdit {
namespace {

using ::mmdit::testing::ClientFor;
using ::mmdit::testing::GoldenDir;
using ::mmdit::testing::MaxAbsDiff;
using ::mmdit::testing::RandomTensor;
using ::mmdit::testing::StartServer;

TEST(ParseMix, ReadsWeightedImageAndTokenShapes) {
  auto mix = ParseMix("3@4x8x8/7;1@64/32;2x2x2/5", 2, 16);
  ASSERT_TRUE(mix.ok()) << mix.status();
  ASSERT_EQ(mix->size(), 3u);
  EXPECT_EQ((*mix)[0].weight, 3);
  EXPECT_EQ((*mix)[0].img_latent, (Shape{4, 8, 8}));
  EXPECT_EQ((*mix)[0].text_tokens, 7);
  EXPECT_EQ((*mix)[1].img_latent, (Shape{64, 16}));
  EXPECT_EQ((*mix)[2].weight, 1);
  EXPECT_EQ((*mix)[2].batch, 2);
  EXPECT_EQ(ParseMix("3@4x8/7", 1, 16).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ParseMix("x@4/7", 1, 16).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(ParseMix, ReadsStepCountsAfterTheTextLength) {
  auto mix = ParseMix("3@16x32x32/77:28;1@16x64x64/77:10;64/32", 1, 16);
  ASSERT_TRUE(mix.ok()) << mix.status();
  ASSERT_EQ(mix->size(), 3u);
  EXPECT_EQ((*mix)[0].steps, 28);
  EXPECT_EQ((*mix)[0].text_tokens, 77);
  EXPECT_EQ((*mix)[1].steps, 10);
  EXPECT_EQ((*mix)[1].img_latent, (Shape{16, 64, 64}));
  EXPECT_EQ((*mix)[2].steps, 0);  // the load's default
  for (const char* bad : {"4x8x8/7:0", "4x8x8/7:x", "4x8x8/7:3:4", "4x8x8/:3", "4x8x8:3"}) {
    EXPECT_EQ(ParseMix(bad, 1, 16).status().code(), absl::StatusCode::kInvalidArgument) << bad;
  }
}

TEST(RunLoad, ClosedLoopSendsExactlyTheRequestedCallsOverAMix) {
  // Four callers of 2 samples each and passes of exactly 8 rows that wait for company: every
  // pass holds all four callers' requests, so the mean the report gives is known exactly.
  ServerOptions options;
  options.scheduler.max_batch_samples = 8;
  options.scheduler.max_queue_delay_us = 60'000'000;
  auto server = StartServer(options);
  auto client = ClientFor(*server);
  LoadOptions load{.concurrency = 4, .requests = 24, .wait_for_batch = true};
  load.mix = *ParseMix("1@4x8x8/7;1@4x4x12/3", 2, 16);
  auto report = RunLoad(*client, load);
  ASSERT_TRUE(report.ok()) << report.status();
  EXPECT_EQ(report->requests, 24);
  EXPECT_TRUE(report->errors.empty());
  EXPECT_DOUBLE_EQ(report->throughput_samples_per_s, 2 * report->throughput_rps);  // 2 samples a request
  EXPECT_EQ(report->mean_batch_samples, 8.0);
  const nlohmann::json json = report->ToJson();
  std::vector<std::string> keys;
  for (const auto& [key, value] : json.items()) keys.push_back(key);
  EXPECT_THAT(keys, ::testing::UnorderedElementsAre("requests", "errors", "throughput_rps", "throughput_samples_per_s",
                                                    "latency_ms", "mean_batch_samples", "server_queue_us_mean",
                                                    "server_compute_us_mean"));
  EXPECT_EQ(server->metrics().samples_computed(), 48u);
}

TEST(RunLoad, OpenLoopCountsErrorsByCode) {
  auto server = StartServer({});
  auto client = ClientFor(*server);
  LoadOptions load{.rate = 200, .requests = 10};
  load.mix = *ParseMix("4x7x8/7", 1, 16);  // H = 7 is not a multiple of the patch
  auto report = RunLoad(*client, load);
  ASSERT_TRUE(report.ok()) << report.status();
  EXPECT_EQ(report->requests, 10);
  EXPECT_EQ(report->errors.at("INVALID_ARGUMENT"), 10);
  EXPECT_EQ(report->throughput_rps, 0);
}

TEST(RunLoad, NeedsExactlyOneModeAndOneBound) {
  auto server = StartServer({});
  auto client = ClientFor(*server);
  LoadOptions both{.concurrency = 1, .rate = 1, .requests = 1};
  both.mix = *ParseMix("4x8x8/7", 1, 16);
  EXPECT_EQ(RunLoad(*client, both).status().code(), absl::StatusCode::kInvalidArgument);
  LoadOptions unbounded{.concurrency = 1};
  unbounded.mix = both.mix;
  EXPECT_EQ(RunLoad(*client, unbounded).status().code(), absl::StatusCode::kInvalidArgument);
  LoadOptions with_steps{.concurrency = 1, .requests = 1};
  with_steps.mix = *ParseMix("4x8x8/7:3", 1, 16);  // step counts are for generations
  EXPECT_EQ(RunLoad(*client, with_steps).status().code(), absl::StatusCode::kInvalidArgument);
}

// A prompt pair and starting noise for sd3_tiny (latent [4, 8, 8], text width 40, pooled 24),
// batch 1, and the same image sampled in-process by core's reference loop.
struct Sd3TinyGeneration {
  Tensor txt = RandomTensor({1, 7, 40}, 11), pooled = RandomTensor({1, 24}, 12);
  Tensor negative_txt = RandomTensor({1, 7, 40}, 13), negative_pooled = RandomTensor({1, 24}, 14);
  Tensor noise = RandomTensor({1, 4, 8, 8}, 15);

  GenerateInputs Inputs(int32_t steps, float guidance) const {
    GenerateInputs inputs;
    inputs.txt_embed = txt;
    inputs.pooled_text = pooled;
    inputs.negative_txt_embed = negative_txt;
    inputs.negative_pooled_text = negative_pooled;
    inputs.initial_noise = noise;
    inputs.steps = steps;
    inputs.guidance_scale = guidance;
    inputs.request_id = "test";
    return inputs;
  }

  // [1, 4, 8, 8]: RunSampler on the server's default scheduler (StartServer serves with it).
  Tensor Reference(int32_t steps, float guidance) const {
    auto engine = Engine::Load(GoldenDir("sd3_tiny"));
    EXPECT_TRUE(engine.ok()) << engine.status();
    GenerationOptions options;
    options.steps = steps;
    options.guidance_scale = guidance;
    auto sampler = FlowMatchSampler::Create(FlowMatchConfig{}, options, Tensor({4, 8, 8}, noise.data));
    EXPECT_TRUE(sampler.ok()) << sampler.status();
    const TextCondition positive{TensorView({7, 40}, txt.data.data()), TensorView({24}, pooled.data.data())};
    const TextCondition negative{TensorView({7, 40}, negative_txt.data.data()),
                                 TensorView({24}, negative_pooled.data.data())};
    const absl::Status status = RunSampler(**engine, *sampler, positive, negative);
    EXPECT_TRUE(status.ok()) << status;
    return Tensor({1, 4, 8, 8}, sampler->latent().data);
  }
};

TEST(DenoiserClientGenerate, EqualsTheInProcessSamplerAndReportsEveryStep) {
  auto server = StartServer({});
  auto client = ClientFor(*server);
  const Sd3TinyGeneration generation;
  GenerateInputs inputs = generation.Inputs(/*steps=*/4, /*guidance=*/5.0f);
  inputs.preview_every = 2;
  std::vector<v1::GenerateProgress> seen;
  auto result = client->Generate(inputs, v1::FP32, std::chrono::seconds(60),
                                 [&seen](const v1::GenerateProgress& progress) { seen.push_back(progress); });
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ(result->latent.shape, (Shape{1, 4, 8, 8}));
  EXPECT_LE(MaxAbsDiff(result->latent, generation.Reference(4, 5.0f)), 1e-5);
  EXPECT_EQ(result->steps, 4);
  EXPECT_EQ(result->rows, 2);  // negative and positive
  EXPECT_GE(result->mean_batch_samples, 2.0);
  EXPECT_GT(result->compute_us, 0);
  EXPECT_GT(result->first_progress_ms, 0);
  EXPECT_LE(result->first_progress_ms, result->total_ms);
  ASSERT_EQ(seen.size(), 4u);
  for (size_t i = 0; i < seen.size(); ++i) {
    EXPECT_EQ(seen[i].step(), static_cast<int32_t>(i + 1));
    EXPECT_EQ(seen[i].total_steps(), 4);
    EXPECT_EQ(seen[i].done(), i == 3);
    EXPECT_EQ(seen[i].has_latent(), i % 2 == 1) << "step " << i + 1;  // previews every 2nd, and the last
    if (i > 0) {
      EXPECT_LT(seen[i].sigma(), seen[i - 1].sigma());
    }
  }
  EXPECT_EQ(seen.back().sigma(), 0.0f);
}

TEST(DenoiserClientGenerate, ReturnsTheServersStatus) {
  auto server = StartServer({});
  auto client = ClientFor(*server);
  const Sd3TinyGeneration generation;
  GenerateInputs inputs = generation.Inputs(3, 5.0f);
  inputs.initial_noise.reset();
  inputs.latent_shape = {4, 7, 8};  // H = 7 is not a multiple of the patch
  auto result = client->Generate(inputs, v1::FP32, std::chrono::seconds(60));
  EXPECT_EQ(result.status().code(), absl::StatusCode::kInvalidArgument) << result.status();
  inputs = generation.Inputs(3, 5.0f);
  inputs.negative_txt_embed.reset();  // CFG without a negative prompt
  inputs.negative_pooled_text.reset();
  result = client->Generate(inputs, v1::FP32, std::chrono::seconds(60));
  EXPECT_EQ(result.status().code(), absl::StatusCode::kInvalidArgument) << result.status();
  EXPECT_THAT(result.status().message(), ::testing::HasSubstr("negative"));
}

// Answers Generate with one progress message that is not done, then OK.
class EndsWithoutDone final : public v1::Denoiser::Service {
  grpc::Status Generate(grpc::ServerContext*, const v1::GenerateRequest*,
                        grpc::ServerWriter<v1::GenerateProgress>* writer) override {
    v1::GenerateProgress progress;
    progress.set_step(1);
    progress.set_total_steps(2);
    writer->Write(progress);
    return grpc::Status::OK;
  }
};

TEST(DenoiserClientGenerate, AStreamEndingWithoutADoneMessageIsInternal) {
  EndsWithoutDone service;
  int port = 0;
  grpc::ServerBuilder builder;
  builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
  builder.RegisterService(&service);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  ASSERT_NE(port, 0);
  auto client = DenoiserClient::Connect({.target = "127.0.0.1:" + std::to_string(port)});
  ASSERT_TRUE(client.ok());
  const Sd3TinyGeneration generation;
  int messages = 0;
  auto result = (*client)->Generate(generation.Inputs(2, 5.0f), v1::FP32, std::chrono::seconds(10),
                                    [&messages](const v1::GenerateProgress&) { ++messages; });
  EXPECT_EQ(result.status().code(), absl::StatusCode::kInternal) << result.status();
  EXPECT_EQ(messages, 1);
  server->Shutdown();
}

TEST(GenerateViaDenoise, EqualsTheInProcessSamplerWithTwoRowsAStep) {
  auto server = StartServer({});
  auto client = ClientFor(*server);
  auto info = client->GetModelInfo(std::chrono::seconds(10));
  ASSERT_TRUE(info.ok()) << info.status();
  const Sd3TinyGeneration generation;
  auto result = GenerateViaDenoise(*client, *info, generation.Inputs(4, 5.0f), v1::FP32, std::chrono::seconds(60));
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ(result->latent.shape, (Shape{1, 4, 8, 8}));
  EXPECT_LE(MaxAbsDiff(result->latent, generation.Reference(4, 5.0f)), 1e-5);
  EXPECT_EQ(result->steps, 4);
  EXPECT_EQ(result->rows, 2);
  EXPECT_GE(result->mean_batch_samples, 2.0);
  EXPECT_LE(result->first_progress_ms, result->total_ms);
  EXPECT_EQ(server->metrics().samples_computed(), 8u);  // 4 steps x [negative, positive]
}

TEST(GenerateViaDenoise, WithoutGuidanceSendsOneRowAndRefusesSkipLayers) {
  auto server = StartServer({});
  auto client = ClientFor(*server);
  auto info = client->GetModelInfo(std::chrono::seconds(10));
  ASSERT_TRUE(info.ok()) << info.status();
  const Sd3TinyGeneration generation;
  GenerateInputs inputs = generation.Inputs(3, 1.0f);
  inputs.negative_txt_embed.reset();
  inputs.negative_pooled_text.reset();
  auto result = GenerateViaDenoise(*client, *info, inputs, v1::FP32, std::chrono::seconds(60));
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ(result->rows, 1);
  EXPECT_LE(MaxAbsDiff(result->latent, generation.Reference(3, 1.0f)), 1e-5);
  inputs = generation.Inputs(3, 5.0f);
  inputs.skip_layers = {1};
  EXPECT_EQ(GenerateViaDenoise(*client, *info, inputs, v1::FP32, std::chrono::seconds(60)).status().code(),
            absl::StatusCode::kInvalidArgument);
}

class RunGenerateLoadTest : public ::testing::TestWithParam<GenerateVia> {};

TEST_P(RunGenerateLoadTest, ClosedLoopRunsExactlyTheRequestedImagesWithCfgRows) {
  auto server = StartServer({});
  auto client = ClientFor(*server);
  GenerateLoadOptions load{.concurrency = 3, .requests = 7, .steps = 3, .via = GetParam()};
  load.mix = *ParseMix("1@4x8x8/7;1@4x4x12/5:2", 1, 16);
  auto report = RunGenerateLoad(*client, load);
  ASSERT_TRUE(report.ok()) << report.status();
  EXPECT_EQ(report->via, GetParam());
  EXPECT_EQ(report->requests, 7);
  EXPECT_TRUE(report->errors.empty()) << report->ToJson().dump();
  // CFG: every step has a negative and a positive row; at most the three callers' share a pass.
  EXPECT_GE(report->mean_batch_samples, 2.0);
  EXPECT_LE(report->mean_batch_samples, 6.0);
  EXPECT_GT(report->images_per_s, 0);
  // Each image ran 2 or 3 steps.
  EXPECT_GE(report->steps_per_s, 2 * report->images_per_s * 0.999);
  EXPECT_LE(report->steps_per_s, 3 * report->images_per_s * 1.001);
  EXPECT_GT(report->ttfs_p50_ms, 0);
  EXPECT_LE(report->ttfs_p50_ms, report->p50_ms);  // a generation's first step comes before its end
  // Rows computed: 2 per step of every image; the step counts of the mix bound them.
  const uint64_t rows = server->metrics().samples_computed();
  EXPECT_GE(rows, 7u * 2 * 2);
  EXPECT_LE(rows, 7u * 2 * 3);
  const nlohmann::json json = report->ToJson();
  std::vector<std::string> keys;
  for (const auto& [key, value] : json.items()) keys.push_back(key);
  EXPECT_THAT(keys, ::testing::UnorderedElementsAre("via", "requests", "errors", "images_per_s", "steps_per_s",
                                                    "ttfs_ms", "latency_ms", "mean_batch_samples",
                                                    "server_queue_us_mean", "server_compute_us_mean", "wall_s"));
  EXPECT_EQ(json["via"], GetParam() == GenerateVia::kGenerate ? "generate" : "denoise");
}

TEST_P(RunGenerateLoadTest, OpenLoopCountsErrorsByCode) {
  auto server = StartServer({});
  auto client = ClientFor(*server);
  GenerateLoadOptions load{.rate = 200, .requests = 5, .steps = 2, .via = GetParam()};
  load.mix = *ParseMix("4x7x8/7", 1, 16);  // H = 7 is not a multiple of the patch
  auto report = RunGenerateLoad(*client, load);
  ASSERT_TRUE(report.ok()) << report.status();
  EXPECT_EQ(report->requests, 5);
  EXPECT_EQ(report->errors.at("INVALID_ARGUMENT"), 5);
  EXPECT_EQ(report->images_per_s, 0);
  EXPECT_EQ(server->metrics().samples_computed(), 0u);
}

INSTANTIATE_TEST_SUITE_P(Via, RunGenerateLoadTest, ::testing::Values(GenerateVia::kGenerate, GenerateVia::kDenoise),
                         [](const auto& info) {
                           return std::string(info.param == GenerateVia::kGenerate ? "Generate" : "Denoise");
                         });

TEST(RunGenerateLoad, NeedsExactlyOneModeAndOneBound) {
  auto server = StartServer({});
  auto client = ClientFor(*server);
  GenerateLoadOptions both{.concurrency = 1, .rate = 1, .requests = 1};
  both.mix = *ParseMix("4x8x8/7", 1, 16);
  EXPECT_EQ(RunGenerateLoad(*client, both).status().code(), absl::StatusCode::kInvalidArgument);
  GenerateLoadOptions unbounded{.concurrency = 1};
  unbounded.mix = both.mix;
  EXPECT_EQ(RunGenerateLoad(*client, unbounded).status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace mmdit
