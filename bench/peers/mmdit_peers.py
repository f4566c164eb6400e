#!/usr/bin/python3
"""The peers of bench/peers.sh: the same MMDiT in PyTorch eager, exported to ONNX.

  mmdit_peers.py prepare --model DIR --batch B (--img_tokens N | --latent C,H,W) --txt_tokens T
                         --work DIR --iters K --threads N
      Loads the model (config.json + model.safetensors, diffusers names) into a PyTorch
      module written from shared/MODEL_SPEC.md, writes seeded inputs (.npy for `mmdit
      forward`, .bin for ONNX Runtime), times PyTorch eager, saves its output and exports
      model.onnx (opset 17, fixed shapes). Prints one JSON line.
  mmdit_peers.py compare --work DIR
      Relative L2 distance between the outputs of PyTorch, ONNX Runtime and our engine.

Not part of the build or CI: it needs Debian's python3-torch (and numpy, which it pulls in).
"""
import argparse
import json
import math
import os
import struct
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F


def read_safetensors(path):
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
        data = memoryview(f.read())
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        begin, end = entry["data_offsets"]
        raw = data[begin:end]
        if entry["dtype"] == "F32":
            array = np.frombuffer(raw, dtype="<f4")
        elif entry["dtype"] == "F16":
            array = np.frombuffer(raw, dtype="<f2").astype(np.float32)
        elif entry["dtype"] == "BF16":
            array = (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
        else:
            raise ValueError(f"{path}: {name}: unsupported dtype {entry['dtype']}")
        tensors[name] = torch.from_numpy(array.reshape(entry["shape"]).copy())
    return tensors


class MMDiT(torch.nn.Module):
    """MODEL_SPEC's forward pass on a batch of equally shaped samples."""

    def __init__(self, config, weights):
        super().__init__()
        self.c = config
        self.heads = config["num_attention_heads"]
        self.head_dim = config["attention_head_dim"]
        self.d = self.heads * self.head_dim
        self.p = config["patch_size"]
        self.layers = config["num_layers"]
        self.pre_only_last = bool(config.get("context_pre_only_last", False))
        self.dual = set(config.get("dual_attention_layers") or [])
        self.qk_norm = config.get("qk_norm") == "rms_norm"
        for name, tensor in weights.items():
            if name == "pos_embed.proj.weight":
                tensor = tensor.reshape(tensor.shape[0], -1)  # conv [D, C, p, p] as a Linear
            self.register_buffer(name.replace(".", "__"), tensor)
        half = 128
        frequencies = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float64) / half)
        self.register_buffer("frequencies", frequencies.float())
        # LayerNorm has no affine weights; explicit ones and zeros because torch 1.13 exports
        # an affine-free layer_norm with an empty scale input that ONNX Runtime rejects.
        self.register_buffer("ln_ones", torch.ones(self.d))
        self.register_buffer("ln_zeros", torch.zeros(self.d))

    def w(self, name):
        return getattr(self, name.replace(".", "__"))

    def linear(self, name, x):
        return F.linear(x, self.w(name + ".weight"), self.w(name + ".bias"))

    def modulate(self, x, shift, scale):
        return F.layer_norm(x, (self.d,), self.ln_ones, self.ln_zeros, eps=1e-6) * (1 + scale[:, None]) + shift[:, None]

    def rms(self, x, name):
        b, n, _ = x.shape
        x = x.reshape(b, n, self.heads, self.head_dim)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.w(name)
        return x.reshape(b, n, self.d)

    def attend(self, q, k, v):
        b, n, _ = q.shape
        split = lambda t: t.reshape(b, t.shape[1], self.heads, self.head_dim).transpose(1, 2)
        scores = torch.matmul(split(q), split(k).transpose(-1, -2)) * (1.0 / math.sqrt(self.head_dim))
        out = torch.matmul(torch.softmax(scores, dim=-1), split(v))
        return out.transpose(1, 2).reshape(b, n, self.d)

    def mlp(self, prefix, x):
        return self.linear(prefix + "net.2", F.gelu(self.linear(prefix + "net.0.proj", x), approximate="tanh"))

    def forward(self, img, txt, timestep, pooled):
        b, p = img.shape[0], self.p
        image_form = img.dim() == 4
        if image_form:
            _, ch, height, width = img.shape
            gh, gw = height // p, width // p
            tokens = img.reshape(b, ch, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5).reshape(b, gh * gw, ch * p * p)
        else:
            tokens = img
        x = self.linear("pos_embed.proj", tokens)
        if self.c.get("pos_embed_max_size"):
            m = self.c["pos_embed_max_size"]
            top, left = (m - gh) // 2, (m - gw) // 2
            table = self.w("pos_embed.pos_embed").reshape(m, m, self.d)
            x = x + table[top:top + gh, left:left + gw].reshape(1, gh * gw, self.d)
        angles = timestep[:, None] * self.frequencies[None]
        features = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
        embed = lambda prefix, v: self.linear(prefix + ".linear_2", F.silu(self.linear(prefix + ".linear_1", v)))
        s = F.silu(embed("time_text_embed.timestep_embedder", features) + embed("time_text_embed.text_embedder", pooled))
        ctx = self.linear("context_embedder", txt)
        t_len = ctx.shape[1]
        for i in range(self.layers):
            blk = f"transformer_blocks.{i}."
            pre_only = self.pre_only_last and i == self.layers - 1
            dual = i in self.dual
            mod = self.linear(blk + "norm1.linear", s).chunk(9 if dual else 6, dim=-1)
            cmod = self.linear(blk + "norm1_context.linear", s).chunk(2 if pre_only else 6, dim=-1)
            xm = self.modulate(x, mod[0], mod[1])
            cm = self.modulate(ctx, cmod[1], cmod[0]) if pre_only else self.modulate(ctx, cmod[0], cmod[1])
            q, k, v = (self.linear(blk + f"attn.to_{n}", xm) for n in "qkv")
            cq, ck, cv = (self.linear(blk + f"attn.add_{n}_proj", cm) for n in "qkv")
            if self.qk_norm:
                q, k = self.rms(q, blk + "attn.norm_q.weight"), self.rms(k, blk + "attn.norm_k.weight")
                cq, ck = self.rms(cq, blk + "attn.norm_added_q.weight"), self.rms(ck, blk + "attn.norm_added_k.weight")
            o = self.attend(torch.cat([cq, q], 1), torch.cat([ck, k], 1), torch.cat([cv, v], 1))
            x_in = x
            x = x + mod[2][:, None] * self.linear(blk + "attn.to_out.0", o[:, t_len:])
            if dual:
                xm2 = self.modulate(x_in, mod[6], mod[7])
                q2, k2, v2 = (self.linear(blk + f"attn2.to_{n}", xm2) for n in "qkv")
                if self.qk_norm:
                    q2, k2 = self.rms(q2, blk + "attn2.norm_q.weight"), self.rms(k2, blk + "attn2.norm_k.weight")
                x = x + mod[8][:, None] * self.linear(blk + "attn2.to_out.0", self.attend(q2, k2, v2))
            x = x + mod[5][:, None] * self.mlp(blk + "ff.", self.modulate(x, mod[3], mod[4]))
            if not pre_only:
                ctx = ctx + cmod[2][:, None] * self.linear(blk + "attn.to_add_out", o[:, :t_len])
                ctx = ctx + cmod[5][:, None] * self.mlp(blk + "ff_context.", self.modulate(ctx, cmod[3], cmod[4]))
        final = self.linear("norm_out.linear", s).chunk(2, dim=-1)  # [scale, shift]
        y = self.linear("proj_out", self.modulate(x, final[1], final[0]))
        if not image_form:
            return y
        co = self.c["out_channels"]
        return y.reshape(b, gh, gw, p, p, co).permute(0, 5, 1, 3, 2, 4).reshape(b, co, gh * p, gw * p)


