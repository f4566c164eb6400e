#include "core/engine.h"

#include <malloc.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <filesystem>

#include "absl/algorithm/container.h"
#include "absl/cleanup/cleanup.h"
#include "absl/strings/str_cat.h"
#include "core/checkpoint.h"
#include "core/layers.h"
#include "core/linear.h"
#include "core/status_macros.h"

namespace mmdit {
namespace {

// Which chunk of a modulation Linear's output feeds each AdaLN site (MODEL_SPEC 3.1, 3.8).
struct AdaLnSite {
  int shift, scale, gate;  // gate -1: the site has no gate
};
struct ModulationLayout {
  int chunks;
  AdaLnSite attention, mlp, dual;
};
constexpr ModulationLayout kFullBlock = {6, {0, 1, 2}, {3, 4, 5}, {-1, -1, -1}};
constexpr ModulationLayout kDualAttentionBlock = {9, {0, 1, 2}, {3, 4, 5}, {6, 7, 8}};
constexpr ModulationLayout kContextPreOnly = {2, {1, 0, -1}, {-1, -1, -1}, {-1, -1, -1}};  // scale first

}  // namespace

// ---------------------------------------------------------------------------------------------
// Prepared weights.

struct StreamBlock {  // one stream's half of a joint block
  int64_t modulation_offset;  // where its AdaLN chunks start in a row of EngineModel::modulation's output
  Linear qkv;  // to_q, to_k, to_v stacked: one product, rows [q | k | v]
  std::optional<Tensor> q_norm, k_norm;
  std::optional<Linear> out;  // out and ff: absent in a context-pre-only text stream
  std::optional<FeedForward> ff;
};

struct SelfAttentionBlock {
  Linear qkv, out;
  std::optional<Tensor> q_norm, k_norm;
};

struct JointBlock {
  StreamBlock image, text;
  std::optional<SelfAttentionBlock> dual_attention;
  ModulationLayout image_layout, text_layout;
};

struct EngineModel {
  std::unique_ptr<DnnlContext> dnnl;
  Linear patch_embed, timestep_1, timestep_2, pooled_1, pooled_2, context_embedder, proj_out;
  // Every block's norm1 and norm1_context, then norm_out, stacked: all of them read only the
  // conditioning vector, so one product per forward reads their weights (most of the
  // model's bytes at batch 1) in a single pass.
  Linear modulation;
  int64_t final_modulation_offset;  // norm_out's [scale, shift] in a row of its output
  std::optional<Tensor> pos_table;  // [M*M, D]
  std::vector<JointBlock> blocks;
};

// ---------------------------------------------------------------------------------------------
// Activations.

// One stream's rows for the whole batch: sample b owns rows [offset[b], offset[b] + rows[b]).
struct StreamRows {
  std::vector<int64_t> offset, rows;
  int64_t total = 0;
  float* x = nullptr;             // [total, D] the residual stream
  float* normed = nullptr;        // [total, D] LN + modulation
  float* qkv = nullptr;           // [total, 3D]: each row's q, k, v
  float* attended = nullptr;      // [total, D]
  float* projected = nullptr;     // [total, D]
  float* mlp_hidden = nullptr;    // [total, mlp]
  float* modulation = nullptr;    // the current block's chunks in sample 0's modulation row
  int64_t modulation_stride = 0;  // floats from one sample's modulation row to the next
  const float* Chunk(int64_t sample, int index, int64_t dim) const {
    return modulation + sample * modulation_stride + index * dim;
  }
};

struct EngineWorkspace {
  std::vector<float> image, text, conditioning, attention_scratch;
  StreamRows image_rows, text_rows;
  std::vector<AttentionSequence> sequences;  // one per sample, rebuilt for each attention
  std::vector<int64_t> sequence_lengths;     // each sample's joint attention length
  std::vector<float> skipped_rows;           // x rows of the samples skipping the current block
};

namespace {

// Grows `buffer` to at least `floats` (never shrinks, so a warmed shape allocates nothing)
// and carves it into consecutive [count] pieces.
class Carver {
 public:
  Carver(std::vector<float>& buffer, int64_t floats) {
    if (static_cast<int64_t>(buffer.size()) < floats) buffer.resize(floats);
    next_ = buffer.data();
  }
  float* Take(int64_t count) { return std::exchange(next_, next_ + count); }

