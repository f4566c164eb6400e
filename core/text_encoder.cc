#include "core/text_encoder.h"

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <set>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "core/safetensors.h"
#include "core/status_macros.h"
#include "nlohmann/json.hpp"

namespace mmdit {
namespace {

using json = nlohmann::json;

bool IsSeparator(char c) { return absl::ascii_isspace(c) || absl::ascii_ispunct(c); }

std::vector<std::string> SplitWords(std::string_view prompt) {
  std::vector<std::string> words;
  std::string current;
  for (char c : prompt) {
    if (IsSeparator(c)) {
      if (!current.empty()) words.push_back(std::move(current));
      current.clear();
    } else {
      current.push_back(absl::ascii_tolower(c));
    }
  }
  if (!current.empty()) words.push_back(std::move(current));
  return words;
}

absl::StatusOr<json> ReadJson(const std::filesystem::path& path) {
  std::ifstream file(path);
  if (!file) return absl::NotFoundError(absl::StrCat(path.string(), ": cannot open"));
  json parsed = json::parse(file, nullptr, /*allow_exceptions=*/false);
  if (parsed.is_discarded() || !parsed.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(path.string(), ": not a JSON object"));
  }
  return parsed;
}

absl::StatusOr<int64_t> PositiveInt(const json& config, const char* key, const std::string& file) {
  auto it = config.find(key);
  if (it == config.end() || !it->is_number_integer() || it->get<int64_t>() < 1) {
    return absl::InvalidArgumentError(absl::StrCat(file, ": '", key, "' must be an integer >= 1"));
  }
  return it->get<int64_t>();
}

absl::StatusOr<Tensor> TakeTable(TensorMap& tables, const std::string& name, const Shape& shape,
                                 const std::string& file) {
  auto it = tables.find(name);
  if (it == tables.end()) return absl::InvalidArgumentError(absl::StrCat(file, ": missing '", name, "'"));
  if (it->second.shape != shape) {
    return absl::InvalidArgumentError(absl::StrCat(file, ": '", name, "' has shape ", ShapeString(it->second.shape),
                                                   ", expected ", ShapeString(shape)));
  }
  it->second.Load();
  return std::move(it->second);
}

}  // namespace

absl::StatusOr<std::unique_ptr<LookupTextEncoder>> LookupTextEncoder::Load(const std::string& dir) {
  const std::filesystem::path config_path = std::filesystem::path(dir) / "config.json";
  const std::string config_file = config_path.string();
  ASSIGN_OR_RETURN(json config, ReadJson(config_path));
  std::unique_ptr<LookupTextEncoder> encoder(new LookupTextEncoder());
  ASSIGN_OR_RETURN(encoder->max_tokens_, PositiveInt(config, "max_tokens", config_file));
  ASSIGN_OR_RETURN(int64_t joint_attention_dim, PositiveInt(config, "joint_attention_dim", config_file));
  ASSIGN_OR_RETURN(int64_t pooled_projection_dim, PositiveInt(config, "pooled_projection_dim", config_file));
  auto vocabulary = config.find("vocabulary");
  if (vocabulary == config.end() || !vocabulary->is_array() || vocabulary->size() < 2) {
    return absl::InvalidArgumentError(
        absl::StrCat(config_file, ": 'vocabulary' must be a list of words (row 0 the empty prompt's, then >= 1 word)"));
  }
  std::set<std::string> seen;
  for (const json& word : *vocabulary) {
    if (!word.is_string()) return absl::InvalidArgumentError(absl::StrCat(config_file, ": a vocabulary entry is not a string"));
    const std::string text = word.get<std::string>();
    // Row 0 is a placeholder name; every other entry must be a word Encode can produce.
    if (!encoder->vocabulary_.empty() && (text.empty() || SplitWords(text) != std::vector<std::string>{text})) {
      return absl::InvalidArgumentError(
          absl::StrCat(config_file, ": vocabulary entry '", text, "' is not one lowercase word"));
    }
    if (!seen.insert(text).second) {
      return absl::InvalidArgumentError(absl::StrCat(config_file, ": vocabulary entry '", text, "' appears twice"));
    }
    encoder->vocabulary_.push_back(text);
  }
  const int64_t size = static_cast<int64_t>(encoder->vocabulary_.size());
  const std::string tables_file = (std::filesystem::path(dir) / "model.safetensors").string();
  ASSIGN_OR_RETURN(TensorMap tables, OpenSafetensors(tables_file));
  ASSIGN_OR_RETURN(encoder->token_embedding_,
                   TakeTable(tables, "token_embedding", Shape{size, joint_attention_dim}, tables_file));
  ASSIGN_OR_RETURN(encoder->pooled_embedding_,
                   TakeTable(tables, "pooled_embedding", Shape{size, pooled_projection_dim}, tables_file));
  return encoder;
}

