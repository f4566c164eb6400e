#include "core/checkpoint.h"

#include <filesystem>
#include <fstream>
#include <regex>
#include <set>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "core/status_macros.h"
#include "nlohmann/json.hpp"

namespace mmdit {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

constexpr char kStabilityPrefix[] = "model.diffusion_model.";

absl::StatusOr<TensorMap> ReadShards(const fs::path& index_path) {
  std::ifstream file(index_path);
  std::stringstream text;
  text << file.rdbuf();
  const json index = json::parse(text.str(), nullptr, /*allow_exceptions=*/false);
  if (index.is_discarded() || !index.is_object() || !index.contains("weight_map") || !index["weight_map"].is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(index_path.string(), ": not a JSON object with a weight_map"));
  }
  std::map<std::string, std::set<std::string>> names_by_shard;
  for (const auto& [name, shard] : index["weight_map"].items()) {
    if (!shard.is_string() || shard.get<std::string>().find('/') != std::string::npos) {
      return absl::InvalidArgumentError(
          absl::StrCat(index_path.string(), ": weight_map entry '", name, "' must name a file beside the index"));
    }
    names_by_shard[shard.get<std::string>()].insert(name);
  }
  TensorMap all;
  for (const auto& [shard, names] : names_by_shard) {
    const fs::path shard_path = index_path.parent_path() / shard;
    ASSIGN_OR_RETURN(TensorMap tensors, OpenSafetensors(shard_path.string()));
    for (const std::string& name : names) {
      if (!tensors.contains(name)) {
        return absl::InvalidArgumentError(
            absl::StrCat(index_path.string(), ": tensor '", name, "' is listed in ", shard, " but not stored there"));
      }
    }
    for (auto& [name, tensor] : tensors) {
      if (!names.contains(name)) {
        return absl::InvalidArgumentError(
            absl::StrCat(shard_path.string(), ": tensor '", name, "' is not listed for this shard in the index"));
      }
      all.emplace(name, std::move(tensor));
    }
  }
  return all;
}

// Splits rows [0, n/parts), [n/parts, 2n/parts), ... of a [n, ...] or [n] tensor (unread
// parts of an unread tensor).
std::vector<Tensor> SplitRows(const Tensor& t, int parts) {
  std::vector<Tensor> out;
  Shape part_shape = t.shape;
  part_shape[0] /= parts;
  const int64_t part_size = NumElements(part_shape);
  for (int i = 0; i < parts; ++i) out.push_back(ElementRange(t, part_shape, i * part_size));
  return out;
}

// [shift, scale] rows -> [scale, shift] rows.
Tensor SwapHalves(const Tensor& t) {
  std::vector<Tensor> halves = SplitRows(t, 2);
  return Concatenate(std::move(halves[1]), std::move(halves[0]), t.shape);
}

// The Stability names of one joint block's stream, relative to `joint_blocks.i.{x,context}_block.`,
// and their diffusers names relative to `transformer_blocks.i.`.
struct StreamNames {
  const char* modulation;
  const char* qkv[3];
  const char* proj;
  const char* ln_q;
  const char* ln_k;
  const char* fc1;
  const char* fc2;
};
constexpr StreamNames kImageNames = {"norm1.linear",  {"attn.to_q", "attn.to_k", "attn.to_v"},
                                     "attn.to_out.0", "attn.norm_q",
                                     "attn.norm_k",   "ff.net.0.proj",
                                     "ff.net.2"};
constexpr StreamNames kTextNames = {"norm1_context.linear", {"attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"},
                                    "attn.to_add_out",      "attn.norm_added_q",
                                    "attn.norm_added_k",    "ff_context.net.0.proj",
                                    "ff_context.net.2"};
constexpr StreamNames kDualNames = {
    nullptr, {"attn2.to_q", "attn2.to_k", "attn2.to_v"}, "attn2.to_out.0", "attn2.norm_q", "attn2.norm_k", nullptr,
    nullptr};

