// mmdit-client: talk to an mmdit-server.
//   mmdit-client health  --target HOST:PORT                   exit 0 only when SERVING
//   mmdit-client info    --target HOST:PORT                   the model and the server's limits, as JSON
//   mmdit-client denoise --target HOST:PORT --img_latent A.npy --txt_embed B.npy --timestep C.npy
//                        --pooled_text D.npy --out OUT.npy [--dtype f32|bf16|f16]
//   mmdit-client generate --target HOST:PORT (--prompt P [--negative_prompt N] | --txt_embed A.npy
//                        --pooled_text B.npy [--negative_txt_embed C.npy --negative_pooled_text D.npy])
//                        [--latent C,H,W | --img_tokens N] [--steps N] [--guidance G] [--seed S]
//                        [--initial_noise N.npy] [--init_latent X.npy --strength F] [--skip_layers 7,8,9
//                        --skip_layer_scale 2.8] [--preview_every K] [--grid N] --out OUT.npy|OUT.png
//                        [--png_scale K] [--dtype f32|bf16|f16]
//                        one image sampled by the server (Generate); inputs have a batch of 1, the output is
//                        [1, C, H, W] or [1, N, F] (.npy), or the image when the latent is one (.png);
//                        progress on stderr (a bar on a terminal, else a line a step). --grid N: N images
//                        in a row (seeds S..S+N-1; without a prompt or embeddings, the digits "0".."N-1")
//   mmdit-client bench   --target HOST:PORT (--concurrency C | --rate R) (--requests N | --duration S)
//                        (--img_tokens N | --latent C,H,W) --txt_tokens T [--batch B] [--mix SPEC] [--json]
//                        [--generate [--via generate|denoise] [--steps N] [--guidance G]]
//                        with --generate, whole images: by the server's Generate, or (--via denoise) by this
//                        client's sampler calling Denoise once per step; mix entries may end in :STEPS
// TLS: --tls_ca FILE (trust), --tls_cert FILE --tls_key FILE (mutual TLS), --tls_server_name NAME.
// On failure: the gRPC status code name and message on stderr, exit 1 (2 for usage).
#include <google/protobuf/util/json_util.h>
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <iostream>
#include <optional>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/match.h"
#include "client/denoiser_client.h"
#include "client/image.h"
#include "client/load_generator.h"
#include "core/npy.h"
#include "core/status_macros.h"
#include "nlohmann/json.hpp"
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
    "  generate (--prompt P [--negative_prompt N] | --txt_embed A.npy --pooled_text B.npy\n"
    "          [--negative_txt_embed C.npy --negative_pooled_text D.npy])\n"
    "          [--latent C,H,W | --img_tokens N] [--steps N] [--guidance G] [--seed S] [--initial_noise N.npy]\n"
    "          [--init_latent X.npy [--strength F]] [--skip_layers 7,8,9 [--skip_layer_scale 2.8]\n"
    "          [--skip_layer_start 0.01] [--skip_layer_stop 0.2]] [--preview_every K] [--request_id ID]\n"
    "          [--grid N] --out OUT.npy|OUT.png [--png_scale K] [--dtype f32|bf16|f16] [--timeout_ms 600000]\n"
    "          .png: the latent as the image (models whose latent is one: the digits model); --grid N:\n"
    "          N images in a row, seeds S..S+N-1, or without a prompt the digits \"0\"..\"N-1\"\n"
    "  bench   (--concurrency C | --rate R) (--requests N | --duration S) (--img_tokens N | --latent C,H,W)\n"
    "          --txt_tokens T [--batch B] [--mix W@CxHxW/T;W@N/T] [--dtype f32|bf16|f16] [--wait_for_batch] [--json]\n"
    "          [--generate [--via generate|denoise] [--steps N] [--guidance 7]]  whole images; mix W@CxHxW/T:STEPS\n"
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

