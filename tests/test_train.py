"""train.py: exact resume, crash-safe checkpoints, signals, LR and EMA, accumulation, DDP, AMP, bad steps.

Every run here is a tiny U-Net on 16x16 `shapes` images, trained for a handful of steps inside a temporary
folder (train.py writes checkpoints/ and results/ relative to the working directory).
"""

import hashlib
import math
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import config
import diffusion
import train
import training
import utils
from conftest import TINY, tiny_checkpoint
from dataset import ShapesDataset
from model import UNet

REPO = Path(__file__).resolve().parents[1]


def as_flags(overrides):
    """{"channel_mults": (1, 2)} -> ["--channel-mults", "1", "2"]"""
    flags = []
    for name, value in overrides.items():
        values = value if isinstance(value, tuple) else (value,)
        flags += ["--" + name.replace("_", "-"), *map(str, values)]
    return flags


TINY_RUN = ["--preset", "demo", *as_flags(TINY), "--batch-size", "8", "--num-workers", "0", "--sample-every", "0",
            "--log-every", "1", "--warmup-steps", "2", "--lr", "1e-3", "--dropout", "0", "--amp", "none"]


@pytest.fixture(autouse=True)
def in_tmp_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def run_train(*flags):
    """Run train.main in-process; returns the exit code (0 when it returned normally)."""
    try:
        train.main([*TINY_RUN, *flags])
    except SystemExit as exit:
        return exit.code or 0
    return 0


def weights(run, name="last.pt"):
    return utils.load_checkpoint(Path("checkpoints") / run / name)


def assert_same_state(a, b):
    """Bit-for-bit equality of model, EMA and optimizer state, and of the LR schedule's position.

    The entries are compared as sets first: walking one side's keys alone would pass when the other side has
    more (or when the first has none at all).
    """
    assert a["step"] == b["step"]
    for key in ("model", "ema"):
        assert a[key].keys() == b[key].keys(), f"{key} entries differ"
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name} differs"
    state_a = a["optimizer"]["state"]
    state_b = b["optimizer"]["state"]
    assert state_a.keys() == state_b.keys() and len(state_a) > 0, "optimizer state slots differ"
    for index in state_a:
        assert state_a[index].keys() == state_b[index].keys(), f"optimizer slot {index} holds other names"
        for name in state_a[index]:
            assert torch.equal(state_a[index][name], state_b[index][name]), f"optimizer.{index}.{name} differs"
    # the learning rate of the next step, and where the schedule stands
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
    assert a["lr_scheduler"] == b["lr_scheduler"]


def stop_at_loss_call(monkeypatch, call_index, signum=signal.SIGTERM):
    """Send `signum` to this process during the `call_index`-th training_loss call (1-based)."""
    original = diffusion.GaussianDiffusion.training_loss
    calls = {"n": 0}

    def wrapped(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == call_index:
            os.kill(os.getpid(), signum)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(diffusion.GaussianDiffusion, "training_loss", wrapped)


def record_training_loss(monkeypatch):
    """Record every training_loss call: its images x0 and labels y, and (first call only) the model's weights.

    Returns the list the calls are appended to. Its length is the number of micro-batches the run took, and the
    first call's weights are the ones the run started from.
    """
    original = diffusion.GaussianDiffusion.training_loss
    calls = []

    def wrapped(self, model, x0, y=None, **kwargs):
        weights_now = None
        if not calls:
            weights_now = {name: value.detach().clone() for name, value in model.state_dict().items()}
        calls.append({"x0": x0.detach().clone(), "y": None if y is None else y.clone(), "weights": weights_now})
        return original(self, model, x0, y, **kwargs)

    monkeypatch.setattr(diffusion.GaussianDiffusion, "training_loss", wrapped)
    return calls


def assert_weights_equal(actual, expected):
    assert actual.keys() == expected.keys()
    for name, value in expected.items():
        assert torch.equal(actual[name], value), name


def content_seeded_training_loss(original):
    """training_loss with each image's timestep and noise drawn from a generator seeded by a hash of its pixels.

    Training then draws the same t and noise for an image whatever batch, micro-batch or process it lands in,
    so runs that split the same images differently can be compared.
    """
    def training_loss(self, model, x0, y=None, **kwargs):
        t = torch.empty(x0.shape[0], dtype=torch.long)
        noise = torch.empty(x0.shape)
        for i, image in enumerate(x0.detach().float().cpu()):
            digest = hashlib.sha256(image.contiguous().numpy().tobytes()).digest()
            generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
            t[i] = torch.randint(0, self.num_timesteps, (), generator=generator)
            noise[i] = torch.randn(image.shape, generator=generator)
        return original(self, model, x0, y, t=t.to(x0.device), noise=noise.to(x0.device))

    return training_loss


# --- resume -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("precision_flags, steps, stop_call", [
    pytest.param(["--amp", "none", "--num-workers", "0"], 7, 4, id="fp32"),
    # What real runs use: bf16 autocast (the demo preset's default) and persistent DataLoader workers. bf16 is
    # several times slower than fp32 on CPUs without AMX, hence fewer steps.
    pytest.param(["--amp", "bf16", "--num-workers", "2"], 4, 2, id="bf16-workers"),
])
def test_interrupted_and_resumed_run_equals_uninterrupted_run(monkeypatch, capsys, precision_flags, steps,
                                                              stop_call):
    # Flips and dropout on, so every kind of random draw of a step is exercised.
    flags = [*precision_flags, "--max-steps", str(steps), "--save-every", "100", "--random-flip", "--dropout", "0.1"]
    assert run_train("--run-name", "straight", *flags) == 0

    with monkeypatch.context() as patch:
        # a signal during step `stop_call`: the step finishes, then the run saves and exits
        stop_at_loss_call(patch, stop_call)
        assert run_train("--run-name", "split", *flags) == 0
    out = capsys.readouterr().out
    assert "SIGTERM: saved" in out
    interrupted = weights("split")
    assert interrupted["step"] == stop_call

    with monkeypatch.context() as patch:
        calls = record_training_loss(patch)
        assert run_train("--run-name", "split", *flags) == 0  # --resume auto picks up last.pt
    assert f"resuming checkpoints/split/last.pt at step {stop_call}" in capsys.readouterr().out
    # A run that ignored the checkpoint and started again with the same seed would also end equal to the
    # straight run; but it would take every step, from freshly initialised weights.
    assert len(calls) == steps - stop_call
    assert_weights_equal(calls[0]["weights"], interrupted["model"])
    resumed = weights("split")
    assert resumed["step"] == steps
    assert_same_state(weights("straight"), resumed)
    # The metrics file reads as one run: each step once.
    assert utils.read_metrics(Path("results/logs/split/metrics.csv"))["step"] == list(range(1, steps + 1))


