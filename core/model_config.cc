#include "core/model_config.h"

#include <algorithm>
#include <cmath>
#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "core/status_macros.h"
#include "nlohmann/json.hpp"

namespace mmdit {
namespace {

using json = nlohmann::json;

absl::Status KeyError(const std::string& what, const std::string& key, const std::string& problem) {
  return absl::InvalidArgumentError(absl::StrCat(what, ": config key '", key, "' ", problem));
}

// Reads integer `key`; absent or null leaves `out` alone unless `required`.
absl::Status ReadInt(const json& root, const std::string& key, bool required, const std::string& what, int64_t* out) {
  const auto it = root.find(key);
  if (it == root.end() || it->is_null()) {
    return required ? KeyError(what, key, "is missing") : absl::OkStatus();
  }
  if (!it->is_number_integer()) return KeyError(what, key, absl::StrCat("must be an integer, got ", it->dump()));
  *out = it->get<int64_t>();
  return absl::OkStatus();
}

// Far above any real model (SD3.5-large: D 2432, 38 layers, J 4096), and small enough that
// products of two or three sizes (D = heads x head_dim, M x M, C x p x p) cannot overflow.
constexpr int64_t kMaxSize = int64_t{1} << 20;
constexpr double kMaxMlpRatio = 64;

absl::Status Positive(const std::string& what, const std::string& key, int64_t value) {
  if (value < 1) return KeyError(what, key, absl::StrCat("must be >= 1, got ", value));
  if (value > kMaxSize) return KeyError(what, key, absl::StrCat("is ", value, "; the engine takes at most ", kMaxSize));
  return absl::OkStatus();
}

absl::Status Validate(const ModelConfig& c, const std::string& what) {
  const std::pair<const char*, int64_t> positives[] = {
      {"patch_size", c.patch_size},
      {"in_channels", c.in_channels},
      {"out_channels", c.out_channels},
      {"num_layers", c.num_layers},
      {"attention_head_dim", c.attention_head_dim},
      {"num_attention_heads", c.num_attention_heads},
      {"joint_attention_dim", c.joint_attention_dim},
      {"caption_projection_dim", c.caption_projection_dim},
      {"pooled_projection_dim", c.pooled_projection_dim},
  };
  for (const auto& [key, value] : positives) RETURN_IF_ERROR(Positive(what, key, value));
  if (c.pos_embed_max_size) RETURN_IF_ERROR(Positive(what, "pos_embed_max_size", *c.pos_embed_max_size));
  if (c.num_attention_heads * c.attention_head_dim != c.caption_projection_dim) {
    return KeyError(what, "caption_projection_dim",
                    absl::StrCat("is ", c.caption_projection_dim,
                                 " but num_attention_heads x attention_head_dim = ", c.num_attention_heads, " x ",
                                 c.attention_head_dim, " = ", c.num_attention_heads * c.attention_head_dim));
  }
  const double mlp_width = c.mlp_ratio * c.hidden();
  if (!(c.mlp_ratio > 0) || !(c.mlp_ratio <= kMaxMlpRatio) || mlp_width != std::floor(mlp_width)) {
    return KeyError(what, "mlp_ratio",
                    absl::StrCat("must be in (0, ", kMaxMlpRatio, "] and give a whole MLP width; ", c.mlp_ratio, " x ",
                                 c.hidden(), " = ", mlp_width));
  }
  for (int64_t layer : c.dual_attention_layers) {
    if (layer < 0 || layer >= c.num_layers) {
      return KeyError(what, "dual_attention_layers",
                      absl::StrCat("names layer ", layer, "; layers are 0..", c.num_layers - 1));
    }
  }
  return absl::OkStatus();
}

}  // namespace

bool ModelConfig::IsDualAttention(int64_t layer) const {
  return std::find(dual_attention_layers.begin(), dual_attention_layers.end(), layer) != dual_attention_layers.end();
}

absl::StatusOr<ModelConfig> ParseModelConfig(std::string_view json_text, const std::string& what) {
  const json root = json::parse(json_text, /*cb=*/nullptr, /*allow_exceptions=*/false);
  if (root.is_discarded() || !root.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": not a JSON object"));
  }
  ModelConfig c;
  RETURN_IF_ERROR(ReadInt(root, "patch_size", true, what, &c.patch_size));
  RETURN_IF_ERROR(ReadInt(root, "in_channels", true, what, &c.in_channels));
  c.out_channels = c.in_channels;
  RETURN_IF_ERROR(ReadInt(root, "out_channels", false, what, &c.out_channels));
  RETURN_IF_ERROR(ReadInt(root, "num_layers", true, what, &c.num_layers));
  RETURN_IF_ERROR(ReadInt(root, "attention_head_dim", true, what, &c.attention_head_dim));
  RETURN_IF_ERROR(ReadInt(root, "num_attention_heads", true, what, &c.num_attention_heads));
  RETURN_IF_ERROR(ReadInt(root, "joint_attention_dim", true, what, &c.joint_attention_dim));
  RETURN_IF_ERROR(ReadInt(root, "caption_projection_dim", false, what, &c.caption_projection_dim));
  if (c.caption_projection_dim == 0 && c.num_attention_heads <= kMaxSize && c.attention_head_dim <= kMaxSize) {
    c.caption_projection_dim = c.hidden();  // absent: D follows from the heads (bounded: no overflow)
  }
  RETURN_IF_ERROR(ReadInt(root, "pooled_projection_dim", true, what, &c.pooled_projection_dim));
  RETURN_IF_ERROR(ReadInt(root, "sample_size", false, what, &c.sample_size));
  int64_t max_size = 0;
  RETURN_IF_ERROR(ReadInt(root, "pos_embed_max_size", false, what, &max_size));
  if (root.contains("pos_embed_max_size") && !root["pos_embed_max_size"].is_null()) c.pos_embed_max_size = max_size;

  if (const auto it = root.find("qk_norm"); it != root.end() && !it->is_null()) {
    if (!it->is_string() || it->get<std::string>() != "rms_norm") {
      return KeyError(what, "qk_norm", absl::StrCat("must be null or \"rms_norm\", got ", it->dump()));
    }
    c.qk_norm = true;
  }
  if (const auto it = root.find("dual_attention_layers"); it != root.end() && !it->is_null()) {
    if (!it->is_array()) return KeyError(what, "dual_attention_layers", "must be a list of layer indices");
    for (const json& layer : *it) {
      if (!layer.is_number_integer()) {
        return KeyError(what, "dual_attention_layers", absl::StrCat("must hold integers, got ", layer.dump()));
      }
      c.dual_attention_layers.push_back(layer.get<int64_t>());
    }
  }
  if (const auto it = root.find("context_pre_only_last"); it != root.end() && !it->is_null()) {
    if (!it->is_boolean())
      return KeyError(what, "context_pre_only_last", absl::StrCat("must be true or false, got ", it->dump()));
    c.context_pre_only_last = it->get<bool>();
  }
  if (const auto it = root.find("mlp_ratio"); it != root.end() && !it->is_null()) {
    if (!it->is_number()) return KeyError(what, "mlp_ratio", absl::StrCat("must be a number, got ", it->dump()));
    c.mlp_ratio = it->get<double>();
  }
  RETURN_IF_ERROR(Validate(c, what));
  return c;
}

