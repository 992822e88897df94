"""Shared test setup: one torch thread, and a tiny checkpoint written by hand (no training needed)."""

import importlib
import os
from pathlib import Path

import pytest
import torch

import config
import utils
from model import create_model

# A U-Net small enough to run in milliseconds on a CPU: 16x16 images, two levels, T = 20.
TINY = dict(num_classes=0, image_size=16, base_channels=32, channel_mults=(1, 2), attn_resolutions=(8,),
            num_heads=2, num_res_blocks=1, timesteps=20)


def reference_library(name):
    """Import a development requirement that tests compare against (diffusers, huggingface_hub). Locally a missing
    one skips the test; in CI (CI=true, where requirements-dev.txt is installed) it fails, so the reference checks
    can never be skipped without anyone noticing."""
    if os.environ.get("CI"):
        return importlib.import_module(name)
    return pytest.importorskip(name)


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """The tests' tensors are small: one thread is as fast as two, and much faster when other processes compete
    for the cores (OpenMP threads then spin waiting for each other)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def float32_on_every_cpu(monkeypatch):
    """--amp auto is bf16 on CPUs with AMX or AVX-512 BF16; the tests compare with float32 results, so every CPU is
    taken for one without (tests of the bf16 choice set it themselves)."""
    monkeypatch.setattr(utils, "cpu_has_fast_bf16", lambda: False)


@torch.no_grad()
def randomise_zero_layers_(model, std=0.05):
    """Draw N(0, std^2) weights and biases for every layer that starts at zero (the output conv, each residual
    block's second conv, each attention's output projection), as training soon would: a fresh model predicts 0
    and ignores its labels. Returns the model."""
    for module in model.modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)) and torch.count_nonzero(module.weight) == 0:
            module.weight.normal_(0, std)
            module.bias.normal_(0, std)
    return model


def tiny_checkpoint(run, num_classes=0, seed=0, step=0, **overrides):
    """Write checkpoints/RUN/last.pt (relative to the working directory) for a TINY model: raw weights differ from
    the EMA weights, and neither has the zero layers of a fresh model, so predictions depend on x_t, t and y.
    `overrides` change the config (say channels=1 with dataset="folder")."""
    cfg = config.get_config("demo", run_name=run, **{**TINY, "num_classes": num_classes, **overrides})
    torch.manual_seed(seed)
    ema_model = randomise_zero_layers_(create_model(cfg))
    raw_model = randomise_zero_layers_(create_model(cfg))
    state = {"model": raw_model.state_dict(), "ema": ema_model.state_dict(), "config": config.config_to_dict(cfg),
             "step": step, "epoch": 0}
    path = Path("checkpoints") / run / "last.pt"
    path.parent.mkdir(parents=True)
    torch.save(state, path)
    return path