def test_channels_last_trains_the_same_model_in_the_other_layout():
    assert run_train("--run-name", "nchw", "--max-steps", "3") == 0
    assert run_train("--run-name", "nhwc", "--max-steps", "3", "--channels-last") == 0
    nchw, nhwc = weights("nchw"), weights("nhwc")
    conv = "down.0.blocks.0.conv1.weight"
    assert nhwc["ema"][conv].is_contiguous(memory_format=torch.channels_last)  # the EMA follows the model's layout
    # The same random draws (no dropout or flips here; training_loss draws its noise in NCHW order) and the same
    # arithmetic in another order: equal up to float32 rounding, which Adam's first steps amplify (8e-6 seen).
    for key in ("model", "ema"):
        for name, value in nchw[key].items():
            torch.testing.assert_close(nhwc[key][name], value, atol=1e-4, rtol=0, msg=f"{key}.{name}")
    logged = [utils.read_metrics(Path(f"results/logs/{run}/metrics.csv"))["loss"] for run in ("nchw", "nhwc")]
    torch.testing.assert_close(torch.tensor(logged[1]), torch.tensor(logged[0]), atol=1e-5, rtol=0)


def make_image_folder(root, count):
    """`count` random 16x16 PNGs in one class folder."""
    import imageio.v3 as iio
    folder = Path(root) / "things"
    folder.mkdir(parents=True)
    generator = torch.Generator().manual_seed(0)
    for i in range(count):
        pixels = torch.randint(0, 256, (16, 16, 3), generator=generator, dtype=torch.uint8)
        iio.imwrite(folder / f"{i:03d}.png", pixels.numpy())
    return root


def test_resume_across_epochs_with_accumulation(monkeypatch):
    # 20 images in micro-batches of 4 with grad_accum 2: 2 steps per epoch (the last 4 images are dropped),
    # so 7 steps cross three epoch boundaries. The signal comes inside an accumulation, and the run stops
    # mid-epoch: at an epoch's end the resumed run would start the next epoch and skip nothing.
    make_image_folder("images", 20)
    flags = ["--dataset", "folder", "--data-dir", "images", "--batch-size", "4", "--max-steps", "7",
             "--grad-accum", "2", "--save-every", "100", "--random-flip"]
    with monkeypatch.context() as patch:
        straight_calls = record_training_loss(patch)
        assert run_train("--run-name", "straight", *flags) == 0
    with monkeypatch.context() as patch:
        stop_at_loss_call(patch, 5, signal.SIGINT)  # first micro-batch of step 3, the first step of epoch 1
        assert run_train("--run-name", "split", *flags) == 0
    interrupted = weights("split")
    assert (interrupted["step"], interrupted["epoch"], interrupted["batch_in_epoch"]) == (3, 1, 2)
    with monkeypatch.context() as patch:
        calls = record_training_loss(patch)
        assert run_train("--run-name", "split", *flags) == 0
    # Steps 4-7 only, from the checkpoint's weights, fed the very micro-batches (flips included) that the
    # straight run fed in steps 4-7: the data resumes mid-epoch, not at the epoch's start.
    assert len(calls) == 8
    assert_weights_equal(calls[0]["weights"], interrupted["model"])
    for call, straight_call in zip(calls, straight_calls[6:], strict=True):
        assert torch.equal(call["x0"], straight_call["x0"])
    assert_same_state(weights("straight"), weights("split"))


def test_epochs_decide_the_number_of_steps(monkeypatch):
    # 22 images in micro-batches of 4, two per step: 5 whole micro-batches an epoch make 2 steps (the fifth
    # micro-batch and 2 images are left over), so 3 epochs are 6 steps of 2 micro-batches. Counting whole
    # micro-batches (5) or images rounded up (22 / 8 -> 3) per epoch would give 15 or 9 steps.
    make_image_folder("images", 22)
    calls = record_training_loss(monkeypatch)
    assert run_train("--run-name", "r", "--dataset", "folder", "--data-dir", "images", "--batch-size", "4",
                     "--grad-accum", "2", "--max-steps", "0", "--epochs", "3") == 0
    state = weights("r")
    assert state["step"] == 6 and len(calls) == 12
    assert (state["epoch"], state["batch_in_epoch"]) == (2, 4)
    assert utils.read_metrics(Path("results/logs/r/metrics.csv"))["epoch"] == [0, 0, 1, 1, 2, 2]
    # Within an epoch no image comes twice.
    for epoch in range(3):
        images = torch.cat([call["x0"] for call in calls[4 * epoch: 4 * epoch + 4]])
        assert len({image.numpy().tobytes() for image in images}) == 16


def test_epoch_sampler_skips_exactly_what_was_seen():
    sampler = training.EpochSampler(100, seed=3, rank=0, world_size=1)
    sampler.set_epoch(2)
    full = list(sampler)
    sampler.set_epoch(2, skip=40)
    assert list(sampler) == full[40:]
    assert sorted(full) == list(range(100))
    sampler.set_epoch(3)
    assert list(sampler) != full
    # Two ranks split one epoch into disjoint halves of equal size.
    halves = [training.EpochSampler(101, seed=3, rank=rank, world_size=2) for rank in (0, 1)]
    for half in halves:
        half.set_epoch(2)
    first, second = (list(half) for half in halves)
    assert len(first) == len(second) == 50 and not set(first) & set(second)


