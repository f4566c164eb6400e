#include "tests/core/reference_model.h"

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

namespace mmdit::testing {
namespace {

using Matrix = std::vector<std::vector<double>>;  // rows of features

const Tensor& W(const TensorMap& weights, const std::string& name) { return weights.at(name); }

Matrix Linear(const TensorMap& weights, const std::string& name, const Matrix& x) {
  const Tensor& w = W(weights, name + ".weight");
  const Tensor& b = W(weights, name + ".bias");
  const int64_t out = w.shape[0], in = w.NumElements() / out;
  Matrix y(x.size(), std::vector<double>(out));
  for (size_t r = 0; r < x.size(); ++r) {
    for (int64_t o = 0; o < out; ++o) {
      double acc = b.data[o];
      for (int64_t i = 0; i < in; ++i) acc += w.data[o * in + i] * x[r][i];
      y[r][o] = acc;
    }
  }
  return y;
}

double Silu(double v) { return v / (1 + std::exp(-v)); }
double Gelu(double v) { return 0.5 * v * (1 + std::tanh(std::sqrt(2 / M_PI) * (v + 0.044715 * v * v * v))); }

// LN(x) * (1 + scale) + shift, per row.
Matrix Modulate(const Matrix& x, const std::vector<double>& shift, const std::vector<double>& scale) {
  Matrix y = x;
  for (auto& row : y) {
    double mean = 0, var = 0;
    for (double v : row) mean += v / row.size();
    for (double v : row) var += (v - mean) * (v - mean) / row.size();
    for (size_t e = 0; e < row.size(); ++e)
      row[e] = (row[e] - mean) / std::sqrt(var + 1e-6) * (1 + scale[e]) + shift[e];
  }
  return y;
}

// chunk k of n of a vector.
std::vector<double> Chunk(const std::vector<double>& v, int k, int n) {
  const size_t size = v.size() / n;
  return std::vector<double>(v.begin() + k * size, v.begin() + (k + 1) * size);
}

void RmsNorm(Matrix& x, const Tensor& gamma, int64_t heads, int64_t hd) {
  for (auto& row : x) {
    for (int64_t h = 0; h < heads; ++h) {
      double ms = 0;
      for (int64_t e = 0; e < hd; ++e) ms += row[h * hd + e] * row[h * hd + e] / hd;
      for (int64_t e = 0; e < hd; ++e) row[h * hd + e] = row[h * hd + e] / std::sqrt(ms + 1e-6) * gamma.data[e];
    }
  }
}

Matrix Attend(const Matrix& q, const Matrix& k, const Matrix& v, int64_t heads, int64_t hd) {
  Matrix out(q.size(), std::vector<double>(heads * hd, 0.0));
  for (int64_t h = 0; h < heads; ++h) {
    for (size_t i = 0; i < q.size(); ++i) {
      std::vector<double> p(k.size());
      double max = -1e300, sum = 0;
      for (size_t j = 0; j < k.size(); ++j) {
        double dot = 0;
        for (int64_t e = 0; e < hd; ++e) dot += q[i][h * hd + e] * k[j][h * hd + e];
        p[j] = dot / std::sqrt(double(hd));
        max = std::max(max, p[j]);
      }
      for (double& s : p) sum += (s = std::exp(s - max));
      for (size_t j = 0; j < k.size(); ++j)
        for (int64_t e = 0; e < hd; ++e) out[i][h * hd + e] += p[j] / sum * v[j][h * hd + e];
    }
  }
  return out;
}

void AddGated(Matrix& x, const std::vector<double>& gate, const Matrix& y) {
  for (size_t r = 0; r < x.size(); ++r)
    for (size_t e = 0; e < gate.size(); ++e) x[r][e] += gate[e] * y[r][e];
}

Matrix Concat(const Matrix& a, const Matrix& b) {
  Matrix c = a;
  c.insert(c.end(), b.begin(), b.end());
  return c;
}

}  // namespace

Tensor ReferenceForward(const ModelConfig& c, const TensorMap& w, const SampleInput& sample) {
  const int64_t d = c.hidden(), p = c.patch_size, heads = c.num_attention_heads, hd = c.attention_head_dim;
  const Shape& img = sample.img_latent.shape;
  const bool image_form = img.size() == 3;
  const int64_t gh = image_form ? img[1] / p : 0, gw = image_form ? img[2] / p : 0;
  // 1. Patchify (channel slowest within a patch).
  Matrix tokens;
  if (image_form) {
    for (int64_t i = 0; i < gh; ++i)
      for (int64_t j = 0; j < gw; ++j) {
        std::vector<double> t;
        for (int64_t ch = 0; ch < img[0]; ++ch)
          for (int64_t u = 0; u < p; ++u)
            for (int64_t v = 0; v < p; ++v)
              t.push_back(sample.img_latent.data[(ch * img[1] + i * p + u) * img[2] + j * p + v]);
        tokens.push_back(t);
      }
  } else {
    for (int64_t n = 0; n < img[0]; ++n)
      tokens.emplace_back(sample.img_latent.data + n * img[1], sample.img_latent.data + (n + 1) * img[1]);
  }
  Matrix x = Linear(w, "pos_embed.proj", tokens);
  // 2. Cropped positions.
  if (c.pos_embed_max_size) {
    const int64_t m = *c.pos_embed_max_size, top = (m - gh) / 2, left = (m - gw) / 2;
    const Tensor& table = W(w, "pos_embed.pos_embed");
    for (int64_t i = 0; i < gh; ++i)
      for (int64_t j = 0; j < gw; ++j)
        for (int64_t e = 0; e < d; ++e) x[i * gw + j][e] += table.data[((top + i) * m + left + j) * d + e];
  }
  // 3-5. Conditioning.
  std::vector<double> features(256);
  for (int k = 0; k < 128; ++k) {
    const double a = sample.timestep * std::exp(-std::log(10000.0) * k / 128);
    features[k] = std::cos(a);
    features[128 + k] = std::sin(a);
  }
  auto mlp2 = [&](const std::string& prefix, const std::vector<double>& in) {
    Matrix h = Linear(w, prefix + ".linear_1", {in});
    for (double& v : h[0]) v = Silu(v);
    return Linear(w, prefix + ".linear_2", h)[0];
  };
  const std::vector<double> temb = mlp2("time_text_embed.timestep_embedder", features);
  const std::vector<double> pemb =
      mlp2("time_text_embed.text_embedder",
           std::vector<double>(sample.pooled_text.data, sample.pooled_text.data + c.pooled_projection_dim));
  std::vector<double> s(d);
  for (int64_t e = 0; e < d; ++e) s[e] = Silu(temb[e] + pemb[e]);
  // 6. Text.
  Matrix txt;
  for (int64_t t = 0; t < sample.txt_embed.shape[0]; ++t) {
    txt.emplace_back(sample.txt_embed.data + t * c.joint_attention_dim,
                     sample.txt_embed.data + (t + 1) * c.joint_attention_dim);
  }
  Matrix ctx = Linear(w, "context_embedder", txt);
  // 7. Blocks.
  for (int64_t i = 0; i < c.num_layers; ++i) {
    // Skip-layer guidance, as diffusers' SD3Transformer2DModel.forward: a skipped block is not
    // run, and both streams go on unchanged.
    if (std::find(sample.skip_layers.begin(), sample.skip_layers.end(), i) != sample.skip_layers.end()) continue;
    const std::string b = "transformer_blocks." + std::to_string(i) + ".";
    const bool pre_only = c.IsContextPreOnly(i), dual = c.IsDualAttention(i);
    const std::vector<double> mod = Linear(w, b + "norm1.linear", {s})[0];
    const std::vector<double> cmod = Linear(w, b + "norm1_context.linear", {s})[0];
    const int n = dual ? 9 : 6;
    const Matrix xm = Modulate(x, Chunk(mod, 0, n), Chunk(mod, 1, n));
    const Matrix cm = pre_only ? Modulate(ctx, Chunk(cmod, 1, 2), Chunk(cmod, 0, 2))
                               : Modulate(ctx, Chunk(cmod, 0, 6), Chunk(cmod, 1, 6));
    Matrix q = Linear(w, b + "attn.to_q", xm), k = Linear(w, b + "attn.to_k", xm), v = Linear(w, b + "attn.to_v", xm);
    Matrix cq = Linear(w, b + "attn.add_q_proj", cm), ck = Linear(w, b + "attn.add_k_proj", cm),
           cv = Linear(w, b + "attn.add_v_proj", cm);
    if (c.qk_norm) {
      RmsNorm(q, W(w, b + "attn.norm_q.weight"), heads, hd);
      RmsNorm(k, W(w, b + "attn.norm_k.weight"), heads, hd);
      RmsNorm(cq, W(w, b + "attn.norm_added_q.weight"), heads, hd);
      RmsNorm(ck, W(w, b + "attn.norm_added_k.weight"), heads, hd);
    }
    const Matrix o = Attend(Concat(cq, q), Concat(ck, k), Concat(cv, v), heads, hd);
    const Matrix o_txt(o.begin(), o.begin() + ctx.size()), o_img(o.begin() + ctx.size(), o.end());
    const Matrix x_in = x;
    AddGated(x, Chunk(mod, 2, n), Linear(w, b + "attn.to_out.0", o_img));
    if (dual) {
      const Matrix xm2 = Modulate(x_in, Chunk(mod, 6, n), Chunk(mod, 7, n));
      Matrix q2 = Linear(w, b + "attn2.to_q", xm2), k2 = Linear(w, b + "attn2.to_k", xm2),
             v2 = Linear(w, b + "attn2.to_v", xm2);
      if (c.qk_norm) {
        RmsNorm(q2, W(w, b + "attn2.norm_q.weight"), heads, hd);
        RmsNorm(k2, W(w, b + "attn2.norm_k.weight"), heads, hd);
      }
      AddGated(x, Chunk(mod, 8, n), Linear(w, b + "attn2.to_out.0", Attend(q2, k2, v2, heads, hd)));
    }
    auto feed_forward = [&](const std::string& prefix, const Matrix& in) {
      Matrix h = Linear(w, prefix + "net.0.proj", in);
      for (auto& row : h)
        for (double& val : row) val = Gelu(val);
      return Linear(w, prefix + "net.2", h);
    };
    AddGated(x, Chunk(mod, 5, n), feed_forward(b + "ff.", Modulate(x, Chunk(mod, 3, n), Chunk(mod, 4, n))));
    if (!pre_only) {
      AddGated(ctx, Chunk(cmod, 2, 6), Linear(w, b + "attn.to_add_out", o_txt));
      AddGated(ctx, Chunk(cmod, 5, 6),
               feed_forward(b + "ff_context.", Modulate(ctx, Chunk(cmod, 3, 6), Chunk(cmod, 4, 6))));
    }
  }
  // 8. Final layer: [scale, shift].
  const std::vector<double> final_mod = Linear(w, "norm_out.linear", {s})[0];
  const Matrix y = Linear(w, "proj_out", Modulate(x, Chunk(final_mod, 1, 2), Chunk(final_mod, 0, 2)));
  // 9. Unpatchify (channel fastest within a token).
  const int64_t co = c.out_channels;
  if (!image_form) {
    Tensor out({static_cast<int64_t>(y.size()), c.output_features()});
    for (size_t r = 0; r < y.size(); ++r)
      for (int64_t e = 0; e < c.output_features(); ++e) out.data[r * c.output_features() + e] = y[r][e];
    return out;
  }
  Tensor out({co, img[1], img[2]});
  for (int64_t i = 0; i < gh; ++i)
    for (int64_t j = 0; j < gw; ++j)
      for (int64_t u = 0; u < p; ++u)
        for (int64_t v = 0; v < p; ++v)
          for (int64_t ch = 0; ch < co; ++ch)
            out.data[(ch * img[1] + i * p + u) * img[2] + j * p + v] = y[i * gw + j][(u * p + v) * co + ch];
  return out;
}

}  // namespace mmdit::testing