def prepare(args):
    torch.set_num_threads(args.threads)
    with open(os.path.join(args.model, "config.json")) as f:
        config = json.load(f)
    model = MMDiT(config, read_safetensors(os.path.join(args.model, "model.safetensors"))).eval()
    rng = np.random.default_rng(0)
    if args.latent:
        img_shape = [int(v) for v in args.latent.split(",")]
    else:
        img_shape = [args.img_tokens, config["in_channels"] * config["patch_size"] ** 2]
    inputs = {
        "img_latent": rng.standard_normal([args.batch] + img_shape, dtype=np.float32),
        "txt_embed": rng.standard_normal([args.batch, args.txt_tokens, config["joint_attention_dim"]], dtype=np.float32),
        "timestep": np.array([1000.0 * (b + 1) / (args.batch + 1) for b in range(args.batch)], dtype=np.float32),
        "pooled_text": rng.standard_normal([args.batch, config["pooled_projection_dim"]], dtype=np.float32),
    }
    os.makedirs(args.work, exist_ok=True)
    manifest = []
    for name, array in inputs.items():
        np.save(os.path.join(args.work, name + ".npy"), array)
        array.tofile(os.path.join(args.work, name + ".bin"))
        manifest.append({"name": name, "shape": list(array.shape)})
    with open(os.path.join(args.work, "inputs.json"), "w") as f:
        json.dump(manifest, f)
    tensors = [torch.from_numpy(inputs[m["name"]]) for m in manifest]
    times = []
    with torch.inference_mode():
        for i in range(args.warmup + args.iters):
            start = time.perf_counter()
            out = model(*tensors)
            if i >= args.warmup:
                times.append((time.perf_counter() - start) * 1e3)
    np.save(os.path.join(args.work, "torch_out.npy"), out.numpy())
    with torch.no_grad():
        torch.onnx.export(model, tuple(tensors), os.path.join(args.work, "model.onnx"), opset_version=17,
                          input_names=[m["name"] for m in manifest], output_names=["prediction"],
                          do_constant_folding=True)
    print(json.dumps({"peer": "pytorch-eager", "torch": torch.__version__, "threads": torch.get_num_threads(),
                      "median_ms": float(np.median(times))}))


def compare(args):
    torch_out = np.load(os.path.join(args.work, "torch_out.npy"))
    ours = np.load(os.path.join(args.work, "ours_out.npy"))
    ort = np.fromfile(os.path.join(args.work, "ort_out.bin"), dtype=np.float32).reshape(torch_out.shape)
    rel = lambda a, b: float(np.linalg.norm((a - b).ravel()) / np.linalg.norm(b.ravel()))
    print(json.dumps({"rel_l2_ours_vs_torch": rel(ours, torch_out), "rel_l2_ort_vs_torch": rel(ort, torch_out)}))


def main():
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--model", required=True)
    p.add_argument("--batch", type=int, required=True)
    p.add_argument("--img_tokens", type=int)
    p.add_argument("--latent")
    p.add_argument("--txt_tokens", type=int, required=True)
    p.add_argument("--work", required=True)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    c = sub.add_parser("compare")
    c.add_argument("--work", required=True)
    args = parser.parse_args()
    prepare(args) if args.command == "prepare" else compare(args)


if __name__ == "__main__":
    sys.exit(main())