def test_truncated_last_checkpoint_falls_back_to_newest_step_file(capsys):
    assert run_train("--run-name", "r", "--max-steps", "4", "--save-every", "2") == 0
    last = Path("checkpoints/r/last.pt")
    last.write_bytes(last.read_bytes()[:1000])
    assert run_train("--run-name", "r", "--max-steps", "6", "--save-every", "2") == 0
    err = capsys.readouterr().err
    assert "last.pt" in err and "warning" in err
    assert weights("r")["step"] == 6


def test_resume_refuses_architecture_change_and_applies_training_change(capsys):
    assert run_train("--run-name", "r", "--max-steps", "2") == 0
    assert run_train("--run-name", "r", "--max-steps", "2", "--base-channels", "64") == 1
    assert "--base-channels 64 would change the model" in capsys.readouterr().err
    assert run_train("--run-name", "r", "--max-steps", "3") == 0
    assert "changed settings: max_steps=3" in capsys.readouterr().out
    assert weights("r")["step"] == 3
    # The demo's power-function EMA: an EMA decay given alone on resume turns it off, as it does at the start.
    assert config.config_from_dict(weights("r")["config"]).ema_gamma == 7
    assert run_train("--run-name", "r", "--max-steps", "4", "--ema-decay", "0.9") == 0
    assert config.config_from_dict(weights("r")["config"]).ema_gamma == 0


@pytest.mark.parametrize("flag, value", [("--timesteps", "30"), ("--beta-schedule", "cosine"),
                                         ("--objective", "eps")])
def test_resume_refuses_a_changed_diffusion(flag, value, capsys):
    # The checkpoint was trained with T = 20, the linear schedule and v-prediction (the demo preset): the same
    # weights under another T, schedule or target would be a different, untrained model.
    path = tiny_checkpoint("r")
    before = path.read_bytes()
    assert run_train("--run-name", "r", flag, value) == 1
    assert f"{flag} {value} would change the model" in capsys.readouterr().err
    assert path.read_bytes() == before and list(path.parent.iterdir()) == [path]
    assert not Path("results").exists()  # refused before anything was written


def test_resume_from_a_named_checkpoint_file(monkeypatch, capsys):
    flags = ["--max-steps", "3", "--save-every", "1", "--keep-checkpoints", "5"]
    assert run_train("--run-name", "a", *flags) == 0
    run_a = {path: path.read_bytes() for path in Path("checkpoints/a").iterdir()}
    source = Path("checkpoints/a/step_0000001.pt")
    capsys.readouterr()
    with monkeypatch.context() as patch:
        calls = record_training_loss(patch)
        assert run_train("--run-name", "b", "--resume", str(source), *flags) == 0
    assert f"resuming {source} at step 1" in capsys.readouterr().out
    # Run b continued from a's step 1 (not from a's last.pt, nor from scratch), so it retraced a's steps 2 and 3.
    assert len(calls) == 2
    assert_weights_equal(calls[0]["weights"], utils.load_checkpoint(source)["model"])
    assert_same_state(weights("a"), weights("b"))
    assert utils.read_metrics(Path("results/logs/b/metrics.csv"))["step"] == [2, 3]
    assert {path: path.read_bytes() for path in Path("checkpoints/a").iterdir()} == run_a  # a left alone


def test_resume_none_never_overwrites_a_run(capsys):
    assert run_train("--run-name", "r", "--max-steps", "2") == 0
    before = Path("checkpoints/r/last.pt").read_bytes()
    assert run_train("--run-name", "r", "--max-steps", "2", "--resume", "none") == 1
    assert "already holds checkpoints" in capsys.readouterr().err
    assert Path("checkpoints/r/last.pt").read_bytes() == before


# --- checkpoint files -------------------------------------------------------------------------------

def test_crash_while_writing_a_checkpoint_leaves_the_previous_one(monkeypatch):
    path = Path("ckpt/last.pt")
    utils.save_checkpoint({"model": {"w": torch.ones(3)}, "config": {}}, path)

    def crash_halfway(state, f):
        f.write(b"half a checkpoint")
        raise RuntimeError("power cut")

    monkeypatch.setattr(torch, "save", crash_halfway)
    with pytest.raises(RuntimeError):
        utils.save_checkpoint({"model": {"w": torch.zeros(3)}, "config": {}}, path)
    assert torch.equal(utils.load_checkpoint(path)["model"]["w"], torch.ones(3))
    assert list(path.parent.iterdir()) == [path]  # no temporary file left behind


def test_full_disk_gives_a_clear_error_and_keeps_the_previous_checkpoint(monkeypatch):
    path = Path("ckpt/last.pt")
    utils.save_checkpoint({"model": {"w": torch.ones(3)}, "config": {}}, path)

    def disk_full(state, f):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(utils.CheckpointError, match="No space left on device.*previous checkpoint is intact"):
        utils.save_checkpoint({"model": {"w": torch.zeros(3)}, "config": {}}, path)
    assert torch.equal(utils.load_checkpoint(path)["model"]["w"], torch.ones(3))


