#include "core/model_config.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "tests/core/test_util.h"

namespace mmdit {
namespace {

using ::testing::HasSubstr;

constexpr char kValid[] = R"({
  "_class_name": "SD3Transformer2DModel", "_diffusers_version": "0.31.0",
  "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 24,
  "attention_head_dim": 64, "num_attention_heads": 24, "joint_attention_dim": 4096,
  "caption_projection_dim": 1536, "pooled_projection_dim": 2048, "pos_embed_max_size": 384,
  "sample_size": 128, "qk_norm": "rms_norm", "dual_attention_layers": [0, 1, 2]
})";

TEST(ModelConfig, ParsesDiffusersKeysAndDefaultsOurs) {
  auto config = ParseModelConfig(kValid, "config.json");
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->hidden(), 1536);
  EXPECT_EQ(config->mlp_hidden(), 6144);
  EXPECT_EQ(config->patch_features(), 64);
  EXPECT_EQ(config->pos_embed_max_size, 384);
  EXPECT_TRUE(config->qk_norm);
  EXPECT_TRUE(config->context_pre_only_last);
  EXPECT_TRUE(config->IsContextPreOnly(23));
  EXPECT_FALSE(config->IsContextPreOnly(22));
  EXPECT_TRUE(config->IsDualAttention(2));
  EXPECT_FALSE(config->IsDualAttention(3));
}

TEST(ModelConfig, WrittenJsonParsesBackToTheSameGeometry) {
  auto config = ParseModelConfig(kValid, "config.json");
  ASSERT_TRUE(config.ok());
  auto again = ParseModelConfig(ModelConfigToJson(*config), "again");
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(again->hidden(), config->hidden());
  EXPECT_EQ(again->dual_attention_layers, config->dual_attention_layers);
  EXPECT_EQ(again->pos_embed_max_size, config->pos_embed_max_size);
}

TEST(ModelConfig, ReadsEveryGoldenConfig) {
  for (const char* name : {"seed_tiny", "sd3_tiny", "sd35_tiny"}) {
    auto config = ReadModelConfig(testing::GoldenDir(name) + "/config.json");
    EXPECT_TRUE(config.ok()) << name << ": " << config.status();
  }
}

// kValid with `key`'s value replaced, or the key renamed away when `value` is empty.
std::string With(const std::string& key, const std::string& value) {
  std::string text = kValid;
  const size_t at = text.find("\"" + key + "\"");
  size_t value_at = text.find(':', at) + 1;
  while (text[value_at] == ' ') ++value_at;
  const size_t end = text[value_at] == '[' ? text.find(']', value_at) + 1 : text.find_first_of(",}", value_at);
  text.replace(at, end - at, value.empty() ? "\"_removed\": 0" : "\"" + key + "\": " + value);
  return text;
}

TEST(ModelConfig, RejectsInconsistentConfigsNamingTheKey) {
  const struct {
    std::string json, message;
  } cases[] = {
      {With("caption_projection_dim", "1000"),
       "'caption_projection_dim' is 1000 but num_attention_heads x attention_head_dim = 24 x 64 = 1536"},
      {With("num_layers", "0"), "'num_layers' must be >= 1, got 0"},
      {With("patch_size", "\"2\""), "'patch_size' must be an integer, got \"2\""},
      {With("in_channels", ""), "'in_channels' is missing"},
      {With("qk_norm", "\"layer_norm\""), "'qk_norm' must be null or \"rms_norm\""},
      {With("dual_attention_layers", "[30]"), "'dual_attention_layers' names layer 30; layers are 0..23"},
      {With("pos_embed_max_size", "-3"), "'pos_embed_max_size' must be >= 1"},
      {With("num_attention_heads", "4611686018427387906"),
       "'num_attention_heads' is 4611686018427387906; the engine takes at most 1048576"},
      {With("pos_embed_max_size", "4294967296"), "'pos_embed_max_size' is 4294967296; the engine takes at most"},
      {"[1, 2]", "not a JSON object"},
      {"{", "not a JSON object"},
  };
  for (const auto& c : cases) {
    auto config = ParseModelConfig(c.json, "config.json");
    EXPECT_EQ(config.status().code(), absl::StatusCode::kInvalidArgument) << c.json;
    EXPECT_THAT(std::string(config.status().message()), HasSubstr(c.message));
  }
}

TEST(ModelConfig, RejectsFractionalMlpWidth) {
  std::string text = kValid;
  text.insert(text.size() - 1, ", \"mlp_ratio\": 0.0001");
  auto config = ParseModelConfig(text, "config.json");
  EXPECT_THAT(std::string(config.status().message()), HasSubstr("'mlp_ratio'"));
}

}  // namespace
}  // namespace mmdit
