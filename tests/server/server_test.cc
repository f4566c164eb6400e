// The service end to end over loopback: an in-process server on port 0 and real clients.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <future>
#include <thread>

#include <google/protobuf/descriptor.h>
#include <google/protobuf/descriptor.pb.h>
#include <grpcpp/generic/generic_stub.h>

#include "core/batch.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "grpc/reflection/v1/reflection.grpc.pb.h"
#include "server/denoiser_server.h"
#include "tests/server/server_test_util.h"

namespace mmdit {
namespace {

using ::mmdit::testing::CallWithBody;
using ::mmdit::testing::ClientFor;
using ::mmdit::testing::Eventually;
using ::mmdit::testing::GoldenDir;
using ::mmdit::testing::HttpGet;
using ::mmdit::testing::Inputs;
using ::mmdit::testing::MaxAbsDiff;
using ::mmdit::testing::RandomSd3TinyInputs;
using ::mmdit::testing::StartDenoise;
using ::mmdit::testing::StartServer;
using ::testing::HasSubstr;
using ::testing::Not;

constexpr auto kTimeout = std::chrono::seconds(30);

// The engine's answer for `inputs` run alone.
Tensor EngineAlone(const std::string& golden, const Inputs& inputs) {
  auto engine = Engine::Load(GoldenDir(golden));
  auto samples = SplitBatch(inputs.img_latent, inputs.txt_embed, inputs.timestep, inputs.pooled_text);
  auto outputs = (*engine)->Forward(*samples);
  EXPECT_TRUE(outputs.ok()) << outputs.status();
  return *StackBatch(*outputs);
}

TEST(DenoiserServer, GoldenCasesThroughDenoiseEqualTheEngine) {
  for (const char* golden : {"seed_tiny", "sd3_tiny", "sd35_tiny"}) {
    auto server = StartServer({}, golden);
    auto client = ClientFor(*server);
    const testing::GoldenCase c = testing::LoadGoldenCase(golden);
    const Inputs inputs{c.img_latent, c.txt_embed, c.timestep, c.pooled_text};
    auto result = client->Denoise(inputs.View(), v1::FP32, kTimeout);
    ASSERT_TRUE(result.ok()) << golden << ": " << result.status();
    EXPECT_LE(MaxAbsDiff(result->prediction, EngineAlone(golden, inputs)), 1e-6) << golden;
    EXPECT_LE(MaxAbsDiff(result->prediction, c.expected), 1e-4) << golden;
    EXPECT_EQ(result->batch_samples, c.img_latent.shape[0]);
  }
}

TEST(DenoiserServer, HalfPrecisionOnTheWireComesBackInTheSameDtype) {
  auto server = StartServer({});
  auto client = ClientFor(*server);
  const Inputs inputs = RandomSd3TinyInputs(2, 8, 8, 5, 1);
  const Tensor reference = EngineAlone("sd3_tiny", inputs);
  for (v1::DType dtype : {v1::BF16, v1::FP16}) {
    v1::DenoiseResponse response;
    grpc::ClientContext context;
    ASSERT_TRUE(client->stub().Denoise(&context, MakeDenoiseRequest(inputs.View(), dtype), &response).ok());
    EXPECT_EQ(response.prediction().dtype(), dtype);
    auto prediction = DecodeTensor(response.prediction(), "prediction");
    ASSERT_TRUE(prediction.ok());
    EXPECT_LE(MaxAbsDiff(*prediction, reference), 0.1) << v1::DType_Name(dtype);  // inputs rounded too
  }
}

TEST(DenoiserServer, ConcurrentCallersOfDifferentShapesShareForwardPassesAndGetTheirOwnAnswers) {
  ServerOptions options;
  options.scheduler.max_batch_samples = 10;            // exactly the six callers' samples:
  options.scheduler.max_queue_delay_us = 60'000'000;  // the pass waits for all of them, however slow
  auto server = StartServer(options);
  auto client = ClientFor(*server);
  const std::vector<Inputs> inputs = {
      RandomSd3TinyInputs(1, 8, 8, 7, 10),    RandomSd3TinyInputs(2, 4, 6, 3, 20),
      RandomSd3TinyInputs(1, 16, 16, 12, 30), RandomSd3TinyInputs(3, 2, 16, 1, 40),
      RandomSd3TinyInputs(1, 6, 10, 9, 50),   RandomSd3TinyInputs(2, 8, 8, 7, 60),
  };
  std::vector<std::unique_ptr<testing::AsyncCall>> calls;
  // They ask to wait for company, so they meet even though the engine is idle.
  for (const Inputs& in : inputs) calls.push_back(StartDenoise(*client, in, kTimeout, /*wait_for_batch=*/true));
  for (size_t i = 0; i < calls.size(); ++i) {
    const grpc::Status status = calls[i]->status.get();
    ASSERT_TRUE(status.ok()) << status.error_message();
    auto prediction = DecodeTensor(calls[i]->response.prediction(), "prediction");
    ASSERT_TRUE(prediction.ok());
    EXPECT_LE(MaxAbsDiff(*prediction, EngineAlone("sd3_tiny", inputs[i])), 1e-5) << "caller " << i;
    EXPECT_EQ(calls[i]->response.batch_samples(), 10) << "caller " << i << " did not share the one pass";
  }
  EXPECT_EQ(server->metrics().samples_computed(), 10u);
}

TEST(DenoiserServer, DeadlinePassingWhileQueuedIsDeadlineExceededAndNothingIsComputed) {
  ServerOptions options;
  options.scheduler.max_queue_delay_us = 2'000'000;
  auto server = StartServer(options);
  auto client = ClientFor(*server);
  auto call = StartDenoise(*client, RandomSd3TinyInputs(1, 8, 8, 7, 1), std::chrono::milliseconds(100),
                           /*wait_for_batch=*/true);
  EXPECT_EQ(call->status.get().error_code(), grpc::StatusCode::DEADLINE_EXCEEDED);
  // The server itself drops it, long before the 2 s wait for company would have run it, and
  // computes nothing. It answers DEADLINE_EXCEEDED when its deadline passes first, or CANCELLED
  // when the client's cancellation (sent at the client's deadline, which ran from an earlier
  // start) arrives first: either is right. Which rule fires on which clock is
  // step_scheduler_test's, on an injected clock.
  EXPECT_TRUE(Eventually(
      [&] {
        return server->metrics().requests_with_code(grpc::StatusCode::DEADLINE_EXCEEDED) +
                   server->metrics().requests_with_code(grpc::StatusCode::CANCELLED) ==
               1;
      },
      std::chrono::milliseconds(1500)));
  EXPECT_EQ(server->queue_size(), 0);
  EXPECT_EQ(server->metrics().samples_computed(), 0u);
  EXPECT_EQ(server->metrics().requests_with_code(grpc::StatusCode::OK), 0u);
}

TEST(DenoiserServer, ClientCancellationWhileQueuedIsDroppedWithoutComputing) {
  ServerOptions options;
  options.scheduler.max_queue_delay_us = 2'000'000;
  auto server = StartServer(options);
  auto client = ClientFor(*server);
  auto call = StartDenoise(*client, RandomSd3TinyInputs(1, 8, 8, 7, 1), kTimeout, /*wait_for_batch=*/true);
  ASSERT_TRUE(Eventually([&] { return server->queue_size() == 1; }));
  call->context.TryCancel();
  EXPECT_EQ(call->status.get().error_code(), grpc::StatusCode::CANCELLED);
  EXPECT_TRUE(Eventually([&] { return server->metrics().requests_with_code(grpc::StatusCode::CANCELLED) == 1; }));
  EXPECT_EQ(server->queue_size(), 0);
  EXPECT_EQ(server->metrics().samples_computed(), 0u);
}

TEST(DenoiserServer, AFullQueueAnswersResourceExhaustedAtOnce) {
  ServerOptions options;
  options.scheduler.max_queue_size = 2;
  options.scheduler.max_queue_delay_us = 10'000'000;
  auto server = StartServer(options);
  auto client = ClientFor(*server);
  auto first = StartDenoise(*client, RandomSd3TinyInputs(1, 8, 8, 7, 1), kTimeout, /*wait_for_batch=*/true);
  auto second = StartDenoise(*client, RandomSd3TinyInputs(1, 8, 8, 7, 2), kTimeout, /*wait_for_batch=*/true);
  ASSERT_TRUE(Eventually([&] { return server->queue_size() == 2; }));
  auto refused = client->Denoise(RandomSd3TinyInputs(1, 8, 8, 7, 3).View(), v1::FP32, kTimeout);
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(std::string(refused.status().message()), HasSubstr("queue full"));
  server->BeginDrain();  // the queued two are still answered
  EXPECT_TRUE(first->status.get().ok());
  EXPECT_TRUE(second->status.get().ok());
}

TEST(DenoiserServer, DrainAnswersEveryAcceptedRequestAndRefusesNewOnes) {
  ServerOptions options;
  options.scheduler.max_queue_delay_us = 10'000'000;
  options.scheduler.max_batch_samples = 2;
  auto server = StartServer(options);
  auto client = ClientFor(*server);
  std::vector<std::unique_ptr<testing::AsyncCall>> accepted;
  for (uint32_t i = 0; i < 3; ++i) {
    accepted.push_back(StartDenoise(*client, RandomSd3TinyInputs(1, 8, 8, 7, i), kTimeout, /*wait_for_batch=*/true));
  }
  // All three accepted: two ran as a full pass, the third waits (for 10 s) for company.
  ASSERT_TRUE(Eventually([&] { return server->metrics().samples_computed() == 2 && server->queue_size() == 1; }));
  server->BeginDrain();
  for (auto& call : accepted) EXPECT_TRUE(call->status.get().ok());
  auto late = client->Denoise(RandomSd3TinyInputs(1, 8, 8, 7, 9).View(), v1::FP32, kTimeout);
  EXPECT_EQ(late.status().code(), absl::StatusCode::kUnavailable);
  auto serving = client->IsServing(kTimeout);
  ASSERT_TRUE(serving.ok());
  EXPECT_FALSE(*serving);
  server->Shutdown();
  EXPECT_EQ(server->metrics().requests_with_code(grpc::StatusCode::OK), 3u);
}

TEST(DenoiserServer, MalformedRequestsAreInvalidArgumentAndHarmNoBatchMate) {
  ServerOptions options;
  options.scheduler.max_queue_delay_us = 200'000;
  options.limits.max_text_tokens = 16;
  auto server = StartServer(options);
  auto client = ClientFor(*server);
  const Inputs good = RandomSd3TinyInputs(1, 8, 8, 7, 1);
  auto good_call = StartDenoise(*client, good, kTimeout, /*wait_for_batch=*/true);  // queued while the bad ones arrive
  std::vector<std::pair<v1::DenoiseRequest, std::string>> bad;
  auto with = [&](const std::function<void(v1::DenoiseRequest&)>& spoil, const std::string& message) {
    v1::DenoiseRequest request = MakeDenoiseRequest(good.View(), v1::FP32);
    spoil(request);
    bad.emplace_back(std::move(request), message);
  };
  with([](auto& r) { r.mutable_img_latent()->set_shape(2, 7); }, "img_latent:");
  with([](auto& r) { r.mutable_txt_embed()->mutable_data()->pop_back(); }, "txt_embed:");
  with([](auto& r) { r.clear_timestep(); }, "timestep: missing");
  with([](auto& r) { std::memset(r.mutable_pooled_text()->mutable_data()->data(), 0xff, 4); },
       "pooled_text: element 0 is NaN");
  with([](auto& r) { r.mutable_img_latent()->set_dtype(static_cast<v1::DType>(42)); }, "img_latent: dtype");
  with(
      [](auto& r) {
        EncodeTensor(testing::RandomTensor({1, 17, 40}, 1), v1::FP32, r.mutable_txt_embed());
      },
      "txt_embed: 17 text tokens");
  for (const auto& [request, message] : bad) {
    v1::DenoiseResponse response;
    grpc::ClientContext context;
    const grpc::Status status = client->stub().Denoise(&context, request, &response);
    EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << message;
    EXPECT_THAT(status.error_message(), HasSubstr(message));
  }
  ASSERT_TRUE(good_call->status.get().ok());
  auto prediction = DecodeTensor(good_call->response.prediction(), "prediction");
  EXPECT_LE(MaxAbsDiff(*prediction, EngineAlone("sd3_tiny", good)), 1e-5);
  EXPECT_TRUE(client->Denoise(good.View(), v1::FP32, kTimeout).ok());  // still serving
  EXPECT_EQ(server->metrics().requests_with_code(grpc::StatusCode::INVALID_ARGUMENT), bad.size());
}

// Finite inputs that overflow float32 inside the model: refused naming the input, never
// answered OK with NaN, and the request that shared the pass is answered as if alone.
TEST(DenoiserServer, InputsThatOverflowInsideTheModelAreRefusedAndHarmNoBatchMate) {
  ServerOptions options;
  options.scheduler.max_batch_samples = 2;            // the pass goes when both are there
  options.scheduler.max_queue_delay_us = 10'000'000;  // and not before
  auto server = StartServer(options);
  auto client = ClientFor(*server);
  const Inputs good = RandomSd3TinyInputs(1, 8, 8, 7, 1);
  const std::vector<std::pair<std::function<void(Inputs&)>, std::string>> overflows = {
      // (One element of 3e19 stays finite in this small model, though the prediction reaches 1e18.)
      {[](Inputs& in) { std::fill(in.pooled_text.data.begin(), in.pooled_text.data.end(), 3e19f); },
       "pooled_text (|value| up to 3e+19)"},
      {[](Inputs& in) { in.img_latent.data[5] = -3.4e38f; }, "img_latent (|value| up to 3.4e+38)"},
  };
  for (const auto& [spoil, message] : overflows) {
    Inputs bad = RandomSd3TinyInputs(1, 8, 8, 7, 2);
    spoil(bad);
    auto good_call = StartDenoise(*client, good, kTimeout, /*wait_for_batch=*/true);
    auto bad_call = StartDenoise(*client, bad, kTimeout, /*wait_for_batch=*/true);
    const grpc::Status bad_status = bad_call->status.get();
    EXPECT_EQ(bad_status.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << message;
    EXPECT_THAT(bad_status.error_message(), HasSubstr("prediction is not finite"));
    EXPECT_THAT(bad_status.error_message(), HasSubstr(message));
    ASSERT_TRUE(good_call->status.get().ok());
    EXPECT_EQ(good_call->response.batch_samples(), 2) << "the two did not share the pass";
    auto prediction = DecodeTensor(good_call->response.prediction(), "prediction");
    ASSERT_TRUE(prediction.ok());
    EXPECT_LE(MaxAbsDiff(*prediction, EngineAlone("sd3_tiny", good)), 1e-5) << message;
  }
  EXPECT_EQ(server->metrics().requests_with_code(grpc::StatusCode::INVALID_ARGUMENT), 2u);
}

TEST(DenoiserServer, AnUnparseableBodyIsInvalidArgumentWithAMessage) {
  auto server = StartServer({});
  for (const char* method : {"/mmdit.v1.Denoiser/Denoise", "/mmdit.v1.Denoiser/Generate"}) {
    // Field 1 (a Tensor) declared 100 bytes long, with 3 present: not a message.
    const grpc::Status status = CallWithBody(*server, method, std::string("\x0a\x64" "abc", 5));
    EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << method;
    EXPECT_THAT(status.error_message(), HasSubstr("the request body (5 bytes) is not a valid mmdit.v1."));
  }
  // An empty body is a valid (empty) message: refused by validation, naming the field.
  const grpc::Status empty = CallWithBody(*server, "/mmdit.v1.Denoiser/Denoise", "");
  EXPECT_EQ(empty.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(empty.error_message(), HasSubstr("img_latent: missing"));
  EXPECT_EQ(server->metrics().requests_with_code(grpc::StatusCode::INVALID_ARGUMENT), 3u);
}

// Every call that reaches the application is counted by method and code, including an unknown
// method's. A call gRPC's core refuses before that (a message over the size limit) is not
// visible to interceptors; it shows in the core's own count of calls started.
TEST(DenoiserServer, MetricsCountTheCallsGrpcAnswersItself) {
  ServerOptions options;
  options.max_receive_message_mb = 1;
  auto server = StartServer(options);
  const grpc::Status oversized = CallWithBody(*server, "/mmdit.v1.Denoiser/Denoise", std::string(2 << 20, 'x'));
  EXPECT_EQ(oversized.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << oversized.error_message();
  // The core counts it as started, and it is in no per-code counter: it never reached us.
  std::string page = HttpGet(server->metrics_port(), "/metrics");
  EXPECT_THAT(page, HasSubstr("grpc_core_server_calls_total{outcome=\"started\"} 1\n"));
  EXPECT_THAT(page, HasSubstr("mmdit_requests_total{code=\"RESOURCE_EXHAUSTED\"} 0\n"));
  EXPECT_THAT(page, Not(HasSubstr("grpc_server_handled_total{")));
  const grpc::Status unknown = CallWithBody(*server, "/mmdit.v1.Denoiser/NoSuchMethod", "");
  EXPECT_EQ(unknown.error_code(), grpc::StatusCode::UNIMPLEMENTED);
  ASSERT_TRUE(ClientFor(*server)->GetModelInfo(kTimeout).ok());
  page = HttpGet(server->metrics_port(), "/metrics");
  EXPECT_THAT(page, HasSubstr("grpc_core_server_calls_total{outcome=\"started\"} 3\n"));
  EXPECT_THAT(page, HasSubstr("grpc_server_handled_total{grpc_service=\"mmdit.v1.Denoiser\",grpc_method=\"GetModelInfo\","
                              "grpc_code=\"OK\"} 1\n"));
  EXPECT_THAT(page, HasSubstr("grpc_method=\"NoSuchMethod\",grpc_code=\"UNIMPLEMENTED\"} 1\n"));
}

TEST(DenoiserServer, HealthFollowsTheLifeCycle) {
  auto server = StartServer({}, "sd3_tiny", /*serve=*/false);
  auto client = ClientFor(*server);
  EXPECT_FALSE(*client->IsServing(kTimeout));
  auto early = client->Denoise(RandomSd3TinyInputs(1, 8, 8, 7, 1).View(), v1::FP32, kTimeout);
  EXPECT_EQ(early.status().code(), absl::StatusCode::kUnavailable);
  ASSERT_TRUE(server->Serve(Engine::Load(GoldenDir("sd3_tiny")).value(), {{2, {4, 16, 16}, 10}}).ok());
  EXPECT_TRUE(*client->IsServing(kTimeout));
  server->BeginDrain();
  EXPECT_FALSE(*client->IsServing(kTimeout));
}

TEST(DenoiserServer, GetModelInfoReportsTheModelAndTheLimits) {
  ServerOptions options;
  options.scheduler.max_batch_samples = 6;
  options.limits.max_samples_per_request = 4;
  options.model_dir = "golden/sd3_tiny";
  auto server = StartServer(options);
  auto info = ClientFor(*server)->GetModelInfo(kTimeout);
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->model().hidden_size(), 64);
  EXPECT_EQ(info->model().depth(), 3);
  EXPECT_EQ(info->model().img_dim(), 16);
  EXPECT_EQ(info->model().pos_embed_max_size(), 8);
  EXPECT_EQ(info->model().model_dir(), "golden/sd3_tiny");
  EXPECT_EQ(info->model().compute_dtype(), "f32");
  EXPECT_EQ(info->limits().max_batch_samples(), 6);
  EXPECT_EQ(info->limits().max_samples_per_request(), 4);
  EXPECT_EQ(info->limits().max_latent_height(), 16);
  EXPECT_THAT(info->limits().forms(), ::testing::ElementsAre("image"));
}

TEST(DenoiserServer, ServesPrometheusMetrics) {
  auto server = StartServer({});
  auto client = ClientFor(*server);
  ASSERT_TRUE(client->Denoise(RandomSd3TinyInputs(2, 8, 8, 7, 1).View(), v1::FP32, kTimeout).ok());
  EXPECT_FALSE(client->Denoise(RandomSd3TinyInputs(1, 3, 8, 7, 1).View(), v1::FP32, kTimeout).ok());
  const std::string page = HttpGet(server->metrics_port(), "/metrics");
  EXPECT_THAT(page, HasSubstr("200 OK"));
  EXPECT_THAT(page, HasSubstr("mmdit_requests_total{code=\"OK\"} 1\n"));
  EXPECT_THAT(page, HasSubstr("mmdit_requests_total{code=\"INVALID_ARGUMENT\"} 1\n"));
  EXPECT_THAT(page, HasSubstr("mmdit_samples_total 2\n"));
  EXPECT_THAT(page, HasSubstr("mmdit_batch_samples_bucket{le=\"2\"} 1\n"));
  EXPECT_THAT(page, HasSubstr("mmdit_queue_seconds_count 1\n"));
  EXPECT_THAT(page, HasSubstr("mmdit_queue_depth 0\n"));
  EXPECT_THAT(HttpGet(server->metrics_port(), "/other"), HasSubstr("404"));
}

// Idle connections cannot hold the HTTP port: a scrape is answered while three sit open (the
// old one-connection-at-a-time server held each for 2 s). Probes for HTTP-only checkers.
TEST(DenoiserServer, HttpPortServesProbesAndScrapesWhileIdleConnectionsAreOpen) {
  auto server = StartServer({});
  const int port = server->metrics_port();
  std::vector<std::unique_ptr<testing::IdleConnection>> idle;
  for (int i = 0; i < 3; ++i) {
    idle.push_back(std::make_unique<testing::IdleConnection>(port));
    ASSERT_TRUE(idle.back()->connected());
  }
  const auto within = std::chrono::milliseconds(1500);  // a fraction of the 6 s the old server took
  EXPECT_THAT(HttpGet(port, "/metrics", within), HasSubstr("mmdit_queue_depth 0\n"));
  const std::string healthz = HttpGet(port, "/healthz", within);
  EXPECT_THAT(healthz, HasSubstr(" 200 "));
  EXPECT_THAT(HttpGet(port, "/readyz", within), HasSubstr(" 200 "));
  server->BeginDrain();
  EXPECT_THAT(HttpGet(port, "/readyz", within), HasSubstr(" 503 "));
  EXPECT_THAT(HttpGet(port, "/healthz", within), HasSubstr(" 200 "));  // alive while draining
}

TEST(DenoiserServer, ReadyzIsNotReadyUntilTheModelIsServed) {
  auto server = StartServer({}, "sd3_tiny", /*serve=*/false);
  EXPECT_THAT(HttpGet(server->metrics_port(), "/readyz"), HasSubstr(" 503 "));
  EXPECT_THAT(HttpGet(server->metrics_port(), "/healthz"), HasSubstr(" 200 "));
  ASSERT_TRUE(server->Serve(Engine::Load(GoldenDir("sd3_tiny")).value(), {{1, {4, 16, 16}, 10}}).ok());
  EXPECT_THAT(HttpGet(server->metrics_port(), "/readyz"), HasSubstr(" 200 "));
}

// At shutdown a Watch stream is told NOT_SERVING and then ends with OK, instead of being cut
// off by the gRPC server's shutdown deadline.
TEST(DenoiserServer, ShutdownEndsHealthWatchStreamsWithNotServing) {
  auto server = StartServer({});
  auto channel = grpc::CreateChannel("127.0.0.1:" + std::to_string(server->port()), grpc::InsecureChannelCredentials());
  auto stub = grpc::health::v1::Health::NewStub(channel);
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + kTimeout);
  grpc::health::v1::HealthCheckRequest request;
  auto reader = stub->Watch(&context, request);
  grpc::health::v1::HealthCheckResponse response;
  ASSERT_TRUE(reader->Read(&response));
  EXPECT_EQ(response.status(), grpc::health::v1::HealthCheckResponse::SERVING);
  std::thread stopper([&] { server->Shutdown(); });
  std::vector<grpc::health::v1::HealthCheckResponse::ServingStatus> seen;
  while (reader->Read(&response)) seen.push_back(response.status());
  const grpc::Status status = reader->Finish();
  stopper.join();
  EXPECT_TRUE(status.ok()) << status.error_code() << " " << status.error_message();
  ASSERT_FALSE(seen.empty());
  EXPECT_EQ(seen.back(), grpc::health::v1::HealthCheckResponse::NOT_SERVING);
}

// A reflection stream on `service` ("grpc.reflection.v1" or "grpc.reflection.v1alpha"), with v1's
// messages: the two versions' messages are the same on the wire, and gRPC's reflection library
// does not install v1alpha's headers.
class ReflectionStream {
 public:
  using Request = grpc::reflection::v1::ServerReflectionRequest;
  using Response = grpc::reflection::v1::ServerReflectionResponse;

  ReflectionStream(const std::shared_ptr<grpc::Channel>& channel, const std::string& service)
      : method_(("/" + service + ".ServerReflection/ServerReflectionInfo").c_str(),
                grpc::internal::RpcMethod::BIDI_STREAMING, channel),
        stream_(grpc::internal::ClientReaderWriterFactory<Request, Response>::Create(channel.get(), method_,
                                                                                     &context_)) {}

  Response Ask(const Request& request) {
    Response response;
    EXPECT_TRUE(stream_->Write(request));
    EXPECT_TRUE(stream_->Read(&response));
    return response;
  }
  grpc::Status Close() {
    stream_->WritesDone();
    return stream_->Finish();
  }

 private:
  grpc::ClientContext context_;
  const grpc::internal::RpcMethod method_;
  std::unique_ptr<grpc::ClientReaderWriter<Request, Response>> stream_;
};

std::vector<std::string> ListedServices(ReflectionStream& stream) {
  ReflectionStream::Request request;
  request.set_list_services("");
  const ReflectionStream::Response response = stream.Ask(request);  // the loop below must not outlive it
  std::vector<std::string> names;
  for (const auto& service : response.list_services_response().service()) names.push_back(service.name());
  return names;
}

std::vector<std::string> FileNames(const ReflectionStream::Response& response) {
  std::vector<std::string> names;
  for (const std::string& bytes : response.file_descriptor_response().file_descriptor_proto()) {
    google::protobuf::FileDescriptorProto file;
    EXPECT_TRUE(file.ParseFromString(bytes));
    names.push_back(file.name());
  }
  return names;
}

TEST(DenoiserServer, ReflectionV1AndV1AlphaListTheSameServices) {
  auto server = StartServer({});
  auto channel = grpc::CreateChannel("127.0.0.1:" + std::to_string(server->port()), grpc::InsecureChannelCredentials());
  ReflectionStream v1(channel, "grpc.reflection.v1"), v1alpha(channel, "grpc.reflection.v1alpha");
  const std::vector<std::string> names = ListedServices(v1);
  EXPECT_THAT(names, ::testing::UnorderedElementsAre("mmdit.v1.Denoiser", "inference.GRPCInferenceService",
                                                     "grpc.health.v1.Health",
                                                     "grpc.reflection.v1.ServerReflection",
                                                     "grpc.reflection.v1alpha.ServerReflection"));
  EXPECT_THAT(ListedServices(v1alpha), ::testing::UnorderedElementsAreArray(names));
  EXPECT_TRUE(v1.Close().ok());
  EXPECT_TRUE(v1alpha.Close().ok());
}

// What grpcurl does to call a method it has never seen: fetch the file that defines the service,
// build descriptors from it, find the method and its message types.
TEST(DenoiserServer, ReflectionV1DescribesTheApi) {
  auto server = StartServer({});
  auto channel = grpc::CreateChannel("127.0.0.1:" + std::to_string(server->port()), grpc::InsecureChannelCredentials());
  ReflectionStream stream(channel, "grpc.reflection.v1");
  ReflectionStream::Request request;
  request.set_host("localhost");
  request.set_file_containing_symbol("mmdit.v1.Denoiser.Denoise");
  const ReflectionStream::Response response = stream.Ask(request);
  EXPECT_EQ(response.valid_host(), "localhost");
  EXPECT_EQ(response.original_request().file_containing_symbol(), "mmdit.v1.Denoiser.Denoise");
  ASSERT_THAT(FileNames(response), ::testing::ElementsAre("mmdit/v1/denoiser.proto"));
  google::protobuf::FileDescriptorProto file;
  ASSERT_TRUE(file.ParseFromString(response.file_descriptor_response().file_descriptor_proto(0)));
  google::protobuf::DescriptorPool pool;
  const google::protobuf::FileDescriptor* built = pool.BuildFile(file);
  ASSERT_NE(built, nullptr);
  const google::protobuf::MethodDescriptor* denoise = pool.FindMethodByName("mmdit.v1.Denoiser.Denoise");
  ASSERT_NE(denoise, nullptr);
  EXPECT_EQ(denoise->input_type()->full_name(), "mmdit.v1.DenoiseRequest");
  EXPECT_NE(denoise->input_type()->FindFieldByName("img_latent"), nullptr);
  EXPECT_NE(pool.FindMethodByName("mmdit.v1.Denoiser.Generate"), nullptr);
  EXPECT_TRUE(stream.Close().ok());
}

TEST(DenoiserServer, ReflectionV1SendsEachDependencyOncePerStream) {
  auto server = StartServer({});
  auto channel = grpc::CreateChannel("127.0.0.1:" + std::to_string(server->port()), grpc::InsecureChannelCredentials());
  ReflectionStream stream(channel, "grpc.reflection.v1");
  ReflectionStream::Request request;
  request.set_file_by_filename("google/protobuf/type.proto");  // imports any.proto and source_context.proto
  EXPECT_THAT(FileNames(stream.Ask(request)),
              ::testing::UnorderedElementsAre("google/protobuf/type.proto", "google/protobuf/any.proto",
                                              "google/protobuf/source_context.proto"));
  EXPECT_THAT(FileNames(stream.Ask(request)), ::testing::ElementsAre("google/protobuf/type.proto"));
  request.set_file_containing_symbol("google.protobuf.Any");
  EXPECT_THAT(FileNames(stream.Ask(request)), ::testing::ElementsAre("google/protobuf/any.proto"));
  request.set_all_extension_numbers_of_type("google.protobuf.Any");
  const ReflectionStream::Response numbers = stream.Ask(request);
  EXPECT_EQ(numbers.all_extension_numbers_response().base_type_name(), "google.protobuf.Any");
  EXPECT_TRUE(numbers.all_extension_numbers_response().extension_number().empty());
  EXPECT_TRUE(stream.Close().ok());
}

TEST(DenoiserServer, ReflectionV1NamesWhatItCannotFind) {
  auto server = StartServer({});
  auto channel = grpc::CreateChannel("127.0.0.1:" + std::to_string(server->port()), grpc::InsecureChannelCredentials());
  ReflectionStream stream(channel, "grpc.reflection.v1");
  ReflectionStream::Request request;
  request.set_file_containing_symbol("mmdit.v1.NoSuchThing");
  ReflectionStream::Response response = stream.Ask(request);
  EXPECT_EQ(response.error_response().error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_THAT(response.error_response().error_message(), HasSubstr("mmdit.v1.NoSuchThing"));
  request.set_file_by_filename("nope.proto");
  response = stream.Ask(request);
  EXPECT_EQ(response.error_response().error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_THAT(response.error_response().error_message(), HasSubstr("file_by_filename"));
  request.mutable_file_containing_extension()->set_containing_type("mmdit.v1.DenoiseRequest");
  request.mutable_file_containing_extension()->set_extension_number(1000);
  response = stream.Ask(request);
  EXPECT_EQ(response.error_response().error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_THAT(response.error_response().error_message(), HasSubstr("has no extension 1000"));
  response = stream.Ask(ReflectionStream::Request());
  EXPECT_EQ(response.error_response().error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  // The stream still answers after its errors.
  EXPECT_THAT(ListedServices(stream), ::testing::Contains("mmdit.v1.Denoiser"));
  EXPECT_TRUE(stream.Close().ok());
}

}  // namespace
}  // namespace mmdit