absl::StatusOr<ModelConfig> ReadModelConfig(const std::string& path) {
  std::ifstream file(path);
  if (!file) return absl::NotFoundError(absl::StrCat(path, ": cannot open"));
  std::stringstream text;
  text << file.rdbuf();
  return ParseModelConfig(text.str(), path);
}

absl::Status ValidateModelConfig(const ModelConfig& config) { return Validate(config, "model config"); }

std::string ModelConfigToJson(const ModelConfig& c) {
  json root = {
      {"_class_name", "SD3Transformer2DModel"},
      {"sample_size", c.sample_size},
      {"patch_size", c.patch_size},
      {"in_channels", c.in_channels},
      {"out_channels", c.out_channels},
      {"num_layers", c.num_layers},
      {"attention_head_dim", c.attention_head_dim},
      {"num_attention_heads", c.num_attention_heads},
      {"joint_attention_dim", c.joint_attention_dim},
      {"caption_projection_dim", c.caption_projection_dim},
      {"pooled_projection_dim", c.pooled_projection_dim},
      {"pos_embed_max_size", c.pos_embed_max_size ? json(*c.pos_embed_max_size) : json(nullptr)},
      {"qk_norm", c.qk_norm ? json("rms_norm") : json(nullptr)},
      {"dual_attention_layers", c.dual_attention_layers},
      {"context_pre_only_last", c.context_pre_only_last},
      {"mlp_ratio", c.mlp_ratio},
  };
  return root.dump(2) + "\n";
}

}  // namespace mmdit