def test_atomic_save_fsyncs_the_file_then_renames_then_fsyncs_the_folder(monkeypatch):
    # Without the first fsync a power cut can leave the renamed file empty; without the last one, the rename
    # itself can be lost. Each fsync is logged with the inode it syncs and the file's size at that moment.
    events = []
    real_fsync = os.fsync
    real_replace = os.replace

    def logged_fsync(fd):
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            events.append(("fsync folder", info.st_ino))
        else:
            events.append(("fsync file", info.st_ino, info.st_size))
        real_fsync(fd)

    def logged_replace(source, destination):
        events.append(("replace", Path(source), Path(destination)))
        real_replace(source, destination)

    monkeypatch.setattr(os, "fsync", logged_fsync)
    monkeypatch.setattr(os, "replace", logged_replace)
    path = Path("ckpt/last.pt")
    utils.save_checkpoint({"model": {"w": torch.ones(3)}, "config": {}}, path)
    assert len(events) == 3
    fsync_file, replace, fsync_folder = events
    # the temporary file, which the rename makes `path` (same inode), with all its bytes already written
    assert fsync_file == ("fsync file", path.stat().st_ino, path.stat().st_size)
    temporary, destination = replace[1:]
    assert destination == path and temporary.parent == path.parent and temporary != path
    assert not temporary.exists()
    assert fsync_folder == ("fsync folder", path.parent.stat().st_ino)
    assert torch.equal(utils.load_checkpoint(path)["model"]["w"], torch.ones(3))


def test_full_disk_during_training_exits_with_the_message(monkeypatch, capsys):
    assert run_train("--run-name", "r", "--max-steps", "2") == 0
    before = Path("checkpoints/r/last.pt").read_bytes()

    def disk_full(state, f):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    assert run_train("--run-name", "r", "--max-steps", "4") == 1
    assert "No space left on device" in capsys.readouterr().err
    assert Path("checkpoints/r/last.pt").read_bytes() == before


class Payload:
    """Unpickling this calls os.system: what a malicious checkpoint would do."""

    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_malicious_pickle_in_a_checkpoint_is_refused():
    torch.save({"model": {}, "config": {}, "extra": Payload()}, "evil.pt")
    with pytest.raises(utils.CheckpointError, match="cannot be read"):
        utils.load_checkpoint("evil.pt")
    assert not Path("pwned").exists()


def test_checkpoint_contents_and_pruning():
    assert run_train("--run-name", "r", "--max-steps", "3", "--save-every", "1", "--keep-checkpoints", "2") == 0
    state = weights("r")
    for key in ("model", "ema", "optimizer", "lr_scheduler", "scaler", "step", "epoch", "config", "rng"):
        assert key in state
    assert state["config"]["base_channels"] == 32
    assert [path.name for path in utils.step_checkpoints("checkpoints/r")] == [
        "step_0000003.pt", "step_0000002.pt"]


# --- LR, EMA, accumulation, precision, bad steps ----------------------------------------------------

def test_lr_schedule_warmup_cosine_and_constant():
    import config
    cfg = config.get_config("demo", warmup_steps=100, lr_schedule="cosine")
    assert training.lr_factor(0, cfg, 1100) == pytest.approx(0.01)  # the first step already learns
    assert training.lr_factor(49, cfg, 1100) == pytest.approx(0.5)
    assert training.lr_factor(99, cfg, 1100) == pytest.approx(1.0)  # end of warmup: the peak
    assert training.lr_factor(100, cfg, 1100) == pytest.approx(1.0)
    assert training.lr_factor(600, cfg, 1100) == pytest.approx(0.5)  # halfway through the cosine
    assert training.lr_factor(1100, cfg, 1100) == pytest.approx(0.0, abs=1e-12)  # end: zero
    constant = config.get_config("demo", warmup_steps=100, lr_schedule="constant")
    assert training.lr_factor(1000, constant, 1100) == 1.0


def test_logged_lr_follows_the_schedule():
    assert run_train("--run-name", "r", "--max-steps", "6", "--warmup-steps", "2") == 0
    lr = utils.read_metrics(Path("results/logs/r/metrics.csv"))["lr"]
    # after step s the next step's LR is peak * factor(s); cosine over the 4 steps after warmup
    expected = [1e-3 * (s + 1) / 2 if s < 2 else 1e-3 * 0.5 * (1 + math.cos(math.pi * (s - 2) / 4))
                for s in range(1, 7)]
    assert lr == pytest.approx(expected, abs=1e-9)


def test_ema_update_is_the_documented_average():
    model = torch.nn.Linear(3, 2)
    ema = torch.nn.Linear(3, 2)
    before = [p.detach().clone() for p in ema.parameters()]
    utils.update_ema(ema, model, decay=0.9)
    for old, new, theta in zip(before, ema.parameters(), model.parameters()):
        assert torch.allclose(new, 0.9 * old + 0.1 * theta.detach())
    assert training.ema_decay_at(0, 0.9999) == pytest.approx(0.1)
    assert training.ema_decay_at(10**7, 0.9999) == 0.9999


def test_the_power_function_ema_weighs_step_s_by_s_to_the_gamma():
    # The weights after step s are the number v_s; the EMA after t steps is sum_s c_s v_s. For gamma = 1 the
    # coefficients are exactly (2s - 1) / t^2 (the product of (1 - 1/k)^2 telescopes to (s / t)^2).
    values = torch.randn(50, dtype=torch.float64)
    ema = torch.nn.Parameter(torch.zeros((), dtype=torch.float64))
    for step, value in enumerate(values, start=1):
        beta = training.ema_decay_at(step, 0.9999, gamma=1.0)
        ema.data = beta * ema.data + (1 - beta) * value
    steps = torch.arange(1, 51, dtype=torch.float64)
    assert ema.item() == pytest.approx(((2 * steps - 1) / 50 ** 2 * values).sum().item(), rel=1e-12)
    # For gamma = 7 the average sits at about (gamma + 1) / (gamma + 2) of any run's length.
    for length in (100, 10_000):
        mean_step = 0.0
        for step in range(1, length + 1):
            beta = training.ema_decay_at(step, 0.9999, gamma=7.0)
            mean_step = beta * mean_step + (1 - beta) * step
        assert mean_step / length == pytest.approx(8 / 9, rel=0.01)


