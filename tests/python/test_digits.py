"""The trained default model (models/digits) end to end: prompts through mmdit-server's text
encoder, sampler and engine make pictures of the digit asked for, as a classifier trained on the
real digits reads them (issue 15's acceptance); the PyTorch model in training/ computes what the
engine computes on the committed weights; the Python text encoder is the C++ one.

Environment (set by ctest): MMDIT_SERVER, MMDIT_TOOL (the mmdit binary), MMDIT_MODELS
(models/), MMDIT_TRAINING (training/), PYTHONPATH (the built client package)."""
import concurrent.futures
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import sklearn.datasets
from sklearn.linear_model import LogisticRegression

import server_process
from mmdit_client import Client

DIGITS = pathlib.Path(os.environ["MMDIT_MODELS"]) / "digits"
sys.path.insert(0, os.environ["MMDIT_TRAINING"])
import lookup_text_encoder  # noqa: E402
import safetensors_io  # noqa: E402

IMAGES_PER_DIGIT = 10


@pytest.fixture(scope="module")
def client():
    process, port = server_process.start_server(DIGITS)
    with Client(f"127.0.0.1:{port}", timeout=120) as c:
        yield c
    server_process.stop_server(process)


@pytest.fixture(scope="module")
def classifier():
    """Logistic regression on the real digits: 8x8 images of ink 0..16, as the model's latent
    is x = ink / 8 - 1."""
    images, labels = sklearn.datasets.load_digits(return_X_y=True)
    return LogisticRegression(max_iter=5000).fit(images / 16.0, labels)


def as_ink(latent):
    """A final latent [1, 1, 8, 8] as the classifier's 64 features (ink / 16, clipped)."""
    return np.clip((latent.reshape(64) + 1.0) / 2.0, 0.0, 1.0)


def generate(client, **request):
    """The final latent of one Generate call with the server's defaults for everything unset."""
    *_, last = client.generate(**request)
    assert last.done
    return last.latent


