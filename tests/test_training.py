"""training.py: the training state and its checkpoint format, built, saved and restored in one place."""

import pytest
import torch

import config
import training
import utils
from conftest import TINY


def tiny_state(seed=0):
    torch.manual_seed(seed)
    cfg = config.get_config("demo", amp="none", **TINY)
    return training.TrainingState(cfg, torch.device("cpu"), None, total_steps=10)


def test_a_checkpoint_holds_exactly_the_keys_and_restores_every_part(tmp_path):
    state = tiny_state(seed=0)
    state.step, state.epoch, state.batch_in_epoch, state.bad_steps = 5, 2, 3, 1
    with torch.no_grad():
        next(state.model.parameters()).add_(1.0)
    path = state.save(tmp_path, "step_0000005.pt", [utils.get_rng_state()])
    saved = utils.load_checkpoint(path)
    assert tuple(saved) == training.CHECKPOINT_KEYS
    assert torch.equal(utils.load_checkpoint(tmp_path / "last.pt")["model"]["stem.weight"], saved["model"]["stem.weight"])

    other = tiny_state(seed=1)
    assert other.restore(saved) is None  # same process count: the random state is restored, no notice
    assert (other.step, other.epoch, other.batch_in_epoch, other.bad_steps) == (5, 2, 3, 1)
    for name, value in state.model.state_dict().items():
        assert torch.equal(other.model.state_dict()[name], value), name
    assert other.lr_scheduler.state_dict() == state.lr_scheduler.state_dict()
    assert "2 process(es)" in tiny_state().restore({**saved, "rng": [saved["rng"][0]] * 2})


def test_restoring_a_weights_only_checkpoint_is_one_sentence(tmp_path):
    saved = tiny_state().checkpoint([utils.get_rng_state()])
    weights_only = {key: saved[key] for key in ("model", "ema", "config")}
    with pytest.raises(utils.CheckpointError, match="holds no optimizer, lr_scheduler, scaler, step"):
        tiny_state().restore(weights_only)
