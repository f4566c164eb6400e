// libFuzzer: what the server does with a request body before any forward pass: parse the
// bytes as a DenoiseRequest and a GenerateRequest, then decode and validate each against a
// real (tiny) model, as the handlers do; or as a grpc.reflection.v1 request, answered. The first
// byte picks which (0 Denoise, 1 Generate, 2 reflection, modulo 3).
#include <cstdint>
#include <memory>

#include "core/engine.h"
#include "core/sampler.h"
#include "mmdit/v1/denoiser.pb.h"
#include "server/reflection_service.h"
#include "server/request_codec.h"

namespace {

const mmdit::Engine& TinyEngine() {
  static const std::unique_ptr<mmdit::Engine> engine = [] {
    auto loaded = mmdit::Engine::Load(MMDIT_FUZZ_MODEL_DIR);
    if (!loaded.ok()) __builtin_trap();
    return *std::move(loaded);
  }();
  return *engine;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  const mmdit::Engine& engine = TinyEngine();
  mmdit::RequestLimits limits;
  limits.max_steps = 50;  // keeps a decoded sampler's tables small
  const char* body = reinterpret_cast<const char*>(data + 1);
  const int body_size = static_cast<int>(size - 1);
  if (data[0] % 3 == 0) {
    mmdit::v1::DenoiseRequest request;
    if (!request.ParseFromArray(body, body_size)) return 0;
    absl::StatusOr<mmdit::DecodedRequest> decoded = mmdit::DecodeRequest(request, engine, limits);
    if (decoded.ok() && decoded->samples.empty()) __builtin_trap();
  } else if (data[0] % 3 == 1) {
    mmdit::v1::GenerateRequest request;
    if (!request.ParseFromArray(body, body_size)) return 0;
    absl::StatusOr<mmdit::DecodedGenerate> decoded =
        mmdit::DecodeGenerateRequest(request, engine, limits, mmdit::FlowMatchConfig());
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