absl::StatusOr<EncodedPrompt> LookupTextEncoder::Encode(std::string_view prompt) const {
  const std::vector<std::string> words = SplitWords(prompt);
  if (static_cast<int64_t>(words.size()) > max_tokens_) {
    return absl::InvalidArgumentError(
        absl::StrCat("has ", words.size(), " words; the text encoder takes at most ", max_tokens_));
  }
  std::vector<int64_t> rows;
  for (const std::string& word : words) {
    auto it = std::find(vocabulary_.begin() + 1, vocabulary_.end(), word);
    if (it == vocabulary_.end()) {
      return absl::InvalidArgumentError(absl::StrCat("word '", word, "' is not in the text encoder's vocabulary (",
                                                     vocabulary_.size() - 1, " words; GetModelInfo lists them)"));
    }
    rows.push_back(it - vocabulary_.begin());
  }
  const int64_t width = token_embedding_.shape[1], pooled_width = pooled_embedding_.shape[1];
  EncodedPrompt encoded{Tensor(Shape{max_tokens_, width}), Tensor(Shape{pooled_width})};
  for (int64_t t = 0; t < max_tokens_; ++t) {
    const int64_t row = t < static_cast<int64_t>(rows.size()) ? rows[t] : 0;
    std::copy_n(token_embedding_.data.begin() + row * width, width, encoded.txt_embed.data.begin() + t * width);
  }
  std::vector<float>& pooled = encoded.pooled_text.data;
  if (rows.empty()) {
    std::copy_n(pooled_embedding_.data.begin(), pooled_width, pooled.begin());
    return encoded;
  }
  for (int64_t row : rows) {
    for (int64_t i = 0; i < pooled_width; ++i) pooled[i] += pooled_embedding_.data[row * pooled_width + i];
  }
  const float count = static_cast<float>(rows.size());
  for (float& value : pooled) value /= count;
  return encoded;
}

TextEncoderSummary LookupTextEncoder::Summary() const {
  return {"LookupTextEncoder",
          absl::StrCat("lookup table, ", vocabulary_.size() - 1, " words, ", max_tokens_, " tokens"),
          max_tokens_,
          token_embedding_.shape[1],
          pooled_embedding_.shape[1],
          std::vector<std::string>(vocabulary_.begin() + 1, vocabulary_.end())};
}

absl::StatusOr<std::unique_ptr<TextEncoder>> LoadTextEncoder(const std::string& model_dir, int64_t joint_attention_dim,
                                                             int64_t pooled_projection_dim) {
  const std::filesystem::path dir = std::filesystem::path(model_dir) / "text_encoder";
  if (!std::filesystem::exists(dir / "config.json")) return std::unique_ptr<TextEncoder>();
  ASSIGN_OR_RETURN(json config, ReadJson(dir / "config.json"));
  const auto class_entry = config.find("_class_name");
  const std::string class_name =
      class_entry != config.end() && class_entry->is_string() ? class_entry->get<std::string>() : "";
  if (class_name != "LookupTextEncoder") {
    return absl::InvalidArgumentError(absl::StrCat((dir / "config.json").string(), ": _class_name '", class_name,
                                                   "' is not a text encoder this server has (LookupTextEncoder)"));
  }
  ASSIGN_OR_RETURN(std::unique_ptr<LookupTextEncoder> encoder, LookupTextEncoder::Load(dir.string()));
  const TextEncoderSummary summary = encoder->Summary();
  const int64_t j = summary.joint_attention_dim, p = summary.pooled_projection_dim;
  if (j != joint_attention_dim || p != pooled_projection_dim) {
    return absl::InvalidArgumentError(absl::StrCat((dir / "config.json").string(), ": the encoder gives widths ", j,
                                                   " and ", p, "; the model takes joint_attention_dim ",
                                                   joint_attention_dim, " and pooled_projection_dim ",
                                                   pooled_projection_dim));
  }
  return std::unique_ptr<TextEncoder>(std::move(encoder));
}

}  // namespace mmdit