def test_ema_weights_are_updated_after_every_step_and_saved():
    assert run_train("--run-name", "r", "--max-steps", "3", "--ema-decay", "0.5", "--save-every", "1",
                     "--keep-checkpoints", "5") == 0
    step2 = weights("r", "step_0000002.pt")
    step3 = weights("r", "step_0000003.pt")
    decay = training.ema_decay_at(3, 0.5)  # min(0.5, 4/13)
    for name, theta in step3["model"].items():
        expected = decay * step2["ema"][name] + (1 - decay) * theta
        assert torch.allclose(step3["ema"][name], expected, atol=1e-7), name
    assert any(not torch.equal(step3["ema"][name], step3["model"][name]) for name in step3["model"])


def test_two_micro_batches_equal_one_double_batch(monkeypatch):
    # Make each image's noise and timestep a function of the image alone, so the split does not change them.
    original = diffusion.GaussianDiffusion.training_loss

    def per_image_draws(self, model, x0, y=None, **kwargs):
        code = (x0.flatten(1) * torch.arange(1, x0[0].numel() + 1)).sum(1)
        t = (code.abs() * 1000).long() % self.num_timesteps
        noise = torch.sin(x0 * 13.0 + code[:, None, None, None])
        return original(self, model, x0, y, t=t, noise=noise)

    monkeypatch.setattr(diffusion.GaussianDiffusion, "training_loss", per_image_draws)
    assert run_train("--run-name", "a", "--max-steps", "1", "--batch-size", "8", "--grad-accum", "2") == 0
    assert run_train("--run-name", "b", "--max-steps", "1", "--batch-size", "16", "--grad-accum", "1") == 0
    # After one Adam step, exp_avg = (1 - beta1) * gradient: compare the gradients themselves, equal up to float
    # summation order. (The weights are not compared: Adam's first update is lr * sign(g), which turns the
    # rounding noise of near-zero gradients into differences the size of the learning rate.)
    state_a = weights("a")["optimizer"]["state"]
    state_b = weights("b")["optimizer"]["state"]
    assert len(state_a) == len(state_b) > 0
    for slot_a, slot_b in zip(state_a.values(), state_b.values()):
        # float32 sums in another order: 1e-5 of the largest entry absolute (8e-9 of 2e-3 seen), 1e-4 relative
        scale = slot_b["exp_avg"].abs().max()
        assert torch.allclose(slot_a["exp_avg"], slot_b["exp_avg"], rtol=1e-4, atol=1e-5 * scale)
    # and the step really saw 16 images: not the same as a single micro-batch of 8
    assert run_train("--run-name", "c", "--max-steps", "1", "--batch-size", "8", "--grad-accum", "1") == 0
    state_c = weights("c")["optimizer"]["state"]
    assert not all(torch.allclose(slot_a["exp_avg"], slot_c["exp_avg"], rtol=1e-4, atol=1e-9)
                   for slot_a, slot_c in zip(state_a.values(), state_c.values()))


def test_bf16_autocast_on_cpu_computes_in_bf16_and_gives_finite_loss(monkeypatch):
    # A finite loss alone would pass if --amp bf16 were ignored: look at what the convolutions put out.
    original = diffusion.GaussianDiffusion.training_loss
    conv_dtypes = []
    loss_dtypes = []

    def record_dtype(module, inputs, output):
        conv_dtypes.append(output.dtype)

    def hooked(self, model, *args, **kwargs):
        hooks = [module.register_forward_hook(record_dtype) for module in model.modules()
                 if isinstance(module, torch.nn.Conv2d)]
        try:
            loss = original(self, model, *args, **kwargs)
        finally:
            for hook in hooks:
                hook.remove()
        loss_dtypes.append(loss.dtype)
        return loss

    monkeypatch.setattr(diffusion.GaussianDiffusion, "training_loss", hooked)
    assert run_train("--run-name", "r", "--max-steps", "3", "--amp", "bf16") == 0
    assert len(conv_dtypes) > 3 and set(conv_dtypes) == {torch.bfloat16}
    assert loss_dtypes == [torch.float32] * 3  # the loss itself is reduced in float32
    loss = utils.read_metrics(Path("results/logs/r/metrics.csv"))["loss"]
    assert len(loss) == 3 and all(math.isfinite(value) for value in loss)


@pytest.mark.parametrize("fast", [True, False])
def test_bf16_on_a_cpu_without_fast_bf16_warns_to_use_fp32(monkeypatch, capsys, fast):
    monkeypatch.setattr(utils, "cpu_has_fast_bf16", lambda: fast)
    assert utils.resolve_amp("bf16", torch.device("cpu")) == torch.bfloat16
    err = capsys.readouterr().err
    assert ("neither AMX nor AVX-512 BF16" in err and "--amp none" in err) != fast
    assert utils.resolve_amp("none", torch.device("cpu")) is None and not capsys.readouterr().err
    # auto: bf16 where the CPU does it in hardware, float32 elsewhere, and no warning either way.
    assert utils.resolve_amp("auto", torch.device("cpu")) == (torch.bfloat16 if fast else None)
    assert not capsys.readouterr().err


def test_fp16_on_cpu_is_refused_with_a_sentence(capsys):
    assert run_train("--run-name", "r", "--max-steps", "1", "--amp", "fp16") == 1
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_non_finite_loss_skips_the_step_and_too_many_stop_the_run(monkeypatch, capsys):
    original = diffusion.GaussianDiffusion.training_loss
    calls = {"n": 0}

    def nan_on_third_call(self, *args, **kwargs):
        calls["n"] += 1
        loss = original(self, *args, **kwargs)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(diffusion.GaussianDiffusion, "training_loss", nan_on_third_call)
    assert run_train("--run-name", "r", "--max-steps", "3", "--save-every", "1", "--keep-checkpoints", "5") == 0
    assert "non-finite loss at step 3" in capsys.readouterr().err
    step2 = weights("r", "step_0000002.pt")
    step3 = weights("r", "step_0000003.pt")
    assert step3["bad_steps"] == 1
    for name in step2["model"]:
        assert torch.equal(step2["model"][name], step3["model"][name])  # the bad step changed nothing
    assert all(torch.isfinite(value).all() for value in weights("r")["model"].values())

    monkeypatch.setattr(diffusion.GaussianDiffusion, "training_loss",
                        lambda self, *args, **kwargs: original(self, *args, **kwargs) * float("nan"))
    before = Path("checkpoints/r/last.pt").read_bytes()
    assert run_train("--run-name", "r", "--max-steps", "10", "--max-bad-steps", "2") == 1
    assert "non-finite losses in a row" in capsys.readouterr().err
    assert Path("checkpoints/r/last.pt").read_bytes() == before


