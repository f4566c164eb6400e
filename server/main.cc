// mmdit-server: serves an MMDiT model over gRPC. Every flag can also be set from the
// environment as MMDIT_<FLAG> (containers); the command line wins. `mmdit-server --help`.
#include <omp.h>
#include <signal.h>
#include <spdlog/spdlog.h>
#include <unistd.h>

#include <iostream>

#include "absl/strings/str_cat.h"
#include "core/engine.h"
#include "core/status_macros.h"
#include "core/text_encoder.h"
#include "server/denoiser_server.h"
#include "tools/flags.h"

extern char** environ;

namespace mmdit {
namespace {

// The built-in default model: the digits model this project trains (training/train_digits.py),
// committed in the repository and copied into the container image.
constexpr char kDefaultModelDir[] = "models/digits";

// Every flag of the server: the parser, `--help` and the environment names come from here.
constexpr FlagSpec kFlagSpecs[] = {
    {"model", "DIR",
     "model directory: config.json, safetensors, optional scheduler_config.json and text_encoder/ (default "
     "models/digits: the trained digits model, prompts \"0\"..\"9\", \"seven\", \"a seven\")"},
    {"model_name", "NAME", "the model's name in the Open Inference Protocol (default: the model directory's last part)"},
    {"host", "0.0.0.0", "address to listen on"},
    {"port", "50051", "gRPC port (0: any free port, logged)"},
    {"metrics_port", "9090", "HTTP port for /metrics, /healthz and /readyz (0: any free port, -1: off)"},
    {"threads", "N", "engine threads (default: all cores)"},
    {"dtype", "f32",
     "compute dtype of the matrix products: f32, or bf16 (weights and activations into the products in bf16, "
     "float32 accumulation; needs AVX-512)"},
    {"max_batch_samples", "8", "rows of one forward pass"},
    {"max_batch_tokens", "0", "image plus text tokens of one forward pass (0: no limit)"},
    {"max_queue_delay_us", "2000", "how long a wait_for_batch Denoise may wait for company while the engine is idle"},
    {"max_queue_size", "256", "queued Denoise and Generate calls; beyond it RESOURCE_EXHAUSTED"},
    {"max_running_generations", "8", "Generate calls sharing each step; more wait in the queue"},
    {"max_steps", "1000", "steps of one Generate"},
    {"max_samples_per_request", "8", "samples of one Denoise"},
    {"max_text_tokens", "512", "text tokens of one sample"},
    {"max_latent_height", "0", "latent pixels (0: the position table's size)"},
    {"max_latent_width", "0", "latent pixels (0: the position table's size)"},
    {"max_image_tokens", "16384", "image tokens of one sample, after patching"},
    {"warmup", "SHAPES",
     "forward passes before SERVING, e.g. 1x16x64x64/77,8x64/32 (BxCxHxW/T or BxN/T; default one sample of the "
     "model's nominal size)"},
    {"max_receive_message_mb", "64", "largest request (and response) message; gRPC caps it at 2 GiB - 1 byte, and GetModelInfo reports the cap"},
    {"keepalive_time_s", "30", "HTTP/2 keepalive ping interval"},
    {"max_connection_age_s", "300", "connections are closed gracefully after this age (0: never)"},
    {"drain_timeout_s", "30",
     "on SIGTERM, how long running work may take to finish; the process exits within this time"},
    {"tls_cert", "FILE", "TLS certificate chain (PEM); with --tls_key"},
    {"tls_key", "FILE", "TLS private key (PEM)"},
    {"tls_client_ca", "FILE", "require client certificates signed by this CA (mutual TLS)"},
    {"log_level", "info", "trace, debug, info, warn, error"},
};

std::string Usage() {
  return absl::StrCat("usage: mmdit-server [--flag value ...]   (each flag also as MMDIT_<FLAG>=value in the "
                      "environment; the command line wins)\n",
                      FlagUsage(kFlagSpecs, "MMDIT_"));
}

absl::Status ReadOptions(const Flags& flags, ServerOptions& o) {
  o.host = flags.String("host", o.host);
  ASSIGN_OR_RETURN(int64_t port, flags.Int("port", o.port));
  ASSIGN_OR_RETURN(int64_t metrics_port, flags.Int("metrics_port", o.metrics_port));
  if (port < 0 || port > 65535 || metrics_port > 65535) return UsageError("ports are 0..65535");
  o.port = static_cast<int>(port);
  o.metrics_port = static_cast<int>(metrics_port);
  ASSIGN_OR_RETURN(o.scheduler.max_batch_samples, flags.Int("max_batch_samples", o.scheduler.max_batch_samples));
  ASSIGN_OR_RETURN(o.scheduler.max_batch_tokens, flags.Int("max_batch_tokens", o.scheduler.max_batch_tokens));
  ASSIGN_OR_RETURN(o.scheduler.max_queue_delay_us, flags.Int("max_queue_delay_us", o.scheduler.max_queue_delay_us));
  ASSIGN_OR_RETURN(o.scheduler.max_queue_size, flags.Int("max_queue_size", o.scheduler.max_queue_size));
  ASSIGN_OR_RETURN(o.limits.max_samples_per_request, flags.Int("max_samples_per_request", o.scheduler.max_batch_samples));
  ASSIGN_OR_RETURN(o.limits.max_text_tokens, flags.Int("max_text_tokens", o.limits.max_text_tokens));
  ASSIGN_OR_RETURN(o.limits.max_latent_height, flags.Int("max_latent_height", o.limits.max_latent_height));
  ASSIGN_OR_RETURN(o.limits.max_latent_width, flags.Int("max_latent_width", o.limits.max_latent_width));
  ASSIGN_OR_RETURN(o.limits.max_image_tokens, flags.Int("max_image_tokens", o.limits.max_image_tokens));
  ASSIGN_OR_RETURN(o.limits.max_steps, flags.Int("max_steps", o.limits.max_steps));
  ASSIGN_OR_RETURN(o.scheduler.max_running_generations,
                   flags.Int("max_running_generations", o.scheduler.max_running_generations));
  ASSIGN_OR_RETURN(o.max_receive_message_mb, flags.Int("max_receive_message_mb", o.max_receive_message_mb));
  ASSIGN_OR_RETURN(o.keepalive_time_s, flags.Int("keepalive_time_s", o.keepalive_time_s));
  ASSIGN_OR_RETURN(o.max_connection_age_s, flags.Int("max_connection_age_s", o.max_connection_age_s));
  ASSIGN_OR_RETURN(o.drain_timeout_s, flags.Int("drain_timeout_s", o.drain_timeout_s));
  const std::pair<const char*, int64_t> positive[] = {{"max_batch_samples", o.scheduler.max_batch_samples},
                                                      {"max_queue_size", o.scheduler.max_queue_size},
                                                      {"max_samples_per_request", o.limits.max_samples_per_request},
                                                      {"max_text_tokens", o.limits.max_text_tokens},
                                                      {"max_image_tokens", o.limits.max_image_tokens},
                                                      {"max_steps", o.limits.max_steps},
                                                      {"max_running_generations", o.scheduler.max_running_generations},
                                                      {"max_receive_message_mb", o.max_receive_message_mb},
                                                      {"keepalive_time_s", o.keepalive_time_s}};
  for (const auto& [name, value] : positive) {
    if (value < 1) return UsageError(absl::StrCat("--", name, " must be >= 1, got ", value));
  }
  if (o.scheduler.max_queue_delay_us < 0 || o.scheduler.max_batch_tokens < 0 || o.drain_timeout_s < 0 ||
      o.max_connection_age_s < 0) {
    return UsageError(
        "--max_queue_delay_us, --max_batch_tokens, --drain_timeout_s and --max_connection_age_s must be >= 0");
  }
  o.tls = {flags.String("tls_cert"), flags.String("tls_key"), flags.String("tls_client_ca")};
  return absl::OkStatus();
}

// The warm-up shapes: --warmup, or one sample of the model's nominal size.
absl::StatusOr<std::vector<WarmupShape>> WarmupShapes(const Flags& flags, const ModelConfig& c,
                                                      const RequestLimits& limits) {
  if (flags.Has("warmup")) return ParseWarmupShapes(flags.String("warmup"), c.patch_features());
  const int64_t text_tokens = std::min<int64_t>(77, limits.max_text_tokens);
  if (c.has_positions()) {
    const int64_t side = std::min(std::max(c.sample_size, c.patch_size), *c.pos_embed_max_size * c.patch_size);
    return std::vector<WarmupShape>{{1, {c.in_channels, side, side}, text_tokens}};
  }
  const int64_t grid = std::max<int64_t>(1, c.sample_size / c.patch_size);
  return std::vector<WarmupShape>{{1, {grid * grid, c.patch_features()}, text_tokens}};
}

absl::Status Run(const Flags& flags) {
  if (const std::string level = flags.String("log_level", "info"); !level.empty()) {
    spdlog::set_level(spdlog::level::from_str(level));
  }
  ServerOptions options;
  RETURN_IF_ERROR(ReadOptions(flags, options));
  const bool default_model = !flags.Has("model");
  options.model_dir = default_model ? kDefaultModelDir : flags.String("model");
  options.model_name = flags.String("model_name", "");
  ASSIGN_OR_RETURN(int64_t threads, flags.Int("threads", 0));
  if (threads > 0) omp_set_num_threads(static_cast<int>(threads));

  // SIGTERM and SIGINT are taken by sigwait below; block them before any thread starts.
  sigset_t stop_signals;
  sigemptyset(&stop_signals);
  sigaddset(&stop_signals, SIGTERM);
  sigaddset(&stop_signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &stop_signals, nullptr);

  ASSIGN_OR_RETURN(std::unique_ptr<DenoiserServer> server, DenoiserServer::Start(options));
  spdlog::info("listening on {}:{} ({}), metrics on {}, health NOT_SERVING until the model is warm", options.host,
               server->port(), options.tls.cert_file.empty() ? "plaintext" : "TLS",
               server->metrics_port() >= 0 ? absl::StrCat(":", server->metrics_port(), "/metrics") : "off");

  const std::string& model_dir = options.model_dir;
  if (default_model) {
    spdlog::info("serving the built-in default model {} (8x8 handwritten digits; prompts like \"7\" or \"a seven\"); "
                 "pass --model for another",
                 model_dir);
  }
  EngineOptions engine_options;
  ASSIGN_OR_RETURN(engine_options.compute, ParseComputeDType(flags.String("dtype", "f32"), "--dtype"));
  ASSIGN_OR_RETURN(std::unique_ptr<Engine> engine, Engine::Load(model_dir, engine_options));
  // The sampler's settings are read before serving; the server holds them from here on.
  ASSIGN_OR_RETURN(FlowMatchConfig flow_match, LoadFlowMatchConfig(model_dir));
  const ModelConfig& c = engine->config();
  spdlog::info(
      "model {}: hidden {}, depth {}, heads {}, patch {}, in/out channels {}/{}, position table {}, "
      "qk_norm {}, {} dual-attention layers; {} compute, {} engine threads",
      model_dir, c.hidden(), c.num_layers, c.num_attention_heads, c.patch_size, c.in_channels, c.out_channels,
      c.pos_embed_max_size.value_or(0), c.qk_norm, c.dual_attention_layers.size(),
      ComputeDTypeName(engine->compute_dtype()), omp_get_max_threads());
  ASSIGN_OR_RETURN(std::vector<WarmupShape> warmup, WarmupShapes(flags, c, options.limits));
  ASSIGN_OR_RETURN(std::unique_ptr<TextEncoder> text_encoder,
                   LoadTextEncoder(model_dir, c.joint_attention_dim, c.pooled_projection_dim));
  spdlog::info("text encoder: {}", text_encoder ? text_encoder->Summary().description
                                                : "none (Generate takes embeddings, not prompts)");
  RETURN_IF_ERROR(server->Serve(std::move(engine), warmup, flow_match, std::move(text_encoder)));
  spdlog::info(
      "SERVING: passes of up to {} rows{}, max queue delay {} us, queue {} requests, {} running generations, "
      "sampler shift {}",
      options.scheduler.max_batch_samples,
      options.scheduler.max_batch_tokens > 0 ? absl::StrCat(" / ", options.scheduler.max_batch_tokens, " tokens") : "",
      options.scheduler.max_queue_delay_us, options.scheduler.max_queue_size, options.scheduler.max_running_generations,
      flow_match.shift);

  int signal_number = 0;
  sigwait(&stop_signals, &signal_number);
  spdlog::info("signal {}: draining (up to {} s)", signal_number, options.drain_timeout_s);
  server->Shutdown();
  spdlog::info("drained; exiting");
  return absl::OkStatus();
}

}  // namespace
}  // namespace mmdit

int main(int argc, char** argv) {
  const std::vector<std::string> args(argv + 1, argv + argc);
  if (!args.empty() && (args[0] == "--help" || args[0] == "-h")) {
    std::cout << mmdit::Usage();
    return 0;
  }
  auto flags = mmdit::Flags::Parse(args, mmdit::FlagNames(mmdit::kFlagSpecs), "MMDIT_", environ);
  if (!flags.ok()) {
    std::cerr << "mmdit-server: " << flags.status().message() << "\n" << mmdit::Usage();
    return 2;
  }
  const absl::Status status = mmdit::Run(*flags);
  if (!status.ok()) {
    spdlog::error("{}", std::string(status.message()));
    return mmdit::IsUsageError(status) ? 2 : 1;
  }
  return 0;
}
