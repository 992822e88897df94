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


# --- the time budget ------------------------------------------------------------------------------------

def fake_clock(monkeypatch, start=0.0):
    """Replace the budget's clock by one that only moves when the test says (returns the dict holding its time)."""
    now = {"t": start}
    monkeypatch.setattr(training, "clock", lambda: now["t"])
    return now


def test_the_planned_length_is_the_longest_that_fits_with_its_checkpoints_and_previews(monkeypatch):
    now = fake_clock(monkeypatch)
    cfg = config.get_config("demo", save_every=50, sample_every=40)
    budget = training.TimeBudget(1000.0, spent=100.0)  # 100 s spent by an earlier session
    now["t"] = 20.0
    budget.step_seconds = 0.5
    budget.save_seconds = 3.0
    budget.preview_seconds = 7.0
    total = budget.plan_steps(40, cfg)  # planned after step 40, whose preview grid comes after the plan
    available = 1000 * (1 - training.TimeBudget.MARGIN) - 120

    def cost(n):  # the steps, the checkpoints at 50, 100, ... below n and at n, the grids at 40, 80, ... and at n
        saves = len([s for s in range(40, n) if s % 50 == 0]) + 1
        previews = len([s for s in range(40, n + 1) if s % 40 == 0]) + (n % 40 != 0)
        return (n - 40) * 0.5 + 3.0 * saves + 7.0 * previews

    assert cost(total) <= available < cost(total + 1)
    assert 1000 < total < 1700  # 1,700 steps would fit without the checkpoints and grids


def test_a_budget_times_its_first_steps_then_stops_at_the_warmups_end(monkeypatch):
    now = fake_clock(monkeypatch)
    budget = training.TimeBudget(600.0)
    for step in range(1, 100):
        now["t"] += 5.0 if step <= 3 else 1.0  # the first 3 steps are slower, and not timed
        if budget.measured(step, last_free_step=1000):
            break
    # 5% of 600 s = 30 s of timed steps, at least 5 steps: step 33, 30 timed steps of 1 s.
    assert (step, budget.step_seconds) == (33, 1.0)
    # Every timed step leaves its mean behind, for when another DDP rank decides that the timing is done.
    early = training.TimeBudget(600.0)
    for step in range(1, 6):
        now["t"] += 2.0
        early.measured(step, last_free_step=1000)
    assert early.step_seconds == 2.0
    short_warmup = training.TimeBudget(600.0)
    assert [short_warmup.measured(step, last_free_step=4) for step in range(1, 5)] == [False, False, False, True]


@pytest.mark.parametrize("text", ["10", "ten minutes", "0s", "-5m"])
def test_a_duration_that_cannot_be_read_is_refused(text):
    with pytest.raises(config.ConfigError, match="time_budget must be a duration such as 90s"):
        config.get_config("demo", time_budget=text)