def test_conditional_run_feeds_labels_drops_them_and_previews_every_class(monkeypatch):
    model_labels = {True: [], False: []}  # by module.training: the model in training, the EMA model in previews
    real_forward = UNet.forward

    def record_labels(self, x, t, y=None):
        model_labels[self.training].append(y)
        return real_forward(self, x, t, y)

    sampled_labels = []
    real_sample = diffusion.GaussianDiffusion.sample

    def record_sample(self, model, shape, *args, **kwargs):
        sampled_labels.append(kwargs.get("y"))
        return real_sample(self, model, shape, *args, **kwargs)

    monkeypatch.setattr(UNet, "forward", record_labels)
    monkeypatch.setattr(diffusion.GaussianDiffusion, "sample", record_sample)
    calls = record_training_loss(monkeypatch)
    assert run_train("--run-name", "r", "--num-classes", "4", "--cond-drop-prob", "0.5", "--batch-size", "32",
                     "--max-steps", "4", "--sample-every", "4") == 0

    # The loader's labels are those of the images it served, in the sampler's order.
    shapes = ShapesDataset(train=True, image_size=16)
    first_indices = list(training.EpochSampler(len(shapes), seed=0))[:128]
    loader_labels = torch.cat([call["y"] for call in calls])
    assert torch.equal(loader_labels, shapes.labels[first_indices].long())
    # The network gets them, each replaced by the null label 4 with probability 0.5: of 128 draws, the share
    # dropped lies in [0.3, 0.7] but for a chance of about 1e-5 (4.5 standard deviations).
    trained_labels = torch.cat(model_labels[True])
    kept = trained_labels != 4
    assert torch.equal(trained_labels[kept], loader_labels[kept])
    assert 0.3 <= (~kept).float().mean().item() <= 0.7
    # One preview, at step 4: a 6x6 grid with the classes in turn, every model call conditioned on them.
    preview_labels = torch.arange(36) % 4
    assert len(sampled_labels) == 1 and torch.equal(sampled_labels[0], preview_labels)
    assert model_labels[False] and all(torch.equal(y, preview_labels) for y in model_labels[False])
    assert Path("results/images/r/step_0000004.png").exists()


# --- outputs and processes --------------------------------------------------------------------------

def test_run_writes_metrics_plot_samples_and_tensorboard():
    assert run_train("--run-name", "r", "--max-steps", "4", "--sample-every", "2") == 0
    metrics = utils.read_metrics(Path("results/logs/r/metrics.csv"))
    for column in ("step", "epoch", "loss", "lr", "grad_norm", "img_per_sec"):
        assert len(metrics[column]) == 4
    assert Path("results/plots/r/loss.png").stat().st_size > 0
    assert sorted(path.name for path in Path("results/images/r").glob("*.png")) == [
        "step_0000002.png", "step_0000004.png"]
    assert any(Path("results/logs/r").glob("events.out.tfevents.*"))
    assert Path("results/logs/r/config.json").exists()


def torchrun(tmp_path, port, script, *flags):
    """Run `script` (train.py, or a launcher that calls train.main) in 2 gloo processes; returns its stdout."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
               str(script), *TINY_RUN, "--device", "cpu", *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_two_process_gloo_run_resumes_bit_for_bit(tmp_path, capsys):
    # A constant learning rate after warmup, so the 3-step run follows the same schedule as the 5-step ones.
    flags = ["--batch-size", "4", "--lr-schedule", "constant"]
    torchrun(tmp_path, 29531, REPO / "train.py", "--run-name", "ddp", "--max-steps", "3", *flags)
    interrupted = weights("ddp")
    assert interrupted["step"] == 3
    # One RNG state per process, and not the same: each rank draws its own noise, timesteps and flips.
    rng = interrupted["rng"]
    assert len(rng) == 2 and not torch.equal(rng[0]["torch"], rng[1]["torch"])
    out = torchrun(tmp_path, 29541, REPO / "train.py", "--run-name", "ddp", "--max-steps", "5", *flags)
    assert "resuming checkpoints/ddp/last.pt at step 3" in out and "notice: the checkpoint was written" not in out
    torchrun(tmp_path, 29542, REPO / "train.py", "--run-name", "straight", "--max-steps", "5", *flags)
    assert_same_state(weights("straight"), weights("ddp"))
    # Only rank 0 writes the metrics file: one row per step, steps 1-3 from the first run.
    assert utils.read_metrics(tmp_path / "results/logs/ddp/metrics.csv")["step"] == [1, 2, 3, 4, 5]

    # The same checkpoint in one process: the run goes on, but cannot restore two ranks' random draws in one
    # process, and says so.
    assert run_train("--run-name", "ddp", "--max-steps", "6", "--device", "cpu", *flags) == 0
    assert "notice: the checkpoint was written by 2 process(es), this run has 1" in capsys.readouterr().out
    assert weights("ddp")["step"] == 6


# Runs train.main with content_seeded_training_loss, and saves the weights each rank ends with.
DDP_LAUNCHER = """
import os
import sys
sys.path[:0] = [{repo!r}, {tests!r}]
import torch
import diffusion
import train
from test_train import content_seeded_training_loss

seeded_loss = content_seeded_training_loss(diffusion.GaussianDiffusion.training_loss)
trained = {{}}

def training_loss(self, model, *args, **kwargs):
    trained["model"] = model
    return seeded_loss(self, model, *args, **kwargs)

