// Generate over loopback: the server's sampling loop against the same sampler run in-process
// on Engine::Forward, alone and inside a crowd; progress, cancellation, deadlines, drain,
// queue limits and malformed requests.
#include <grpcpp/grpcpp.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <thread>

#include "core/sampler.h"
#include "proto/tensor_codec.h"
#include "tests/server/server_test_util.h"

namespace mmdit::testing {
namespace {

// Per-sample conditioning and latent of one generation, and its request.
struct Generation {
  Tensor txt_embed, pooled_text, negative_txt_embed, negative_pooled_text;  // [T, J], [P]
  Tensor noise;                                                             // per-sample latent
  std::optional<Tensor> init_latent;
  GenerationOptions options;

  v1::GenerateRequest Request() const {
    v1::GenerateRequest request;
    auto batched = [](const Tensor& t, v1::Tensor* wire) {
      Shape shape = t.shape;
      shape.insert(shape.begin(), 1);
      EncodeTensor(TensorView(shape, t.data.data()), v1::FP32, wire);
    };
    batched(txt_embed, request.mutable_txt_embed());
    batched(pooled_text, request.mutable_pooled_text());
    if (options.guidance_scale > 1) {
      batched(negative_txt_embed, request.mutable_negative_txt_embed());
      batched(negative_pooled_text, request.mutable_negative_pooled_text());
    }
    batched(noise, request.mutable_initial_noise());
    if (init_latent) {
      batched(*init_latent, request.mutable_init_latent());
      request.set_strength(options.strength);
    }
    request.set_steps(static_cast<int32_t>(options.steps));
    request.set_guidance_scale(options.guidance_scale);
    for (int64_t layer : options.skip_layer_guidance.layers) request.mutable_skip_layer_guidance()->add_layers(layer);
    return request;
  }

