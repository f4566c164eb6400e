// mmdit: the engine from the command line.
//   mmdit forward --model DIR --img_latent A.npy --txt_embed B.npy --timestep C.npy --pooled_text D.npy --out OUT.npy
//                 [--dtype f32|bf16]
//   mmdit inspect --model DIR [--img_tokens N]
//   mmdit init    --out DIR --preset NAME --seed S [--weights_dtype f32|bf16|f16] [size overrides]
//   mmdit bench   --model DIR --batch B (--img_tokens N | --latent C,H,W) --txt_tokens T [--iters K] [--warmup W]
//                 [--threads N] [--dtype f32|bf16] [--roofline true] [--baseline_batch B0]
// Exit 0 on success; on error one line on stderr naming the problem, exit 1 (2 for usage).
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <iostream>
#include <numeric>
#include <random>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "core/batch.h"
#include "core/engine.h"
#include "core/npy.h"
#include "core/random_model.h"
#include "core/status_macros.h"
#include "nlohmann/json.hpp"
#include "tools/batch_inputs.h"
#include "tools/flags.h"
#include "tools/roofline.h"

namespace mmdit {
namespace {

using json = nlohmann::json;

constexpr char kUsage[] =
    "usage: mmdit <command> [flags]\n"
    "  forward --model DIR --img_latent A.npy --txt_embed B.npy --timestep C.npy --pooled_text D.npy --out OUT.npy\n"
    "          [--threads N] [--dtype f32|bf16]\n"
    "  inspect --model DIR [--img_tokens N]\n"
    "  init    --out DIR --preset NAME --seed S [--weights_dtype f32|bf16|f16] [--hidden_size --depth\n"
    "          --num_heads --mlp_ratio --img_dim --txt_dim --cond_dim --patch_size --in_channels\n"
    "          --out_channels --pos_embed_max_size --sample_size --qk_norm true|false]\n"
    "  bench   --model DIR --batch B (--img_tokens N | --latent C,H,W) --txt_tokens T [--iters K]\n"
    "          [--warmup W] [--threads N] [--dtype f32|bf16] [--roofline true] [--baseline_batch B0]\n"
    "          --roofline also times the forward's matrix products alone, on oneDNN's matmul\n"
    "          (standalone_matmul_ms, the roofline) and as the engine runs them\n"
    "          (standalone_products_ms), and prints the forward's ratio to each\n"
    "          --baseline_batch also times a forward of the first B0 samples before each forward\n"
    "          (baseline_median_ms) and prints samples/s over theirs (throughput_over_baseline)\n";

absl::Status SetThreads(const Flags& flags) {
  ASSIGN_OR_RETURN(int64_t threads, flags.Int("threads", 0));
  if (threads < 0) return absl::InvalidArgumentError("--threads must be >= 0 (0: all cores)");
  if (threads > 0) omp_set_num_threads(static_cast<int>(threads));
  return absl::OkStatus();
}

absl::StatusOr<EngineOptions> ReadEngineOptions(const Flags& flags) {
  EngineOptions options;
  ASSIGN_OR_RETURN(options.compute, ParseComputeDType(flags.String("dtype", "f32"), "--dtype"));
  return options;
}

absl::Status Forward(const Flags& flags) {
  RETURN_IF_ERROR(SetThreads(flags));
  ASSIGN_OR_RETURN(std::string model_dir, flags.RequiredString("model"));
  ASSIGN_OR_RETURN(std::string out_path, flags.RequiredString("out"));
  ASSIGN_OR_RETURN(BatchInputs inputs, ReadBatchInputs(flags));
  ASSIGN_OR_RETURN(std::vector<SampleInput> samples,
                   SplitBatch(inputs.img_latent, inputs.txt_embed, inputs.timestep, inputs.pooled_text));
  ASSIGN_OR_RETURN(EngineOptions options, ReadEngineOptions(flags));
  ASSIGN_OR_RETURN(std::unique_ptr<Engine> engine, Engine::Load(model_dir, options));
  ASSIGN_OR_RETURN(std::vector<Tensor> outputs, engine->Forward(samples));
  ASSIGN_OR_RETURN(Tensor stacked, StackBatch(outputs));
  return WriteNpy(out_path, stacked);
}

// Parameters and their bytes as stored, from the weight list the config implies.
json DescribeModel(const ModelConfig& c, int64_t img_tokens) {
  const int64_t parameters = ParameterCount(c);
  return {
      {"img_dim", c.patch_features()},
      {"txt_dim", c.joint_attention_dim},
      {"hidden_size", c.hidden()},
      {"depth", c.num_layers},
      {"num_heads", c.num_attention_heads},
      {"head_dim", c.attention_head_dim},
      {"mlp_ratio", c.mlp_ratio},
      {"cond_dim", c.pooled_projection_dim},
      {"patch_size", c.patch_size},
      {"in_channels", c.in_channels},
      {"out_channels", c.out_channels},
      {"pos_embed_max_size", c.pos_embed_max_size ? json(*c.pos_embed_max_size) : json(nullptr)},
      {"qk_norm", c.qk_norm ? json("rms_norm") : json(nullptr)},
      {"dual_attention_layers", c.dual_attention_layers},
      {"context_pre_only_last", c.context_pre_only_last},
      {"parameter_count", parameters},
      {"weight_bytes", parameters * 4},  // as the engine holds them: float32
      {"img_tokens", img_tokens},
      {"output_size", img_tokens * c.output_features()},
  };
}

absl::Status Inspect(const Flags& flags) {
  ASSIGN_OR_RETURN(std::string model_dir, flags.RequiredString("model"));
  // Loading checks that the weights match the config, so what this prints is what runs.
  ASSIGN_OR_RETURN(std::unique_ptr<Engine> engine, Engine::Load(model_dir));
  const ModelConfig& c = engine->config();
  const int64_t nominal_grid = std::max<int64_t>(1, c.sample_size / c.patch_size);
  ASSIGN_OR_RETURN(int64_t img_tokens, flags.Int("img_tokens", nominal_grid * nominal_grid));
  std::cout << DescribeModel(c, img_tokens).dump(2) << "\n";
  return absl::OkStatus();
}

absl::Status ApplyOverrides(const Flags& flags, ModelConfig& c) {
  ASSIGN_OR_RETURN(c.patch_size, flags.Int("patch_size", c.patch_size));
  ASSIGN_OR_RETURN(c.in_channels, flags.Int("in_channels", c.in_channels));
  ASSIGN_OR_RETURN(int64_t img_dim, flags.Int("img_dim", 0));
  if (img_dim > 0) {
    if (img_dim % (c.patch_size * c.patch_size) != 0) {
      return absl::InvalidArgumentError(absl::StrCat("--img_dim ", img_dim, " is not channels x patch_size^2"));
    }
    c.in_channels = img_dim / (c.patch_size * c.patch_size);
  }
  ASSIGN_OR_RETURN(c.out_channels,
                   flags.Int("out_channels", flags.Has("in_channels") || img_dim > 0 ? c.in_channels : c.out_channels));
  ASSIGN_OR_RETURN(c.num_layers, flags.Int("depth", c.num_layers));
  ASSIGN_OR_RETURN(int64_t heads, flags.Int("num_heads", c.num_attention_heads));
  ASSIGN_OR_RETURN(int64_t hidden, flags.Int("hidden_size", c.hidden()));
  if (heads < 1 || hidden % heads != 0) {
    return absl::InvalidArgumentError(absl::StrCat("--hidden_size ", hidden, " must divide into --num_heads ", heads));
  }
  c.num_attention_heads = heads;
  c.attention_head_dim = hidden / heads;
  c.caption_projection_dim = hidden;
  ASSIGN_OR_RETURN(c.mlp_ratio, flags.Double("mlp_ratio", c.mlp_ratio));
  ASSIGN_OR_RETURN(c.joint_attention_dim, flags.Int("txt_dim", c.joint_attention_dim));
  ASSIGN_OR_RETURN(c.pooled_projection_dim, flags.Int("cond_dim", c.pooled_projection_dim));
  ASSIGN_OR_RETURN(c.sample_size, flags.Int("sample_size", c.sample_size));
  if (flags.Has("pos_embed_max_size")) {
    ASSIGN_OR_RETURN(int64_t size, flags.Int("pos_embed_max_size", 0));
    c.pos_embed_max_size = size > 0 ? std::optional<int64_t>(size) : std::nullopt;
  }
  ASSIGN_OR_RETURN(c.qk_norm, flags.Bool("qk_norm", c.qk_norm));
  // Layers removed by --depth leave the dual-attention list.
  std::erase_if(c.dual_attention_layers, [&](int64_t layer) { return layer >= c.num_layers; });
  return ValidateModelConfig(c);
}

absl::Status Init(const Flags& flags) {
  ASSIGN_OR_RETURN(std::string out_dir, flags.RequiredString("out"));
  ASSIGN_OR_RETURN(std::string preset, flags.RequiredString("preset"));
  ASSIGN_OR_RETURN(int64_t seed, flags.RequiredInt("seed"));
  ASSIGN_OR_RETURN(ModelConfig config, PresetConfig(preset));
  RETURN_IF_ERROR(ApplyOverrides(flags, config));
  const std::string dtype_name = flags.String("weights_dtype", "f32");
  const std::map<std::string, DType> dtypes = {{"f32", DType::kF32}, {"bf16", DType::kBF16}, {"f16", DType::kF16}};
  if (!dtypes.contains(dtype_name)) {
    return absl::InvalidArgumentError(absl::StrCat("--weights_dtype must be f32, bf16 or f16, got '", dtype_name, "'"));
  }
  return WriteRandomModel(out_dir, config, static_cast<uint64_t>(seed), dtypes.at(dtype_name));
}

double Percentile(std::vector<double> values, double q) {
  std::sort(values.begin(), values.end());
  const double at = q * (values.size() - 1);
  const size_t low = static_cast<size_t>(at);
  const size_t high = std::min(low + 1, values.size() - 1);
  return values[low] + (at - low) * (values[high] - values[low]);
}

absl::Status Bench(const Flags& flags) {
  RETURN_IF_ERROR(SetThreads(flags));
  ASSIGN_OR_RETURN(std::string model_dir, flags.RequiredString("model"));
  ASSIGN_OR_RETURN(int64_t batch, flags.RequiredInt("batch"));
  ASSIGN_OR_RETURN(int64_t txt_tokens, flags.RequiredInt("txt_tokens"));
  ASSIGN_OR_RETURN(int64_t iters, flags.Int("iters", 10));
  ASSIGN_OR_RETURN(int64_t warmup, flags.Int("warmup", 2));
  if (batch < 1 || txt_tokens < 1 || iters < 1 || warmup < 0) {
    return absl::InvalidArgumentError("--batch, --txt_tokens and --iters must be >= 1, --warmup >= 0");
  }
  ASSIGN_OR_RETURN(int64_t baseline_batch, flags.Int("baseline_batch", 0));  // 0: no baseline
  if (flags.Has("baseline_batch") && (baseline_batch < 1 || baseline_batch > batch)) {
    return absl::InvalidArgumentError(
        absl::StrCat("--baseline_batch must be between 1 and --batch (", batch, "), got ", baseline_batch));
  }
  ASSIGN_OR_RETURN(EngineOptions options, ReadEngineOptions(flags));
  ASSIGN_OR_RETURN(std::unique_ptr<Engine> engine, Engine::Load(model_dir, options));
  const ModelConfig& c = engine->config();
  Shape img_shape;
  if (flags.Has("latent") == flags.Has("img_tokens")) {
    return absl::InvalidArgumentError("give exactly one of --img_tokens N (token form) or --latent C,H,W");
  }
  if (flags.Has("latent")) {
    ASSIGN_OR_RETURN(img_shape, flags.IntList("latent"));
  } else {
    ASSIGN_OR_RETURN(int64_t tokens, flags.RequiredInt("img_tokens"));
    img_shape = {tokens, c.patch_features()};
  }
  std::mt19937 rng(0);
  std::normal_distribution<float> normal;
  auto random_tensor = [&](Shape shape) {
    Tensor t(std::move(shape));
    for (float& v : t.data) v = normal(rng);
    return t;
  };
  std::vector<Tensor> storage;
  std::vector<SampleInput> samples;
  storage.reserve(3 * batch);
  for (int64_t b = 0; b < batch; ++b) {
    storage.push_back(random_tensor(img_shape));
    storage.push_back(random_tensor({txt_tokens, c.joint_attention_dim}));
    storage.push_back(random_tensor({c.pooled_projection_dim}));
    const size_t at = storage.size() - 3;
    samples.push_back({storage[at], storage[at + 1], 1000.0f * (b + 1) / (batch + 1), storage[at + 2]});
  }
  std::vector<SampleTokens> tokens;
  for (const SampleInput& s : samples) {
    RETURN_IF_ERROR(engine->ValidateSample(s));
    tokens.push_back(engine->TokensOf(s));
  }
  // With --baseline_batch, each iteration also runs a forward of the first baseline_batch
  // samples, just before the full one: the two are compared under the same conditions (this
  // VM's speed drifts by 5-10 % over minutes, enough to decide a ratio measured in two runs).
  const absl::Span<const SampleInput> baseline_samples = absl::MakeConstSpan(samples).first(baseline_batch);
  auto time_forward_ms = [&engine](absl::Span<const SampleInput> forward_samples) -> absl::StatusOr<double> {
    const auto start = std::chrono::steady_clock::now();
    RETURN_IF_ERROR(engine->Forward(forward_samples).status());
    return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
  };
  std::vector<double> times_ms, baseline_times_ms;
  for (int64_t i = 0; i < warmup + iters; ++i) {
    if (baseline_batch > 0) {
      ASSIGN_OR_RETURN(double baseline_ms, time_forward_ms(baseline_samples));
      if (i >= warmup) baseline_times_ms.push_back(baseline_ms);
    }
    ASSIGN_OR_RETURN(double ms, time_forward_ms(samples));
    if (i >= warmup) times_ms.push_back(ms);
  }
  const double gflop = ForwardFlops(c, tokens) / 1e9, median = Percentile(times_ms, 0.5);
  json result = {
      {"batch", batch},
      {"dtype", ComputeDTypeName(options.compute)},
      {"img_shape", img_shape},
      {"txt_tokens", txt_tokens},
      {"threads", omp_get_max_threads()},
      {"median_ms", median},
      // Throughput over many passes is 1 / mean; the tail of a noisy VM makes it exceed the median.
      {"mean_ms", std::accumulate(times_ms.begin(), times_ms.end(), 0.0) / times_ms.size()},
      {"p10_ms", Percentile(times_ms, 0.1)},
      {"p90_ms", Percentile(times_ms, 0.9)},
      {"gflop_per_forward", gflop},
      {"gflops", gflop / (median / 1e3)},
  };
  if (baseline_batch > 0) {
    const double baseline_median = Percentile(baseline_times_ms, 0.5);
    result["baseline_batch"] = baseline_batch;
    result["baseline_median_ms"] = baseline_median;
    result["baseline_p10_ms"] = Percentile(baseline_times_ms, 0.1);
    result["baseline_p90_ms"] = Percentile(baseline_times_ms, 0.9);
    // Samples per second at --batch over those at --baseline_batch, from the medians.
    result["throughput_over_baseline"] = (batch / median) / (baseline_batch / baseline_median);
  }
  ASSIGN_OR_RETURN(bool roofline, flags.Bool("roofline", false));
  if (roofline) {
    // The same forward's products replayed alone, in this process, right after the forwards.
    std::vector<MatmulCall> calls;
    RETURN_IF_ERROR(engine->Forward(samples, &calls).status());
    double matmul_gflop = 0;
    for (const MatmulCall& call : calls) matmul_gflop += 2.0 * call.rows * call.in * call.out / 1e9;
    // The roofline is oneDNN's matmul alone; the products as the engine runs them (on
    // PanelGemm) are timed too, for how much of the forward is not products.
    ASSIGN_OR_RETURN(double matmul_ms, StandaloneMatmulMs(options.compute, calls, static_cast<int>(iters), false));
    ASSIGN_OR_RETURN(double products_ms, StandaloneMatmulMs(options.compute, calls, static_cast<int>(iters), true));
    result["matmuls"] = calls.size();
    result["matmul_gflop"] = matmul_gflop;
    result["standalone_matmul_ms"] = matmul_ms;
    result["standalone_matmul_gflops"] = matmul_gflop / (matmul_ms / 1e3);
    result["forward_over_standalone_matmuls"] = median / matmul_ms;
    result["standalone_products_ms"] = products_ms;
    result["forward_over_standalone_products"] = median / products_ms;
  }
  std::cout << result.dump() << "\n";
  return absl::OkStatus();
}

struct Command {
  const char* name;
  absl::Status (*run)(const Flags&);
  std::set<std::string> flags;
};

int Main(int argc, char** argv) {
  const Command commands[] = {
      {"forward", Forward, {"model", "img_latent", "txt_embed", "timestep", "pooled_text", "out", "threads", "dtype"}},
      {"inspect", Inspect, {"model", "img_tokens"}},
      {"init",
       Init,
       {"out", "preset", "seed", "weights_dtype", "hidden_size", "depth", "num_heads", "mlp_ratio", "img_dim",
        "txt_dim", "cond_dim", "patch_size", "in_channels", "out_channels", "pos_embed_max_size", "sample_size",
        "qk_norm"}},
      {"bench",
       Bench,
       {"model", "batch", "img_tokens", "latent", "txt_tokens", "iters", "warmup", "threads", "dtype", "roofline",
        "baseline_batch"}},
  };
  if (argc < 2 || std::string(argv[1]) == "--help" || std::string(argv[1]) == "help") {
    std::cerr << kUsage;
    return argc < 2 ? 2 : 0;
  }
  for (const Command& command : commands) {
    if (argv[1] != std::string(command.name)) continue;
    auto flags = Flags::Parse(std::vector<std::string>(argv + 2, argv + argc), command.flags);
    absl::Status status = flags.ok() ? command.run(*flags) : flags.status();
    if (status.ok()) return 0;
    std::cerr << "mmdit " << command.name << ": " << status.message() << "\n";
    return IsUsageError(status) ? 2 : 1;
  }
  std::cerr << "mmdit: unknown command '" << argv[1] << "'\n" << kUsage;
  return 2;
}

}  // namespace
}  // namespace mmdit

int main(int argc, char** argv) { return mmdit::Main(argc, argv); }