diffusion.GaussianDiffusion.training_loss = training_loss
train.main(sys.argv[1:])
model = getattr(trained["model"], "module", trained["model"])  # the module inside DistributedDataParallel
torch.save(model.state_dict(), "weights_rank" + os.environ["RANK"] + ".pt")
"""


def test_two_processes_at_batch_b_train_like_one_process_at_batch_2b(tmp_path, monkeypatch):
    # The ranks take alternate indices of one shared shuffle, so at each step their two micro-batches of 8 are
    # together the one process's batch of 16.
    size = len(ShapesDataset(train=True, image_size=16))
    halves = [list(training.EpochSampler(size, seed=0, rank=rank, world_size=2)) for rank in (0, 1)]
    whole = list(training.EpochSampler(size, seed=0))
    for step in range(4):
        together = halves[0][8 * step: 8 * step + 8] + halves[1][8 * step: 8 * step + 8]
        assert sorted(together) == sorted(whole[16 * step: 16 * step + 16])

    # Each process draws its own t and noise; drawn from each image's pixels instead, they no longer depend on
    # which process trains on the image. No flips and no dropout (TINY_RUN), the other per-process draws.
    flags = ["--max-steps", "4", "--no-random-flip", "--lr-schedule", "constant", "--device", "cpu"]
    launcher = tmp_path / "launch.py"
    launcher.write_text(DDP_LAUNCHER.format(repo=str(REPO), tests=str(REPO / "tests")))
    torchrun(tmp_path, 29543, launcher, "--run-name", "two", "--batch-size", "8", *flags)
    monkeypatch.setattr(diffusion.GaussianDiffusion, "training_loss",
                        content_seeded_training_loss(diffusion.GaussianDiffusion.training_loss))
    assert run_train("--run-name", "one", "--batch-size", "16", *flags) == 0

    rank0 = torch.load(tmp_path / "weights_rank0.pt")
    rank1 = torch.load(tmp_path / "weights_rank1.pt")
    assert_weights_equal(rank0, weights("two")["model"])
    # The ranks stay in step: with the gradients averaged across them, both take the same updates, bit for bit.
    assert_weights_equal(rank1, rank0)
    # The loss and the gradient norm of every step are the one process's (logged to 6 digits): the gradient is
    # the mean over all 16 images. Summed across ranks its norm would double; unsynced, each rank would step
    # along its own half's gradient.
    two = utils.read_metrics(tmp_path / "results/logs/two/metrics.csv")
    one = utils.read_metrics(tmp_path / "results/logs/one/metrics.csv")
    assert len(two["step"]) == len(one["step"]) == 4
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-4)
    assert two["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-4)
    # And the same weights, up to float32 summation order, which Adam amplifies where a gradient is rounding
    # noise around 0 (3e-5 seen); summed or unsynced gradients make them differ by 2e-3 to 5e-3.
    one_model = weights("one")["model"]
    assert rank0.keys() == one_model.keys()
    for name, value in one_model.items():
        torch.testing.assert_close(rank0[name], value, atol=2e-4, rtol=0, msg=name)


# --- one optimizer step: training.apply_gradients ----------------------------------------------------------

def sgd_problem(loss_scale, scaler=None):
    """A linear layer with SGD at lr 1, whose loss has gradient norm 5 x loss_scale (a 3-4-5 triangle). With a
    GradScaler the backward pass goes through scaler.scale(loss), as in training."""
    layer = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        layer.weight.zero_()
    optimizer = torch.optim.SGD(layer.parameters(), lr=1.0)
    loss = layer(torch.tensor([[3.0, 4.0]])).sum() * loss_scale
    (loss if scaler is None else scaler.scale(loss)).backward()
    return layer, optimizer, loss.detach()


def test_apply_gradients_clips_the_norm_and_reports_it_before_clipping():
    layer, optimizer, loss = sgd_problem(2.0)  # gradient (6, 8), norm 10
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    grad_norm, finite = training.apply_gradients(layer, optimizer, scaler, loss, grad_clip=1.0)
    assert finite and grad_norm == pytest.approx(10.0)
    torch.testing.assert_close(layer.weight, torch.tensor([[-0.6, -0.8]]))  # one step along the clipped gradient
    assert layer.weight.grad is None  # cleared for the next step


def test_apply_gradients_skips_a_non_finite_step():
    layer, optimizer, _ = sgd_problem(float("inf"))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    _, finite = training.apply_gradients(layer, optimizer, scaler, torch.tensor(float("inf")), 1.0)
    assert not finite
    assert torch.count_nonzero(layer.weight) == 0 and layer.weight.grad is None  # no step, gradients cleared


def test_apply_gradients_unscales_fp16_gradients_and_lets_the_scaler_skip_overflows():
    # torch.amp.GradScaler runs on a CPU too, so the fp16 branch is tested here. The scaler multiplies the loss by
    # 2^16 before backward; apply_gradients must divide that out before it clips, reports the norm and steps.
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16, enabled=True)
    layer, optimizer, loss = sgd_problem(2.0, scaler)  # true gradient (6, 8), norm 10
    assert torch.equal(layer.weight.grad, torch.tensor([[6.0, 8.0]]) * 2**16)
    grad_norm, finite = training.apply_gradients(layer, optimizer, scaler, loss, grad_clip=1.0)
    assert finite and grad_norm == pytest.approx(10.0)
    torch.testing.assert_close(layer.weight, torch.tensor([[-0.6, -0.8]]))  # the same step as without a scaler
    assert scaler.get_scale() == 2.0**16  # a good step keeps the scale

    # A finite loss whose scaled gradient (4e34 x 2^16) is inf in float32: what an fp16 overflow looks like.
    layer, optimizer, loss = sgd_problem(1e34, scaler)
    assert torch.isfinite(loss) and not torch.isfinite(layer.weight.grad).all()
    grad_norm, finite = training.apply_gradients(layer, optimizer, scaler, loss, grad_clip=1.0)
    assert grad_norm == math.inf  # reported in the metrics
    assert finite  # not a bad step (documented): overflows are routine with fp16, and the scaler's business
    assert torch.count_nonzero(layer.weight) == 0 and layer.weight.grad is None  # update skipped, gradients cleared
    assert scaler.get_scale() == 2.0**15  # and the scale halved

    # A non-finite loss is a bad step with a scaler too; the scaler backs off again.
    layer, optimizer, loss = sgd_problem(float("nan"), scaler)
    _, finite = training.apply_gradients(layer, optimizer, scaler, loss, grad_clip=1.0)
    assert not finite
    assert torch.count_nonzero(layer.weight) == 0 and scaler.get_scale() == 2.0**14


# --- --time-budget ----------------------------------------------------------------------------------------

def one_second_per_step(monkeypatch, stop_at_call=None):
    """A clock for the budget that moves 1 s per training_loss call and stands still otherwise, so the plan is
    the same on every machine; optionally SIGTERM during call `stop_at_call`. Returns the clock's dict."""
    now = {"t": 0.0, "calls": 0}
    monkeypatch.setattr(training, "clock", lambda: now["t"])
    original = diffusion.GaussianDiffusion.training_loss

    def timed(self, *args, **kwargs):
        now["t"] += 1.0
        now["calls"] += 1
        if now["calls"] == stop_at_call:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(diffusion.GaussianDiffusion, "training_loss", timed)
    return now


