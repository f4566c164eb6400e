#include "core/random_model.h"

#include <cmath>
#include <filesystem>
#include <fstream>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "core/safetensors.h"
#include "core/status_macros.h"
#include "core/weights.h"

namespace mmdit {
namespace {

// splitmix64: fast, and reproducible across platforms (std:: distributions are not).
class Random {
 public:
  explicit Random(uint64_t seed) : state_(seed) {}
  double Uniform() {  // [0, 1)
    uint64_t z = (state_ += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return static_cast<double>((z ^ (z >> 31)) >> 11) * 0x1.0p-53;
  }

 private:
  uint64_t state_;
};

ModelConfig SeedGeometry(int64_t hidden, int64_t depth, int64_t heads, int64_t sample_size) {
  ModelConfig c;
  c.patch_size = 1;
  c.in_channels = c.out_channels = 16;  // img_dim 16
  c.num_layers = depth;
  c.num_attention_heads = heads;
  c.attention_head_dim = hidden / heads;
  c.caption_projection_dim = hidden;
  c.joint_attention_dim = 4096;
  c.pooled_projection_dim = 768;
  c.sample_size = sample_size;      // img_tokens = sample_size^2
  c.context_pre_only_last = false;  // the seed's every block is full
  return c;
}

ModelConfig Sd3Geometry(int64_t hidden, int64_t depth, int64_t max_size) {
  ModelConfig c;
  c.patch_size = 2;
  c.in_channels = c.out_channels = 16;
  c.num_layers = depth;
  c.num_attention_heads = hidden / 64;
  c.attention_head_dim = 64;
  c.caption_projection_dim = hidden;
  c.joint_attention_dim = 4096;
  c.pooled_projection_dim = 2048;
  c.pos_embed_max_size = max_size;
  c.sample_size = 128;
  return c;
}

// diffusers' get_2d_sincos_pos_embed for a max_size x max_size grid (base size = sample/p):
// half of the features encode the column, half the row, each [sin | cos].
void SinCosPositions(const ModelConfig& c, std::vector<float>& table) {
  const int64_t m = *c.pos_embed_max_size, d = c.hidden(), quarter = d / 4;
  const double base = std::max<int64_t>(1, c.sample_size / c.patch_size);
  const double grid_scale = base / m;  // diffusers: arange(m) / (m / base_size), interpolation scale 1
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j < m; ++j) {
      float* row = table.data() + (i * m + j) * d;
      const double coords[2] = {j * grid_scale, i * grid_scale};  // width first, as diffusers
      for (int axis = 0; axis < 2; ++axis) {
        for (int64_t k = 0; k < quarter; ++k) {
          const double omega = 1.0 / std::pow(10000.0, static_cast<double>(k) / quarter);
          row[axis * 2 * quarter + k] = static_cast<float>(std::sin(coords[axis] * omega));
          row[axis * 2 * quarter + quarter + k] = static_cast<float>(std::cos(coords[axis] * omega));
        }
      }
    }
  }
}

}  // namespace

std::vector<std::string> PresetNames() {
  return {"seed-default", "seed-recommended", "sd3-medium", "sd35-medium", "sd35-large"};
}

absl::StatusOr<ModelConfig> PresetConfig(const std::string& name) {
  if (name == "seed-default") return SeedGeometry(768, 12, 12, 8);
  if (name == "seed-recommended") return SeedGeometry(1536, 24, 24, 16);
  if (name == "sd3-medium") return Sd3Geometry(1536, 24, 192);
  if (name == "sd35-medium") {
    ModelConfig c = Sd3Geometry(1536, 24, 384);
    c.qk_norm = true;
    for (int64_t layer = 0; layer <= 12; ++layer) c.dual_attention_layers.push_back(layer);
    return c;
  }
  if (name == "sd35-large") {
    ModelConfig c = Sd3Geometry(2432, 38, 192);
    c.qk_norm = true;
    return c;
  }
  return absl::NotFoundError(
      absl::StrCat("unknown preset '", name, "'; presets: ", absl::StrJoin(PresetNames(), ", ")));
}

absl::Status WriteRandomModel(const std::string& dir, const ModelConfig& config, uint64_t seed, DType weights_dtype) {
  RETURN_IF_ERROR(ValidateModelConfig(config));
  std::error_code error;
  std::filesystem::create_directories(dir, error);
  if (error) return absl::InternalError(absl::StrCat(dir, ": cannot create: ", error.message()));
  {
    std::ofstream file(std::filesystem::path(dir) / "config.json", std::ios::trunc);
    file << ModelConfigToJson(config);
    if (!file) return absl::InternalError(absl::StrCat(dir, "/config.json: write failed"));
  }
  const std::vector<std::pair<std::string, Shape>> layout = ExpectedTensors(config);
  Random random(seed);
  int64_t fan_in = 1;  // of the last weight matrix: its bias shares the bound
  return WriteSafetensors((std::filesystem::path(dir) / "model.safetensors").string(), layout, weights_dtype,
                          [&](size_t i, std::vector<float>& values) {
                            const auto& [name, shape] = layout[i];
                            if (name == "pos_embed.pos_embed") return SinCosPositions(config, values);
                            if (shape.size() == 1 && name.find("norm") != std::string::npos) {  // RMS gammas
                              std::fill(values.begin(), values.end(), 1.0f);
                              return;
                            }
                            if (shape.size() >= 2) fan_in = NumElements(shape) / shape[0];
                            const double bound = 1.0 / std::sqrt(static_cast<double>(fan_in));
                            for (float& v : values) v = static_cast<float>((2.0 * random.Uniform() - 1.0) * bound);
                          });
}

}  // namespace mmdit
