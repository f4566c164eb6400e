#!/usr/bin/python3
"""Trains the digits model: the small MMDiT that mmdit-server serves by default.

Data: scikit-learn's handwritten digits (Debian's python3-sklearn; 1797 real 8x8 images, 10
classes, ink 0..16), in image form as SD3 takes latents: [1, 8, 8], x0 = ink/8 - 1 in [-1, 1];
"the latent is the image". Patch 2 gives 16 image tokens (a 4x4 grid, position table 4x4):
SD3's own patch size, and a quarter of patch 1's tokens, so four times the training steps fit
in the time budget of 2 cores; 8x8 is the data's native size, so no invented pixels.

Objective: SD3's rectified flow, x_t = (1-s) x0 + s eps, predict eps - x0, s logit-normal
(SD3's m = 0, s = 1); the model's timestep is 1000 s. Text: a lookup-table encoder trained with
the model (training/lookup_text_encoder.py), prompts like "7", "seven", "a seven"; 10 % of them
dropped to the empty prompt, which is the unconditional one (CFG).

Deterministic: the same seed, torch version and --threads give the same files. Writes into
--out: config.json, scheduler_config.json, model.safetensors (EMA weights, diffusers names) and
text_encoder/{config.json, model.safetensors}. Then samples 10 images per digit with the
server's sampler (28 steps, guidance 7) and prints how often a classifier trained on the real
digits reads the requested digit.

  /usr/bin/python3 training/train_digits.py --out models/digits    # ~10 min on 2 cores
"""
import argparse
import copy
import json
import math
import os
import sys
import time

# torch's own threads split the work; OpenBLAS threading on top of them oversubscribes the
# cores (measured: 3.3x slower per step on 2 cores), and it is not part of determinism.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import lookup_text_encoder  # noqa: E402
import safetensors_io  # noqa: E402
from mmdit_torch import MMDiT  # noqa: E402

NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
NUMERALS = [str(d) for d in range(10)]
FILLERS = ["a", "an", "the", "digit", "number", "handwritten"]
# Row 0 is the empty prompt's (padding and the unconditional pooled vector).
VOCABULARY = ["<empty>"] + NUMERALS + NAMES + FILLERS
MAX_TOKENS = 4
TEMPLATES = ["{n}", "{w}", "a {w}", "a {n}", "an {w}", "the {w}", "the {n}", "digit {n}", "digit {w}",
             "the digit {w}", "the digit {n}", "number {n}", "the number {w}", "a handwritten {w}",
             "a handwritten {n}"]

CONFIG = {
    "_class_name": "SD3Transformer2DModel",
    "sample_size": 8,
    "patch_size": 2,
    "in_channels": 1,
    "out_channels": 1,
    "num_layers": 4,
    "attention_head_dim": 32,
    "num_attention_heads": 2,
    "joint_attention_dim": 32,
    "caption_projection_dim": 64,
    "pooled_projection_dim": 32,
    "pos_embed_max_size": 4,
    "qk_norm": None,
    "context_pre_only_last": True,
}
SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}


def prompt_table():
    """Every training prompt of every digit as token ids padded with 0: ids [K, T], lengths [K],
    digits [K]."""
    ids, lengths, digits = [], [], []
    for d in range(10):
        for template in TEMPLATES:
            prompt = template.format(n=NUMERALS[d], w=NAMES[d])
            found = lookup_text_encoder.token_ids(prompt, VOCABULARY, MAX_TOKENS)
            ids.append(found + [0] * (MAX_TOKENS - len(found)))
            lengths.append(len(found))
            digits.append(d)
    return torch.tensor(ids), torch.tensor(lengths), torch.tensor(digits)


class TextTables(torch.nn.Module):
    """The lookup encoder's two tables, trained with the model."""

    def __init__(self, generator):
        super().__init__()
        v = len(VOCABULARY)
        self.token_embedding = torch.nn.Parameter(torch.randn(v, CONFIG["joint_attention_dim"], generator=generator))
        self.pooled_embedding = torch.nn.Parameter(
            torch.randn(v, CONFIG["pooled_projection_dim"], generator=generator))

    def forward(self, ids, lengths):
        txt = self.token_embedding[ids]
        mask = (torch.arange(ids.shape[1])[None, :] < lengths[:, None]).float()[..., None]
        mean = (self.pooled_embedding[ids] * mask).sum(1) / lengths.clamp(min=1)[:, None].float()
        pooled = torch.where(lengths[:, None] > 0, mean, self.pooled_embedding[0].expand_as(mean))
        return txt, pooled


def sigma_schedule(steps, shift=SCHEDULER["shift"], t_count=SCHEDULER["num_train_timesteps"]):
    """core/sampler.cc's SigmaSchedule (diffusers' FlowMatchEulerDiscreteScheduler)."""
    def shifted(s):
        return shift * s / (1 + (shift - 1) * s)
    sigma_max = float(np.float32(shifted(np.float32(1.0))))
    sigma_min = float(np.float32(shifted(np.float32(1.0) / np.float32(t_count))))
    timesteps = np.linspace(sigma_max * t_count, sigma_min * t_count, steps)
    return [float(np.float32(shifted(t / t_count))) for t in timesteps] + [0.0]


@torch.no_grad()
def sample(model, text, ids, lengths, generator, steps=28, guidance=7.0):
    """Euler with CFG from noise: what Generate computes (up to the noise's generator)."""
    n = ids.shape[0]
    txt, pooled = text(ids, lengths)
    empty_txt, empty_pooled = text(torch.zeros_like(ids), torch.zeros_like(lengths))
    x = torch.randn(n, 1, 8, 8, generator=generator)
    sigmas = sigma_schedule(steps)
    for i in range(steps):
        t = torch.full((2 * n,), sigmas[i] * 1000.0)
        v = model(torch.cat([x, x]), torch.cat([empty_txt, txt]), t, torch.cat([empty_pooled, pooled]))
        v_uncond, v_cond = v[:n], v[n:]
        x = x + (sigmas[i + 1] - sigmas[i]) * (v_uncond + guidance * (v_cond - v_uncond))
    return x


