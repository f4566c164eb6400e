// mmdit-client: talk to an mmdit-server.
//   mmdit-client health  --target HOST:PORT                   exit 0 only when SERVING
//   mmdit-client info    --target HOST:PORT                   the model and the server's limits, as JSON
//   mmdit-client denoise --target HOST:PORT --img_latent A.npy --txt_embed B.npy --timestep C.npy
//                        --pooled_text D.npy --out OUT.npy [--dtype f32|bf16|f16]
//   mmdit-client bench   --target HOST:PORT (--concurrency C | --rate R) (--requests N | --duration S)
//                        (--img_tokens N | --latent C,H,W) --txt_tokens T [--batch B] [--mix SPEC] [--json]
// TLS: --tls_ca FILE (trust), --tls_cert FILE --tls_key FILE (mutual TLS), --tls_server_name NAME.
// On failure: the gRPC status code name and message on stderr, exit 1 (2 for usage).
#include <google/protobuf/util/json_util.h>

#include <iostream>

#include "absl/strings/str_cat.h"
#include "client/denoiser_client.h"
#include "client/load_generator.h"
#include "core/npy.h"
#include "core/status_macros.h"
#include "tools/batch_inputs.h"
#include "tools/flags.h"

namespace mmdit {
namespace {

constexpr char kUsage[] =
    "usage: mmdit-client <command> --target HOST:PORT [flags]\n"
    "  health\n"
    "  info\n"
    "  denoise --img_latent A.npy --txt_embed B.npy --timestep C.npy --pooled_text D.npy --out OUT.npy\n"
    "          [--dtype f32|bf16|f16] [--timeout_ms 60000]\n"
    "  bench   (--concurrency C | --rate R) (--requests N | --duration S) (--img_tokens N | --latent C,H,W)\n"
    "          --txt_tokens T [--batch B] [--mix W@CxHxW/T;W@N/T] [--dtype f32|bf16|f16] [--json]\n"
    "  TLS:    --tls_ca FILE [--tls_cert FILE --tls_key FILE] [--tls_server_name NAME]\n";

absl::StatusOr<v1::DType> WireDType(const Flags& flags) {
  const std::string name = flags.String("dtype", "f32");
  if (name == "f32") return v1::FP32;
  if (name == "bf16") return v1::BF16;
  if (name == "f16") return v1::FP16;
  return absl::InvalidArgumentError(absl::StrCat("--dtype must be f32, bf16 or f16, got '", name, "'"));
}

absl::StatusOr<std::unique_ptr<DenoiserClient>> Connect(const Flags& flags) {
  ClientOptions options;
  ASSIGN_OR_RETURN(options.target, flags.RequiredString("target"));
  options.tls_ca_file = flags.String("tls_ca");
  options.tls_cert_file = flags.String("tls_cert");
  options.tls_key_file = flags.String("tls_key");
  options.tls_server_name = flags.String("tls_server_name");
  return DenoiserClient::Connect(options);
}

std::chrono::milliseconds Timeout(const Flags& flags) {
  return std::chrono::milliseconds(flags.Int("timeout_ms", 60'000).value_or(60'000));
}

absl::Status Health(const Flags& flags) {
  ASSIGN_OR_RETURN(auto client, Connect(flags));
  ASSIGN_OR_RETURN(bool serving, client->IsServing(std::chrono::milliseconds(Timeout(flags))));
  std::cout << (serving ? "SERVING" : "NOT_SERVING") << "\n";
  return serving ? absl::OkStatus() : absl::UnavailableError("the server is not serving");
}

absl::Status Info(const Flags& flags) {
  ASSIGN_OR_RETURN(auto client, Connect(flags));
  ASSIGN_OR_RETURN(v1::GetModelInfoResponse info, client->GetModelInfo(Timeout(flags)));
  std::string json;
  google::protobuf::util::JsonPrintOptions print;
  print.add_whitespace = true;
  print.always_print_primitive_fields = true;
  print.preserve_proto_field_names = true;
  if (!google::protobuf::util::MessageToJsonString(info, &json, print).ok()) {
    return absl::InternalError("cannot print the model info as JSON");
  }
  std::cout << json;
  return absl::OkStatus();
}

absl::Status Denoise(const Flags& flags) {
  ASSIGN_OR_RETURN(v1::DType dtype, WireDType(flags));
  ASSIGN_OR_RETURN(std::string out_path, flags.RequiredString("out"));
  ASSIGN_OR_RETURN(BatchInputs inputs, ReadBatchInputs(flags));
  ASSIGN_OR_RETURN(auto client, Connect(flags));
  const DenoiseInputs request{inputs.img_latent, inputs.txt_embed, inputs.timestep, inputs.pooled_text, ""};
  ASSIGN_OR_RETURN(DenoiseResult result, client->Denoise(request, dtype, Timeout(flags)));
  std::cerr << "queue " << result.queue_us << " us, compute " << result.compute_us << " us, batch of "
            << result.batch_samples << " samples\n";
  return WriteNpy(out_path, result.prediction);
}

absl::Status Bench(const Flags& flags) {
  LoadOptions options;
  ASSIGN_OR_RETURN(options.concurrency, flags.Int("concurrency", 0));
  ASSIGN_OR_RETURN(options.rate, flags.Double("rate", 0));
  ASSIGN_OR_RETURN(options.requests, flags.Int("requests", 0));
  ASSIGN_OR_RETURN(options.duration_s, flags.Double("duration", 0));
  ASSIGN_OR_RETURN(options.dtype, WireDType(flags));
  ASSIGN_OR_RETURN(options.timeout_ms, flags.Int("timeout_ms", 60'000));
  ASSIGN_OR_RETURN(int64_t batch, flags.Int("batch", 1));
  ASSIGN_OR_RETURN(auto client, Connect(flags));
  ASSIGN_OR_RETURN(v1::GetModelInfoResponse info, client->GetModelInfo(Timeout(flags)));
  if (flags.Has("mix")) {
    ASSIGN_OR_RETURN(options.mix, ParseMix(flags.String("mix"), batch, info.model().img_dim()));
  } else {
    ASSIGN_OR_RETURN(int64_t text_tokens, flags.RequiredInt("txt_tokens"));
    if (flags.Has("latent") == flags.Has("img_tokens")) {
      return absl::InvalidArgumentError("give exactly one of --img_tokens N, --latent C,H,W or --mix SPEC");
    }
    Shape img;
    if (flags.Has("latent")) {
      ASSIGN_OR_RETURN(img, flags.IntList("latent"));
    } else {
      ASSIGN_OR_RETURN(int64_t tokens, flags.RequiredInt("img_tokens"));
      img = {tokens, info.model().img_dim()};
    }
    options.mix = {{1.0, batch, img, text_tokens}};
  }
  ASSIGN_OR_RETURN(LoadReport report, RunLoad(*client, options));
  std::string errors;
  for (const auto& [code, count] : report.errors) absl::StrAppend(&errors, " ", code, "=", count);
  std::cout << "requests " << report.requests << " in " << report.wall_s
            << " s; errors:" << (errors.empty() ? " none" : errors) << "\n"
            << "throughput " << report.throughput_rps << " requests/s, " << report.throughput_samples_per_s
            << " samples/s\n"
            << "latency ms p50 " << report.p50_ms << "  p90 " << report.p90_ms << "  p95 " << report.p95_ms << "  p99 "
            << report.p99_ms << "\n"
            << "mean batch_samples " << report.mean_batch_samples << "; server queue " << report.server_queue_us_mean
            << " us, compute " << report.server_compute_us_mean << " us (means)\n";
  if (flags.String("json", "false") != "false") std::cout << report.ToJson().dump() << "\n";
  return absl::OkStatus();
}

int Main(int argc, char** argv) {
  const std::set<std::string> common = {"target", "tls_ca", "tls_cert", "tls_key", "tls_server_name", "timeout_ms"};
  struct Command {
    const char* name;
    absl::Status (*run)(const Flags&);
    std::set<std::string> flags;
  } commands[] = {
      {"health", Health, {}},
      {"info", Info, {}},
      {"denoise", Denoise, {"img_latent", "txt_embed", "timestep", "pooled_text", "out", "dtype"}},
      {"bench",
       Bench,
       {"concurrency", "rate", "requests", "duration", "img_tokens", "latent", "txt_tokens", "batch", "mix", "dtype",
        "json"}},
  };
  if (argc < 2 || std::string(argv[1]) == "--help") {
    std::cerr << kUsage;
    return argc < 2 ? 2 : 0;
  }
  for (Command& command : commands) {
    if (argv[1] != std::string(command.name)) continue;
    command.flags.insert(common.begin(), common.end());
    std::vector<std::string> args(argv + 2, argv + argc);
    for (std::string& arg : args) {
      if (arg == "--json") arg = "--json=true";  // a bare switch
    }
    auto flags = Flags::Parse(args, command.flags);
    if (!flags.ok()) {
      std::cerr << "mmdit-client " << command.name << ": " << flags.status().message() << "\n";
      return 2;
    }
    const absl::Status status = command.run(*flags);
    if (status.ok()) return 0;
    std::cerr << absl::StatusCodeToString(status.code()) << ": " << status.message() << "\n";
    return 1;
  }
  std::cerr << "mmdit-client: unknown command '" << argv[1] << "'\n" << kUsage;
  return 2;
}

}  // namespace
}  // namespace mmdit

int main(int argc, char** argv) { return mmdit::Main(argc, argv); }