  // The reference: the same sampler, one Engine::Forward per step, in this process.
  Tensor InProcess(Engine& engine) const {
    auto sampler = FlowMatchSampler::Create({}, options, noise, init_latent ? &*init_latent : nullptr);
    EXPECT_TRUE(sampler.ok()) << sampler.status();
    const absl::Status status = RunSampler(engine, *sampler, {txt_embed, pooled_text},
                                           {negative_txt_embed, negative_pooled_text});
    EXPECT_TRUE(status.ok()) << status;
    return sampler->latent();
  }
};

// A generation for the golden model `golden` (image form [C, H, W], or token form [N, F]).
Generation MakeGeneration(const ModelConfig& c, Shape latent, int64_t text_tokens, int64_t steps, float guidance,
                          uint32_t seed) {
  Generation g;
  g.txt_embed = RandomTensor({text_tokens, c.joint_attention_dim}, seed);
  g.pooled_text = RandomTensor({c.pooled_projection_dim}, seed + 1);
  g.negative_txt_embed = RandomTensor({text_tokens + 3, c.joint_attention_dim}, seed + 2);
  g.negative_pooled_text = RandomTensor({c.pooled_projection_dim}, seed + 3);
  g.noise = GaussianNoise(latent, seed + 4);
  g.options.steps = steps;
  g.options.guidance_scale = guidance;
  return g;
}

struct StreamResult {
  grpc::Status status;
  std::vector<v1::GenerateProgress> progress;
  Tensor final_latent;  // per sample, without the batch dimension
};

StreamResult RunGenerate(DenoiserClient& client, const v1::GenerateRequest& request,
                         std::chrono::milliseconds timeout = std::chrono::seconds(60),
                         std::function<bool(const v1::GenerateProgress&)> keep_reading = {},
                         grpc::ClientContext* external_context = nullptr) {
  grpc::ClientContext own_context;
  grpc::ClientContext& context = external_context ? *external_context : own_context;
  context.set_deadline(std::chrono::system_clock::now() + timeout);
  StreamResult result;
  std::unique_ptr<grpc::ClientReader<v1::GenerateProgress>> reader = client.stub().Generate(&context, request);
  v1::GenerateProgress progress;
  while (reader->Read(&progress)) {
    result.progress.push_back(progress);
    if (keep_reading && !keep_reading(progress)) {
      context.TryCancel();
      break;
    }
  }
  while (reader->Read(&progress)) {}  // drain after a cancel
  result.status = reader->Finish();
  if (!result.progress.empty() && result.progress.back().done()) {
    absl::StatusOr<Tensor> latent = DecodeTensor(result.progress.back().latent(), "latent");
    EXPECT_TRUE(latent.ok()) << latent.status();
    if (latent.ok()) {
      result.final_latent = *latent;
      result.final_latent.shape.erase(result.final_latent.shape.begin());
    }
  }
  return result;
}

std::unique_ptr<Engine> LoadEngine(const std::string& golden) {
  auto engine = Engine::Load(GoldenDir(golden));
  EXPECT_TRUE(engine.ok()) << engine.status();
  return std::move(*engine);
}

struct SamplerCase {
  std::string description;
  std::string golden;
  float guidance;
  std::vector<int64_t> skip_layers;
  bool img2img;
};

class GenerateEqualsTheInProcessSampler : public ::testing::TestWithParam<SamplerCase> {};

TEST_P(GenerateEqualsTheInProcessSampler, WithinOneEMinus5) {
  const SamplerCase& p = GetParam();
  auto server = StartServer({}, p.golden);
  auto client = ClientFor(*server);
  std::unique_ptr<Engine> engine = LoadEngine(p.golden);
  const ModelConfig& c = engine->config();
  const Shape latent = c.has_positions() ? Shape{c.in_channels, 8, 6} : Shape{20, c.patch_features()};
  Generation g = MakeGeneration(c, latent, 7, /*steps=*/6, p.guidance, 11);
  g.options.skip_layer_guidance.layers = p.skip_layers;
  g.options.skip_layer_guidance.start = 0.0;  // active at steps 1..4 of 6 (0 < i < 6 * 0.8)
  g.options.skip_layer_guidance.stop = 0.8;
  v1::GenerateRequest request = g.Request();
  if (!p.skip_layers.empty()) {
    request.mutable_skip_layer_guidance()->set_start(0.0f);
    request.mutable_skip_layer_guidance()->set_stop(0.8f);
  }
  if (p.img2img) {
    g.init_latent = RandomTensor(latent, 99);
    g.options.strength = 0.5f;
    request = g.Request();
  }
  const StreamResult result = RunGenerate(*client, request);
  ASSERT_TRUE(result.status.ok()) << result.status.error_message();
  const Tensor expected = g.InProcess(*engine);
  EXPECT_EQ(result.final_latent.shape, expected.shape);
  EXPECT_LE(MaxAbsDiff(result.final_latent, expected), 1e-5);
  // It moved: the result is not the starting noise.
  EXPECT_GT(MaxAbsDiff(result.final_latent, g.noise), 1e-2);

  const int64_t total_steps = p.img2img ? 3 : 6;
  ASSERT_EQ(static_cast<int64_t>(result.progress.size()), total_steps);
  int64_t expected_rows = p.guidance > 1 ? 2 : 1;
  for (int64_t i = 0; i < total_steps; ++i) {
    const v1::GenerateProgress& step = result.progress[i];
    EXPECT_EQ(step.step(), i + 1);
    EXPECT_EQ(step.total_steps(), total_steps);
    EXPECT_EQ(step.done(), i + 1 == total_steps);
    const bool slg_active = !p.skip_layers.empty() && i >= 1 && i <= 4;
    EXPECT_EQ(step.rows(), expected_rows + (slg_active ? 1 : 0)) << "step " << i;
  }
  EXPECT_EQ(result.progress.back().sigma(), 0.0f);
}

INSTANTIATE_TEST_SUITE_P(
    Cases, GenerateEqualsTheInProcessSampler,
    ::testing::Values(SamplerCase{"sd3_cfg", "sd3_tiny", 7.0f, {}, false},
                      SamplerCase{"sd3_no_cfg", "sd3_tiny", 1.0f, {}, false},
                      SamplerCase{"sd3_skip_layer_guidance", "sd3_tiny", 5.0f, {1}, false},
                      SamplerCase{"sd3_img2img", "sd3_tiny", 4.0f, {}, true},
                      SamplerCase{"sd35_cfg", "sd35_tiny", 7.0f, {0}, false},
                      SamplerCase{"token_form_cfg", "seed_tiny", 3.0f, {}, false}),
    DescriptionAsTestName());

TEST(Generate, ProgressCarriesPreviewsEveryKStepsAndTheFinalLatentInTheRequestedDtype) {
  auto server = StartServer({});
  auto client = ClientFor(*server);
  std::unique_ptr<Engine> engine = LoadEngine("sd3_tiny");
  Generation g = MakeGeneration(engine->config(), {4, 8, 8}, 5, 5, 7.0f, 3);
  v1::GenerateRequest request = g.Request();
  request.set_preview_every(2);
  request.set_output_dtype(v1::BF16);
  const StreamResult result = RunGenerate(*client, request);
  ASSERT_TRUE(result.status.ok()) << result.status.error_message();
  ASSERT_EQ(result.progress.size(), 5u);
  for (const v1::GenerateProgress& step : result.progress) {
    EXPECT_EQ(step.has_latent(), step.step() % 2 == 0 || step.done()) << step.step();
    if (step.has_latent()) {
      EXPECT_EQ(step.latent().dtype(), v1::BF16);
      EXPECT_EQ(std::vector<int64_t>(step.latent().shape().begin(), step.latent().shape().end()),
                (std::vector<int64_t>{1, 4, 8, 8}));
    }
  }
  // bf16 on the wire: within bf16 rounding of the float32 trajectory.
  const Tensor expected = g.InProcess(*engine);
  for (size_t i = 0; i < expected.data.size(); ++i) {
    EXPECT_NEAR(result.final_latent.data[i], expected.data[i], 1e-2 * std::max(1.0f, std::abs(expected.data[i])));
  }
}

TEST(Generate, SeededNoiseIsReproducibleAndSeedsDiffer) {
  auto server = StartServer({});
  auto client = ClientFor(*server);
  std::unique_ptr<Engine> engine = LoadEngine("sd3_tiny");
  Generation g = MakeGeneration(engine->config(), {4, 8, 8}, 5, 3, 1.0f, 3);
  v1::GenerateRequest request = g.Request();
  request.clear_initial_noise();
  request.add_latent_shape(4);
  request.add_latent_shape(8);
  request.add_latent_shape(8);
  request.set_seed(42);
  const StreamResult first = RunGenerate(*client, request), second = RunGenerate(*client, request);
  request.set_seed(43);
  const StreamResult other = RunGenerate(*client, request);
  ASSERT_TRUE(first.status.ok() && second.status.ok() && other.status.ok());
  EXPECT_EQ(first.final_latent.data, second.final_latent.data);
  EXPECT_GT(MaxAbsDiff(first.final_latent, other.final_latent), 1e-2);
  g.noise = GaussianNoise({4, 8, 8}, 42);  // the seed is GaussianNoise's
  EXPECT_LE(MaxAbsDiff(first.final_latent, g.InProcess(*engine)), 1e-5);
}

TEST(Generate, AnEmptyLatentShapeIsTheModelsNominalSizeInImageForm) {
  auto server = StartServer({});
  auto client = ClientFor(*server);
  Generation g = MakeGeneration(LoadEngine("sd3_tiny")->config(), {4, 8, 8}, 5, 3, 1.0f, 3);
  v1::GenerateRequest request = g.Request();
  request.clear_initial_noise();
  request.set_seed(42);
  const StreamResult nominal = RunGenerate(*client, request);  // sd3_tiny: in_channels 4, sample_size 8
  for (int64_t d : {4, 8, 8}) request.add_latent_shape(d);
  const StreamResult explicit_shape = RunGenerate(*client, request);
  ASSERT_TRUE(nominal.status.ok()) << nominal.status.error_message();
  ASSERT_TRUE(explicit_shape.status.ok()) << explicit_shape.status.error_message();
  EXPECT_EQ(nominal.final_latent.shape, (Shape{4, 8, 8}));
  EXPECT_EQ(nominal.final_latent.data, explicit_shape.final_latent.data);
}

TEST(Generate, TokenFormModelsHaveNoNominalSizeSoLatentShapeIsRequired) {
  auto server = StartServer({}, "seed_tiny");
  auto client = ClientFor(*server);
  Generation g = MakeGeneration(LoadEngine("seed_tiny")->config(), {20, 16}, 5, 3, 1.0f, 3);
  v1::GenerateRequest request = g.Request();
  request.clear_initial_noise();
  request.set_seed(42);
  const StreamResult result = RunGenerate(*client, request);
  EXPECT_EQ(result.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(result.status.error_message(), ::testing::HasSubstr("latent_shape: required"));
}

// A generation's result does not depend on who shared its steps: alone, and in a crowd of
// other resolutions, step counts, text lengths, CFG settings and start times, with Denoise
// calls mixed in.
TEST(Generate, TheResultDoesNotDependOnWhoSharedItsSteps) {
  ServerOptions options;
  options.scheduler.max_batch_samples = 16;
  auto server = StartServer(options);
  auto client = ClientFor(*server);
  std::unique_ptr<Engine> engine = LoadEngine("sd3_tiny");
  const ModelConfig& c = engine->config();
  const Generation subject = MakeGeneration(c, {4, 8, 8}, 6, 12, 7.0f, 5);
  const StreamResult alone = RunGenerate(*client, subject.Request());
  ASSERT_TRUE(alone.status.ok()) << alone.status.error_message();
  for (const v1::GenerateProgress& step : alone.progress) EXPECT_EQ(step.batch_samples(), 2);

  std::vector<Generation> crowd;
  const Shape shapes[] = {{4, 16, 16}, {4, 4, 8}, {4, 12, 6}, {4, 8, 8}};
  for (int i = 0; i < 4; ++i) crowd.push_back(MakeGeneration(c, shapes[i], 3 + 5 * i, 4 + 5 * i, i % 2 ? 1.0f : 6.0f, 100 + i));
  std::vector<StreamResult> crowd_results(crowd.size());
  std::vector<std::thread> threads;
  for (size_t i = 0; i < crowd.size(); ++i) {
    threads.emplace_back([&, i] {
      std::this_thread::sleep_for(std::chrono::milliseconds(2 * i));  // staggered starts
      crowd_results[i] = RunGenerate(*client, crowd[i].Request());
    });
  }
  std::thread denoise_caller([&] {
    for (int i = 0; i < 10; ++i) ASSERT_TRUE(client->Denoise(RandomSd3TinyInputs(1, 8, 8, 5, i).View(), v1::FP32, std::chrono::seconds(30)).ok());
  });
  const StreamResult in_crowd = RunGenerate(*client, subject.Request());
  for (std::thread& t : threads) t.join();
  denoise_caller.join();
  ASSERT_TRUE(in_crowd.status.ok()) << in_crowd.status.error_message();
  EXPECT_LE(MaxAbsDiff(in_crowd.final_latent, alone.final_latent), 1e-5);
  for (size_t i = 0; i < crowd.size(); ++i) {
    ASSERT_TRUE(crowd_results[i].status.ok()) << crowd_results[i].status.error_message();
    EXPECT_LE(MaxAbsDiff(crowd_results[i].final_latent, crowd[i].InProcess(*engine)), 1e-5) << i;
  }
  EXPECT_EQ(server->running_generations(), 0);
}

// Steps of the server, all generations together.
uint64_t StepsComputed(const DenoiserServer& server) { return server.metrics().generation_steps(); }

TEST(Generate, CancellingMidGenerationStopsItsComputationWhileOthersFinish) {
  ServerOptions options;
  options.limits.max_steps = 100000;
  auto server = StartServer(options);
  auto client = ClientFor(*server);
  std::unique_ptr<Engine> engine = LoadEngine("sd3_tiny");
  const ModelConfig& c = engine->config();
  const Generation other = MakeGeneration(c, {4, 8, 8}, 5, 30, 7.0f, 1);
  StreamResult other_result;
  std::thread other_caller([&] { other_result = RunGenerate(*client, other.Request()); });
  // 100000 steps could not finish within the test: it ends only by the cancel.
  const Generation doomed = MakeGeneration(c, {4, 8, 8}, 5, 100000, 1.0f, 2);
  const StreamResult cancelled = RunGenerate(*client, doomed.Request(), std::chrono::seconds(60),
                                             [](const v1::GenerateProgress& p) { return p.step() < 3; });
  EXPECT_EQ(cancelled.status.error_code(), grpc::StatusCode::CANCELLED);
  ASSERT_TRUE(Eventually([&] { return server->metrics().requests_with_code(grpc::StatusCode::CANCELLED) == 1; }));
  other_caller.join();
  ASSERT_TRUE(other_result.status.ok()) << other_result.status.error_message();
  EXPECT_LE(MaxAbsDiff(other_result.final_latent, other.InProcess(*engine)), 1e-5);
  // Nothing more is computed for it once the server has seen the cancel.
  const uint64_t steps = StepsComputed(*server);
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  EXPECT_EQ(StepsComputed(*server), steps);
  EXPECT_EQ(server->running_generations(), 0);
}

TEST(Generate, ADeadlineMidGenerationIsDeadlineExceededAndComputationStops) {
  ServerOptions options;
  options.limits.max_steps = 100000;
  auto server = StartServer(options);
  auto client = ClientFor(*server);
  const Generation g = MakeGeneration(LoadEngine("sd3_tiny")->config(), {4, 8, 8}, 5, 100000, 1.0f, 2);
  const StreamResult result = RunGenerate(*client, g.Request(), std::chrono::milliseconds(300));
  EXPECT_EQ(result.status.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED);
  EXPECT_GT(result.progress.size(), 0u);  // it had started
  // The server ended it itself at a step boundary (the deadline rule), or on gRPC's cancel.
  ASSERT_TRUE(Eventually([&] {
    return server->metrics().requests_with_code(grpc::StatusCode::DEADLINE_EXCEEDED) +
               server->metrics().requests_with_code(grpc::StatusCode::CANCELLED) ==
           1;
  }));
  const uint64_t steps = StepsComputed(*server);
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  EXPECT_EQ(StepsComputed(*server), steps);
  EXPECT_EQ(server->running_generations(), 0);
}

TEST(Generate, AFullQueueIsResourceExhaustedAtOnce) {
  ServerOptions options;
  options.limits.max_steps = 100000;
  options.scheduler.max_running_generations = 1;
  options.scheduler.max_queue_size = 1;
  auto server = StartServer(options);
  auto client = ClientFor(*server);
  const ModelConfig c = LoadEngine("sd3_tiny")->config();
  const Generation runner = MakeGeneration(c, {4, 8, 8}, 5, 100000, 1.0f, 2);
  grpc::ClientContext running_context, queued_context;
  StreamResult running, queued;
  std::thread running_caller([&] {
    running = RunGenerate(*client, runner.Request(), std::chrono::seconds(60), {}, &running_context);
  });
  ASSERT_TRUE(Eventually([&] { return server->running_generations() == 1; }));
  std::thread queued_caller([&] {
    queued = RunGenerate(*client, runner.Request(), std::chrono::seconds(60), {}, &queued_context);
  });
  ASSERT_TRUE(Eventually([&] { return server->queue_size() == 1; }));
  const StreamResult refused = RunGenerate(*client, runner.Request());
  EXPECT_EQ(refused.status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_NE(refused.status.error_message().find("queue full"), std::string::npos);
  EXPECT_TRUE(refused.progress.empty());
  queued_context.TryCancel();
  running_context.TryCancel();
  running_caller.join();
  queued_caller.join();
  EXPECT_EQ(queued.status.error_code(), grpc::StatusCode::CANCELLED);
  EXPECT_TRUE(queued.progress.empty());  // it never started
}

TEST(Generate, DrainFinishesRunningGenerationsAndRefusesNewOnes) {
  auto server = StartServer({});
  auto client = ClientFor(*server);
  std::unique_ptr<Engine> engine = LoadEngine("sd3_tiny");
  const Generation g = MakeGeneration(engine->config(), {4, 8, 8}, 5, 200, 7.0f, 8);
  StreamResult result;
  std::thread caller([&] { result = RunGenerate(*client, g.Request()); });
  ASSERT_TRUE(Eventually([&] { return server->running_generations() == 1; }));
  server->BeginDrain();
  const StreamResult refused = RunGenerate(*client, g.Request());
  EXPECT_EQ(refused.status.error_code(), grpc::StatusCode::UNAVAILABLE);
  caller.join();
  ASSERT_TRUE(result.status.ok()) << result.status.error_message();
  EXPECT_EQ(result.progress.size(), 200u);
  server->Shutdown();
}

TEST(Generate, ADrainTimeoutEndsRunningGenerationsUnavailableNamingTheStep) {
  ServerOptions options;
  options.drain_timeout_s = 0;
  options.limits.max_steps = 100000;
  auto server = StartServer(options);
  auto client = ClientFor(*server);
  const Generation g = MakeGeneration(LoadEngine("sd3_tiny")->config(), {4, 8, 8}, 5, 100000, 1.0f, 8);
  StreamResult result;
  std::thread caller([&] { result = RunGenerate(*client, g.Request()); });
  ASSERT_TRUE(Eventually([&] { return StepsComputed(*server) > 2; }));
  server->Shutdown();
  caller.join();
  EXPECT_EQ(result.status.error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_NE(result.status.error_message().find("at step "), std::string::npos) << result.status.error_message();
}

TEST(Generate, GenerateAndDenoiseShareForwardPasses) {
  ServerOptions options;
  options.scheduler.max_batch_samples = 16;
  options.limits.max_steps = 100000;
  auto server = StartServer(options);
  auto client = ClientFor(*server);
  const Generation g = MakeGeneration(LoadEngine("sd3_tiny")->config(), {4, 8, 8}, 5, 100000, 7.0f, 8);
  grpc::ClientContext context;
  std::atomic<bool> shared{false};
  StreamResult result;
  std::thread caller([&] {
    result = RunGenerate(*client, g.Request(), std::chrono::seconds(60),
                         [&](const v1::GenerateProgress& p) { return !(shared = p.batch_samples() > 2); }, &context);
  });
  ASSERT_TRUE(Eventually([&] { return server->running_generations() == 1; }));
  int32_t max_batch = 0;
  for (int i = 0; i < 20 && !shared; ++i) {
    absl::StatusOr<DenoiseResult> denoised =
        client->Denoise(RandomSd3TinyInputs(2, 8, 8, 5, i).View(), v1::FP32, std::chrono::seconds(30));
    ASSERT_TRUE(denoised.ok()) << denoised.status();
    max_batch = std::max(max_batch, denoised->batch_samples);
  }
  caller.join();
  EXPECT_TRUE(shared.load());
  EXPECT_EQ(max_batch, 4);  // 2 CFG rows of the generation + 2 samples of the Denoise call
}

struct MalformedCase {
  std::string description;
  std::function<void(v1::GenerateRequest&)> corrupt;
  std::string expected_field;
};

class MalformedGenerate : public ::testing::TestWithParam<MalformedCase> {};

TEST_P(MalformedGenerate, IsInvalidArgumentNamingTheField) {
  static auto* server = StartServer({}).release();  // one server for the whole table
  auto client = ClientFor(*server);
  Generation g = MakeGeneration(LoadEngine("sd3_tiny")->config(), {4, 8, 8}, 5, 3, 7.0f, 1);
  v1::GenerateRequest request = g.Request();
  GetParam().corrupt(request);
  const StreamResult result = RunGenerate(*client, request);
  EXPECT_EQ(result.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << result.status.error_message();
  EXPECT_NE(result.status.error_message().find(GetParam().expected_field), std::string::npos)
      << result.status.error_message();
  EXPECT_TRUE(result.progress.empty());
}

v1::Tensor ZeroTensor(Shape shape) {
  v1::Tensor wire;
  EncodeTensor(Tensor(shape), v1::FP32, &wire);
  return wire;
}

INSTANTIATE_TEST_SUITE_P(
    Table, MalformedGenerate,
    ::testing::Values(
        MalformedCase{"no_txt_embed", [](v1::GenerateRequest& r) { r.clear_txt_embed(); }, "txt_embed"},
        MalformedCase{"txt_embed_batch_2",
                      [](v1::GenerateRequest& r) { *r.mutable_txt_embed() = ZeroTensor({2, 5, 40}); }, "txt_embed"},
        MalformedCase{"txt_embed_wrong_width",
                      [](v1::GenerateRequest& r) { *r.mutable_txt_embed() = ZeroTensor({1, 5, 41}); }, "txt_embed"},
        MalformedCase{"pooled_wrong_width",
                      [](v1::GenerateRequest& r) { *r.mutable_pooled_text() = ZeroTensor({1, 25}); }, "pooled_text"},
        MalformedCase{"negative_missing_with_cfg", [](v1::GenerateRequest& r) { r.clear_negative_txt_embed(); },
                      "negative_txt_embed"},
        MalformedCase{"negative_wrong_width",
                      [](v1::GenerateRequest& r) { *r.mutable_negative_txt_embed() = ZeroTensor({1, 5, 39}); },
                      "negative_txt_embed"},
        MalformedCase{"negative_pooled_wrong",
                      [](v1::GenerateRequest& r) { *r.mutable_negative_pooled_text() = ZeroTensor({1, 3}); },
                      "negative_pooled_text"},
        MalformedCase{"latent_wrong_channels",
                      [](v1::GenerateRequest& r) {
                        r.clear_initial_noise();
                        for (int64_t d : {3, 8, 8}) r.add_latent_shape(d);
                      },
                      "latent_shape"},
        MalformedCase{"latent_too_large",
                      [](v1::GenerateRequest& r) {
                        r.clear_initial_noise();
                        for (int64_t d : {4, 64, 64}) r.add_latent_shape(d);
                      },
                      "latent_shape"},
        MalformedCase{"latent_shape_disagrees_with_noise",
                      [](v1::GenerateRequest& r) {
                        for (int64_t d : {4, 8, 6}) r.add_latent_shape(d);
                      },
                      "initial_noise"},
        MalformedCase{"noise_odd_size",
                      [](v1::GenerateRequest& r) { *r.mutable_initial_noise() = ZeroTensor({1, 4, 7, 8}); },
                      "initial_noise"},
        MalformedCase{"noise_nan",
                      [](v1::GenerateRequest& r) {
                        Tensor t({1, 4, 8, 8});
                        t.data[5] = std::nanf("");
                        EncodeTensor(t, v1::FP32, r.mutable_initial_noise());
                      },
                      "initial_noise"},
        MalformedCase{"init_latent_shape",
                      [](v1::GenerateRequest& r) { *r.mutable_init_latent() = ZeroTensor({1, 4, 8, 6}); },
                      "init_latent"},
        MalformedCase{"strength_without_init_latent", [](v1::GenerateRequest& r) { r.set_strength(0.5f); },
                      "strength"},
        MalformedCase{"strength_zero",
                      [](v1::GenerateRequest& r) {
                        *r.mutable_init_latent() = ZeroTensor({1, 4, 8, 8});
                        r.set_strength(0.0f);
                      },
                      "strength"},
        MalformedCase{"steps_negative", [](v1::GenerateRequest& r) { r.set_steps(-1); }, "steps"},
        MalformedCase{"steps_over_the_limit", [](v1::GenerateRequest& r) { r.set_steps(1001); }, "steps"},
        MalformedCase{"guidance_nan", [](v1::GenerateRequest& r) { r.set_guidance_scale(std::nanf("")); },
                      "guidance_scale"},
        MalformedCase{"skip_layer_out_of_range",
                      [](v1::GenerateRequest& r) { r.mutable_skip_layer_guidance()->add_layers(3); },
                      "skip_layer_guidance.layers"},
        MalformedCase{"skip_layers_without_cfg",
                      [](v1::GenerateRequest& r) {
                        r.set_guidance_scale(1.0f);
                        r.mutable_skip_layer_guidance()->add_layers(1);
                      },
                      "skip_layer_guidance"},
        MalformedCase{"preview_negative", [](v1::GenerateRequest& r) { r.set_preview_every(-2); }, "preview_every"},
        MalformedCase{"output_dtype_unknown",
                      [](v1::GenerateRequest& r) { r.set_output_dtype(static_cast<v1::DType>(9)); }, "output_dtype"},
        MalformedCase{"too_many_text_tokens",
                      [](v1::GenerateRequest& r) { *r.mutable_txt_embed() = ZeroTensor({1, 513, 40}); }, "txt_embed"}),
    DescriptionAsTestName());

TEST(Generate, ConditioningThatOverflowsEndsTheGenerationAtThatStepNamingTheInput) {
  auto server = StartServer(ServerOptions());
  auto client = ClientFor(*server);
  Generation g = MakeGeneration(LoadEngine("sd3_tiny")->config(), {4, 8, 8}, 5, 6, 7.0f, 1);
  std::fill(g.negative_pooled_text.data.begin(), g.negative_pooled_text.data.end(), 3e19f);
  const StreamResult result = RunGenerate(*client, g.Request());
  EXPECT_EQ(result.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(result.status.error_message(), ::testing::HasSubstr("latent is not finite"));
  EXPECT_THAT(result.status.error_message(), ::testing::HasSubstr("negative_pooled_text (|value| up to 3e+19)"));
  EXPECT_THAT(result.status.error_message(), ::testing::HasSubstr("at step 1 of 6"));
  EXPECT_TRUE(result.progress.empty());  // no message carried the NaN latent
}

TEST(Generate, GetModelInfoReportsTheSamplerDefaultsAndGenerationLimits) {
  ServerOptions options;
  options.scheduler.max_running_generations = 5;
  options.limits.max_steps = 77;
  auto server = StartServer(options);
  auto client = ClientFor(*server);
  absl::StatusOr<v1::GetModelInfoResponse> info = client->GetModelInfo(std::chrono::seconds(10));
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->sampler().scheduler(), "FlowMatchEulerDiscreteScheduler");
  EXPECT_EQ(info->sampler().shift(), 3.0);
  EXPECT_EQ(info->sampler().steps(), 28);
  EXPECT_EQ(info->sampler().guidance_scale(), 7.0f);
  EXPECT_EQ(info->limits().max_running_generations(), 5);
  EXPECT_EQ(info->limits().max_steps(), 77);
}

TEST(Generate, MetricsCountStepsGenerationsAndFirstSteps) {
  auto server = StartServer({});
  auto client = ClientFor(*server);
  const Generation g = MakeGeneration(LoadEngine("sd3_tiny")->config(), {4, 8, 8}, 5, 4, 7.0f, 8);
  ASSERT_TRUE(RunGenerate(*client, g.Request()).status.ok());
  const std::string metrics = HttpGet(server->metrics_port(), "/metrics");
  EXPECT_NE(metrics.find("mmdit_generation_steps_total 4\n"), std::string::npos) << metrics;
  EXPECT_NE(metrics.find("mmdit_generation_seconds_count 1\n"), std::string::npos);
  EXPECT_NE(metrics.find("mmdit_generation_first_step_seconds_count 1\n"), std::string::npos);
  EXPECT_NE(metrics.find("mmdit_generation_step_queue_seconds_count 4\n"), std::string::npos);
  EXPECT_NE(metrics.find("mmdit_requests_total{code=\"OK\"} 1\n"), std::string::npos);
  // The step loop releases the generation's slot just after answering it: a gauge, read soon after.
  EXPECT_TRUE(Eventually([&] {
    return HttpGet(server->metrics_port(), "/metrics").find("mmdit_generations_running 0\n") != std::string::npos;
  }));
}

// The digits model (models/digits) and its text encoder: Generate's prompt is its encoder's
// embeddings, and what is wrong with a prompt is named.
std::unique_ptr<TextEncoder> DigitsEncoder() {
  auto encoder = LoadTextEncoder(DigitsModelDir(), 32, 32);
  EXPECT_TRUE(encoder.ok()) << encoder.status();
  EXPECT_NE(*encoder, nullptr);
  return std::move(*encoder);
}

void EncodeBatchOfOne(const Tensor& t, v1::Tensor* wire) {
  Shape shape = t.shape;
  shape.insert(shape.begin(), 1);
  EncodeTensor(TensorView(shape, t.data.data()), v1::FP32, wire);
}

TEST(Generate, APromptIsTheSameGenerationAsItsEncodersEmbeddings) {
  auto server = StartModelServer({}, DigitsModelDir());
  ASSERT_NE(server, nullptr);
  auto client = ClientFor(*server);
  const std::unique_ptr<TextEncoder> encoder = DigitsEncoder();
  auto seven = encoder->Encode("a seven"), empty = encoder->Encode(""), one = encoder->Encode("one");
  ASSERT_TRUE(seven.ok() && empty.ok() && one.ok());

  v1::GenerateRequest by_prompt;
  by_prompt.set_prompt("A Seven!");  // case and punctuation do not matter
  by_prompt.set_seed(5);
  by_prompt.set_steps(6);  // guidance_scale unset: 7, so CFG against the empty negative prompt
  v1::GenerateRequest by_embeddings;
  by_embeddings.set_seed(5);
  by_embeddings.set_steps(6);
  EncodeBatchOfOne(seven->txt_embed, by_embeddings.mutable_txt_embed());
  EncodeBatchOfOne(seven->pooled_text, by_embeddings.mutable_pooled_text());
  EncodeBatchOfOne(empty->txt_embed, by_embeddings.mutable_negative_txt_embed());
  EncodeBatchOfOne(empty->pooled_text, by_embeddings.mutable_negative_pooled_text());
  const StreamResult prompted = RunGenerate(*client, by_prompt), embedded = RunGenerate(*client, by_embeddings);
  ASSERT_TRUE(prompted.status.ok()) << prompted.status.error_message();
  ASSERT_TRUE(embedded.status.ok()) << embedded.status.error_message();
  EXPECT_EQ(prompted.final_latent.shape, (Shape{1, 8, 8}));  // the digits model's nominal size
  EXPECT_EQ(prompted.final_latent.data, embedded.final_latent.data);
  EXPECT_EQ(prompted.progress.front().rows(), 2);  // the positive and the negative prompt

  // An explicit negative prompt is encoded too: "one" as the negative moves the result.
  by_prompt.set_negative_prompt("one");
  *by_embeddings.mutable_negative_txt_embed() = {};
  *by_embeddings.mutable_negative_pooled_text() = {};
  EncodeBatchOfOne(one->txt_embed, by_embeddings.mutable_negative_txt_embed());
  EncodeBatchOfOne(one->pooled_text, by_embeddings.mutable_negative_pooled_text());
  const StreamResult against_one = RunGenerate(*client, by_prompt), embedded_one = RunGenerate(*client, by_embeddings);
  ASSERT_TRUE(against_one.status.ok() && embedded_one.status.ok());
  EXPECT_EQ(against_one.final_latent.data, embedded_one.final_latent.data);
  EXPECT_GT(MaxAbsDiff(against_one.final_latent, prompted.final_latent), 1e-3);
}

TEST(Generate, PromptErrorsNameTheFieldAndTheProblem) {
  auto digits = StartModelServer({}, DigitsModelDir());
  auto tiny = StartServer({});
  ASSERT_NE(digits, nullptr);
  auto digits_client = ClientFor(*digits), tiny_client = ClientFor(*tiny);
  struct Case {
    std::string description;
    DenoiserClient* client;
    std::function<void(v1::GenerateRequest&)> set;
    std::string expected;
  };
  const std::vector<Case> cases = {
      {"no encoder", tiny_client.get(), [](v1::GenerateRequest& r) { r.set_prompt("7"); },
       "prompt: this model has no text encoder"},
      {"prompt and embeddings", digits_client.get(),
       [](v1::GenerateRequest& r) {
         r.set_prompt("7");
         *r.mutable_txt_embed() = ZeroTensor({1, 4, 32});
       },
       "txt_embed: send either prompt or embeddings, not both"},
      {"negative without prompt", digits_client.get(), [](v1::GenerateRequest& r) { r.set_negative_prompt("1"); },
       "negative_prompt: only with prompt"},
      {"unknown word", digits_client.get(), [](v1::GenerateRequest& r) { r.set_prompt("a banana"); },
       "prompt: word 'banana' is not in the text encoder's vocabulary"},
      {"unknown negative word", digits_client.get(),
       [](v1::GenerateRequest& r) {
         r.set_prompt("7");
         r.set_negative_prompt("blurry");
       },
       "negative_prompt: word 'blurry'"},
      {"too many words", digits_client.get(),
       [](v1::GenerateRequest& r) { r.set_prompt("the handwritten digit seven please"); },
       "prompt: has 5 words; the text encoder takes at most 4"},
  };
  for (const Case& c : cases) {
    v1::GenerateRequest request;
    request.set_seed(1);
    request.set_steps(2);
    c.set(request);
    const StreamResult result = RunGenerate(*c.client, request);
    EXPECT_EQ(result.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << c.description;
    EXPECT_THAT(result.status.error_message(), ::testing::HasSubstr(c.expected)) << c.description;
    EXPECT_TRUE(result.progress.empty()) << c.description;
  }
}

TEST(Generate, GetModelInfoReportsTheTextEncoderAndTheNominalSize) {
  auto digits = StartModelServer({}, DigitsModelDir());
  auto tiny = StartServer({});
  ASSERT_NE(digits, nullptr);
  absl::StatusOr<v1::GetModelInfoResponse> info = ClientFor(*digits)->GetModelInfo(std::chrono::seconds(10));
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->model().sample_size(), 8);
  EXPECT_EQ(info->model().in_channels(), 1);
  ASSERT_TRUE(info->model().has_text_encoder());
  const v1::TextEncoderInfo& encoder = info->model().text_encoder();
  EXPECT_EQ(encoder.kind(), "LookupTextEncoder");
  EXPECT_EQ(encoder.max_tokens(), 4);
  EXPECT_THAT(encoder.vocabulary(), ::testing::Contains("seven"));
  EXPECT_THAT(encoder.vocabulary(), ::testing::Contains("7"));
  EXPECT_EQ(encoder.vocabulary_size(), 26);
  info = ClientFor(*tiny)->GetModelInfo(std::chrono::seconds(10));
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_FALSE(info->model().has_text_encoder());
  EXPECT_EQ(info->model().sample_size(), 8);
}

}  // namespace
}  // namespace mmdit::testing