// Renames one Stability tensor into `out`; returns false when the name is not one it knows.
// `hidden` (D) tells the context-pre-only block's [2D, D] text modulation from a full [6D, D] one.
// Moves from `tensor` only when it returns true.
bool RenameStability(const std::string& name, int64_t hidden, Tensor& tensor, TensorMap& out) {
  static const std::map<std::string, std::string> kTopLevel = {
      {"x_embedder.proj", "pos_embed.proj"},
      {"t_embedder.mlp.0", "time_text_embed.timestep_embedder.linear_1"},
      {"t_embedder.mlp.2", "time_text_embed.timestep_embedder.linear_2"},
      {"y_embedder.mlp.0", "time_text_embed.text_embedder.linear_1"},
      {"y_embedder.mlp.2", "time_text_embed.text_embedder.linear_2"},
      {"context_embedder", "context_embedder"},
      {"final_layer.linear", "proj_out"},
  };
  if (name == "pos_embed") {
    out.emplace("pos_embed.pos_embed", std::move(tensor));
    return true;
  }
  static const std::regex kParam(R"((.*)\.(weight|bias))");
  std::smatch param;
  if (!std::regex_match(name, param, kParam)) return false;
  const std::string module = param[1], suffix = "." + param[2].str();
  const bool splits_in_2 = !tensor.shape.empty() && tensor.shape[0] % 2 == 0;
  const bool splits_in_3 = !tensor.shape.empty() && tensor.shape[0] % 3 == 0;
  if (module == "final_layer.adaLN_modulation.1" && splits_in_2) {
    out.emplace("norm_out.linear" + suffix, SwapHalves(tensor));
    return true;
  }
  if (const auto it = kTopLevel.find(module); it != kTopLevel.end()) {
    out.emplace(it->second + suffix, std::move(tensor));
    return true;
  }
  static const std::regex kBlock(R"(joint_blocks\.(\d+)\.(x_block|context_block)\.(.*))");
  std::smatch block;
  if (!std::regex_match(module, block, kBlock)) return false;
  const std::string prefix = absl::StrCat("transformer_blocks.", block[1].str(), ".");
  const bool image = block[2] == "x_block";
  std::string rest = block[3];
  const bool dual = rest.starts_with("attn2.");
  if (dual) {
    rest = rest.substr(6);
  } else if (rest.starts_with("attn.")) {
    rest = rest.substr(5);  // attn.qkv -> qkv; mlp.fc1 stays
  }
  const StreamNames& names = dual ? kDualNames : (image ? kImageNames : kTextNames);
  if (rest == "qkv" && splits_in_3) {
    std::vector<Tensor> parts = SplitRows(tensor, 3);
    for (int i = 0; i < 3; ++i) out.emplace(prefix + names.qkv[i] + suffix, std::move(parts[i]));
    return true;
  }
  if (rest == "adaLN_modulation.1" && names.modulation != nullptr) {
    // The context-pre-only last block's text modulation is [shift, scale]: [2D, D] weight, [2D] bias.
    const bool pre_only = !image && splits_in_2 && tensor.shape[0] == 2 * hidden;
    out.emplace(prefix + names.modulation + suffix, pre_only ? SwapHalves(tensor) : std::move(tensor));
    return true;
  }
  const std::pair<const char*, const char*> simple[] = {
      {"proj", names.proj}, {"ln_q", names.ln_q}, {"ln_k", names.ln_k}, {"mlp.fc1", names.fc1}, {"mlp.fc2", names.fc2}};
  for (const auto& [from, to] : simple) {
    if (rest == from && to != nullptr) {
      out.emplace(prefix + to + suffix, std::move(tensor));
      return true;
    }
  }
  return false;
}

bool IsStabilityLayout(const TensorMap& tensors) {
  for (const auto& [name, tensor] : tensors) {
    std::string_view bare = name;
    if (bare.starts_with(kStabilityPrefix)) bare.remove_prefix(sizeof(kStabilityPrefix) - 1);
    if (bare.starts_with("joint_blocks.") || bare.starts_with("x_embedder.") || bare.starts_with("final_layer.")) {
      return true;
    }
  }
  return false;
}

}  // namespace

absl::StatusOr<TensorMap> ReadCheckpoint(const std::string& model_dir) {
  const fs::path dir(model_dir);
  for (const char* single : {"model.safetensors", "diffusion_pytorch_model.safetensors"}) {
    if (fs::exists(dir / single)) return OpenSafetensors((dir / single).string());
  }
  const fs::path index = dir / "diffusion_pytorch_model.safetensors.index.json";
  if (fs::exists(index)) return ReadShards(index);
  return absl::NotFoundError(
      absl::StrCat(model_dir,
                   ": no weights (looked for model.safetensors, diffusion_pytorch_model.safetensors and "
                   "diffusion_pytorch_model.safetensors.index.json)"));
}

absl::StatusOr<TensorMap> ToDiffusersNames(TensorMap tensors, int64_t hidden) {
  if (!IsStabilityLayout(tensors)) return tensors;
  TensorMap renamed;
  for (auto& [stored_name, tensor] : tensors) {
    std::string name = stored_name;
    if (name.starts_with(kStabilityPrefix)) name = name.substr(sizeof(kStabilityPrefix) - 1);
    const size_t before = renamed.size();
    const bool known = RenameStability(name, hidden, tensor, renamed);
    if (!known) renamed.emplace(stored_name, std::move(tensor));
    // Every stored tensor adds one name (a fused qkv three); fewer means two names met.
    const bool fused_qkv = known && (name.ends_with(".qkv.weight") || name.ends_with(".qkv.bias"));
    if (renamed.size() != before + (fused_qkv ? 3 : 1)) {
      return absl::InvalidArgumentError(
          absl::StrCat("checkpoint holds '", stored_name, "' and another tensor that maps to the same name"));
    }
  }
  return renamed;
}

}  // namespace mmdit