def digit_classifier(images, labels):
    from sklearn.linear_model import LogisticRegression
    return LogisticRegression(max_iter=5000).fit(images.reshape(len(images), -1), labels)


def save_model(out, model, text, metadata):
    os.makedirs(os.path.join(out, "text_encoder"), exist_ok=True)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(CONFIG, f, indent=2)
        f.write("\n")
    with open(os.path.join(out, "scheduler_config.json"), "w") as f:
        json.dump(SCHEDULER, f, indent=2)
        f.write("\n")
    tensors = {k: v.numpy() for k, v in model.checkpoint_tensors().items()}
    safetensors_io.save(os.path.join(out, "model.safetensors"), tensors, metadata)
    encoder_config = {
        "_class_name": "LookupTextEncoder",
        "max_tokens": MAX_TOKENS,
        "joint_attention_dim": CONFIG["joint_attention_dim"],
        "pooled_projection_dim": CONFIG["pooled_projection_dim"],
        "vocabulary": VOCABULARY,
    }
    with open(os.path.join(out, "text_encoder", "config.json"), "w") as f:
        json.dump(encoder_config, f, indent=2)
        f.write("\n")
    safetensors_io.save(os.path.join(out, "text_encoder", "model.safetensors"),
                        {k: v.detach().numpy() for k, v in text.state_dict().items()}, metadata)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ema", type=float, default=0.999)
    parser.add_argument("--uncond", type=float, default=0.1, help="fraction of prompts dropped to the empty one")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)

    from sklearn.datasets import load_digits
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 8.0 - 1.0  # [1797, 1, 8, 8]
    labels = torch.tensor(digits.target)
    by_digit = [torch.nonzero(labels == d).flatten() for d in range(10)]
    prompt_ids, prompt_lengths, prompt_digits = prompt_table()

    model = MMDiT(CONFIG)
    text = TextTables(generator)
    ema_model, ema_text = copy.deepcopy(model), copy.deepcopy(text)
    parameters = list(model.parameters()) + list(text.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=args.lr, weight_decay=0.0, betas=(0.9, 0.99))
    warmup = min(200, args.steps // 10)

    def learning_rate(step):  # linear warm-up, cosine decay to a tenth
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, args.steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, learning_rate)
    started = time.time()
    running = 0.0
    for step in range(args.steps):
        # A batch of prompts, then for each an image of its digit.
        choice = torch.randint(len(prompt_ids), (args.batch,), generator=generator)
        ids, lengths, wanted = prompt_ids[choice], prompt_lengths[choice].clone(), prompt_digits[choice]
        drop = torch.rand(args.batch, generator=generator) < args.uncond
        ids = torch.where(drop[:, None], torch.zeros_like(ids), ids)
        lengths = torch.where(drop, torch.zeros_like(lengths), lengths)
        pick = torch.rand(args.batch, generator=generator)
        index = torch.stack([by_digit[d][int(p * len(by_digit[d]))] for d, p in zip(wanted.tolist(), pick)])
        x0 = images[index]
        noise = torch.randn(x0.shape, generator=generator)
        s = torch.sigmoid(torch.randn(args.batch, generator=generator))  # logit-normal
        x_t = (1 - s)[:, None, None, None] * x0 + s[:, None, None, None] * noise
        txt, pooled = text(ids, lengths)
        prediction = model(x_t, txt, 1000.0 * s, pooled)
        loss = F.mse_loss(prediction, noise - x0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        scheduler.step()
        decay = 0.0 if step < warmup else args.ema
        with torch.no_grad():
            for ema, live in ((ema_model, model), (ema_text, text)):
                for e, p in zip(ema.parameters(), live.parameters()):
                    e.mul_(decay).add_(p, alpha=1 - decay)
        running = 0.98 * running + 0.02 * loss.item() if step else loss.item()
        if step % (250 if args.steps > 500 else 20) == 0 or step == args.steps - 1:
            print(f"step {step:5d}  loss {running:.4f}  lr {scheduler.get_last_lr()[0]:.2e}  "
                  f"{time.time() - started:6.0f} s", flush=True)
    train_seconds = time.time() - started

    metadata = {"trained_by": "training/train_digits.py", "steps": args.steps, "batch": args.batch,
                "seed": args.seed, "torch": torch.__version__}
    save_model(args.out, ema_model, ema_text, metadata)
    print(f"trained in {train_seconds:.0f} s; wrote {args.out}", flush=True)

    # The check the acceptance test makes through the server, here on torch's own sampler.
    classifier = digit_classifier(digits.images, digits.target)
    wanted = torch.arange(10).repeat_interleave(10)
    table_row = {d: TEMPLATES.index("{n}") + d * len(TEMPLATES) for d in range(10)}
    rows = torch.tensor([table_row[int(d)] for d in wanted])
    images_out = sample(ema_model, ema_text, prompt_ids[rows], prompt_lengths[rows],
                        torch.Generator().manual_seed(1234))
    ink = ((images_out[:, 0] + 1.0) * 8.0).clamp(0, 16).numpy()
    accuracy = float((classifier.predict(ink.reshape(100, -1)) == wanted.numpy()).mean())
    print(f"accuracy of 100 samples (28 steps, guidance 7): {accuracy:.2f}")


if __name__ == "__main__":
    main()
