// The Open Inference Protocol (inference.GRPCInferenceService) end to end over loopback, with a
// client generated from our copy of grpc_predict_v2.proto: metadata, ModelInfer against Denoise,
// raw and typed contents, every malformed class, and a v2 call sharing a pass with Denoise.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cstring>
#include <functional>
#include <future>

#include "inference/grpc_predict_v2.grpc.pb.h"
#include "proto/tensor_codec.h"
#include "server/denoiser_server.h"
#include "tests/server/server_test_util.h"

namespace mmdit {
namespace {

using ::mmdit::testing::ClientFor;
using ::mmdit::testing::Inputs;
using ::mmdit::testing::RandomSd3TinyInputs;
using ::mmdit::testing::StartServer;
using ::testing::HasSubstr;

constexpr auto kTimeout = std::chrono::seconds(30);

std::unique_ptr<inference::GRPCInferenceService::Stub> InferenceStub(const DenoiserServer& server) {
  return inference::GRPCInferenceService::NewStub(
      grpc::CreateChannel("127.0.0.1:" + std::to_string(server.port()), grpc::InsecureChannelCredentials()));
}

// `denoise`'s tensors as ModelInfer inputs: raw contents, or (FP32 only) typed contents.
inference::ModelInferRequest InferRequestFor(const v1::DenoiseRequest& denoise, bool typed,
                                             const std::string& model = "sd3_tiny") {
  inference::ModelInferRequest request;
  request.set_model_name(model);
  request.set_id("infer-test");
  const std::pair<const char*, const v1::Tensor*> tensors[] = {{"img_latent", &denoise.img_latent()},
                                                               {"txt_embed", &denoise.txt_embed()},
                                                               {"timestep", &denoise.timestep()},
                                                               {"pooled_text", &denoise.pooled_text()}};
  for (const auto& [name, tensor] : tensors) {
    auto* input = request.add_inputs();
    input->set_name(name);
    input->set_datatype(tensor->dtype() == v1::FP32 ? "FP32" : tensor->dtype() == v1::FP16 ? "FP16" : "BF16");
    input->mutable_shape()->CopyFrom(tensor->shape());
    if (typed) {
      std::vector<float> values(tensor->data().size() / sizeof(float));
      std::memcpy(values.data(), tensor->data().data(), tensor->data().size());
      for (float value : values) input->mutable_contents()->add_fp32_contents(value);
    } else {
      request.add_raw_input_contents(tensor->data());
    }
  }
  return request;
}

v1::DenoiseResponse DenoiseAlone(DenoiserClient& client, const v1::DenoiseRequest& request) {
  v1::DenoiseResponse response;
  grpc::ClientContext context;
  const grpc::Status status = client.stub().Denoise(&context, request, &response);
  EXPECT_TRUE(status.ok()) << status.error_message();
  return response;
}

TEST(InferenceService, LivenessReadinessAndMetadata) {
  auto listening = StartServer({}, "sd3_tiny", /*serve=*/false);
  auto stub = InferenceStub(*listening);
  {
    grpc::ClientContext live_context, ready_context, model_context;
    inference::ServerLiveResponse live;
    inference::ServerReadyResponse ready;
    inference::ModelReadyRequest model_request;
    model_request.set_name("sd3_tiny");
    inference::ModelReadyResponse model_ready;
    ASSERT_TRUE(stub->ServerLive(&live_context, {}, &live).ok());
    ASSERT_TRUE(stub->ServerReady(&ready_context, {}, &ready).ok());
    ASSERT_TRUE(stub->ModelReady(&model_context, model_request, &model_ready).ok());
    EXPECT_TRUE(live.live());
    EXPECT_FALSE(ready.ready()) << "ready before the model is served";
    EXPECT_FALSE(model_ready.ready());
  }
  auto server = StartServer({});
  stub = InferenceStub(*server);
  grpc::ClientContext ready_context;
  inference::ServerReadyResponse ready;
  ASSERT_TRUE(stub->ServerReady(&ready_context, {}, &ready).ok());
  EXPECT_TRUE(ready.ready());
  for (const auto& [name, version, expected] : {std::tuple<std::string, std::string, bool>{"sd3_tiny", "", true},
                                                {"sd3_tiny", "1", true},
                                                {"sd3_tiny", "2", false},
                                                {"other", "", false}}) {
    grpc::ClientContext context;
    inference::ModelReadyRequest request;
    request.set_name(name);
    request.set_version(version);
    inference::ModelReadyResponse response;
    ASSERT_TRUE(stub->ModelReady(&context, request, &response).ok());
    EXPECT_EQ(response.ready(), expected) << name << " version '" << version << "'";
  }
  {
    grpc::ClientContext context;
    inference::ServerMetadataResponse response;
    ASSERT_TRUE(stub->ServerMetadata(&context, {}, &response).ok());
    EXPECT_EQ(response.name(), "mmdit-serve");
    EXPECT_FALSE(response.version().empty());
  }
  {
    grpc::ClientContext context;
    inference::ModelMetadataRequest request;
    request.set_name("sd3_tiny");
    inference::ModelMetadataResponse response;
    ASSERT_TRUE(stub->ModelMetadata(&context, request, &response).ok());
    EXPECT_EQ(response.name(), "sd3_tiny");
    EXPECT_THAT(response.versions(), ::testing::ElementsAre("1"));
    auto engine = Engine::Load(testing::GoldenDir("sd3_tiny"));
    ASSERT_TRUE(engine.ok());
    const ModelConfig& c = (*engine)->config();
    ASSERT_EQ(response.inputs_size(), 4);
    EXPECT_EQ(response.inputs(0).name(), "img_latent");
    EXPECT_THAT(response.inputs(0).shape(), ::testing::ElementsAre(-1, c.in_channels, -1, -1));
    EXPECT_EQ(response.inputs(1).name(), "txt_embed");
    EXPECT_THAT(response.inputs(1).shape(), ::testing::ElementsAre(-1, -1, c.joint_attention_dim));
    EXPECT_EQ(response.inputs(2).name(), "timestep");
    EXPECT_EQ(response.inputs(3).name(), "pooled_text");
    EXPECT_THAT(response.inputs(3).shape(), ::testing::ElementsAre(-1, c.pooled_projection_dim));
    ASSERT_EQ(response.outputs_size(), 1);
    EXPECT_EQ(response.outputs(0).name(), "prediction");
    EXPECT_THAT(response.outputs(0).shape(), ::testing::ElementsAre(-1, c.out_channels, -1, -1));
    EXPECT_EQ(response.outputs(0).datatype(), "FP32");
  }
  grpc::ClientContext context;
  inference::ModelMetadataRequest request;
  request.set_name("sd3");
  inference::ModelMetadataResponse response;
  const grpc::Status status = stub->ModelMetadata(&context, request, &response);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_THAT(status.error_message(), HasSubstr("\"sd3_tiny\""));
}

TEST(InferenceService, ModelNameComesFromTheFlagWhenGiven) {
  ServerOptions options;
  options.model_name = "digits";
  auto server = StartServer(options);
  auto stub = InferenceStub(*server);
  grpc::ClientContext context;
  inference::ModelMetadataRequest request;
  request.set_name("digits");
  inference::ModelMetadataResponse response;
  EXPECT_TRUE(stub->ModelMetadata(&context, request, &response).ok());
}

// ModelInfer answers exactly what Denoise answers (each alone, so the same pass), raw and typed,
// in every wire dtype.
TEST(InferenceService, ModelInferEqualsDenoiseRawAndTyped) {
  auto server = StartServer({});
  auto client = ClientFor(*server);
  auto stub = InferenceStub(*server);
  const Inputs inputs = RandomSd3TinyInputs(2, 8, 8, 5, 3);
  for (v1::DType dtype : {v1::FP32, v1::FP16, v1::BF16}) {
    const v1::DenoiseRequest denoise = MakeDenoiseRequest(inputs.View(), dtype);
    const v1::DenoiseResponse expected = DenoiseAlone(*client, denoise);
    for (bool typed : {false, true}) {
      if (typed && dtype != v1::FP32) continue;  // the protocol has no typed field for 16-bit floats
      grpc::ClientContext context;
      inference::ModelInferResponse response;
      const grpc::Status status = stub->ModelInfer(&context, InferRequestFor(denoise, typed), &response);
      ASSERT_TRUE(status.ok()) << v1::DType_Name(dtype) << ": " << status.error_message();
      EXPECT_EQ(response.model_name(), "sd3_tiny");
      EXPECT_EQ(response.model_version(), "1");
      EXPECT_EQ(response.id(), "infer-test");
      ASSERT_EQ(response.outputs_size(), 1);
      EXPECT_EQ(response.outputs(0).name(), "prediction");
      EXPECT_EQ(response.outputs(0).datatype(), dtype == v1::FP32 ? "FP32" : v1::DType_Name(dtype));
      EXPECT_THAT(response.outputs(0).shape(), ::testing::ElementsAreArray(expected.prediction().shape()));
      ASSERT_EQ(response.raw_output_contents_size(), 1);
      EXPECT_TRUE(response.raw_output_contents(0) == expected.prediction().data())
          << v1::DType_Name(dtype) << (typed ? " typed" : " raw") << ": not Denoise's answer bit for bit";
    }
  }
}

TEST(InferenceService, AModelInferCallAndADenoiseCallShareOnePass) {
  ServerOptions options;
  options.scheduler.max_batch_samples = 3;             // exactly both calls' samples:
  options.scheduler.max_queue_delay_us = 60'000'000;  // the pass waits for both, however slow
  auto server = StartServer(options);
  auto client = ClientFor(*server);
  auto stub = InferenceStub(*server);
  const Inputs denoise_inputs = RandomSd3TinyInputs(2, 8, 8, 5, 4), infer_inputs = RandomSd3TinyInputs(1, 4, 6, 3, 5);
  auto denoise_call = testing::StartDenoise(*client, denoise_inputs, kTimeout, /*wait_for_batch=*/true);
  inference::ModelInferRequest request = InferRequestFor(MakeDenoiseRequest(infer_inputs.View(), v1::FP32), false);
  (*request.mutable_parameters())["wait_for_batch"].set_bool_param(true);
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + kTimeout);
  inference::ModelInferResponse response;
  std::promise<grpc::Status> done;
  stub->async()->ModelInfer(&context, &request, &response, [&done](grpc::Status s) { done.set_value(s); });
  const grpc::Status infer_status = done.get_future().get();
  ASSERT_TRUE(infer_status.ok()) << infer_status.error_message();
  const grpc::Status denoise_status = denoise_call->status.get();
  ASSERT_TRUE(denoise_status.ok()) << denoise_status.error_message();
  EXPECT_EQ(denoise_call->response.batch_samples(), 3) << "the two calls did not share the pass";
  EXPECT_EQ(server->metrics().samples_computed(), 3u);
  // Its answer is its own: the engine's for its inputs alone, up to the pass's ragged rounding.
  const v1::DenoiseResponse alone = DenoiseAlone(*client, MakeDenoiseRequest(infer_inputs.View(), v1::FP32));
  v1::Tensor got;
  got.set_dtype(v1::FP32);
  got.mutable_shape()->CopyFrom(response.outputs(0).shape());
  got.set_data(response.raw_output_contents(0));
  auto got_tensor = DecodeTensor(got, "prediction"), alone_tensor = DecodeTensor(alone.prediction(), "prediction");
  ASSERT_TRUE(got_tensor.ok() && alone_tensor.ok());
  EXPECT_LE(testing::MaxAbsDiff(*got_tensor, *alone_tensor), 1e-5);
}

TEST(InferenceService, EveryMalformedRequestIsRefusedNamingWhatIsWrong) {
  auto server = StartServer({});
  auto stub = InferenceStub(*server);
  const v1::DenoiseRequest denoise = MakeDenoiseRequest(RandomSd3TinyInputs(1, 8, 8, 5, 6).View(), v1::FP32);
  const inference::ModelInferRequest good = InferRequestFor(denoise, false);
  const inference::ModelInferRequest good_typed = InferRequestFor(denoise, true);
  struct Case {
    const char* name;
    const inference::ModelInferRequest* base;
    std::function<void(inference::ModelInferRequest&)> mutate;
    grpc::StatusCode code;
    const char* message;
  };
  using R = inference::ModelInferRequest;
  const std::vector<Case> cases = {
      {"unknown model", &good, [](R& r) { r.set_model_name("sd3"); }, grpc::StatusCode::NOT_FOUND, "unknown model"},
      {"unknown version", &good, [](R& r) { r.set_model_version("7"); }, grpc::StatusCode::NOT_FOUND,
       "no version \"7\""},
      {"unknown input", &good, [](R& r) { r.mutable_inputs(1)->set_name("text"); },
       grpc::StatusCode::INVALID_ARGUMENT, "inputs[1]: unknown input \"text\""},
      {"input twice", &good, [](R& r) { r.mutable_inputs(1)->set_name("img_latent"); },
       grpc::StatusCode::INVALID_ARGUMENT, "inputs[1] (img_latent): the input is given twice"},
      {"missing input", &good,
       [](R& r) {
         r.mutable_inputs()->RemoveLast();
         r.mutable_raw_input_contents()->RemoveLast();
       },
       grpc::StatusCode::INVALID_ARGUMENT, "pooled_text"},
      {"datatype", &good, [](R& r) { r.mutable_inputs(0)->set_datatype("INT8"); }, grpc::StatusCode::INVALID_ARGUMENT,
       "inputs[0] (img_latent): datatype \"INT8\" is not served"},
      {"raw count", &good, [](R& r) { r.mutable_raw_input_contents()->RemoveLast(); },
       grpc::StatusCode::INVALID_ARGUMENT, "raw_input_contents: 3 entries for 4 inputs"},
      {"raw size", &good, [](R& r) { r.mutable_raw_input_contents(0)->resize(12); },
       grpc::StatusCode::INVALID_ARGUMENT, "img_latent"},
      {"raw and typed", &good, [](R& r) { r.mutable_inputs(2)->mutable_contents()->add_fp32_contents(1); },
       grpc::StatusCode::INVALID_ARGUMENT, "inputs[2] (timestep): has typed contents while raw_input_contents"},
      {"typed count", &good_typed, [](R& r) { r.mutable_inputs(2)->mutable_contents()->add_fp32_contents(1); },
       grpc::StatusCode::INVALID_ARGUMENT, "inputs[2] (timestep): 2 values in contents.fp32_contents"},
      {"typed field", &good_typed,
       [](R& r) {
         r.mutable_inputs(2)->mutable_contents()->clear_fp32_contents();
         r.mutable_inputs(2)->mutable_contents()->add_int_contents(500);
       },
       grpc::StatusCode::INVALID_ARGUMENT, "contents.fp32_contents"},
      {"typed FP16", &good_typed, [](R& r) { r.mutable_inputs(2)->set_datatype("FP16"); },
       grpc::StatusCode::INVALID_ARGUMENT, "FP16 has no typed contents"},
      {"negative dim", &good, [](R& r) { r.mutable_inputs(1)->set_shape(1, -5); },
       grpc::StatusCode::INVALID_ARGUMENT, "inputs[1] (txt_embed): shape [1, -5, 40] has a negative dimension"},
      {"huge shape", &good_typed,
       [](R& r) {
         for (int i = 0; i < 3; ++i) r.mutable_inputs(0)->add_shape(int64_t{1} << 30);
       },
       grpc::StatusCode::INVALID_ARGUMENT, "larger than any request"},
      {"wrong shape", &good, [](R& r) { r.mutable_inputs(0)->set_shape(1, 3); }, grpc::StatusCode::INVALID_ARGUMENT,
       "img_latent"},
      {"unknown output", &good, [](R& r) { r.add_outputs()->set_name("sample"); }, grpc::StatusCode::INVALID_ARGUMENT,
       "outputs[0]: unknown output \"sample\""},
      {"parameter type", &good, [](R& r) { (*r.mutable_parameters())["wait_for_batch"].set_int64_param(1); },
       grpc::StatusCode::INVALID_ARGUMENT, "parameters[\"wait_for_batch\"]: expected a bool_param"},
  };
  for (const Case& c : cases) {
    inference::ModelInferRequest request = *c.base;
    c.mutate(request);
    grpc::ClientContext context;
    inference::ModelInferResponse response;
    const grpc::Status status = stub->ModelInfer(&context, request, &response);
    EXPECT_EQ(status.error_code(), c.code) << c.name << ": " << status.error_message();
    EXPECT_THAT(status.error_message(), HasSubstr(c.message)) << c.name;
  }
  // The body of some other message: INVALID_ARGUMENT with a message, as for Denoise.
  const grpc::Status status =
      testing::CallWithBody(*server, "/inference.GRPCInferenceService/ModelInfer", std::string("\x0a\x64" "abc", 5));
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(status.error_message(), HasSubstr("inference.ModelInferRequest"));
  EXPECT_EQ(server->metrics().samples_computed(), 0u) << "a refused request was computed";
}

// What perf_analyzer does: read ModelConfig, fill each input's dims (batch first, -1 made
// concrete) and call ModelInfer; timestep arrives as [B, 1].
TEST(InferenceService, ModelConfigDescribesRequestsThatModelInferAccepts) {
  ServerOptions options;
  options.scheduler.max_batch_samples = 6;
  auto server = StartServer(options);
  auto stub = InferenceStub(*server);
  grpc::ClientContext context;
  inference::ModelConfigRequest config_request;
  config_request.set_name("sd3_tiny");
  inference::ModelConfigResponse config;
  ASSERT_TRUE(stub->ModelConfig(&context, config_request, &config).ok());
  EXPECT_EQ(config.config().name(), "sd3_tiny");
  EXPECT_EQ(config.config().max_batch_size(), 6);
  ASSERT_EQ(config.config().input_size(), 4);
  ASSERT_EQ(config.config().output_size(), 1);
  EXPECT_EQ(config.config().output(0).name(), "prediction");
  const int64_t batch = 2;
  const Inputs inputs = RandomSd3TinyInputs(batch, 8, 6, 5, 11);
  const v1::DenoiseRequest denoise = MakeDenoiseRequest(inputs.View(), v1::FP32);
  inference::ModelInferRequest request = InferRequestFor(denoise, false);
  for (int i = 0; i < 4; ++i) {
    const inference::ModelInput& declared = config.config().input(i);
    EXPECT_EQ(declared.data_type(), inference::TYPE_FP32);
    ASSERT_EQ(request.inputs(i).name(), declared.name());
    // The declared dims, with the batch in front and each -1 the size these inputs have.
    std::vector<int64_t> shape = {batch};
    for (int d = 0; d < declared.dims_size(); ++d) {
      const int64_t given = declared.name() == "timestep" ? 1 : request.inputs(i).shape(d + 1);
      if (declared.dims(d) != -1) {
        EXPECT_EQ(declared.dims(d), given) << declared.name() << " dim " << d;
      }
      shape.push_back(given);
    }
    request.mutable_inputs(i)->mutable_shape()->Assign(shape.begin(), shape.end());
  }
  EXPECT_THAT(request.inputs(2).shape(), ::testing::ElementsAre(batch, 1));  // timestep as Triton sends it
  grpc::ClientContext infer_context;
  inference::ModelInferResponse response;
  const grpc::Status status = stub->ModelInfer(&infer_context, request, &response);
  ASSERT_TRUE(status.ok()) << status.error_message();
  auto client = ClientFor(*server);
  EXPECT_TRUE(response.raw_output_contents(0) == DenoiseAlone(*client, denoise).prediction().data());
}

TEST(InferenceService, ModelStatisticsCountsEveryInferenceOfTheModel) {
  auto server = StartServer({});
  auto stub = InferenceStub(*server);
  auto client = ClientFor(*server);
  DenoiseAlone(*client, MakeDenoiseRequest(RandomSd3TinyInputs(2, 8, 8, 5, 12).View(), v1::FP32));
  {
    grpc::ClientContext context;
    inference::ModelInferResponse response;
    ASSERT_TRUE(stub->ModelInfer(&context,
                                 InferRequestFor(MakeDenoiseRequest(RandomSd3TinyInputs(1, 4, 4, 3, 13).View(),
                                                                    v1::FP32),
                                                 false),
                                 &response)
                    .ok());
  }
  {
    inference::ModelInferRequest bad = InferRequestFor(
        MakeDenoiseRequest(RandomSd3TinyInputs(1, 4, 4, 3, 14).View(), v1::FP32), false);
    bad.mutable_inputs(0)->set_shape(1, 3);
    grpc::ClientContext context;
    inference::ModelInferResponse response;
    EXPECT_FALSE(stub->ModelInfer(&context, bad, &response).ok());
  }
  grpc::ClientContext context;
  inference::ModelStatisticsRequest request;
  request.set_name("sd3_tiny");
  inference::ModelStatisticsResponse response;
  ASSERT_TRUE(stub->ModelStatistics(&context, request, &response).ok());
  ASSERT_EQ(response.model_stats_size(), 1);
  const inference::ModelStatistics& stats = response.model_stats(0);
  EXPECT_EQ(stats.name(), "sd3_tiny");
  EXPECT_EQ(stats.version(), "1");
  EXPECT_EQ(stats.inference_count(), 3u);  // samples: 2 + 1
  EXPECT_EQ(stats.execution_count(), 2u);  // one pass each
  EXPECT_GT(stats.last_inference(), 1'700'000'000'000u);  // ms since the epoch, after 2023
  const inference::InferStatistics& infer = stats.inference_stats();
  EXPECT_EQ(infer.success().count(), 2u);
  EXPECT_EQ(infer.fail().count(), 1u);
  EXPECT_EQ(infer.compute_infer().count(), 2u);
  EXPECT_GT(infer.compute_infer().ns(), 0u);
  EXPECT_GE(infer.success().ns(), infer.compute_infer().ns() + infer.queue().ns());
  grpc::ClientContext unknown_context;
  request.set_name("sd3");
  EXPECT_EQ(stub->ModelStatistics(&unknown_context, request, &response).error_code(), grpc::StatusCode::NOT_FOUND);
  grpc::ClientContext server_metadata_context;
  inference::ServerMetadataResponse metadata;
  ASSERT_TRUE(stub->ServerMetadata(&server_metadata_context, {}, &metadata).ok());
  EXPECT_THAT(metadata.extensions(), ::testing::ElementsAre("model_configuration", "statistics"));
}

}  // namespace
}  // namespace mmdit
