#include "core/weights.h"

#include <cassert>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace mmdit {
namespace {

// The one place that knows which tensors a configuration has. `visit(name, shape)` is called
// for each, in checkpoint order; BindWeights and ExpectedTensors both walk it.
class TensorCatalog {
 public:
  explicit TensorCatalog(const ModelConfig& c) : c_(c) {}

  template <typename Visitor>
  void Walk(Visitor&& visit) const {
    const int64_t d = c_.hidden(), p = c_.patch_size;
    visit("pos_embed.proj.weight", Shape{d, c_.in_channels, p, p});
    visit("pos_embed.proj.bias", Shape{d});
    if (c_.pos_embed_max_size) {
      const int64_t m = *c_.pos_embed_max_size;
      visit("pos_embed.pos_embed", Shape{1, m * m, d});
    }
    Linear(visit, "time_text_embed.timestep_embedder.linear_1", d, kTimestepFeatures);
    Linear(visit, "time_text_embed.timestep_embedder.linear_2", d, d);
    Linear(visit, "time_text_embed.text_embedder.linear_1", d, c_.pooled_projection_dim);
    Linear(visit, "time_text_embed.text_embedder.linear_2", d, d);
    Linear(visit, "context_embedder", d, c_.joint_attention_dim);
    for (int64_t i = 0; i < c_.num_layers; ++i) {
      const std::string b = absl::StrCat("transformer_blocks.", i, ".");
      const bool pre_only = c_.IsContextPreOnly(i), dual = c_.IsDualAttention(i);
      Linear(visit, b + "norm1.linear", (dual ? 9 : 6) * d, d);
      Linear(visit, b + "norm1_context.linear", (pre_only ? 2 : 6) * d, d);
      for (const char* name : {"to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0"}) {
        Linear(visit, b + "attn." + name, d, d);
      }
      if (!pre_only) Linear(visit, b + "attn.to_add_out", d, d);
      if (c_.qk_norm) {
        for (const char* name : {"norm_q", "norm_k", "norm_added_q", "norm_added_k"}) {
          visit(b + "attn." + name + ".weight", Shape{c_.attention_head_dim});
        }
      }
      if (dual) {
        for (const char* name : {"to_q", "to_k", "to_v", "to_out.0"}) Linear(visit, b + "attn2." + name, d, d);
        if (c_.qk_norm) {
          for (const char* name : {"norm_q", "norm_k"})
            visit(b + "attn2." + name + ".weight", Shape{c_.attention_head_dim});
        }
      }
      Linear(visit, b + "ff.net.0.proj", c_.mlp_hidden(), d);
      Linear(visit, b + "ff.net.2", d, c_.mlp_hidden());
      if (!pre_only) {
        Linear(visit, b + "ff_context.net.0.proj", c_.mlp_hidden(), d);
        Linear(visit, b + "ff_context.net.2", d, c_.mlp_hidden());
      }
    }
    Linear(visit, "norm_out.linear", 2 * d, d);
    Linear(visit, "proj_out", c_.output_features(), d);
  }

  static constexpr int64_t kTimestepFeatures = 256;

 private:
  template <typename Visitor>
  static void Linear(Visitor& visit, const std::string& name, int64_t out, int64_t in) {
    visit(name + ".weight", Shape{out, in});
    visit(name + ".bias", Shape{out});
  }
  const ModelConfig& c_;
};

// Takes tensors out of the map by name, checking shapes; collects every problem.
class Binder {
 public:
  Binder(const ModelConfig& config, TensorMap tensors) : tensors_(std::move(tensors)) {
    TensorCatalog(config).Walk([&](const std::string& name, Shape shape) { expected_[name] = std::move(shape); });
  }

  Tensor Take(const std::string& name) {
    const Shape& shape = expected_.at(name);  // an invariant: only catalogued names are taken
    auto it = tensors_.find(name);
    // On a problem the caller gets an empty placeholder (Finish fails anyway): allocating the
    // expected shape could itself exhaust memory when config and weights disagree.
    if (it == tensors_.end()) {
      problems_.push_back(absl::StrCat("missing '", name, "' ", ShapeString(shape)));
      return Tensor();
    }
    Tensor tensor = std::move(it->second);
    tensors_.erase(it);
    if (tensor.shape != shape) {
      problems_.push_back(
          absl::StrCat("'", name, "' has shape ", ShapeString(tensor.shape), ", expected ", ShapeString(shape)));
      return Tensor();
    }
    return tensor;
  }
  LinearWeights TakeLinear(const std::string& name) { return {Take(name + ".weight"), Take(name + ".bias")}; }
  std::optional<Tensor> TakeIf(bool present, const std::string& name) {
    return present ? std::optional<Tensor>(Take(name)) : std::nullopt;
  }
  std::optional<LinearWeights> TakeLinearIf(bool present, const std::string& name) {
    return present ? std::optional<LinearWeights>(TakeLinear(name)) : std::nullopt;
  }

  absl::Status Finish() {
    for (const auto& [name, tensor] : tensors_) {
      problems_.push_back(absl::StrCat("unexpected '", name, "' ", ShapeString(tensor.shape)));
    }
    if (problems_.empty()) return absl::OkStatus();
    return absl::InvalidArgumentError(absl::StrCat("weights do not match the config (", problems_.size(),
                                                   " problems): ", absl::StrJoin(problems_, "; ")));
  }

