// Text encoders: a prompt in, the model's conditioning out (txt_embed [T, J], pooled_text [P]).
// SD3's encoders are CLIP-L, CLIP-G and T5-XXL; serving those would be later implementations of
// TextEncoder. The first is LookupTextEncoder, the digits model's vocabulary and embedding
// tables, trained with the model (training/train_digits.py; training/lookup_text_encoder.py is
// the same encoder in Python).
#pragma once

#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "core/tensor.h"

namespace mmdit {

struct EncodedPrompt {
  Tensor txt_embed;    // [T, J]
  Tensor pooled_text;  // [P]
};

// What a client needs to know to write prompts (GetModelInfo reports it).
struct TextEncoderSummary {
  std::string kind;         // the config's _class_name, e.g. "LookupTextEncoder"
  std::string description;  // e.g. "lookup table, 26 words, 4 tokens"
  int64_t max_tokens = 0;   // txt_embed's T
  int64_t joint_attention_dim = 0, pooled_projection_dim = 0;  // txt_embed's J, pooled_text's P
  std::vector<std::string> words;  // the words a prompt may use; empty for an open vocabulary
};

class TextEncoder {
 public:
  virtual ~TextEncoder() = default;
  // Errors: InvalidArgument naming the problem (a word outside the vocabulary, too many words).
  // The empty prompt is the unconditional one (the negative prompt's default).
  virtual absl::StatusOr<EncodedPrompt> Encode(std::string_view prompt) const = 0;
  virtual TextEncoderSummary Summary() const = 0;
};

// A model directory's `text_encoder/`: `config.json` ({"_class_name": "LookupTextEncoder",
// "vocabulary": [...], "max_tokens": T, "joint_attention_dim": J, "pooled_projection_dim": P})
// and `model.safetensors` (`token_embedding [V, J]`, `pooled_embedding [V, P]`, V the
// vocabulary's size). Row 0 belongs to the empty prompt: it pads txt_embed to T rows and is the
// pooled vector of a prompt without words.
//
// A prompt is split into words at ASCII whitespace and punctuation and lowercased (ASCII
// letters only). txt_embed: the words' token rows, then row 0 up to T. pooled_text: the mean
// of the words' pooled rows (a float32 sum in word order, divided by the count).
class LookupTextEncoder final : public TextEncoder {
 public:
  // Errors: NotFound (no config.json), InvalidArgument (malformed JSON, missing keys, an empty
  // or duplicated vocabulary word, tables whose shapes disagree with the config), naming the file.
  static absl::StatusOr<std::unique_ptr<LookupTextEncoder>> Load(const std::string& dir);

  absl::StatusOr<EncodedPrompt> Encode(std::string_view prompt) const override;
  TextEncoderSummary Summary() const override;

 private:
  LookupTextEncoder() = default;
  std::vector<std::string> vocabulary_;
  int64_t max_tokens_ = 0;
  Tensor token_embedding_;   // [V, J]
  Tensor pooled_embedding_;  // [V, P]
};

// The text encoder of `model_dir` (its `text_encoder/` subdirectory), or nullptr when it has
// none. Errors: those of the encoder's Load, and InvalidArgument for an unknown _class_name or
// widths that differ from the model's `joint_attention_dim` / `pooled_projection_dim`.
absl::StatusOr<std::unique_ptr<TextEncoder>> LoadTextEncoder(const std::string& model_dir, int64_t joint_attention_dim,
                                                             int64_t pooled_projection_dim);

}  // namespace mmdit
