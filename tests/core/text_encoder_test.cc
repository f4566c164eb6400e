// LookupTextEncoder on the digits model's committed tables (models/digits/text_encoder), and
// the errors of loading a broken one.
#include "core/text_encoder.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>

#include "core/safetensors.h"
#include "nlohmann/json.hpp"
#include "tests/core/test_util.h"

namespace mmdit::testing {
namespace {

using ::testing::HasSubstr;

constexpr int64_t kTokens = 4, kWidth = 32, kPooledWidth = 32;

struct Tables {
  std::vector<std::string> vocabulary;
  Tensor token_embedding, pooled_embedding;
  int64_t Row(const std::string& word) const {
    return std::find(vocabulary.begin(), vocabulary.end(), word) - vocabulary.begin();
  }
};

// The tables as the file holds them, read without the encoder.
Tables ReadTables() {
  const std::string dir = DigitsModelDir() + "/text_encoder";
  Tables tables;
  std::ifstream config_file(dir + "/config.json");
  const nlohmann::json config = nlohmann::json::parse(config_file);
  tables.vocabulary = config["vocabulary"].get<std::vector<std::string>>();
  auto map = ReadSafetensors(dir + "/model.safetensors");
  EXPECT_TRUE(map.ok()) << map.status();
  tables.token_embedding = std::move(map->at("token_embedding"));
  tables.pooled_embedding = std::move(map->at("pooled_embedding"));
  return tables;
}

std::unique_ptr<TextEncoder> Digits() {
  auto encoder = LoadTextEncoder(DigitsModelDir(), kWidth, kPooledWidth);
  EXPECT_TRUE(encoder.ok()) << encoder.status();
  EXPECT_NE(*encoder, nullptr);
  return std::move(*encoder);
}

std::vector<float> TokenRow(const Tables& t, int64_t row) {
  return {t.token_embedding.data.begin() + row * kWidth, t.token_embedding.data.begin() + (row + 1) * kWidth};
}
std::vector<float> PooledRow(const Tables& t, int64_t row) {
  return {t.pooled_embedding.data.begin() + row * kPooledWidth,
          t.pooled_embedding.data.begin() + (row + 1) * kPooledWidth};
}
std::vector<float> EncodedTokenRow(const EncodedPrompt& e, int64_t t) {
  return {e.txt_embed.data.begin() + t * kWidth, e.txt_embed.data.begin() + (t + 1) * kWidth};
}

TEST(LookupTextEncoder, AWordIsItsTableRowsPaddedWithTheEmptyPromptsRow) {
  const Tables tables = ReadTables();
  auto encoded = Digits()->Encode("7");
  ASSERT_TRUE(encoded.ok()) << encoded.status();
  EXPECT_EQ(encoded->txt_embed.shape, (Shape{kTokens, kWidth}));
  EXPECT_EQ(encoded->pooled_text.shape, (Shape{kPooledWidth}));
  const int64_t seven = tables.Row("7");
  ASSERT_LT(seven, static_cast<int64_t>(tables.vocabulary.size()));
  EXPECT_EQ(EncodedTokenRow(*encoded, 0), TokenRow(tables, seven));
  for (int64_t t = 1; t < kTokens; ++t) EXPECT_EQ(EncodedTokenRow(*encoded, t), TokenRow(tables, 0)) << t;
  EXPECT_EQ(encoded->pooled_text.data, PooledRow(tables, seven));
}

TEST(LookupTextEncoder, PooledTextIsTheMeanOfTheWordsRows) {
  const Tables tables = ReadTables();
  auto encoded = Digits()->Encode("a seven");
  ASSERT_TRUE(encoded.ok()) << encoded.status();
  const std::vector<float> a = PooledRow(tables, tables.Row("a")), seven = PooledRow(tables, tables.Row("seven"));
  for (int64_t i = 0; i < kPooledWidth; ++i) EXPECT_EQ(encoded->pooled_text.data[i], (a[i] + seven[i]) / 2.0f) << i;
  EXPECT_EQ(EncodedTokenRow(*encoded, 0), TokenRow(tables, tables.Row("a")));
  EXPECT_EQ(EncodedTokenRow(*encoded, 1), TokenRow(tables, tables.Row("seven")));
  EXPECT_EQ(EncodedTokenRow(*encoded, 2), TokenRow(tables, 0));
}

TEST(LookupTextEncoder, CaseAndPunctuationDoNotMatterAndTheEmptyPromptIsRowZero) {
  const Tables tables = ReadTables();
  const std::unique_ptr<TextEncoder> encoder = Digits();
  auto plain = encoder->Encode("a seven"), shouted = encoder->Encode("  A, Seven!\t");
  ASSERT_TRUE(plain.ok() && shouted.ok());
  EXPECT_EQ(plain->txt_embed.data, shouted->txt_embed.data);
  EXPECT_EQ(plain->pooled_text.data, shouted->pooled_text.data);
  for (const char* empty : {"", "  ", "?!"}) {
    auto encoded = encoder->Encode(empty);
    ASSERT_TRUE(encoded.ok()) << encoded.status();
    for (int64_t t = 0; t < kTokens; ++t) EXPECT_EQ(EncodedTokenRow(*encoded, t), TokenRow(tables, 0));
    EXPECT_EQ(encoded->pooled_text.data, PooledRow(tables, 0));
  }
}

TEST(LookupTextEncoder, UnknownWordsAndTooManyWordsAreNamed) {
  const std::unique_ptr<TextEncoder> encoder = Digits();
  auto unknown = encoder->Encode("a banana");
  EXPECT_EQ(unknown.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(unknown.status().message(), HasSubstr("word 'banana' is not in the text encoder's vocabulary"));
  auto long_prompt = encoder->Encode("the handwritten digit seven please");
  EXPECT_EQ(long_prompt.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(long_prompt.status().message(), HasSubstr("has 5 words; the text encoder takes at most 4"));
}

TEST(LookupTextEncoder, SummaryListsTheVocabularyWithoutTheEmptyRow) {
  const TextEncoderSummary summary = Digits()->Summary();
  EXPECT_EQ(summary.kind, "LookupTextEncoder");
  EXPECT_EQ(summary.max_tokens, kTokens);
  EXPECT_EQ(summary.joint_attention_dim, kWidth);
  EXPECT_EQ(summary.pooled_projection_dim, kPooledWidth);
  EXPECT_EQ(summary.words.size(), 26u);
  EXPECT_EQ(summary.words.front(), "0");
  EXPECT_THAT(summary.words, ::testing::Contains("seven"));
  EXPECT_THAT(summary.words, ::testing::Not(::testing::Contains("<empty>")));
}

// A copy of the digits model's text_encoder/ to break.
class BrokenEncoder : public ::testing::Test {
 protected:
  void SetUp() override {
    model_dir_ = MakeTempDir("broken_encoder");
    std::filesystem::copy(DigitsModelDir() + "/text_encoder", model_dir_ + "/text_encoder");
    std::ifstream file(Dir() + "/config.json");
    config_ = nlohmann::json::parse(file);
  }
  void TearDown() override { std::filesystem::remove_all(model_dir_); }
  std::string Dir() const { return model_dir_ + "/text_encoder"; }
  void WriteConfig(const std::string& text) const { std::ofstream(Dir() + "/config.json") << text; }
  absl::Status Load() const { return LoadTextEncoder(model_dir_, kWidth, kPooledWidth).status(); }

  std::string model_dir_;
  nlohmann::json config_;
};

TEST_F(BrokenEncoder, MalformedJsonNamesTheFile) {
  WriteConfig("{\"max_tokens\": 4,");
  EXPECT_EQ(Load().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(Load().message(), HasSubstr("text_encoder/config.json: not a JSON object"));
}

TEST_F(BrokenEncoder, AnUnknownClassIsRefused) {
  config_["_class_name"] = "CLIPTextModel";
  WriteConfig(config_.dump());
  EXPECT_THAT(Load().message(), HasSubstr("_class_name 'CLIPTextModel' is not a text encoder this server has"));
}

TEST_F(BrokenEncoder, AVocabularyThatDisagreesWithTheTablesIsAShapeError) {
  config_["vocabulary"].push_back("eleven");
  WriteConfig(config_.dump());
  EXPECT_EQ(Load().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(Load().message(), HasSubstr("'token_embedding' has shape [27, 32], expected [28, 32]"));
}

TEST_F(BrokenEncoder, DuplicatedOrMultiWordEntriesAreRefused) {
  config_["vocabulary"][3] = "seven";
  WriteConfig(config_.dump());
  EXPECT_THAT(Load().message(), HasSubstr("vocabulary entry 'seven' appears twice"));
  config_["vocabulary"][3] = "two words";
  WriteConfig(config_.dump());
  EXPECT_THAT(Load().message(), HasSubstr("vocabulary entry 'two words' is not one lowercase word"));
}

TEST_F(BrokenEncoder, MissingKeysAndTablesAreNamed) {
  nlohmann::json without_tokens = config_;
  without_tokens.erase("max_tokens");
  WriteConfig(without_tokens.dump());
  EXPECT_THAT(Load().message(), HasSubstr("'max_tokens' must be an integer >= 1"));
  WriteConfig(config_.dump());
  std::filesystem::remove(Dir() + "/model.safetensors");
  EXPECT_FALSE(Load().ok());
  EXPECT_THAT(Load().message(), HasSubstr("model.safetensors"));
}

TEST_F(BrokenEncoder, WidthsThatDifferFromTheModelsAreRefused) {
  const absl::Status status = LoadTextEncoder(model_dir_, 40, kPooledWidth).status();
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(status.message(), HasSubstr("the encoder gives widths 32 and 32; the model takes joint_attention_dim 40"));
}

TEST(LoadTextEncoder, AModelWithoutTextEncoderHasNone) {
  auto encoder = LoadTextEncoder(GoldenDir("sd3_tiny"), 40, 24);
  ASSERT_TRUE(encoder.ok()) << encoder.status();
  EXPECT_EQ(*encoder, nullptr);
}

}  // namespace
}  // namespace mmdit::testing