// Protobuf's JSON mapping prints 64-bit integers as strings (for JavaScript); people and jq
// read numbers. Turns those of `json` (printed from a `descriptor` message) back into numbers.
void Int64FieldsAsNumbers(nlohmann::json& json, const google::protobuf::Descriptor& descriptor) {
  using google::protobuf::FieldDescriptor;
  for (int i = 0; i < descriptor.field_count(); ++i) {
    const FieldDescriptor& field = *descriptor.field(i);
    if (!json.is_object() || !json.contains(field.name())) continue;
    nlohmann::json& value = json[field.name()];
    auto convert = [&field](nlohmann::json& element) {
      if (field.cpp_type() == FieldDescriptor::CPPTYPE_MESSAGE) {
        Int64FieldsAsNumbers(element, *field.message_type());
      } else if (element.is_string() && field.cpp_type() == FieldDescriptor::CPPTYPE_INT64) {
        element = std::stoll(element.get<std::string>());
      } else if (element.is_string() && field.cpp_type() == FieldDescriptor::CPPTYPE_UINT64) {
        element = std::stoull(element.get<std::string>());
      }
    };
    if (field.is_repeated() && value.is_array()) {
      for (nlohmann::json& element : value) convert(element);
    } else {
      convert(value);
    }
  }
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
  nlohmann::json parsed = nlohmann::json::parse(json);
  Int64FieldsAsNumbers(parsed, *info.GetDescriptor());
  std::cout << parsed.dump(2) << "\n";
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

// Reads the .npy named by --`name`, if given.
absl::StatusOr<std::optional<Tensor>> OptionalNpy(const Flags& flags, const std::string& name) {
  if (!flags.Has(name)) return std::nullopt;
  ASSIGN_OR_RETURN(Tensor tensor, ReadNpy(flags.String(name)));
  return tensor;
}

absl::StatusOr<std::optional<float>> OptionalFloat(const Flags& flags, const std::string& name) {
  if (!flags.Has(name)) return std::nullopt;
  ASSIGN_OR_RETURN(double value, flags.Double(name, 0));
  return static_cast<float>(value);
}

// Progress on stderr: on a terminal one bar redrawn in place, elsewhere a line per step.
class ProgressPrinter {
 public:
  explicit ProgressPrinter(bool terminal) : terminal_(terminal) {}
  ~ProgressPrinter() { EndLine(); }

  void Print(const v1::GenerateProgress& progress) {
    const std::string numbers =
        absl::StrFormat("%d/%d sigma %.4f rows %d batch %d", progress.step(), progress.total_steps(), progress.sigma(),
                        progress.rows(), progress.batch_samples());
    const std::string preview = progress.has_latent() && !progress.done() ? " (preview)" : "";
    if (!terminal_) {
      std::cerr << "step " << numbers << preview << "\n";
      return;
    }
    constexpr int kWidth = 30;
    const int total = std::max(1, progress.total_steps());
    const int filled = std::clamp(progress.step() * kWidth / total, 0, kWidth);
    std::cerr << "\r[" << std::string(filled, '#') << std::string(kWidth - filled, ' ') << "] " << numbers << preview
              << "   " << std::flush;
    open_ = true;
  }

  void EndLine() {
    if (open_) std::cerr << "\n";
    open_ = false;
  }

 private:
  const bool terminal_;
  bool open_ = false;  // a bar is on the terminal's current line
};

// Generate's conditioning from the flags: --prompt (and --negative_prompt) for the model's text
// encoder, or the embeddings from .npy files (held in `owned`, which `inputs` views).
absl::Status ReadConditioning(const Flags& flags, bool required, GenerateInputs& inputs, std::vector<Tensor>& owned) {
  const bool embedded = flags.Has("txt_embed") || flags.Has("pooled_text") || flags.Has("negative_txt_embed") ||
                        flags.Has("negative_pooled_text");
  if (flags.Has("prompt") && embedded) {
    return absl::InvalidArgumentError("give --prompt or --txt_embed/--pooled_text, not both");
  }
  if (flags.Has("negative_prompt") && !flags.Has("prompt")) {
    return absl::InvalidArgumentError("--negative_prompt needs --prompt");
  }
  if (flags.Has("prompt")) {
    inputs.prompt = flags.String("prompt");
    if (flags.Has("negative_prompt")) inputs.negative_prompt = flags.String("negative_prompt");
    return absl::OkStatus();
  }
  if (!embedded && !required) return absl::OkStatus();
  if (flags.Has("negative_txt_embed") != flags.Has("negative_pooled_text")) {
    return absl::InvalidArgumentError("give both --negative_txt_embed and --negative_pooled_text, or neither");
  }
  owned.reserve(4);  // the views below must not move
  ASSIGN_OR_RETURN(std::string txt_path, flags.RequiredString("txt_embed"));
  ASSIGN_OR_RETURN(std::string pooled_path, flags.RequiredString("pooled_text"));
  ASSIGN_OR_RETURN(owned.emplace_back(), ReadNpy(txt_path));
  inputs.txt_embed = owned.back();
  ASSIGN_OR_RETURN(owned.emplace_back(), ReadNpy(pooled_path));
  inputs.pooled_text = owned.back();
  if (flags.Has("negative_txt_embed")) {
    ASSIGN_OR_RETURN(owned.emplace_back(), ReadNpy(flags.String("negative_txt_embed")));
    inputs.negative_txt_embed = owned.back();
    ASSIGN_OR_RETURN(owned.emplace_back(), ReadNpy(flags.String("negative_pooled_text")));
    inputs.negative_pooled_text = owned.back();
  }
  return absl::OkStatus();
}

// The latents as the file --out names: .npy ([N, ...], N = 1 without --grid) or .png (the
// images side by side, each pixel --png_scale times).
absl::Status WriteLatents(const std::string& path, const std::vector<Tensor>& latents, int64_t png_scale) {
  if (absl::EndsWith(path, ".npy")) {
    Tensor stacked = latents.front();
    for (size_t i = 1; i < latents.size(); ++i) {
      stacked.data.insert(stacked.data.end(), latents[i].data.begin(), latents[i].data.end());
    }
    stacked.shape[0] = static_cast<int64_t>(latents.size());
    return WriteNpy(path, stacked);
  }
  std::vector<Image> images;
  for (const Tensor& latent : latents) {
    ASSIGN_OR_RETURN(images.emplace_back(), LatentToImage(latent));
  }
  ASSIGN_OR_RETURN(Image row, ImageRow(images));
  return WritePng(path, Upscale(row, png_scale));
}

absl::Status Generate(const Flags& flags) {
  ASSIGN_OR_RETURN(v1::DType dtype, WireDType(flags));
  ASSIGN_OR_RETURN(std::string out_path, flags.RequiredString("out"));
  if (!absl::EndsWith(out_path, ".npy") && !absl::EndsWith(out_path, ".png")) {
    return absl::InvalidArgumentError(absl::StrCat("--out must end in .npy or .png, got '", out_path, "'"));
  }
  ASSIGN_OR_RETURN(int64_t grid, flags.Int("grid", 0));
  if (grid < 0 || grid > 100) return absl::InvalidArgumentError("--grid must be 1..100 (images in the row)");
  ASSIGN_OR_RETURN(int64_t png_scale, flags.Int("png_scale", 1));
  if (png_scale < 1 || png_scale > 64) return absl::InvalidArgumentError("--png_scale must be 1..64");

  GenerateInputs inputs;
  std::vector<Tensor> owned;
  // --grid without a prompt or embeddings: the digits, one prompt per image.
  RETURN_IF_ERROR(ReadConditioning(flags, /*required=*/grid == 0, inputs, owned));
  const bool digit_grid = grid > 0 && !inputs.prompt && inputs.txt_embed.data == nullptr;
  if (digit_grid && grid > 10) {
    return absl::InvalidArgumentError("--grid without --prompt makes one image per digit: at most 10");
  }
  ASSIGN_OR_RETURN(const std::optional<Tensor> initial_noise, OptionalNpy(flags, "initial_noise"));
  ASSIGN_OR_RETURN(const std::optional<Tensor> init_latent, OptionalNpy(flags, "init_latent"));
  if (initial_noise) inputs.initial_noise = *initial_noise;
  if (init_latent) inputs.init_latent = *init_latent;
  if (flags.Has("latent") && flags.Has("img_tokens")) {
    return absl::InvalidArgumentError("give at most one of --latent C,H,W and --img_tokens N");
  }
  if (flags.Has("latent")) {
    ASSIGN_OR_RETURN(inputs.latent_shape, flags.IntList("latent"));
  } else if (flags.Has("img_tokens")) {
    ASSIGN_OR_RETURN(int64_t tokens, flags.RequiredInt("img_tokens"));
    inputs.latent_shape = {tokens};
  }  // else the server's default: the model's nominal size (image form)
  ASSIGN_OR_RETURN(int64_t steps, flags.Int("steps", 0));
  inputs.steps = static_cast<int32_t>(steps);
  ASSIGN_OR_RETURN(inputs.guidance_scale, OptionalFloat(flags, "guidance"));
  ASSIGN_OR_RETURN(int64_t seed, flags.Int("seed", 0));
  inputs.seed = static_cast<uint64_t>(seed);
  ASSIGN_OR_RETURN(inputs.strength, OptionalFloat(flags, "strength"));
  if (flags.Has("skip_layers")) {
    ASSIGN_OR_RETURN(inputs.skip_layers, flags.IntList("skip_layers"));
  }
  ASSIGN_OR_RETURN(inputs.skip_layer_scale, OptionalFloat(flags, "skip_layer_scale"));
  ASSIGN_OR_RETURN(inputs.skip_layer_start, OptionalFloat(flags, "skip_layer_start"));
  ASSIGN_OR_RETURN(inputs.skip_layer_stop, OptionalFloat(flags, "skip_layer_stop"));
  ASSIGN_OR_RETURN(int64_t preview_every, flags.Int("preview_every", 0));
  inputs.preview_every = static_cast<int32_t>(preview_every);
  inputs.request_id = flags.String("request_id");
  ASSIGN_OR_RETURN(int64_t timeout_ms, flags.Int("timeout_ms", 600'000));
  ASSIGN_OR_RETURN(auto client, Connect(flags));

  if (grid == 0) {
    ProgressPrinter printer(::isatty(STDERR_FILENO) == 1);
    absl::StatusOr<GenerateResult> result =
        client->Generate(inputs, dtype, std::chrono::milliseconds(timeout_ms),
                         [&printer](const v1::GenerateProgress& progress) { printer.Print(progress); });
    printer.EndLine();
    if (!result.ok()) return result.status();
    std::cerr << absl::StrFormat(
        "%d steps in %.1f ms (first step after %.1f ms); queue %d us, compute %d us, mean batch %.2f rows\n",
        result->steps, result->total_ms, result->first_progress_ms, result->queue_us, result->compute_us,
        result->mean_batch_samples);
    return WriteLatents(out_path, {result->latent}, png_scale);
  }

  // A row of images, generated at once so that the server merges their steps into shared passes:
  // the digits 0..grid-1 (one seed), or one conditioning with seeds seed..seed+grid-1.
  std::vector<GenerateInputs> row(grid, inputs);
  for (int64_t i = 0; i < grid; ++i) {
    if (digit_grid) {
      row[i].prompt = absl::StrCat(i);
    } else {
      row[i].seed = inputs.seed + i;
    }
  }
  std::vector<absl::StatusOr<GenerateResult>> results(grid, absl::UnknownError("not run"));
  std::vector<std::thread> callers;
  for (int64_t i = 0; i < grid; ++i) {
    callers.emplace_back([&, i] { results[i] = client->Generate(row[i], dtype, std::chrono::milliseconds(timeout_ms)); });
  }
  for (std::thread& caller : callers) caller.join();
  std::vector<Tensor> latents;
  for (int64_t i = 0; i < grid; ++i) {
    if (!results[i].ok()) {
      return absl::Status(results[i].status().code(),
                          absl::StrCat("image ", i, ": ", results[i].status().message()));
    }
    std::cerr << absl::StrFormat("image %d (%s): %d steps in %.1f ms, mean batch %.2f rows\n", i,
                                 row[i].prompt ? absl::StrCat("prompt \"", *row[i].prompt, "\"")
                                               : absl::StrCat("seed ", row[i].seed),
                                 results[i]->steps, results[i]->total_ms, results[i]->mean_batch_samples);
    latents.push_back(std::move(results[i]->latent));
  }
  return WriteLatents(out_path, latents, png_scale);
}

// The request shapes of a bench: --mix, or one shape from --latent / --img_tokens and --txt_tokens.
absl::StatusOr<std::vector<RequestShape>> BenchMix(const Flags& flags, const v1::GetModelInfoResponse& info,
                                                   int64_t batch) {
  if (flags.Has("mix")) return ParseMix(flags.String("mix"), batch, info.model().img_dim());
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
  return std::vector<RequestShape>{{1.0, batch, img, text_tokens}};
}

std::string ErrorCounts(const std::map<std::string, int64_t>& errors) {
  std::string text;
  for (const auto& [code, count] : errors) absl::StrAppend(&text, " ", code, "=", count);
  return text.empty() ? " none" : text;
}

// After a bench: the first message of each error code on stderr, and an error (exit 1) when
// any request failed, so that a script cannot mistake a run of failures for a measurement.
absl::Status BenchOutcome(int64_t requests, const std::map<std::string, int64_t>& errors,
                          const std::map<std::string, std::string>& first_errors) {
  int64_t failed = 0;
  for (const auto& [code, count] : errors) {
    failed += count;
    const auto first = first_errors.find(code);
    std::cerr << "first " << code << ": " << (first == first_errors.end() ? "" : first->second) << "\n";
  }
  if (failed == 0) return absl::OkStatus();
  return absl::AbortedError(absl::StrCat(failed, " of ", requests, " requests failed (first errors above)"));
}

absl::Status BenchGenerate(const Flags& flags, DenoiserClient& client, const v1::GetModelInfoResponse& info) {
  GenerateLoadOptions options;
  ASSIGN_OR_RETURN(options.concurrency, flags.Int("concurrency", 0));
  ASSIGN_OR_RETURN(options.rate, flags.Double("rate", 0));
  ASSIGN_OR_RETURN(options.requests, flags.Int("requests", 0));
  ASSIGN_OR_RETURN(options.duration_s, flags.Double("duration", 0));
  ASSIGN_OR_RETURN(options.dtype, WireDType(flags));
  ASSIGN_OR_RETURN(options.timeout_ms, flags.Int("timeout_ms", 600'000));
  ASSIGN_OR_RETURN(options.steps, flags.Int("steps", 0));
  ASSIGN_OR_RETURN(double guidance, flags.Double("guidance", 7.0));
  options.guidance_scale = static_cast<float>(guidance);
  ASSIGN_OR_RETURN(options.wait_for_batch, flags.Bool("wait_for_batch", false));
  const std::string via = flags.String("via", "generate");
  if (via != "generate" && via != "denoise") {
    return absl::InvalidArgumentError(absl::StrCat("--via must be generate or denoise, got '", via, "'"));
  }
  options.via = via == "generate" ? GenerateVia::kGenerate : GenerateVia::kDenoise;
  if (flags.Has("batch"))
    return absl::InvalidArgumentError("--batch is for Denoise benches: a generation is one image");
  ASSIGN_OR_RETURN(options.mix, BenchMix(flags, info, 1));
  ASSIGN_OR_RETURN(GenerateLoadReport report, RunGenerateLoad(client, options));
  std::cout << absl::StrFormat(
      "via %s: %d generations in %.2f s; errors:%s\n"
      "throughput %.3f images/s, %.2f steps/s\n"
      "time to first step ms p50 %.1f  p90 %.1f  p99 %.1f\n"
      "end-to-end ms p50 %.1f  p90 %.1f  p99 %.1f\n"
      "mean rows per pass %.2f; server queue %.0f us, compute %.0f us per image (means)\n",
      via, report.requests, report.wall_s, ErrorCounts(report.errors), report.images_per_s, report.steps_per_s,
      report.ttfs_p50_ms, report.ttfs_p90_ms, report.ttfs_p99_ms, report.p50_ms, report.p90_ms, report.p99_ms,
      report.mean_batch_samples, report.server_queue_us_mean, report.server_compute_us_mean);
  ASSIGN_OR_RETURN(bool json, flags.Bool("json", false));
  if (json) std::cout << report.ToJson().dump() << "\n";
  return BenchOutcome(report.requests, report.errors, report.first_errors);
}

absl::Status Bench(const Flags& flags) {
  ASSIGN_OR_RETURN(bool generate, flags.Bool("generate", false));
  generate = generate || flags.Has("via");
  if (!generate && (flags.Has("steps") || flags.Has("guidance"))) {
    return absl::InvalidArgumentError("--steps and --guidance are for --generate");
  }
  ASSIGN_OR_RETURN(auto client, Connect(flags));
  ASSIGN_OR_RETURN(v1::GetModelInfoResponse info, client->GetModelInfo(Timeout(flags)));
  if (generate) return BenchGenerate(flags, *client, info);
  LoadOptions options;
  ASSIGN_OR_RETURN(options.concurrency, flags.Int("concurrency", 0));
  ASSIGN_OR_RETURN(options.rate, flags.Double("rate", 0));
  ASSIGN_OR_RETURN(options.requests, flags.Int("requests", 0));
  ASSIGN_OR_RETURN(options.duration_s, flags.Double("duration", 0));
  ASSIGN_OR_RETURN(options.dtype, WireDType(flags));
  ASSIGN_OR_RETURN(options.timeout_ms, flags.Int("timeout_ms", 60'000));
  ASSIGN_OR_RETURN(options.wait_for_batch, flags.Bool("wait_for_batch", false));
  ASSIGN_OR_RETURN(int64_t batch, flags.Int("batch", 1));
  ASSIGN_OR_RETURN(options.mix, BenchMix(flags, info, batch));
  ASSIGN_OR_RETURN(LoadReport report, RunLoad(*client, options));
  std::cout << "requests " << report.requests << " in " << report.wall_s << " s; errors:" << ErrorCounts(report.errors)
            << "\n"
            << "throughput " << report.throughput_rps << " requests/s, " << report.throughput_samples_per_s
            << " samples/s\n"
            << "latency ms p50 " << report.p50_ms << "  p90 " << report.p90_ms << "  p95 " << report.p95_ms << "  p99 "
            << report.p99_ms << "\n"
            << "mean batch_samples " << report.mean_batch_samples << "; server queue " << report.server_queue_us_mean
            << " us, compute " << report.server_compute_us_mean << " us (means)\n";
  ASSIGN_OR_RETURN(bool json, flags.Bool("json", false));
  if (json) std::cout << report.ToJson().dump() << "\n";
  return BenchOutcome(report.requests, report.errors, report.first_errors);
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
      {"generate",
       Generate,
       {"prompt",
        "negative_prompt",
        "grid",
        "png_scale",
        "txt_embed",
        "pooled_text",
        "negative_txt_embed",
        "negative_pooled_text",
        "latent",
        "img_tokens",
        "steps",
        "guidance",
        "seed",
        "initial_noise",
        "init_latent",
        "strength",
        "skip_layers",
        "skip_layer_scale",
        "skip_layer_start",
        "skip_layer_stop",
        "preview_every",
        "request_id",
        "out",
        "dtype"}},
      {"bench",
       Bench,
       {"concurrency", "rate", "requests", "duration", "img_tokens", "latent", "txt_tokens", "batch", "mix", "dtype",
        "json", "generate", "via", "steps", "guidance", "wait_for_batch"}},
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
      if (arg == "--json" || arg == "--generate" || arg == "--wait_for_batch") arg += "=true";  // bare switches
    }
    auto flags = Flags::Parse(args, command.flags);
    if (!flags.ok()) {
      std::cerr << "mmdit-client " << command.name << ": " << flags.status().message() << "\n";
      return 2;
    }
    const absl::Status status = command.run(*flags);
    if (status.ok()) return 0;
    if (IsUsageError(status)) {
      std::cerr << "mmdit-client " << command.name << ": " << status.message() << "\n";
      return 2;
    }
    std::cerr << absl::StatusCodeToString(status.code()) << ": " << status.message() << "\n";
    return 1;
  }
  std::cerr << "mmdit-client: unknown command '" << argv[1] << "'\n" << kUsage;
  return 2;
}

}  // namespace
}  // namespace mmdit

int main(int argc, char** argv) { return mmdit::Main(argc, argv); }
