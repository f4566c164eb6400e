"""A float32 MMDiT in PyTorch, as ../shared/MODEL_SPEC.md (and our C++ engine) computes it.

It exists to train the digits model (training/train_digits.py) and to check the engine on the
trained weights (tests/python/test_digits_model.py). Parameter names are diffusers' (those of
SD3Transformer2DModel), so `state_dict()` is the checkpoint the engine loads. Image form only
(a position table, patches); no qk-norm, no dual attention: the digits model needs neither.
"""
import math

import torch
from torch import nn
import torch.nn.functional as F


def layer_norm(x):
    """LN over the last axis, eps 1e-6, no weight or bias (the spec's LN)."""
    return F.layer_norm(x, x.shape[-1:], eps=1e-6)


def gelu_tanh(x):
    return F.gelu(x, approximate="tanh")


def timestep_features(t):
    """[B] timesteps on the 0..1000 scale -> [B, 256]: cos first, then sin (spec 2.3)."""
    k = torch.arange(128, dtype=t.dtype, device=t.device)
    frequencies = torch.exp(-math.log(10000.0) * k / 128.0)
    angles = t[:, None] * frequencies[None, :]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


def sincos_position_table(grid, dim):
    """SD3's fixed 2D sin-cos table, [1, grid*grid, dim]: half the features for the row, half
    for the column. The engine loads whatever table the checkpoint holds; this is ours."""
    def one_axis(positions, width):
        omega = 1.0 / 10000 ** (torch.arange(width // 2, dtype=torch.float64) / (width / 2.0))
        angles = positions[:, None] * omega[None, :]
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)

    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float64),
                                torch.arange(grid, dtype=torch.float64), indexing="ij")
    table = torch.cat([one_axis(rows.reshape(-1), dim // 2), one_axis(cols.reshape(-1), dim // 2)], dim=1)
    return table.float()[None]


class MLP(nn.Module):
    """linear_2(SiLU(linear_1(x))): the timestep and pooled-text embedders."""

    def __init__(self, d_in, d):
        super().__init__()
        self.linear_1 = nn.Linear(d_in, d)
        self.linear_2 = nn.Linear(d, d)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))


class FeedForward(nn.Module):
    """ff.net.2(GELU_tanh(ff.net.0.proj(x))), under diffusers' names."""

    def __init__(self, d, hidden):
        super().__init__()
        self.net = nn.ModuleList([nn.Module(), nn.Identity(), nn.Linear(hidden, d)])
        self.net[0].proj = nn.Linear(d, hidden)

    def forward(self, x):
        return self.net[2](gelu_tanh(self.net[0].proj(x)))


class Modulation(nn.Module):
    """norm1.linear / norm1_context.linear / norm_out.linear: chunks of Linear(SiLU(vec))."""

    def __init__(self, d, chunks):
        super().__init__()
        self.linear = nn.Linear(d, chunks * d)
        self.chunks = chunks

    def forward(self, silu_vec):
        return self.linear(silu_vec)[:, None, :].chunk(self.chunks, dim=-1)


class JointAttention(nn.Module):
    def __init__(self, d, heads, context_pre_only):
        super().__init__()
        self.heads = heads
        for name in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj"):
            setattr(self, name, nn.Linear(d, d))
        self.to_out = nn.ModuleList([nn.Linear(d, d)])
        if not context_pre_only:
            self.to_add_out = nn.Linear(d, d)

    def split_heads(self, x):
        b, n, d = x.shape
        return x.view(b, n, self.heads, d // self.heads).transpose(1, 2)

    def forward(self, x, ctx):
        n_txt = ctx.shape[1]
        # Text first, then image: the order does not matter (no mask, no positions inside).
        q = torch.cat([self.add_q_proj(ctx), self.to_q(x)], dim=1)
        k = torch.cat([self.add_k_proj(ctx), self.to_k(x)], dim=1)
        v = torch.cat([self.add_v_proj(ctx), self.to_v(x)], dim=1)
        q, k, v = (self.split_heads(z) for z in (q, k, v))
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        o = (scores.softmax(dim=-1) @ v).transpose(1, 2).flatten(2)
        return o[:, n_txt:], o[:, :n_txt]


class JointBlock(nn.Module):
    """Spec 3: both streams through one code path; the last block's text stream ends early."""

    def __init__(self, d, heads, mlp_ratio, context_pre_only):
        super().__init__()
        self.context_pre_only = context_pre_only
        self.norm1 = Modulation(d, 6)
        self.norm1_context = Modulation(d, 2 if context_pre_only else 6)
        self.attn = JointAttention(d, heads, context_pre_only)
        self.ff = FeedForward(d, int(mlp_ratio * d))
        if not context_pre_only:
            self.ff_context = FeedForward(d, int(mlp_ratio * d))

    def forward(self, x, ctx, silu_vec):
        sh1, sc1, g1, sh2, sc2, g2 = self.norm1(silu_vec)
        if self.context_pre_only:
            csc1, csh1 = self.norm1_context(silu_vec)  # scale first in the last block
        else:
            csh1, csc1, cg1, csh2, csc2, cg2 = self.norm1_context(silu_vec)
        o_img, o_txt = self.attn(layer_norm(x) * (1 + sc1) + sh1, layer_norm(ctx) * (1 + csc1) + csh1)
        x = x + g1 * self.attn.to_out[0](o_img)
        x = x + g2 * self.ff(layer_norm(x) * (1 + sc2) + sh2)
        if self.context_pre_only:
            return x, None
        ctx = ctx + cg1 * self.attn.to_add_out(o_txt)
        ctx = ctx + cg2 * self.ff_context(layer_norm(ctx) * (1 + csc2) + csh2)
        return x, ctx


class PatchEmbed(nn.Module):
    def __init__(self, channels, patch, d, grid):
        super().__init__()
        self.proj = nn.Conv2d(channels, d, kernel_size=patch, stride=patch)
        self.register_buffer("pos_embed", sincos_position_table(grid, d))
        self.grid = grid

    def forward(self, latent):
        # Patchify (spec 2.1) as a Linear on [B, N, C*p*p], token n = i*w + j, feature
        # c*p*p + u*p + v: the conv's weight reshaped. (torch's CPU conv backward is far slower.)
        b, c, height, width = latent.shape
        p = self.proj.kernel_size[0]
        h, w = height // p, width // p
        patches = latent.view(b, c, h, p, w, p).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w, c * p * p)
        tokens = F.linear(patches, self.proj.weight.flatten(1), self.proj.bias)
        top, left = (self.grid - h) // 2, (self.grid - w) // 2
        table = self.pos_embed.view(self.grid, self.grid, -1)[top:top + h, left:left + w]
        return tokens + table.reshape(1, h * w, -1)


class TimeTextEmbed(nn.Module):
    def __init__(self, pooled_dim, d):
        super().__init__()
        self.timestep_embedder = MLP(256, d)
        self.text_embedder = MLP(pooled_dim, d)

    def forward(self, timestep, pooled):
        return self.timestep_embedder(timestep_features(timestep)) + self.text_embedder(pooled)


class MMDiT(nn.Module):
    """SD3Transformer2DModel's forward for a diffusers config dict."""

    def __init__(self, config):
        super().__init__()
        self.config = dict(config)
        d = config["num_attention_heads"] * config["attention_head_dim"]
        self.patch = config["patch_size"]
        self.out_channels = config["out_channels"]
        self.pos_embed = PatchEmbed(config["in_channels"], self.patch, d, config["pos_embed_max_size"])
        self.time_text_embed = TimeTextEmbed(config["pooled_projection_dim"], d)
        self.context_embedder = nn.Linear(config["joint_attention_dim"], d)
        layers = config["num_layers"]
        self.transformer_blocks = nn.ModuleList([
            JointBlock(d, config["num_attention_heads"], config.get("mlp_ratio", 4), i == layers - 1)
            for i in range(layers)
        ])
        self.norm_out = Modulation(d, 2)
        self.proj_out = nn.Linear(d, self.patch * self.patch * self.out_channels)
        self.zero_init_outputs()

    def zero_init_outputs(self):
        """AdaLN-Zero: every modulation and the output projection start at zero, so each block
        starts as the identity and the model as the zero prediction."""
        for module in self.modules():
            if isinstance(module, Modulation):
                nn.init.zeros_(module.linear.weight)
                nn.init.zeros_(module.linear.bias)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, latent, txt_embed, timestep, pooled_text):
        b, _, height, width = latent.shape
        p, h, w = self.patch, height // self.patch, width // self.patch
        x = self.pos_embed(latent)
        silu_vec = F.silu(self.time_text_embed(timestep, pooled_text))
        ctx = self.context_embedder(txt_embed)
        for block in self.transformer_blocks:
            x, ctx = block(x, ctx, silu_vec)
        scale, shift = self.norm_out(silu_vec)
        y = self.proj_out(layer_norm(x) * (1 + scale) + shift)  # [B, N, p*p*Co], channel fastest
        y = y.view(b, h, w, p, p, self.out_channels)
        return y.permute(0, 5, 1, 3, 2, 4).reshape(b, self.out_channels, height, width)

    def checkpoint_tensors(self):
        """The weights as the engine loads them: diffusers names, float32, contiguous."""
        return {name: t.detach().float().contiguous() for name, t in self.state_dict().items()}
