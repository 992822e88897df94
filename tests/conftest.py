"""Shared test setup: one torch thread, and a tiny checkpoint written by hand (no training needed)."""

from pathlib import Path

import pytest
import torch

import config
from model import create_model

# A U-Net small enough to run in milliseconds on a CPU: 16x16 images, two levels, T = 20.
TINY = dict(image_size=16, base_channels=32, channel_mults=(1, 2), attn_resolutions=(8,), num_heads=2,
            num_res_blocks=1, timesteps=20)


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """The tests' tensors are small: one thread is as fast as two, and much faster when other processes compete
    for the cores (OpenMP threads then spin waiting for each other)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_checkpoint(run, num_classes=0, seed=0, step=0):
    """Write checkpoints/RUN/last.pt (relative to the working directory) for a TINY model: raw weights differ from
    the EMA weights, and both have a non-zero output conv, so predictions are not all 0."""
    cfg = config.get_config("demo", num_classes=num_classes, run_name=run, **TINY)
    torch.manual_seed(seed)
    ema_model = create_model(cfg)
    raw_model = create_model(cfg)
    with torch.no_grad():  # the zero-initialised output conv would make every prediction 0
        ema_model.out_conv.weight.normal_(0, 0.05)
        raw_model.out_conv.weight.normal_(0, 0.05)
    state = {"model": raw_model.state_dict(), "ema": ema_model.state_dict(), "config": config.config_to_dict(cfg),
             "step": step, "epoch": 0}
    path = Path("checkpoints") / run / "last.pt"
    path.parent.mkdir(parents=True)
    torch.save(state, path)
    return path