 private:
  TensorMap tensors_;
  std::map<std::string, Shape> expected_;
  std::vector<std::string> problems_;
};

StreamBlockWeights BindStream(Binder& bind, const std::string& block, bool image, bool pre_only, bool qk_norm) {
  const std::string attn = block + "attn.";
  StreamBlockWeights w;
  w.modulation = bind.TakeLinear(block + (image ? "norm1.linear" : "norm1_context.linear"));
  w.q = bind.TakeLinear(attn + (image ? "to_q" : "add_q_proj"));
  w.k = bind.TakeLinear(attn + (image ? "to_k" : "add_k_proj"));
  w.v = bind.TakeLinear(attn + (image ? "to_v" : "add_v_proj"));
  w.q_norm = bind.TakeIf(qk_norm, attn + (image ? "norm_q.weight" : "norm_added_q.weight"));
  w.k_norm = bind.TakeIf(qk_norm, attn + (image ? "norm_k.weight" : "norm_added_k.weight"));
  const bool full = image || !pre_only;
  w.out = bind.TakeLinearIf(full, attn + (image ? "to_out.0" : "to_add_out"));
  const std::string ff = block + (image ? "ff.net." : "ff_context.net.");
  w.ff_in = bind.TakeLinearIf(full, ff + "0.proj");
  w.ff_out = bind.TakeLinearIf(full, ff + "2");
  return w;
}

}  // namespace

std::vector<std::pair<std::string, Shape>> ExpectedTensors(const ModelConfig& config) {
  std::vector<std::pair<std::string, Shape>> out;
  TensorCatalog(config).Walk([&](const std::string& name, Shape shape) { out.emplace_back(name, std::move(shape)); });
  return out;
}

int64_t ParameterCount(const ModelConfig& config) {
  int64_t parameters = 0;
  TensorCatalog(config).Walk([&](const std::string&, const Shape& shape) { parameters += NumElements(shape); });
  return parameters;
}

absl::StatusOr<ModelWeights> BindWeights(const ModelConfig& c, TensorMap tensors) {
  Binder bind(c, std::move(tensors));
  ModelWeights w;
  const int64_t d = c.hidden();
  w.patch_embed = bind.TakeLinear("pos_embed.proj");
  w.patch_embed.weight.shape = {d, c.patch_features()};  // the conv kernel, read as a Linear
  if (c.pos_embed_max_size) {
    w.pos_table = bind.Take("pos_embed.pos_embed");
    w.pos_table->shape = {*c.pos_embed_max_size * *c.pos_embed_max_size, d};
  }
  w.timestep_1 = bind.TakeLinear("time_text_embed.timestep_embedder.linear_1");
  w.timestep_2 = bind.TakeLinear("time_text_embed.timestep_embedder.linear_2");
  w.pooled_1 = bind.TakeLinear("time_text_embed.text_embedder.linear_1");
  w.pooled_2 = bind.TakeLinear("time_text_embed.text_embedder.linear_2");
  w.context_embedder = bind.TakeLinear("context_embedder");
  for (int64_t i = 0; i < c.num_layers; ++i) {
    const std::string block = absl::StrCat("transformer_blocks.", i, ".");
    JointBlockWeights bw;
    bw.image = BindStream(bind, block, /*image=*/true, c.IsContextPreOnly(i), c.qk_norm);
    bw.text = BindStream(bind, block, /*image=*/false, c.IsContextPreOnly(i), c.qk_norm);
    if (c.IsDualAttention(i)) {
      const std::string attn2 = block + "attn2.";
      SelfAttentionWeights dual;
      dual.q = bind.TakeLinear(attn2 + "to_q");
      dual.k = bind.TakeLinear(attn2 + "to_k");
      dual.v = bind.TakeLinear(attn2 + "to_v");
      dual.out = bind.TakeLinear(attn2 + "to_out.0");
      dual.q_norm = bind.TakeIf(c.qk_norm, attn2 + "norm_q.weight");
      dual.k_norm = bind.TakeIf(c.qk_norm, attn2 + "norm_k.weight");
      bw.dual_attention = std::move(dual);
    }
    w.blocks.push_back(std::move(bw));
  }
  w.norm_out = bind.TakeLinear("norm_out.linear");
  w.proj_out = bind.TakeLinear("proj_out");
  if (absl::Status status = bind.Finish(); !status.ok()) return status;
  return w;
}

LinearWeights StackOutputs(std::vector<LinearWeights> parts) {
  int64_t out = 0;
  for (const LinearWeights& part : parts) out += part.weight.shape[0];
  const int64_t in = parts.empty() ? 0 : parts[0].weight.shape[1];
  // Reserved, not sized: untouched pages cost no memory, so the stacked matrix grows only as
  // fast as the parts are freed (a zero-filled one would briefly double them: 340 MB for
  // seed-default's modulation).
  std::vector<float> weight, bias;
  weight.reserve(out * in);
  bias.reserve(out);
  for (LinearWeights& part : parts) {
    assert(part.weight.shape[1] == in && "stacked Linears share their input");
    part.Load();
    weight.insert(weight.end(), part.weight.data.begin(), part.weight.data.end());
    bias.insert(bias.end(), part.bias.data.begin(), part.bias.data.end());
    part = LinearWeights();
  }
  return {Tensor({out, in}, std::move(weight)), Tensor({out}, std::move(bias))};
}

}  // namespace mmdit