def test_a_time_budget_run_trains_exactly_like_max_steps_with_the_number_it_chose(monkeypatch, capsys):
    one_second_per_step(monkeypatch)
    assert run_train("--run-name", "budget", "--time-budget", "30s", "--warmup-steps", "3") == 0
    out = capsys.readouterr().out
    # Step 3 is timed (the warmup ends there), then 30 s x 0.95 less the 3 s spent leaves 25 more steps.
    assert "time budget 30s: 1 s per step" in out and "so 28 steps in all" in out
    budget_run = weights("budget")
    assert budget_run["step"] == 28 and budget_run["budget_steps"] == 28
    assert budget_run["train_seconds"] == pytest.approx(28.0)

    assert run_train("--run-name", "fixed", "--max-steps", "28", "--warmup-steps", "3") == 0
    assert_same_state(budget_run, weights("fixed"))


def test_a_resumed_budget_run_keeps_its_plan_and_does_not_count_the_pause(monkeypatch, capsys):
    now = one_second_per_step(monkeypatch)
    assert run_train("--run-name", "whole", "--time-budget", "30s", "--warmup-steps", "3") == 0
    now.update(t=0.0, calls=0)
    one_second_per_step(monkeypatch, stop_at_call=12)
    assert run_train("--run-name", "parts", "--time-budget", "30s", "--warmup-steps", "3") == 0
    stopped = weights("parts")
    assert stopped["step"] == 12 and stopped["budget_steps"] == 28 and stopped["train_seconds"] == 12.0

    later = one_second_per_step(monkeypatch)
    later["t"] = 3600.0  # an hour passes while the run is stopped
    assert run_train("--run-name", "parts", "--time-budget", "30s", "--warmup-steps", "3") == 0
    assert "fixed by the time budget 30s; 0.2 min used" in capsys.readouterr().out
    assert_same_state(weights("whole"), weights("parts"))


def test_the_budget_stops_a_run_on_time_when_the_machine_gets_slower(monkeypatch, capsys):
    now = one_second_per_step(monkeypatch)
    original = diffusion.GaussianDiffusion.training_loss

    def slower(self, *args, **kwargs):
        if now["calls"] >= 10:
            now["t"] += 1.0  # 2 s per step from step 11 on
        return original(self, *args, **kwargs)

    monkeypatch.setattr(diffusion.GaussianDiffusion, "training_loss", slower)
    assert run_train("--run-name", "slow", "--time-budget", "30s", "--warmup-steps", "3") == 0
    assert "time budget 30s reached at step" in capsys.readouterr().out
    stopped = weights("slow")
    assert stopped["step"] < 28 and stopped["train_seconds"] <= 30


@pytest.mark.parametrize("flags, message", [
    (["--time-budget", "10m", "--max-steps", "100"], "cannot go with --max-steps; give one of the two"),
    (["--time-budget", "10m", "--epochs", "3"], "cannot go with --epochs"),
    (["--time-budget", "ten"], "time_budget must be a duration such as 90s"),
])
def test_a_time_budget_that_contradicts_the_length_is_refused(flags, message, capsys):
    assert run_train("--run-name", "bad", *flags) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not Path("checkpoints/bad/last.pt").exists()


def test_a_planned_budget_run_refuses_another_budget_on_resume(monkeypatch, capsys):
    one_second_per_step(monkeypatch, stop_at_call=8)
    assert run_train("--run-name", "b", "--time-budget", "30s", "--warmup-steps", "3") == 0
    assert run_train("--run-name", "b", "--time-budget", "1h", "--warmup-steps", "3") == 1
    assert "fixed its length at 28 steps" in capsys.readouterr().err
    # Naming a length instead trains on from the same checkpoint, with the budget switched off.
    assert run_train("--run-name", "b", "--max-steps", "10", "--warmup-steps", "3") == 0
    assert weights("b")["step"] == 10 and weights("b")["config"]["time_budget"] == ""


def test_a_budget_is_set_when_a_run_starts_and_off_keeps_the_planned_length(monkeypatch, capsys):
    assert run_train("--run-name", "plain", "--max-steps", "3") == 0
    assert run_train("--run-name", "plain", "--time-budget", "10m") == 1
    assert "trained without --time-budget" in capsys.readouterr().err

    one_second_per_step(monkeypatch, stop_at_call=8)
    assert run_train("--run-name", "b", "--time-budget", "30s", "--warmup-steps", "3") == 0
    assert run_train("--run-name", "b", "--time-budget", "off", "--warmup-steps", "3") == 0
    assert weights("b")["step"] == 28 and weights("b")["config"]["max_steps"] == 28
