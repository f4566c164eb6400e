// Strict binding, both naming layouts, sharded and half-precision checkpoints.
#include "core/weights.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <regex>

#include "core/checkpoint.h"
#include "core/engine.h"
#include "core/safetensors.h"
#include "nlohmann/json.hpp"
#include "tests/core/test_util.h"

namespace mmdit {
namespace {

namespace fs = std::filesystem;
using ::mmdit::testing::GoldenCase;
using ::mmdit::testing::GoldenDir;
using ::mmdit::testing::MaxAbsDiff;
using ::testing::HasSubstr;

TensorMap GoldenTensors(const std::string& name) {
  auto tensors = ReadSafetensors(GoldenDir(name) + "/model.safetensors");
  EXPECT_TRUE(tensors.ok()) << tensors.status();
  return *std::move(tensors);
}

ModelConfig GoldenConfig(const std::string& name) {
  auto config = ReadModelConfig(GoldenDir(name) + "/config.json");
  EXPECT_TRUE(config.ok()) << config.status();
  return *config;
}

// Writes `tensors` with the golden case's config.json into a fresh model directory.
std::string WriteModelDir(const std::string& golden, const TensorMap& tensors, DType dtype = DType::kF32,
                          const std::string& file = "model.safetensors") {
  const std::string dir = testing::MakeTempDir("model");
  fs::copy_file(GoldenDir(golden) + "/config.json", dir + "/config.json");
  std::vector<std::pair<std::string, TensorView>> views;
  for (const auto& [name, tensor] : tensors) views.emplace_back(name, tensor);
  EXPECT_TRUE(WriteSafetensors(dir + "/" + file, views, dtype).ok());
  return dir;
}

std::vector<Tensor> RunGolden(const std::string& model_dir, const std::string& golden) {
  auto engine = Engine::Load(model_dir);
  EXPECT_TRUE(engine.ok()) << engine.status();
  if (!engine.ok()) return {};
  const GoldenCase c = testing::LoadGoldenCase(golden);
  auto outputs = (*engine)->Forward(c.Samples());
  EXPECT_TRUE(outputs.ok()) << outputs.status();
  return outputs.ok() ? *outputs : std::vector<Tensor>();
}

TEST(BindWeights, AcceptsEveryGoldenCheckpoint) {
  for (const char* name : {"seed_tiny", "sd3_tiny", "sd35_tiny"}) {
    auto weights = BindWeights(GoldenConfig(name), GoldenTensors(name));
    EXPECT_TRUE(weights.ok()) << name << ": " << weights.status();
  }
}

TEST(BindWeights, ListsEveryMissingUnexpectedAndMisshapedTensorInOneError) {
  TensorMap tensors = GoldenTensors("sd3_tiny");
  tensors.erase("transformer_blocks.1.attn.to_k.weight");
  tensors.erase("proj_out.bias");
  tensors["transformer_blocks.2.attn.to_add_out.weight"] = Tensor({64, 64});  // the last block has none
  tensors["context_embedder.weight"] = Tensor({64, 41});
  auto weights = BindWeights(GoldenConfig("sd3_tiny"), std::move(tensors));
  ASSERT_EQ(weights.status().code(), absl::StatusCode::kInvalidArgument);
  const std::string message(weights.status().message());
  EXPECT_THAT(message, HasSubstr("4 problems"));
  EXPECT_THAT(message, HasSubstr("missing 'transformer_blocks.1.attn.to_k.weight' [64, 64]"));
  EXPECT_THAT(message, HasSubstr("missing 'proj_out.bias' [16]"));
  EXPECT_THAT(message, HasSubstr("unexpected 'transformer_blocks.2.attn.to_add_out.weight' [64, 64]"));
  EXPECT_THAT(message, HasSubstr("'context_embedder.weight' has shape [64, 41], expected [64, 40]"));
}

TEST(BindWeights, ExpectedTensorsIsExactlyWhatTheGoldenCheckpointsHold) {
  for (const char* name : {"seed_tiny", "sd3_tiny", "sd35_tiny"}) {
    const TensorMap tensors = GoldenTensors(name);
    const auto expected = ExpectedTensors(GoldenConfig(name));
    EXPECT_EQ(expected.size(), tensors.size()) << name;
    for (const auto& [tensor_name, shape] : expected) {
      ASSERT_TRUE(tensors.contains(tensor_name)) << tensor_name;
      EXPECT_EQ(tensors.at(tensor_name).shape, shape) << tensor_name;
    }
  }
}

// The inverse of MODEL_SPEC section 4, written independently of core/checkpoint.cc: diffusers
// names to the original Stability layout (fused qkv, [shift, scale] halves).
TensorMap ToStabilityNames(const TensorMap& diffusers, int64_t layers, bool pre_only_last, const std::string& prefix) {
  auto concat_rows = [](std::vector<const Tensor*> parts) {
    Tensor out = *parts[0];
    for (size_t i = 1; i < parts.size(); ++i) {
      out.data.insert(out.data.end(), parts[i]->data.begin(), parts[i]->data.end());
      out.shape[0] += parts[i]->shape[0];
    }
    return out;
  };
  auto swap_halves = [&](const Tensor& t) {
    const int64_t half = t.NumElements() / 2;
    Tensor a(t.shape), b(t.shape);
    a.shape[0] /= 2;
    b.shape[0] /= 2;
    a.data.assign(t.data.begin(), t.data.begin() + half);
    b.data.assign(t.data.begin() + half, t.data.end());
    return concat_rows({&b, &a});
  };
  const std::vector<std::pair<std::string, std::string>> renames = {
      {"pos_embed.proj", "x_embedder.proj"},
      {"time_text_embed.timestep_embedder.linear_1", "t_embedder.mlp.0"},
      {"time_text_embed.timestep_embedder.linear_2", "t_embedder.mlp.2"},
      {"time_text_embed.text_embedder.linear_1", "y_embedder.mlp.0"},
      {"time_text_embed.text_embedder.linear_2", "y_embedder.mlp.2"},
      {"context_embedder", "context_embedder"},
      {"proj_out", "final_layer.linear"},
  };
  TensorMap out;
  for (const char* suffix : {".weight", ".bias"}) {
    for (const auto& [from, to] : renames) out[prefix + to + suffix] = diffusers.at(from + suffix);
    out[prefix + "final_layer.adaLN_modulation.1" + suffix] =
        swap_halves(diffusers.at(std::string("norm_out.linear") + suffix));
    for (int64_t i = 0; i < layers; ++i) {
      const std::string d = "transformer_blocks." + std::to_string(i) + ".";
      const std::string s = prefix + "joint_blocks." + std::to_string(i) + ".";
      auto at = [&](const std::string& name) { return &diffusers.at(d + name + suffix); };
      const bool last_pre_only = pre_only_last && i == layers - 1;
      out[s + "x_block.adaLN_modulation.1" + suffix] = *at("norm1.linear");
      out[s + "x_block.attn.qkv" + suffix] = concat_rows({at("attn.to_q"), at("attn.to_k"), at("attn.to_v")});
      out[s + "x_block.attn.proj" + suffix] = *at("attn.to_out.0");
      out[s + "x_block.mlp.fc1" + suffix] = *at("ff.net.0.proj");
      out[s + "x_block.mlp.fc2" + suffix] = *at("ff.net.2");
      const Tensor& context_mod = *at("norm1_context.linear");
      out[s + "context_block.adaLN_modulation.1" + suffix] = last_pre_only ? swap_halves(context_mod) : context_mod;
      out[s + "context_block.attn.qkv" + suffix] =
          concat_rows({at("attn.add_q_proj"), at("attn.add_k_proj"), at("attn.add_v_proj")});
      if (!last_pre_only) {
        out[s + "context_block.attn.proj" + suffix] = *at("attn.to_add_out");
        out[s + "context_block.mlp.fc1" + suffix] = *at("ff_context.net.0.proj");
        out[s + "context_block.mlp.fc2" + suffix] = *at("ff_context.net.2");
      }
      if (std::string(suffix) == ".weight" && diffusers.contains(d + "attn.norm_q.weight")) {
        out[s + "x_block.attn.ln_q.weight"] = *at("attn.norm_q");
        out[s + "x_block.attn.ln_k.weight"] = *at("attn.norm_k");
        out[s + "context_block.attn.ln_q.weight"] = *at("attn.norm_added_q");
        out[s + "context_block.attn.ln_k.weight"] = *at("attn.norm_added_k");
      }
    }
  }
  if (diffusers.contains("pos_embed.pos_embed")) out[prefix + "pos_embed"] = diffusers.at("pos_embed.pos_embed");
  return out;
}

class StabilityLayoutTest : public ::testing::TestWithParam<std::tuple<std::string, std::string>> {};

TEST_P(StabilityLayoutTest, LoadsAndGivesTheSameOutputsAsDiffusersNames) {
  const auto& [golden, prefix] = GetParam();
  const ModelConfig config = GoldenConfig(golden);
  const TensorMap stability =
      ToStabilityNames(GoldenTensors(golden), config.num_layers, config.context_pre_only_last, prefix);
  auto renamed = ToDiffusersNames(stability, config.hidden());
  ASSERT_TRUE(renamed.ok()) << renamed.status();
  EXPECT_EQ(renamed->size(), GoldenTensors(golden).size());
  const std::vector<Tensor> expected = RunGolden(GoldenDir(golden), golden);
  const std::vector<Tensor> actual = RunGolden(WriteModelDir(golden, stability), golden);
  ASSERT_EQ(actual.size(), expected.size());
  for (size_t b = 0; b < actual.size(); ++b) EXPECT_EQ(actual[b].data, expected[b].data) << "sample " << b;
}

INSTANTIATE_TEST_SUITE_P(Layouts, StabilityLayoutTest,
                         ::testing::Combine(::testing::Values("sd3_tiny", "sd35_tiny", "seed_tiny"),
                                            ::testing::Values("", "model.diffusion_model.")));

TEST(Checkpoint, RefusesTwoStoredTensorsThatMapToOneName) {
  const ModelConfig config = GoldenConfig("sd3_tiny");
  TensorMap stability = ToStabilityNames(GoldenTensors("sd3_tiny"), config.num_layers, true, "model.diffusion_model.");
  stability["final_layer.linear.bias"] = stability.at("model.diffusion_model.final_layer.linear.bias");
  auto renamed = ToDiffusersNames(std::move(stability), config.hidden());
  EXPECT_EQ(renamed.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(renamed.status().message()), HasSubstr("maps to the same name"));
}

TEST(BindWeights, AMismatchedConfigFailsWithoutAllocatingItsTensors) {
  ModelConfig huge = GoldenConfig("sd3_tiny");
  huge.num_attention_heads = huge.attention_head_dim = 1024;  // D = 2^20: 4 TiB of weights
  huge.caption_projection_dim = huge.hidden();
  auto weights = BindWeights(huge, GoldenTensors("sd3_tiny"));
  EXPECT_EQ(weights.status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(Engine, RefusesWeightsWithoutTheConfigsBlockStructure) {
  const ModelConfig config = GoldenConfig("sd3_tiny");
  auto weights = BindWeights(config, GoldenTensors("sd3_tiny"));
  ASSERT_TRUE(weights.ok());
  weights->blocks.pop_back();
  EXPECT_EQ(Engine::Create(config, *std::move(weights)).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(Checkpoint, ReadsDiffusersShardsThroughTheIndex) {
  const TensorMap all = GoldenTensors("sd3_tiny");
  const std::string dir = testing::MakeTempDir("shards");
  fs::copy_file(GoldenDir("sd3_tiny") + "/config.json", dir + "/config.json");
  std::vector<std::pair<std::string, TensorView>> shard[2];
  nlohmann::json index = {{"metadata", {{"total_size", 0}}}, {"weight_map", nlohmann::json::object()}};
  int i = 0;
  for (const auto& [name, tensor] : all) {
    const int which = i++ % 2;
    shard[which].emplace_back(name, tensor);
    index["weight_map"][name] = "diffusion_pytorch_model-0000" + std::to_string(which + 1) + "-of-00002.safetensors";
  }
  for (int s = 0; s < 2; ++s) {
    ASSERT_TRUE(
        WriteSafetensors(dir + "/diffusion_pytorch_model-0000" + std::to_string(s + 1) + "-of-00002.safetensors",
                         shard[s], DType::kF32)
            .ok());
  }
  std::ofstream(dir + "/diffusion_pytorch_model.safetensors.index.json") << index.dump();
  const std::vector<Tensor> expected = RunGolden(GoldenDir("sd3_tiny"), "sd3_tiny");
  const std::vector<Tensor> actual = RunGolden(dir, "sd3_tiny");
  ASSERT_EQ(actual.size(), expected.size());
  for (size_t b = 0; b < actual.size(); ++b) EXPECT_EQ(actual[b].data, expected[b].data);

  // A tensor the index places in a shard that does not hold it.
  index["weight_map"]["proj_out.bias"] = "diffusion_pytorch_model-00001-of-00002.safetensors";
  index["weight_map"]["context_embedder.bias"] = "diffusion_pytorch_model-00002-of-00002.safetensors";
  std::ofstream(dir + "/diffusion_pytorch_model.safetensors.index.json") << index.dump();
  auto broken = ReadCheckpoint(dir);
  EXPECT_EQ(broken.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(broken.status().message()), HasSubstr("but not stored there"));
}

TEST(Checkpoint, ReadsTheDiffusersSingleFileName) {
  const std::string dir =
      WriteModelDir("seed_tiny", GoldenTensors("seed_tiny"), DType::kF32, "diffusion_pytorch_model.safetensors");
  EXPECT_EQ(RunGolden(dir, "seed_tiny").size(), 3u);
}

TEST(Checkpoint, NamesTheFilesItLookedFor) {
  const std::string dir = testing::MakeTempDir("empty");
  auto result = ReadCheckpoint(dir);
  EXPECT_EQ(result.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(result.status().message()), HasSubstr("diffusion_pytorch_model.safetensors.index.json"));
}

// Stored BF16 weights are converted at load; the output stays within the bf16 tolerance of
// shared/golden/README.md (relative L2 <= 2e-2).
TEST(Checkpoint, Bfloat16StoredWeightsStayWithinTheBf16Tolerance) {
  const std::string dir = WriteModelDir("sd3_tiny", GoldenTensors("sd3_tiny"), DType::kBF16);
  const std::vector<Tensor> outputs = RunGolden(dir, "sd3_tiny");
  const GoldenCase c = testing::LoadGoldenCase("sd3_tiny");
  double diff_sq = 0, ref_sq = 0;
  for (size_t b = 0; b < outputs.size(); ++b) {
    const Tensor expected = testing::SampleOf(c.expected, b);
    for (int64_t i = 0; i < expected.NumElements(); ++i) {
      diff_sq += std::pow(outputs[b].data[i] - expected.data[i], 2);
      ref_sq += std::pow(expected.data[i], 2);
    }
  }
  ASSERT_EQ(outputs.size(), 2u);
  EXPECT_GT(diff_sq, 0.0);  // the weights really were rounded
  EXPECT_LE(std::sqrt(diff_sq / ref_sq), 2e-2);
}

TEST(StackOutputs, StacksWeightRowsAndBiasesInOrder) {
  LinearWeights a{Tensor({1, 2}, {1, 2}), Tensor({1}, {10})};
  LinearWeights b{Tensor({2, 2}, {3, 4, 5, 6}), Tensor({2}, {20, 30})};
  const LinearWeights stacked = StackOutputs({std::move(a), std::move(b)});
  EXPECT_EQ(stacked.weight.shape, (Shape{3, 2}));
  EXPECT_EQ(stacked.weight.data, (std::vector<float>{1, 2, 3, 4, 5, 6}));
  EXPECT_EQ(stacked.bias.data, (std::vector<float>{10, 20, 30}));
}

}  // namespace
}  // namespace mmdit
