// Every malformed-input class is refused with INVALID_ARGUMENT naming the field.
#include "server/request_codec.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <functional>

#include "tests/core/test_util.h"

namespace mmdit {
namespace {

using ::mmdit::testing::GoldenDir;
using ::mmdit::testing::RandomTensor;
using ::testing::HasSubstr;

// sd3_tiny: C 4, p 2, table 8x8 (latents up to 16x16), J 40, P 24.
v1::DenoiseRequest ValidRequest(int64_t batch = 2) {
  v1::DenoiseRequest request;
  EncodeTensor(RandomTensor({batch, 4, 8, 12}, 1), v1::FP32, request.mutable_img_latent());
  EncodeTensor(RandomTensor({batch, 7, 40}, 2), v1::FP32, request.mutable_txt_embed());
  EncodeTensor(Tensor({batch}, std::vector<float>(batch, 500.0f)), v1::FP32, request.mutable_timestep());
  EncodeTensor(RandomTensor({batch, 24}, 3), v1::FP32, request.mutable_pooled_text());
  return request;
}

struct BadRequestCase {
  std::string description;
  std::function<void(v1::DenoiseRequest&)> spoil;
  std::string message;
  friend void PrintTo(const BadRequestCase& c, std::ostream* os) { *os << c.description; }
};

class RequestCodecTest : public ::testing::TestWithParam<BadRequestCase> {
 protected:
  static void SetUpTestSuite() { engine_ = Engine::Load(GoldenDir("sd3_tiny"))->release(); }
  static void TearDownTestSuite() { delete engine_; }
  static Engine* engine_;
  RequestLimits limits{.max_samples_per_request = 4,
                       .max_text_tokens = 16,
                       .max_latent_height = 0,
                       .max_latent_width = 0,
                       .max_image_tokens = 1000};
};
Engine* RequestCodecTest::engine_ = nullptr;

TEST_F(RequestCodecTest, DecodesAValidRequestInEveryDtype) {
  for (v1::DType dtype : {v1::FP32, v1::FP16, v1::BF16}) {
    v1::DenoiseRequest request = ValidRequest();
    EncodeTensor(RandomTensor({2, 4, 8, 12}, 1), dtype, request.mutable_img_latent());
    auto decoded = DecodeRequest(request, *engine_, limits);
    ASSERT_TRUE(decoded.ok()) << decoded.status();
    EXPECT_EQ(decoded->samples.size(), 2u);
    EXPECT_EQ(decoded->output_dtype, dtype);
    EXPECT_EQ(decoded->tokens, 2 * (4 * 6 + 7));
    EXPECT_EQ(decoded->samples[1].img_latent.shape, (Shape{4, 8, 12}));
  }
}

TEST_P(RequestCodecTest, RefusesWithInvalidArgumentNamingTheField) {
  v1::DenoiseRequest request = ValidRequest();
  GetParam().spoil(request);
  auto decoded = DecodeRequest(request, *engine_, limits);
  ASSERT_EQ(decoded.status().code(), absl::StatusCode::kInvalidArgument) << GetParam().description;
  EXPECT_THAT(std::string(decoded.status().message()), HasSubstr(GetParam().message));
}

void SetFloat(v1::Tensor* wire, int64_t index, float value) {
  std::memcpy(wire->mutable_data()->data() + 4 * index, &value, 4);
}

INSTANTIATE_TEST_SUITE_P(
    Malformed, RequestCodecTest,
    ::testing::Values(
        BadRequestCase{"missing tensor", [](auto& r) { r.clear_pooled_text(); }, "pooled_text: missing (no shape)"},
        BadRequestCase{"unknown dtype", [](auto& r) { r.mutable_txt_embed()->set_dtype(static_cast<v1::DType>(9)); },
                       "txt_embed: dtype must be FP32, FP16 or BF16, got 9"},
        BadRequestCase{"unspecified dtype", [](auto& r) { r.mutable_txt_embed()->set_dtype(v1::DTYPE_UNSPECIFIED); },
                       "txt_embed: dtype must be FP32, FP16 or BF16, got DTYPE_UNSPECIFIED"},
        BadRequestCase{"empty tensor", [](auto& r) { r.mutable_txt_embed()->set_shape(1, 0); },
                       "txt_embed: shape [2, 0, 40] is empty"},
        BadRequestCase{"bytes not shape x dtype", [](auto& r) { r.mutable_img_latent()->mutable_data()->resize(10); },
                       "img_latent: 10 bytes, but FP32 [2, 4, 8, 12] needs 3072"},
        BadRequestCase{"wrong rank", [](auto& r) { r.mutable_pooled_text()->add_shape(1); },
                       "pooled_text: expected [B, P]"},
        BadRequestCase{"batch sizes disagree",
                       [](auto& r) { EncodeTensor(Tensor({3}), v1::FP32, r.mutable_timestep()); },
                       "timestep: batch size 3 differs from img_latent's 2"},
        BadRequestCase{"NaN", [](auto& r) { SetFloat(r.mutable_txt_embed(), 5, NAN); }, "txt_embed: element 5 is NaN"},
        BadRequestCase{"Inf", [](auto& r) { SetFloat(r.mutable_img_latent(), 7, INFINITY); },
                       "img_latent: element 7 is Inf"},
        BadRequestCase{"channels do not fit the model",
                       [](auto& r) {
                         EncodeTensor(RandomTensor({2, 3, 8, 8}, 4), v1::FP32, r.mutable_img_latent());
                       },
                       "img_latent: expected [C=4, H, W]"},
        BadRequestCase{"H not a multiple of the patch",
                       [](auto& r) {
                         EncodeTensor(RandomTensor({2, 4, 7, 8}, 4), v1::FP32, r.mutable_img_latent());
                       },
                       "multiples of patch_size 2"},
        BadRequestCase{"beyond the position table",
                       [](auto& r) {
                         EncodeTensor(RandomTensor({2, 4, 8, 18}, 4), v1::FP32, r.mutable_img_latent());
                       },
                       "img_latent: latent 8x18 exceeds this server's maximum 16x16"},
        BadRequestCase{"text width",
                       [](auto& r) {
                         EncodeTensor(RandomTensor({2, 7, 41}, 4), v1::FP32, r.mutable_txt_embed());
                       },
                       "sample 0: txt_embed: expected [T >= 1, 40]"},
        BadRequestCase{"too many text tokens",
                       [](auto& r) {
                         EncodeTensor(RandomTensor({2, 17, 40}, 4), v1::FP32, r.mutable_txt_embed());
                       },
                       "txt_embed: 17 text tokens; this server takes at most 16"},
        BadRequestCase{"element count beyond 64 bits",
                       [](auto& r) {
                         r.mutable_img_latent()->clear_shape();
                         for (int64_t dim : {int64_t{1}, int64_t{1} << 40, int64_t{1} << 40, int64_t{4}}) {
                           r.mutable_img_latent()->add_shape(dim);
                         }
                         r.mutable_img_latent()->clear_data();
                       },
                       "img_latent: 0 bytes, but FP32 [1, 1099511627776, 1099511627776, 4] needs over 2^64"},
        BadRequestCase{"millions of tiny samples refused before decoding",
                       [](auto& r) { r.mutable_img_latent()->set_shape(0, 10'000'000); },
                       "img_latent: batch of 10000000 samples; this server takes at most 4 per request"},
        BadRequestCase{"too many samples", [](auto& r) { r = ValidRequest(5); },
                       "img_latent: batch of 5 samples; this server takes at most 4 per request"}),
    testing::DescriptionAsTestName());

TEST(TensorCodec, EncodesPredictionsInTheRequestedDtype) {
  const std::vector<Tensor> outputs = {Tensor({2}, {1.0f, 2.5f}), Tensor({2}, {-3.0f, 0.5f})};
  for (v1::DType dtype : {v1::FP32, v1::FP16, v1::BF16}) {
    v1::Tensor wire;
    EncodePrediction(outputs, dtype, &wire);
    EXPECT_EQ(wire.dtype(), dtype);
    auto back = DecodeTensor(wire, "prediction");
    ASSERT_TRUE(back.ok()) << back.status();
    EXPECT_EQ(back->shape, (Shape{2, 2}));
    EXPECT_EQ(back->data, (std::vector<float>{1.0f, 2.5f, -3.0f, 0.5f}));
  }
}

TEST(TensorCodec, FirstUnencodableFindsNonFiniteValuesAndValuesBeyondTheDtypesRange) {
  const Tensor finite({3}, {1.0f, -7.0e4f, 3.0e38f});
  EXPECT_EQ(FirstUnencodable(finite, v1::FP32), std::nullopt);
  EXPECT_EQ(FirstUnencodable(finite, v1::FP16), 1);  // fp16's largest finite value is 65504
  EXPECT_EQ(FirstUnencodable(finite, v1::BF16), std::nullopt);
  EXPECT_EQ(FirstUnencodable(Tensor({2}, {65504.0f, -65504.0f}), v1::FP16), std::nullopt);
  EXPECT_EQ(FirstUnencodable(Tensor({2}, {3.39e38f, 0.0f}), v1::BF16), std::nullopt);  // rounds to bf16's max
  EXPECT_EQ(FirstUnencodable(Tensor({2}, {0.0f, 3.4e38f}), v1::BF16), 1);               // rounds up to Inf
  EXPECT_EQ(FirstUnencodable(Tensor({2}, {0.0f, std::nanf("")}), v1::FP32), 1);
  EXPECT_EQ(FirstUnencodable(Tensor({1}, {-INFINITY}), v1::BF16), 0);
}

TEST(CheckAnswer, NamesTheSampleTheValueAndTheInputOfLargestMagnitude) {
  const Tensor small({2}, {0.5f, -1.0f}), huge({1}, {-3.0e19f}), latent({2}, {1.0f, 2.0f});
  const std::vector<Tensor> answer = {Tensor({2}, {1.0f, 2.0f}), Tensor({2}, {0.0f, std::nanf("")})};
  const std::vector<std::vector<NamedInput>> inputs = {{{"img_latent", latent}, {"pooled_text", small}},
                                                       {{"img_latent", latent}, {"pooled_text", huge}}};
  const absl::Status status = CheckAnswer(answer, v1::FP32, inputs, "prediction");
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(status.message()), HasSubstr("prediction of sample 1 is not finite (nan at element 1)"));
  EXPECT_THAT(std::string(status.message()), HasSubstr("largest magnitude is pooled_text (|value| up to 3e+19)"));
  // A lone sample is not numbered; a finite answer passes.
  EXPECT_THAT(std::string(CheckAnswer({answer[1]}, v1::FP32, {inputs[1]}, "latent").message()),
              HasSubstr("latent is not finite"));
  EXPECT_TRUE(CheckAnswer({answer[0]}, v1::FP16, {inputs[0]}, "prediction").ok());
}

TEST(CheckAnswer, AFiniteValueBeyondFp16IsRefusedOnlyInFp16) {
  const Tensor latent({1}, {1.0f});
  const std::vector<Tensor> answer = {Tensor({2}, {1.0f, 7.0e4f})};
  const absl::Status status = CheckAnswer(answer, v1::FP16, {{{"img_latent", latent}}}, "prediction");
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(status.message()), HasSubstr("prediction holds 70000, beyond FP16's range"));
  EXPECT_TRUE(CheckAnswer(answer, v1::FP32, {{{"img_latent", latent}}}, "prediction").ok());
  EXPECT_TRUE(CheckAnswer(answer, v1::BF16, {{{"img_latent", latent}}}, "prediction").ok());
}

}  // namespace
}  // namespace mmdit
