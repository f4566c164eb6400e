// libFuzzer: what the server does with a request body before any forward pass: parse the
// bytes as a DenoiseRequest and a GenerateRequest, then decode and validate each against a
// real (tiny) model, as the handlers do; or as a grpc.reflection.v1 request, answered. The first
// byte picks which, modulo 4: 0 Denoise, 1 Generate (sd3_tiny, no text encoder), 2 reflection,
// 3 Generate on the digits model with its text encoder (prompts).
#include <cstdint>
#include <memory>

#include "core/engine.h"
#include "core/sampler.h"
#include "core/text_encoder.h"
#include "mmdit/v1/denoiser.pb.h"
#include "server/reflection_service.h"
#include "server/request_codec.h"

namespace {

std::unique_ptr<mmdit::Engine> LoadOrTrap(const char* model_dir) {
  auto loaded = mmdit::Engine::Load(model_dir);
  if (!loaded.ok()) __builtin_trap();
  return *std::move(loaded);
}

const mmdit::Engine& TinyEngine() {
  static const std::unique_ptr<mmdit::Engine> engine = LoadOrTrap(MMDIT_FUZZ_MODEL_DIR);
  return *engine;
}

// The digits model and its text encoder, as mmdit-server loads them by default.
struct DigitsModel {
  std::unique_ptr<mmdit::Engine> engine;
  std::unique_ptr<mmdit::TextEncoder> text_encoder;
  mmdit::FlowMatchConfig flow_match;
};
const DigitsModel& Digits() {
  static const DigitsModel digits = [] {
    DigitsModel model{LoadOrTrap(MMDIT_FUZZ_DIGITS_DIR), nullptr, {}};
    const mmdit::ModelConfig& c = model.engine->config();
    auto encoder = mmdit::LoadTextEncoder(MMDIT_FUZZ_DIGITS_DIR, c.joint_attention_dim, c.pooled_projection_dim);
    auto flow_match = mmdit::LoadFlowMatchConfig(MMDIT_FUZZ_DIGITS_DIR);
    if (!encoder.ok() || *encoder == nullptr || !flow_match.ok()) __builtin_trap();
    model.text_encoder = *std::move(encoder);
    model.flow_match = *flow_match;
    return model;
  }();
  return digits;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  const mmdit::Engine& engine = TinyEngine();
  mmdit::RequestLimits limits;
  limits.max_steps = 50;  // keeps a decoded sampler's tables small
  const char* body = reinterpret_cast<const char*>(data + 1);
  const int body_size = static_cast<int>(size - 1);
  if (data[0] % 4 == 0) {
    mmdit::v1::DenoiseRequest request;
    if (!request.ParseFromArray(body, body_size)) return 0;
    absl::StatusOr<mmdit::DecodedRequest> decoded = mmdit::DecodeRequest(request, engine, limits);
    if (decoded.ok() && decoded->samples.empty()) __builtin_trap();
  } else if (data[0] % 4 == 1 || data[0] % 4 == 3) {
    mmdit::v1::GenerateRequest request;
    if (!request.ParseFromArray(body, body_size)) return 0;
    const bool digits = data[0] % 4 == 3;
    absl::StatusOr<mmdit::DecodedGenerate> decoded =
        digits ? mmdit::DecodeGenerateRequest(request, *Digits().engine, Digits().text_encoder.get(), limits,
                                              Digits().flow_match)
               : mmdit::DecodeGenerateRequest(request, engine, nullptr, limits, mmdit::FlowMatchConfig());
    if (decoded.ok() && !decoded->sampler) __builtin_trap();
  } else {
    static const mmdit::ReflectionService reflection({"mmdit.v1.Denoiser"});
    mmdit::ReflectionService::Request request;
    if (!request.ParseFromArray(body, body_size)) return 0;
    std::set<std::string> files_sent;
    const mmdit::ReflectionService::Response response = reflection.Answer(request, files_sent);
    if (response.message_response_case() == mmdit::ReflectionService::Response::MESSAGE_RESPONSE_NOT_SET) {
      __builtin_trap();  // every request gets an answer or an error
    }
  }
  return 0;
}