def generate_all(client, requests):
    """Many Generate calls at once, as many users would send them (the server shares their steps)."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=20) as pool:
        return list(pool.map(lambda request: generate(client, **request), requests))


def test_prompts_make_the_digit_asked_for(client, classifier):
    requests = [{"prompt": str(digit), "seed": 1000 + digit * IMAGES_PER_DIGIT + k}
                for digit in range(10) for k in range(IMAGES_PER_DIGIT)]
    latents = generate_all(client, requests)
    assert all(latent.shape == (1, 1, 8, 8) for latent in latents)
    read = classifier.predict(np.stack([as_ink(latent) for latent in latents]))
    asked = np.repeat(np.arange(10), IMAGES_PER_DIGIT)
    accuracy = float(np.mean(read == asked))
    confusion = {d: np.bincount(read[asked == d], minlength=10).tolist() for d in range(10)}
    print(f"digits read as asked: {accuracy:.2f} of {len(asked)}; per digit, what was read: {confusion}")
    assert accuracy >= 0.9, confusion


def test_unconditional_images_are_not_all_one_digit(client, classifier):
    latents = generate_all(client, [{"prompt": "", "seed": 2000 + k} for k in range(20)])
    read = classifier.predict(np.stack([as_ink(latent) for latent in latents]))
    assert len(set(read.tolist())) >= 3, read


def test_the_same_seed_is_the_same_image_and_other_seeds_differ(client):
    first, again, other = (generate(client, prompt="a four", seed=s) for s in (7, 7, 8))
    assert first.tobytes() == again.tobytes()
    assert np.max(np.abs(first - other)) > 1e-2


def diffusers_sigmas(steps, shift, train_timesteps):
    """FlowMatchEulerDiscreteScheduler's sigmas after set_timesteps(steps), written from diffusers'
    code (float32 table, float64 linspace, shifted again), without the trailing 0."""
    def shifted(s):
        return shift * s / (1 + (shift - 1) * s)
    table = shifted(np.arange(1, train_timesteps + 1, dtype=np.float32)[::-1] / np.float32(train_timesteps))
    timesteps = np.linspace(float(table[0]) * train_timesteps, float(table[-1]) * train_timesteps, steps)
    return shifted(timesteps / train_timesteps).astype(np.float32)


def test_every_step_reaches_the_schedulers_sigma(client):
    """The sigma schedule the server samples with is diffusers' for the model's
    scheduler_config.json (shift 3): the images alone do not show a schedule without its shift."""
    import json
    scheduler = json.loads((DIGITS / "scheduler_config.json").read_text())
    assert scheduler["shift"] == 3.0
    for steps in (28, 5):
        progress = list(client.generate(prompt="3", seed=1, steps=steps))
        reached = np.array([p.sigma for p in progress], np.float32)
        expected = np.append(diffusers_sigmas(steps, scheduler["shift"], scheduler["num_train_timesteps"])[1:], 0)
        np.testing.assert_allclose(reached, expected, rtol=0, atol=1e-6)


def test_the_python_text_encoder_is_the_servers(client):
    """The server's encoder, seen through Generate: a prompt and the Python encoder's embeddings
    of it give the same bytes."""
    encoder = lookup_text_encoder.LookupTextEncoder(str(DIGITS / "text_encoder"))
    for prompt in ("7", "A Seven!", "the digit nine", ""):
        txt, pooled = encoder.encode(prompt)
        empty_txt, empty_pooled = encoder.encode("")
        by_prompt = generate(client, prompt=prompt, seed=3, steps=4)
        by_embeddings = generate(client, txt_embed=txt[None], pooled_text=pooled[None],
                                 negative_txt_embed=empty_txt[None], negative_pooled_text=empty_pooled[None],
                                 seed=3, steps=4)
        assert by_prompt.tobytes() == by_embeddings.tobytes(), prompt


def test_the_torch_model_is_the_engine_on_the_trained_weights(tmp_path):
    """training/mmdit_torch.py (the model the weights were trained in) against `mmdit forward`,
    on the committed weights, within 1e-4."""
    import torch
    from mmdit_torch import MMDiT
    import json

    config = json.loads((DIGITS / "config.json").read_text())
    model = MMDiT(config)
    weights = safetensors_io.load(str(DIGITS / "model.safetensors"))
    model.load_state_dict({name: torch.from_numpy(array) for name, array in weights.items()})
    model = model.double()  # the reference in float64; the engine computes in float32
    rng = np.random.default_rng(15)
    encoder = lookup_text_encoder.LookupTextEncoder(str(DIGITS / "text_encoder"))
    prompts = ["7", "a three", "", "the digit nine"]
    inputs = {
        "img_latent": rng.standard_normal((4, 1, 8, 8)).astype(np.float32),
        "txt_embed": np.stack([encoder.encode(p)[0] for p in prompts]),
        "timestep": np.array([1000.0, 750.0, 250.0, 20.0], np.float32),
        "pooled_text": np.stack([encoder.encode(p)[1] for p in prompts]),
    }
    for name, array in inputs.items():
        np.save(tmp_path / f"{name}.npy", array)
    subprocess.run([os.environ["MMDIT_TOOL"], "forward", "--model", str(DIGITS),
                    *(arg for name in inputs for arg in (f"--{name}", str(tmp_path / f"{name}.npy"))),
                    "--out", str(tmp_path / "out.npy")], check=True, capture_output=True)
    engine = np.load(tmp_path / "out.npy")
    with torch.no_grad():
        reference = model(*(torch.from_numpy(inputs[n]).double()
                            for n in ("img_latent", "txt_embed", "timestep", "pooled_text"))).numpy()
    assert engine.shape == reference.shape == (4, 1, 8, 8)
    difference = float(np.max(np.abs(engine - reference)))
    print(f"engine vs torch float64 on the trained weights: max |diff| {difference:.2e}")
    assert difference <= 1e-4