 private:
  float* next_;
};

// Packs `s.rows` sample after sample and carves `s`'s buffers out of `buffer`.
void PlanStream(std::vector<float>& buffer, int64_t dim, int64_t mlp, StreamRows& s) {
  s.total = 0;
  for (size_t b = 0; b < s.rows.size(); ++b) {
    s.offset[b] = s.total;
    s.total += s.rows[b];
  }
  Carver carve(buffer, s.total * (7 * dim + mlp));
  for (float** piece : {&s.x, &s.normed, &s.attended, &s.projected}) *piece = carve.Take(s.total * dim);
  s.qkv = carve.Take(s.total * 3 * dim);
  s.mlp_hidden = carve.Take(s.total * mlp);
}

RowGroups SamplesOf(const StreamRows& s) { return {s.offset, s.total, s.modulation_stride}; }

// normed[rows of b] = LN(x) * (1 + scale_b) + shift_b, from `source` rows. The rows only feed
// matrix products, so they are written in the compute dtype: in bf16 the float buffer `out`
// holds bf16 values in its first half, and the products read them as they are.
void ModulateRows(const StreamRows& s, const float* source, AdaLnSite site, int64_t dim, ComputeDType compute,
                  float* out) {
  const float* shift = s.Chunk(0, site.shift, dim);
  const float* scale = s.Chunk(0, site.scale, dim);
  if (compute == ComputeDType::kBF16) {
    LayerNormModulate(source, SamplesOf(s), dim, shift, scale, reinterpret_cast<uint16_t*>(out));
  } else {
    LayerNormModulate(source, SamplesOf(s), dim, shift, scale, out);
  }
}

// x[rows of b] += gate_b * y.
void GateIntoResidual(StreamRows& s, const float* y, AdaLnSite site, int64_t dim) {
  GatedResidualAdd(y, SamplesOf(s), dim, s.Chunk(0, site.gate, dim), s.x);
}

// q, k, v of `normed` rows in one product, with the optional RMS qk-norm.
template <typename Block>
absl::Status ProjectQkv(Block& w, const StreamRows& s, const float* normed, int64_t heads, int64_t head_dim) {
  const int64_t dim = heads * head_dim;
  RETURN_IF_ERROR(w.qkv.ForwardRows(normed, s.total, s.qkv));
  if (w.q_norm) RmsNormHeads(s.qkv, s.total, 3 * dim, heads, head_dim, w.q_norm->data.data());
  if (w.k_norm) RmsNormHeads(s.qkv + dim, s.total, 3 * dim, heads, head_dim, w.k_norm->data.data());
  return absl::OkStatus();
}

AttentionSegment SegmentOf(const StreamRows& s, int64_t sample, int64_t dim) {
  const float* q = s.qkv + s.offset[sample] * 3 * dim;
  return {q, q + dim, q + 2 * dim, s.attended + s.offset[sample] * dim, s.rows[sample]};
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Construction.

Engine::Engine(const ModelConfig& config, const EngineOptions& options, std::unique_ptr<EngineModel> model)
    : config_(config), options_(options), model_(std::move(model)), workspace_(std::make_unique<EngineWorkspace>()) {}

Engine::~Engine() = default;

absl::StatusOr<std::unique_ptr<Engine>> Engine::Load(const std::string& model_dir, const EngineOptions& options) {
  ASSIGN_OR_RETURN(ModelConfig config, ReadModelConfig((std::filesystem::path(model_dir) / "config.json").string()));
  ASSIGN_OR_RETURN(TensorMap tensors, ReadCheckpoint(model_dir));
  ASSIGN_OR_RETURN(TensorMap named, ToDiffusersNames(std::move(tensors), config.hidden()));
  ASSIGN_OR_RETURN(ModelWeights weights, BindWeights(config, std::move(named)));
  return Create(config, std::move(weights), options);
}

namespace {

// An optional weight (a norm's gammas, the position table), its values read.
std::optional<Tensor> Loaded(std::optional<Tensor> tensor) {
  if (tensor) tensor->Load();
  return tensor;
}

// `w.modulation` has already gone into the model's stacked modulation, at `modulation_offset`.
absl::StatusOr<StreamBlock> PrepareStream(DnnlContext& dnnl, StreamBlockWeights w, int64_t modulation_offset) {
  auto linear = [&](LinearWeights& lw, Epilogue e = Epilogue::kNone) { return Linear::Create(dnnl, std::move(lw), e); };
  LinearWeights qkv_weights = StackOutputs({std::move(w.q), std::move(w.k), std::move(w.v)});
  ASSIGN_OR_RETURN(Linear qkv, Linear::Create(dnnl, std::move(qkv_weights), Epilogue::kNone, RowsDType::kCompute));
  StreamBlock s{modulation_offset,
                std::move(qkv),
                Loaded(std::move(w.q_norm)),
                Loaded(std::move(w.k_norm)),
                {},
                {}};
  if (w.out) {
    ASSIGN_OR_RETURN(s.out, linear(*w.out));
    ASSIGN_OR_RETURN(s.ff, FeedForward::Create(dnnl, std::move(*w.ff_in), std::move(*w.ff_out), RowsDType::kCompute));
  }
  return s;
}

absl::StatusOr<SelfAttentionBlock> PrepareSelfAttention(DnnlContext& dnnl, SelfAttentionWeights w) {
  LinearWeights qkv_weights = StackOutputs({std::move(w.q), std::move(w.k), std::move(w.v)});
  ASSIGN_OR_RETURN(Linear qkv, Linear::Create(dnnl, std::move(qkv_weights), Epilogue::kNone, RowsDType::kCompute));
  ASSIGN_OR_RETURN(Linear out, Linear::Create(dnnl, std::move(w.out), Epilogue::kNone));
  return SelfAttentionBlock{std::move(qkv), std::move(out), Loaded(std::move(w.q_norm)), Loaded(std::move(w.k_norm))};
}

}  // namespace

absl::StatusOr<std::unique_ptr<Engine>> Engine::Create(const ModelConfig& config, ModelWeights w,
                                                       const EngineOptions& options) {
  RETURN_IF_ERROR(ValidateModelConfig(config));
  // `w` comes from BindWeights(config, ...), which checked every shape; a hand-built one must
  // at least have the block structure the config implies, or the forward pass would misread it.
  bool structure_matches =
      static_cast<int64_t>(w.blocks.size()) == config.num_layers && w.pos_table.has_value() == config.has_positions();
  for (size_t i = 0; structure_matches && i < w.blocks.size(); ++i) {
    structure_matches = w.blocks[i].dual_attention.has_value() == config.IsDualAttention(i) &&
                        w.blocks[i].text.out.has_value() == !config.IsContextPreOnly(i);
  }
  if (!structure_matches) {
    return absl::InvalidArgumentError(
        "model weights do not have the block structure of the config; bind them with "
        "BindWeights");
  }
  ASSIGN_OR_RETURN(std::unique_ptr<DnnlContext> dnnl, DnnlContext::Create(options.compute));
  auto linear = [&](LinearWeights& lw) { return Linear::Create(*dnnl, std::move(lw), Epilogue::kNone); };
  ASSIGN_OR_RETURN(Linear patch_embed, linear(w.patch_embed));
  ASSIGN_OR_RETURN(Linear timestep_1, linear(w.timestep_1));
  ASSIGN_OR_RETURN(Linear timestep_2, linear(w.timestep_2));
  ASSIGN_OR_RETURN(Linear pooled_1, linear(w.pooled_1));
  ASSIGN_OR_RETURN(Linear pooled_2, linear(w.pooled_2));
  ASSIGN_OR_RETURN(Linear context_embedder, linear(w.context_embedder));
  ASSIGN_OR_RETURN(Linear proj_out, Linear::Create(*dnnl, std::move(w.proj_out), Epilogue::kNone, RowsDType::kCompute));
  // The stacked modulation: per block the image stream's chunks, then the text stream's;
  // norm_out last.
  std::vector<LinearWeights> modulation_parts;
  std::vector<int64_t> stream_offsets;  // image, text of block 0, image, text of block 1, ...
  int64_t modulation_width = 0;
  for (JointBlockWeights& bw : w.blocks) {
    for (StreamBlockWeights* stream : {&bw.image, &bw.text}) {
      stream_offsets.push_back(modulation_width);
      modulation_width += stream->modulation.weight.shape[0];
      modulation_parts.push_back(std::move(stream->modulation));
    }
  }
  const int64_t final_modulation_offset = modulation_width;
  modulation_parts.push_back(std::move(w.norm_out));
  // Packed first, its parts read from the checkpoint one at a time: the largest allocation of
  // the load then comes before the heap holds anything else.
  ASSIGN_OR_RETURN(Linear modulation, Linear::CreateStacked(*dnnl, std::move(modulation_parts)));
  std::vector<JointBlock> blocks;
  for (size_t i = 0; i < w.blocks.size(); ++i) {
    JointBlockWeights& bw = w.blocks[i];
    ASSIGN_OR_RETURN(StreamBlock image, PrepareStream(*dnnl, std::move(bw.image), stream_offsets[2 * i]));
    ASSIGN_OR_RETURN(StreamBlock text, PrepareStream(*dnnl, std::move(bw.text), stream_offsets[2 * i + 1]));
    JointBlock block{std::move(image), std::move(text), std::nullopt,
                     bw.dual_attention ? kDualAttentionBlock : kFullBlock,
                     config.IsContextPreOnly(i) ? kContextPreOnly : kFullBlock};
    if (bw.dual_attention) {
      ASSIGN_OR_RETURN(block.dual_attention, PrepareSelfAttention(*dnnl, std::move(*bw.dual_attention)));
    }
    blocks.push_back(std::move(block));
  }
  auto model = std::make_unique<EngineModel>(EngineModel{nullptr,
                                                         std::move(patch_embed),
                                                         std::move(timestep_1),
                                                         std::move(timestep_2),
                                                         std::move(pooled_1),
                                                         std::move(pooled_2),
                                                         std::move(context_embedder),
                                                         std::move(proj_out),
                                                         std::move(modulation),
                                                         final_modulation_offset,
                                                         Loaded(std::move(w.pos_table)),
                                                         std::move(blocks)});
  model->dnnl = std::move(dnnl);  // the Linears point at it; it lives as long as they do
  // Preparing freed each weight's float32 values once it was packed. glibc keeps freed blocks
  // in its heap up to a trim threshold that grows with the largest block freed (up to 64 MB),
  // so without this the server would hold that much for nothing.
  malloc_trim(0);
  return std::unique_ptr<Engine>(new Engine(config, options, std::move(model)));
}

// ---------------------------------------------------------------------------------------------
// Validation.

SampleTokens Engine::TokensOf(const SampleInput& sample) const {
  const Shape& img = sample.img_latent.shape;
  const int64_t p = config_.patch_size;
  const int64_t image_tokens = img.size() == 3 ? (img[1] / p) * (img[2] / p) : img[0];
  return {image_tokens, sample.txt_embed.shape[0]};
}

absl::Status Engine::ValidateSample(const SampleInput& s) const {
  const ModelConfig& c = config_;
  const Shape& img = s.img_latent.shape;
  const int64_t p = c.patch_size;
  // Far beyond any real sample (SD3 at 2048x2048 has 16384 image tokens), and small enough that
  // the workspace sizes computed from token counts cannot overflow.
  constexpr int64_t kMaxTokens = int64_t{1} << 24;
  for (int64_t dim : img) {
    if (dim > kMaxTokens) {
      return absl::InvalidArgumentError(
          absl::StrCat("img_latent: ", ShapeString(img), " has a dimension over ", kMaxTokens));
    }
  }
  if (!s.txt_embed.shape.empty() && s.txt_embed.shape[0] > kMaxTokens) {
    return absl::InvalidArgumentError(
        absl::StrCat("txt_embed: ", s.txt_embed.shape[0], " tokens; at most ", kMaxTokens));
  }
  if (img.size() == 3 && img[1] >= p && img[2] >= p && (img[1] / p) * (img[2] / p) > kMaxTokens) {
    return absl::InvalidArgumentError(
        absl::StrCat("img_latent: ", ShapeString(img), " makes over ", kMaxTokens, " image tokens"));
  }
  if (img.size() == 3) {
    const bool fits = img[0] == c.in_channels && img[1] >= p && img[2] >= p && img[1] % p == 0 && img[2] % p == 0;
    if (!fits) {
      return absl::InvalidArgumentError(absl::StrCat("img_latent: expected [C=", c.in_channels,
                                                     ", H, W] with H and W positive multiples of patch_size ", p,
                                                     ", got ", ShapeString(img)));
    }
    if (c.pos_embed_max_size && (img[1] / p > *c.pos_embed_max_size || img[2] / p > *c.pos_embed_max_size)) {
      return absl::InvalidArgumentError(absl::StrCat("img_latent: ", ShapeString(img), " is a ", img[1] / p, "x",
                                                     img[2] / p, " patch grid; the position table allows at most ",
                                                     *c.pos_embed_max_size, "x", *c.pos_embed_max_size,
                                                     " (H and W <= ", *c.pos_embed_max_size * p, ")"));
    }
  } else if (img.size() == 2) {
    if (c.has_positions()) {
      return absl::InvalidArgumentError(absl::StrCat("img_latent: token form ", ShapeString(img),
                                                     " needs a model without a position table; send [C=", c.in_channels,
                                                     ", H, W]"));
    }
    if (img[0] < 1 || img[1] != c.patch_features()) {
      return absl::InvalidArgumentError(
          absl::StrCat("img_latent: expected tokens [N >= 1, ", c.patch_features(), "], got ", ShapeString(img)));
    }
  } else {
    return absl::InvalidArgumentError(absl::StrCat("img_latent: expected [C=", c.in_channels,
                                                   ", H, W] (image form) or [N, ", c.patch_features(),
                                                   "] (token form) per sample, got ", ShapeString(img)));
  }
  const Shape& txt = s.txt_embed.shape;
  if (txt.size() != 2 || txt[0] < 1 || txt[1] != c.joint_attention_dim) {
    return absl::InvalidArgumentError(
        absl::StrCat("txt_embed: expected [T >= 1, ", c.joint_attention_dim, "] per sample, got ", ShapeString(txt)));
  }
  const Shape& pooled = s.pooled_text.shape;
  if (pooled.size() != 1 || pooled[0] != c.pooled_projection_dim) {
    return absl::InvalidArgumentError(absl::StrCat("pooled_text: expected [", c.pooled_projection_dim,
                                                   "] per sample, got ", ShapeString(s.pooled_text.shape)));
  }
  if (!std::isfinite(s.timestep)) {
    return absl::InvalidArgumentError(absl::StrCat("timestep: must be finite, got ", s.timestep));
  }
  for (int64_t layer : s.skip_layers) {
    if (layer < 0 || layer >= c.num_layers) {
      return absl::InvalidArgumentError(absl::StrCat("skip_layers: layer ", layer, " outside [0, ", c.num_layers, ")"));
    }
  }
  return absl::OkStatus();
}

double ForwardFlops(const ModelConfig& c, absl::Span<const SampleTokens> samples) {
  const double d = c.hidden(), mlp = c.mlp_hidden(), batch = samples.size();
  double n = 0, t = 0, attention = 0, dual = 0;
  for (const SampleTokens& s : samples) {
    n += s.image_tokens;
    t += s.text_tokens;
    const double length = s.image_tokens + s.text_tokens;
    attention += 2.0 * length * length * d * 2;  // Q K^T and P V
    dual += 2.0 * s.image_tokens * s.image_tokens * d * 2;
  }
  auto linear = [](double rows, double in, double out) { return 2.0 * rows * in * out; };
  double flops = linear(n, c.patch_features(), d) + linear(batch, kTimestepFeatures, d) + linear(batch, d, d) +
                 linear(batch, c.pooled_projection_dim, d) + linear(batch, d, d) + linear(t, c.joint_attention_dim, d);
  for (int64_t i = 0; i < c.num_layers; ++i) {
    const bool pre_only = c.IsContextPreOnly(i), is_dual = c.IsDualAttention(i);
    flops += linear(batch, d, (is_dual ? 9 : 6) * d) + linear(batch, d, (pre_only ? 2 : 6) * d);
    flops += linear(n + t, d, 3 * d) + attention;                     // q, k, v; attention
    flops += linear(n, d, d) + 2 * linear(n, d, mlp);                 // image out, MLP
    if (!pre_only) flops += linear(t, d, d) + 2 * linear(t, d, mlp);  // text out, MLP
    if (is_dual) flops += linear(n, d, 4 * d) + dual;
  }
  return flops + linear(batch, d, 2 * d) + linear(n, d, c.output_features());
}

// ---------------------------------------------------------------------------------------------
// The forward pass (MODEL_SPEC section 2).

namespace {

// Everything one forward call reads and writes besides the weights.
struct Pass {
  const ModelConfig& config;
  ComputeDType compute;
  absl::Span<const SampleInput> batch;
  StreamRows& image;
  StreamRows& text;
  float* conditioning;          // [B, D]: SiLU(temb + pemb), what every modulation Linear reads
  float* conditioning_scratch;  // [B, 256 + P + 2D]
  float* modulation;            // [B, modulation_width]: every AdaLN chunk of the pass
  int64_t modulation_width;
  absl::Span<float> attention_scratch;
  std::vector<AttentionSequence>& sequences;  // [B], filled by each attention call
  std::vector<float>& skipped_rows;           // see SaveSkippedRows
};

// Patchify (or take tokens), patch-embed, add cropped positions: image.x [N_total, D].
absl::Status EmbedImage(Pass& pass, Linear& patch_embed, const std::optional<Tensor>& pos_table) {
  const ModelConfig& c = pass.config;
  const int64_t d = c.hidden(), p = c.patch_size;
  StreamRows& s = pass.image;
  float* tokens = s.mlp_hidden;  // [N_total, C*p*p]: free until the first MLP (mlp >= C*p*p is checked)
  for (size_t b = 0; b < pass.batch.size(); ++b) {
    const TensorView& img = pass.batch[b].img_latent;
    float* sample_tokens = tokens + s.offset[b] * c.patch_features();
    if (img.shape.size() == 3) {
      Patchify(img.data, img.shape[0], img.shape[1], img.shape[2], p, sample_tokens);
    } else {
      std::copy(img.data, img.data + img.NumElements(), sample_tokens);
    }
  }
  RETURN_IF_ERROR(patch_embed.Forward(tokens, s.total, s.x));
  if (pos_table) {
    for (size_t b = 0; b < pass.batch.size(); ++b) {
      const Shape& img = pass.batch[b].img_latent.shape;
      AddCroppedPositions(pos_table->data.data(), *c.pos_embed_max_size, img[1] / p, img[2] / p, d,
                          s.x + s.offset[b] * d);
    }
  }
  return absl::OkStatus();
}

// conditioning [B, D] = SiLU(timestep embedding + pooled-text embedding).
absl::Status EmbedConditioning(Pass& pass, EngineModel& m) {
  const int64_t batch = pass.batch.size(), d = pass.config.hidden(), pooled = pass.config.pooled_projection_dim;
  float* features = pass.conditioning_scratch;              // [B, 256]
  float* pooled_in = features + batch * kTimestepFeatures;  // [B, P]
  float* hidden = pooled_in + batch * pooled;               // [B, D]
  float* pooled_embedding = hidden + batch * d;             // [B, D]
  for (int64_t b = 0; b < batch; ++b) {
    TimestepFeatures(pass.batch[b].timestep, features + b * kTimestepFeatures);
    std::copy_n(pass.batch[b].pooled_text.data, pooled, pooled_in + b * pooled);
  }
  RETURN_IF_ERROR(m.timestep_1.Forward(features, batch, hidden));
  SiLU(hidden, batch * d, hidden);
  RETURN_IF_ERROR(m.timestep_2.Forward(hidden, batch, pass.conditioning));
  RETURN_IF_ERROR(m.pooled_1.Forward(pooled_in, batch, hidden));
  SiLU(hidden, batch * d, hidden);
  RETURN_IF_ERROR(m.pooled_2.Forward(hidden, batch, pooled_embedding));
  for (int64_t i = 0; i < batch * d; ++i) pass.conditioning[i] += pooled_embedding[i];
  SiLU(pass.conditioning, batch * d, pass.conditioning);
  return absl::OkStatus();
}

// text.x [T_total, D] = context_embedder(txt_embed).
absl::Status EmbedText(Pass& pass, Linear& context_embedder) {
  StreamRows& s = pass.text;
  const int64_t j = pass.config.joint_attention_dim;
  float* packed = s.mlp_hidden;  // [T_total, J]: free until the first MLP (mlp >= J is checked)
  for (size_t b = 0; b < pass.batch.size(); ++b) {
    const TensorView& txt = pass.batch[b].txt_embed;
    std::copy(txt.data, txt.data + txt.NumElements(), packed + s.offset[b] * j);
  }
  return context_embedder.Forward(packed, s.total, s.x);
}

// Modulate, then project to q, k, v: the part of a block before the streams meet.
absl::Status PreAttention(Pass& pass, StreamBlock& w, AdaLnSite site, StreamRows& s) {
  const ModelConfig& c = pass.config;
  s.modulation = pass.modulation + w.modulation_offset;
  s.modulation_stride = pass.modulation_width;
  ModulateRows(s, s.x, site, c.hidden(), pass.compute, s.normed);
  return ProjectQkv(w, s, s.normed, c.num_attention_heads, c.attention_head_dim);
}

// The only place that knows there are two streams: each sample attends over its text and
// image tokens together, and the result lands back in each stream's `attended` rows.
void JointAttention(Pass& pass) {
  const int64_t batch = pass.batch.size(), d = pass.config.hidden();
  std::vector<AttentionSequence>& sequences = pass.sequences;
  for (int64_t b = 0; b < batch; ++b) {
    sequences[b].segments[0] = SegmentOf(pass.text, b, d);
    sequences[b].segments[1] = SegmentOf(pass.image, b, d);
    sequences[b].num_segments = 2;
  }
  Attention(sequences, pass.config.num_attention_heads, pass.config.attention_head_dim, {3 * d, d}, pass.compute,
            pass.attention_scratch);
}

// x += gate * out(attended).
absl::Status AttentionResidual(Pass& pass, StreamBlock& w, AdaLnSite site, StreamRows& s) {
  RETURN_IF_ERROR(w.out->Forward(s.attended, s.total, s.projected));
  GateIntoResidual(s, s.projected, site, pass.config.hidden());
  return absl::OkStatus();
}

// x += gate * ff(LN(x) * (1 + scale) + shift), ff = Linear(GELU_tanh(Linear(.))).
absl::Status MlpResidual(Pass& pass, StreamBlock& w, AdaLnSite site, StreamRows& s) {
  const int64_t d = pass.config.hidden();
  ModulateRows(s, s.x, site, d, pass.compute, s.normed);
  RETURN_IF_ERROR(w.ff->Forward(s.normed, s.total, s.mlp_hidden, s.projected));
  GateIntoResidual(s, s.projected, site, d);
  return absl::OkStatus();
}

// SD3.5-medium: x += g3 * attn2.out(SelfAttn(`normed`)) over each sample's image tokens.
// `normed` = LN(x_in) * (1 + sc3) + sh3 from the block's input (in image.mlp_hidden).
absl::Status DualSelfAttention(Pass& pass, SelfAttentionBlock& w, AdaLnSite site, const float* normed) {
  const ModelConfig& c = pass.config;
  StreamRows& s = pass.image;
  RETURN_IF_ERROR(ProjectQkv(w, s, normed, c.num_attention_heads, c.attention_head_dim));
  std::vector<AttentionSequence>& sequences = pass.sequences;
  for (size_t b = 0; b < sequences.size(); ++b) {
    sequences[b].segments[0] = SegmentOf(s, b, c.hidden());
    sequences[b].num_segments = 1;
  }
  Attention(sequences, c.num_attention_heads, c.attention_head_dim, {3 * c.hidden(), c.hidden()}, pass.compute,
            pass.attention_scratch);
  RETURN_IF_ERROR(w.out.Forward(s.attended, s.total, s.projected));
  GateIntoResidual(s, s.projected, site, c.hidden());
  return absl::OkStatus();
}

// One joint block (MODEL_SPEC section 3).
absl::Status JointBlockForward(Pass& pass, JointBlock& block) {
  StreamRows& image = pass.image;
  StreamRows& text = pass.text;
  RETURN_IF_ERROR(PreAttention(pass, block.image, block.image_layout.attention, image));
  RETURN_IF_ERROR(PreAttention(pass, block.text, block.text_layout.attention, text));
  if (block.dual_attention) {
    ModulateRows(image, image.x, block.image_layout.dual, pass.config.hidden(), pass.compute, image.mlp_hidden);
  }
  JointAttention(pass);
  RETURN_IF_ERROR(AttentionResidual(pass, block.image, block.image_layout.attention, image));
  if (block.dual_attention) {
    RETURN_IF_ERROR(DualSelfAttention(pass, *block.dual_attention, block.image_layout.dual, image.mlp_hidden));
  }
  RETURN_IF_ERROR(MlpResidual(pass, block.image, block.image_layout.mlp, image));
  if (!block.text.out) return absl::OkStatus();  // context-pre-only: the text stream ends here
  RETURN_IF_ERROR(AttentionResidual(pass, block.text, block.text_layout.attention, text));
  return MlpResidual(pass, block.text, block.text_layout.mlp, text);
}

// Skip-layer guidance (SD3.5): diffusers does not run a skipped block for that sample, so the
// sample leaves the block with the rows it came in with. The batch still runs the block over
// every sample's rows (one product for all of them), and afterwards the skipping samples get
// their input x back. That is the whole skip: x is the only state a block hands on (normed,
// qkv, attended, projected and mlp_hidden, the dual attention's input included, are written
// inside a block before they are read; the modulation comes from the conditioning vector),
// and attention runs per sample, so a skipping sample changes no other sample's result. A
// context-pre-only block leaves text.x as it is anyway; restoring it changes nothing.
bool SkipsBlock(const SampleInput& sample, int64_t block) { return absl::c_linear_search(sample.skip_layers, block); }

// Copies the image and text x rows of every sample that skips `block` into
// pass.skipped_rows [sum over those samples of (N_b + T_b), D], grown to need and kept.
// Returns whether any sample skips (nothing is copied or allocated otherwise).
bool SaveSkippedRows(Pass& pass, int64_t block) {
  const int64_t d = pass.config.hidden();
  int64_t floats = 0;
  for (size_t b = 0; b < pass.batch.size(); ++b) {
    if (SkipsBlock(pass.batch[b], block)) floats += (pass.image.rows[b] + pass.text.rows[b]) * d;
  }
  if (floats == 0) return false;
  if (static_cast<int64_t>(pass.skipped_rows.size()) < floats) pass.skipped_rows.resize(floats);
  float* saved = pass.skipped_rows.data();
  for (size_t b = 0; b < pass.batch.size(); ++b) {
    if (!SkipsBlock(pass.batch[b], block)) continue;
    for (const StreamRows* s : {&pass.image, &pass.text}) {
      saved = std::copy_n(s->x + s->offset[b] * d, s->rows[b] * d, saved);
    }
  }
  return true;
}

// Puts back what SaveSkippedRows(pass, block) saved: the skipping samples' x as before the block.
void RestoreSkippedRows(Pass& pass, int64_t block) {
  const int64_t d = pass.config.hidden();
  const float* saved = pass.skipped_rows.data();
  for (size_t b = 0; b < pass.batch.size(); ++b) {
    if (!SkipsBlock(pass.batch[b], block)) continue;
    for (StreamRows* s : {&pass.image, &pass.text}) {
      std::copy_n(saved, s->rows[b] * d, s->x + s->offset[b] * d);
      saved += s->rows[b] * d;
    }
  }
}

// y [N_total, p*p*Co] = proj_out(LN(x) * (1 + scale) + shift), [scale, shift] = norm_out(cond).
absl::Status FinalLayer(Pass& pass, EngineModel& m, float* y) {
  StreamRows& s = pass.image;
  s.modulation = pass.modulation + m.final_modulation_offset;
  s.modulation_stride = pass.modulation_width;
  // norm_out's chunks are [scale, shift], the order of the context-pre-only block's.
  ModulateRows(s, s.x, kContextPreOnly.attention, pass.config.hidden(), pass.compute, s.normed);
  return m.proj_out.ForwardRows(s.normed, s.total, y);
}

}  // namespace

absl::StatusOr<std::vector<Tensor>> Engine::Forward(absl::Span<const SampleInput> batch,
                                                    std::vector<MatmulCall>* matmul_trace) {
  if (batch.empty()) return std::vector<Tensor>();
  for (size_t b = 0; b < batch.size(); ++b) {
    if (absl::Status status = ValidateSample(batch[b]); !status.ok()) {
      return absl::InvalidArgumentError(absl::StrCat("sample ", b, ": ", status.message()));
    }
  }
  const ModelConfig& c = config_;
  const int64_t n_batch = batch.size(), d = c.hidden();
  std::lock_guard<std::mutex> lock(forward_mutex_);
  EngineWorkspace& ws = *workspace_;

  // Plan: each stream's rows, packed sample after sample, and the buffers that hold them.
  ws.image_rows.offset.assign(n_batch, 0);
  ws.text_rows.offset.assign(n_batch, 0);
  ws.image_rows.rows.resize(n_batch);
  ws.text_rows.rows.resize(n_batch);
  ws.sequences.resize(n_batch);
  ws.sequence_lengths.resize(n_batch);  // joint attention's; the dual's are shorter
  for (int64_t b = 0; b < n_batch; ++b) {
    const SampleTokens tokens = TokensOf(batch[b]);
    ws.image_rows.rows[b] = tokens.image_tokens;
    ws.text_rows.rows[b] = tokens.text_tokens;
    ws.sequence_lengths[b] = tokens.image_tokens + tokens.text_tokens;
  }
  // The MLP buffer doubles as input staging (patch features, text features) and holds the
  // dual-attention input: it is at least as wide as each.
  const int64_t wide = std::max({c.mlp_hidden(), c.patch_features(), c.joint_attention_dim, d});
  PlanStream(ws.image, d, std::max(wide, c.output_features()), ws.image_rows);
  PlanStream(ws.text, d, wide, ws.text_rows);
  EngineModel& m = *model_;
  const int64_t modulation_width = m.modulation.out_features();
  Carver carve(ws.conditioning,
               n_batch * (3 * d + kTimestepFeatures + c.pooled_projection_dim + modulation_width));
  const int64_t scratch =
      AttentionScratchFloats(ws.sequence_lengths, c.attention_head_dim, omp_get_max_threads());
  if (static_cast<int64_t>(ws.attention_scratch.size()) < scratch) ws.attention_scratch.resize(scratch);
  float* conditioning = carve.Take(n_batch * d);
  float* conditioning_scratch = carve.Take(n_batch * (2 * d + kTimestepFeatures + c.pooled_projection_dim));
  float* modulation = carve.Take(n_batch * modulation_width);
  Pass pass{c,
            options_.compute,
            batch,
            ws.image_rows,
            ws.text_rows,
            conditioning,
            conditioning_scratch,
            modulation,
            modulation_width,
            absl::MakeSpan(ws.attention_scratch),
            ws.sequences,
            ws.skipped_rows};

  m.dnnl->trace = matmul_trace;
  absl::Cleanup stop_tracing = [&m] { m.dnnl->trace = nullptr; };
  RETURN_IF_ERROR(EmbedImage(pass, m.patch_embed, m.pos_table));
  RETURN_IF_ERROR(EmbedConditioning(pass, m));
  RETURN_IF_ERROR(m.modulation.Forward(pass.conditioning, n_batch, pass.modulation));
  RETURN_IF_ERROR(EmbedText(pass, m.context_embedder));
  for (size_t i = 0; i < m.blocks.size(); ++i) {
    const bool some_skip = SaveSkippedRows(pass, i);  // skip-layer guidance rows keep their x
    RETURN_IF_ERROR(JointBlockForward(pass, m.blocks[i]));
    if (some_skip) RestoreSkippedRows(pass, i);
  }
  float* y = ws.image_rows.mlp_hidden;  // [N_total, p*p*Co]
  RETURN_IF_ERROR(FinalLayer(pass, m, y));

  std::vector<Tensor> outputs;
  outputs.reserve(n_batch);
  for (int64_t b = 0; b < n_batch; ++b) {
    const Shape& img = batch[b].img_latent.shape;
    const float* sample_y = y + ws.image_rows.offset[b] * c.output_features();
    if (img.size() == 3) {
      Tensor out({c.out_channels, img[1], img[2]});
      Unpatchify(sample_y, c.out_channels, img[1], img[2], c.patch_size, out.data.data());
      outputs.push_back(std::move(out));
    } else {
      outputs.emplace_back(Shape{img[0], c.output_features()},
                           std::vector<float>(sample_y, sample_y + img[0] * c.output_features()));
    }
  }
  return outputs;
}

}  // namespace mmdit
