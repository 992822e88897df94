"""The pieces of a training run that train.py, benchmark.py and any later training script share.

    state = TrainingState(cfg, device, amp_dtype, total_steps)   # model, EMA, optimizer, LR schedule, scaler, counters
    state.restore(checkpoint, rank, world_size)                  # from a checkpoint TrainingState.checkpoint wrote
    loss, grad_norm, finite = train_step(state, diffusion, batches, device, amp_dtype)   # forward, backward, clip,
                                                                                        # Adam, LR schedule, EMA
    state.save(run_dir, f"step_{state.step:07d}.pt", rng_states)  # atomically, as last.pt too

The checkpoint format lives in TrainingState alone: what it holds is written by `checkpoint` and read by `restore`
(sampling reads its "ema", "model", "config" and "step" entries). A new field is one edit there. Everything else
here is a piece of the loop: the data order that a resume can continue, the learning rate and EMA schedules, the
gradient step. (Signals and the torchrun setup are in utils.py: sampling uses them too.)

A run can start from another model's weights: TrainingState(..., weights=state_dict) builds the model in their
layer shapes (a pruned model's are its own), and `initial_weights` / `fine_tune_config` give a new run started
--init-from a checkpoint that checkpoint's weights and settings.

Imports config, model and utils; no script.
"""

import contextlib
import copy
import dataclasses
import io
import math
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Sampler

import config
import utils
from model import create_model

CHECKPOINT_KEYS = ("model", "ema", "optimizer", "lr_scheduler", "scaler", "step", "epoch", "batch_in_epoch",
                   "bad_steps", "config", "rng", "budget_steps", "train_seconds")
OPTIONAL_KEYS = ("bad_steps", "budget_steps", "train_seconds")  # absent from checkpoints of older versions


class TrainingState:
    """Everything a run carries from step to step and saves in its checkpoints: the model, its EMA, the optimizer,
    the learning-rate schedule, the fp16 gradient scaler, and where the run is (step, epoch, batch_in_epoch,
    bad_steps), the run's length (total_steps; budget_steps once a --time-budget has fixed it) and its training time
    so far (train_seconds). `model` is the plain module; `train_model` is what the loop calls (DDP- or
    compile-wrapped)."""

    def __init__(self, cfg, device, amp_dtype, total_steps, weights=None):
        self.cfg = cfg
        self.model = create_model(cfg, weights).to(device)  # weights: a state dict whose layer shapes it takes
        self.ema_model = copy.deepcopy(self.model).eval().requires_grad_(False)
        # fused: one kernel per tensor, where the default on a CPU is a Python loop of ~10 ops per tensor (the gain
        # is in README, Speed notes); also the fastest Adam on CUDA.
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                          fused=True)
        self.total_steps = total_steps
        # Reads self.total_steps at every step, so that a time budget can fix it after the first steps.
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_factor(step, cfg, self.total_steps))
        self.scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.bad_steps = 0
        self.budget_steps = None
        self.train_seconds = 0.0
        self.train_model = self.model
        self.ddp_model = None

    def restore(self, checkpoint, rank=0, world_size=1):
        """Continue from a checkpoint that `checkpoint` wrote. Returns a notice for the user, or None: a checkpoint
        written by another number of processes re-seeds the random draws instead of restoring them. A checkpoint
        without the training state (say one with weights only) raises utils.CheckpointError."""
        missing = [key for key in CHECKPOINT_KEYS if key not in checkpoint and key not in OPTIONAL_KEYS]
        if missing:
            raise utils.CheckpointError(f"the checkpoint holds no {', '.join(missing)}, so training cannot continue "
                                        f"from it (it can still be sampled from); start a new --run-name instead")
        self.model.load_state_dict(checkpoint["model"])
        self.ema_model.load_state_dict(checkpoint["ema"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        for group in self.optimizer.param_groups:
            group["fused"] = True  # the checkpoint's param_groups replace ours, and may say fused=None
        self.lr_scheduler.load_state_dict(checkpoint["lr_scheduler"])
        self.scaler.load_state_dict(checkpoint["scaler"])
        self.step = checkpoint["step"]
        self.epoch = checkpoint["epoch"]
        self.batch_in_epoch = checkpoint["batch_in_epoch"]
        self.bad_steps = checkpoint.get("bad_steps", 0)
        self.budget_steps = checkpoint.get("budget_steps")
        self.train_seconds = checkpoint.get("train_seconds", 0.0)
        if self.budget_steps and self.cfg.time_budget:
            self.total_steps = self.budget_steps  # the schedule the budget fixed, kept as it was
        rng_states = checkpoint["rng"]
        if len(rng_states) == world_size:
            utils.set_rng_state(rng_states[rank])
            return None
        return (f"the checkpoint was written by {len(rng_states)} process(es), this run has {world_size}; random "
                f"draws are re-seeded, so the run will not repeat exactly")

    def prepare(self, device, channels_last=False, distributed=False, local_rank=0, compile=False):
        """Set the layout and the wrappers the loop trains through (DDP, torch.compile)."""
        if channels_last:
            # The EMA too: the per-step lerp between weights in two layouts is much slower than within one.
            self.model = self.model.to(memory_format=torch.channels_last)
            self.ema_model = self.ema_model.to(memory_format=torch.channels_last)
        self.train_model = self.model
        if distributed:
            self.ddp_model = DistributedDataParallel(self.model,
                                                     device_ids=[local_rank] if device.type == "cuda" else None)
            self.train_model = self.ddp_model
        if compile:
            self.train_model = torch.compile(self.train_model)
        return self

    def checkpoint(self, rng_states):
        """The checkpoint: a dict of tensors and plain values (loadable with weights_only=True) with
        CHECKPOINT_KEYS; rng_states holds utils.get_rng_state() of every process."""
        state = {
            "model": self.model.state_dict(), "ema": self.ema_model.state_dict(),
            "optimizer": self.optimizer.state_dict(), "lr_scheduler": self.lr_scheduler.state_dict(),
            "scaler": self.scaler.state_dict(), "step": self.step, "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch, "bad_steps": self.bad_steps,
            "config": config.config_to_dict(self.cfg), "rng": rng_states,
            "budget_steps": self.budget_steps, "train_seconds": self.train_seconds,
        }
        assert tuple(state) == CHECKPOINT_KEYS
        return state

    def save(self, run_dir, name, rng_states, keep=3):
        """Write the checkpoint to run_dir/name and run_dir/last.pt (atomically), and keep only the newest `keep`
        step files. Returns the path; raises utils.CheckpointError when the disk refuses."""
        state = self.checkpoint(rng_states)
        path = Path(run_dir) / name
        utils.save_checkpoint(state, path)
        utils.save_checkpoint(state, Path(run_dir) / "last.pt")
        utils.prune_checkpoints(run_dir, keep)
        return path


def train_step(state, diffusion, micro_batches, device, amp_dtype, distributed=False):
    """One optimizer step of `state` over cfg.grad_accum micro-batches (an iterator of (images, labels or None) on
    `device`; cfg is state.cfg): autocast forward of the diffusion loss, backward (DDP syncs the gradients on the last micro-batch
    only), then apply_gradients, the LR schedule and the EMA update. Returns (loss, gradient norm, finite); the loss
    is averaged over the processes, so every process takes the same decisions."""
    cfg = state.cfg
    grad_accum = cfg.grad_accum
    loss_sum = torch.zeros((), device=device)
    for micro in range(grad_accum):
        images, labels = next(micro_batches)
        skip_sync = distributed and micro < grad_accum - 1
        with state.ddp_model.no_sync() if skip_sync else contextlib.nullcontext():
            with utils.autocast(device, amp_dtype):
                loss = diffusion.training_loss(state.train_model, images, labels) / grad_accum
            state.scaler.scale(loss).backward()
        loss_sum += loss.detach()
    if distributed:
        dist.all_reduce(loss_sum)
        loss_sum /= dist.get_world_size()
    grad_norm, finite = apply_gradients(state.model, state.optimizer, state.scaler, loss_sum, cfg.grad_clip)
    state.bad_steps = 0 if finite else state.bad_steps + 1
    state.step += 1
    state.lr_scheduler.step()
    utils.update_ema(state.ema_model, state.model, ema_decay_at(state.step, cfg.ema_decay, cfg.ema_gamma))
    return loss_sum, grad_norm, finite


# --- the time budget ------------------------------------------------------------------------------------

clock = time.perf_counter  # the budget's clock (tests replace it)


class TimeBudget:
    """`train.py --time-budget`: a run that must end, its last checkpoint and samples written, within `seconds` of
    training time (`spent` of it used by earlier sessions of a resumed run).

    It times the first steps after the SKIPPED ones (MIN_MEASURED steps at least, and about MEASURE_FRACTION of the
    budget or 30 s, but no further than the end of the LR warmup, whose learning rates do not depend on the run's
    length), then fixes the number of steps with `plan_steps`. So a budgeted run trains exactly like
    `--max-steps N` with the N it prints, and a resumed run keeps that N. Should the machine get slower, the loop stops early, on time (`over`)."""

    SKIPPED = 3
    MIN_MEASURED = 5
    MEASURE_FRACTION = 0.05
    MARGIN = 0.05  # kept free for what the estimate misses (a noisy machine, the loss plot, ...)

    def __init__(self, seconds, spent=0.0, start=None):
        self.seconds = seconds
        self.spent = spent
        self.start = clock() if start is None else start
        self.first = None  # (step, time) after the first timed step
        self.step_seconds = None
        self.save_seconds = 0.0
        self.preview_seconds = 0.0
        self.last_check = None

    def elapsed(self):
        """Training time so far, earlier sessions included."""
        return self.spent + clock() - self.start

    def measured(self, step, last_free_step):
        """Call after every step until it returns True: whether the steps timed so far are enough (then
        step_seconds holds the mean time per step). It stops timing at `last_free_step` (the warmup's end), after
        which the learning rate depends on the run's length."""
        now = clock()
        # The timer starts after the first SKIPPED steps, which allocate memory and pick kernels, so are slower.
        if self.first is None or step <= min(self.SKIPPED, max(last_free_step, 2) - 1):
            self.first = (step, now)
            return False
        steps = step - self.first[0]
        seconds = now - self.first[1]
        # Kept up to date at every step: under DDP another rank may decide that the timing is done.
        self.step_seconds = seconds / steps
        long_enough = seconds >= min(self.MEASURE_FRACTION * self.seconds, 30.0)
        return steps >= self.MIN_MEASURED and long_enough or step >= max(last_free_step, 2)

    def plan_steps(self, step, cfg):
        """The largest N such that N - step more steps at step_seconds each, the checkpoints and preview grids
        due on the way and at the end (each save_seconds, preview_seconds), fit in what is left of the budget less
        MARGIN. At least step + 1."""
        available = self.seconds * (1 - self.MARGIN) - self.elapsed()

        def cost(total):
            # The loop saves and previews after planning at this step too: count the multiples in [step, total).
            saves = (total - 1) // cfg.save_every - (step - 1) // cfg.save_every + 1  # on the way, and the last one
            previews = 0
            if cfg.sample_every:
                previews = (total // cfg.sample_every - (step - 1) // cfg.sample_every
                            + (total % cfg.sample_every != 0))
            return (total - step) * self.step_seconds + saves * self.save_seconds + previews * self.preview_seconds

        per_step = (self.step_seconds + self.save_seconds / cfg.save_every
                    + (self.preview_seconds / cfg.sample_every if cfg.sample_every else 0))
        total = step + max(1, int((available - self.save_seconds - self.preview_seconds) / per_step))
        # The estimate is within a few steps (the events fall on multiples); walk to the exact answer.
        while cost(total + 1) <= available:
            total += 1
        while total > step + 1 and cost(total) > available:
            total -= 1
        return total

    def over(self, reserve):
        """Call after every step: whether one more step like the last one, and then `reserve` seconds (what the
        final checkpoint and samples take), would run past the budget."""
        now = self.elapsed()
        last_step = now - self.last_check if self.last_check is not None else self.step_seconds or 0.0
        self.last_check = now
        return now + last_step + reserve > self.seconds


def time_serialisation(state):
    """Seconds to serialise one checkpoint of `state` (a run writes each twice: step_N.pt and last.pt)."""
    start = clock()
    torch.save(state.checkpoint([utils.get_rng_state()]), io.BytesIO())
    return clock() - start


# --- pieces of the loop ---------------------------------------------------------------------------------

class EpochSampler(Sampler):
    """Shuffles the dataset once per epoch from (seed, epoch) alone, and shards it across processes.

    Like DistributedSampler with set_epoch, but it can also skip the part of an epoch a resumed run has
    already seen, without loading those images, so a resumed run sees exactly the data it would have seen.
    """

    def __init__(self, dataset_size, seed, rank=0, world_size=1):
        self.per_rank = dataset_size // world_size  # drop the tail so every rank gets the same count
        self.dataset_size = dataset_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch, skip=0):
        """Iterate over epoch `epoch`, leaving out its first `skip` indices on this rank."""
        self.epoch = epoch
        self.skip = skip

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.dataset_size, generator=generator)
        order = order[self.rank: self.per_rank * self.world_size: self.world_size]
        return iter(order[self.skip:].tolist())

    def __len__(self):
        return self.per_rank - self.skip


def lr_factor(step, cfg, total_steps):
    """Learning-rate multiplier for the optimizer step after `step` steps: linear warmup that reaches the peak at
    step `warmup_steps`, then cosine annealing to 0 at `total_steps`, or constant."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return 1.0
    progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def ema_decay_at(step, decay, gamma=0.0):
    """EMA decay for the update after `step` optimizer steps.

    gamma = 0: min(decay, (1 + step) / (10 + step)). The warmup keeps the average from being dominated by the random
    initial weights in short runs; past a few thousand steps it is `decay` itself.

    gamma > 0: the power-function EMA of Karras et al. 2024 (EDM2, eq. 2), (1 - 1 / step) ** (gamma + 1). After
    t steps the average weighs the weights of step s in proportion to s ** gamma, whatever t is: it always covers
    the same late fraction of the run (its mean is at (gamma + 1) / (gamma + 2) of the run), so it suits a run whose
    length a time budget decides. The first update (step 1) copies the weights.
    """
    if gamma > 0:
        return (1 - 1 / step) ** (gamma + 1)
    return min(decay, (1 + step) / (10 + step))


def apply_gradients(model, optimizer, scaler, loss, grad_clip):
    """Unscale the gradients, clip their global norm, and take the optimizer step unless something is non-finite;
    then clear the gradients. Returns (gradient norm before clipping, whether the step was good); the norm and the
    loss come from the device in one transfer.

    With fp16, overflowing gradients are the GradScaler's business: it skips that update itself and lowers the scale,
    so only a non-finite loss makes a bad step then.
    """
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip or float("inf"))
    loss_value, grad_norm_value = torch.stack([loss, grad_norm.float()]).tolist()
    finite = math.isfinite(loss_value) and (scaler.is_enabled() or math.isfinite(grad_norm_value))
    if finite or scaler.is_enabled():
        scaler.step(optimizer)
        scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm_value, finite


def random_flip(images, return_flips=False):
    """Flip each image horizontally with probability 1/2, using torch's global RNG; with return_flips, also the
    (B,) bool tensor of which were flipped (their captions need mirroring).

    Flipping here rather than in the dataset keeps every random draw of a step in RNG states that checkpoints
    save, which is what makes a resumed run identical to an uninterrupted one.
    """
    flip = torch.rand(images.shape[0], device=images.device) < 0.5
    flipped = torch.where(flip[:, None, None, None], images.flip(3), images)
    return (flipped, flip) if return_flips else flipped


def resolve_run(preset, overrides, rank=0):
    """The run's config and the checkpoint to resume from: (cfg, checkpoint_path, checkpoint_state), for a preset
    and the config fields a user set (`overrides`).

    When resuming, the architecture and the diffusion come from the checkpoint (config.ARCHITECTURE_FIELDS): flags
    that would change them are refused, and training-only flags (say a larger --max-steps) are applied with a notice.
    """
    lengths = [name for name in ("max_steps", "epochs") if name in overrides]
    if str(overrides.get("time_budget", "")).lower() in ("off", "none") or lengths and "time_budget" not in overrides:
        overrides = {**overrides, "time_budget": ""}  # a length typed out replaces a preset's time budget
    cfg = config.get_config(preset, **overrides)
    if cfg.time_budget and lengths:
        raise utils.UsageError(f"--time-budget chooses the number of steps itself, so it cannot go with "
                               f"--{lengths[0].replace('_', '-')}; give one of the two")
    run_dir = utils.CHECKPOINT_DIR / cfg.name
    if cfg.resume == "none":
        if (run_dir / "last.pt").exists() or utils.step_checkpoints(run_dir):
            raise utils.UsageError(f"{run_dir} already holds checkpoints; to start afresh, choose another --run-name or "
                             f"move that folder away (nothing was overwritten)")
        return cfg, None, None
    if cfg.resume == "auto":
        path, state = utils.load_latest_checkpoint(run_dir)
        if path is None:
            return cfg, None, None
    else:
        path = Path(cfg.resume)
        state = utils.load_checkpoint(path)

    saved = config.config_from_dict(state["config"])
    config.check_same_model(cfg, overrides, saved, f"checkpoint {path}", "use another --run-name to train a new model")
    changes = {name: value for name, value in overrides.items()
               if name != "resume" and getattr(saved, name) != value}
    if saved.teacher and Path(changes.get("teacher", saved.teacher)).resolve() == Path(saved.teacher).resolve():
        changes.pop("teacher", None)  # the same file, typed another way
    fixed = [name for name in ("teacher", "student_steps", "distill_guidance") if name in changes]
    if fixed and (saved.teacher or changes.get("teacher")):  # a round, or a run that would become one mid-way
        raise utils.UsageError(f"--{fixed[0].replace('_', '-')} {changes[fixed[0]]} differs from the "
                               f"{getattr(saved, fixed[0])!r} that the distillation run {path} started with, and a "
                               f"round keeps its teacher, steps and guidance; use another --run-name")
    if "distill_from" in changes and Path(changes["distill_from"] or ".").resolve() != \
            Path(saved.distill_from or ".").resolve():
        raise utils.UsageError(f"--distill-from {changes['distill_from']!r} differs from the "
                               f"{saved.distill_from!r} that the run {path} started with, and a run keeps what it "
                               f"learns from; use another --run-name")
    changes.pop("distill_from", None)  # the same file, typed another way
    planned = state.get("budget_steps")
    if changes.get("time_budget") and not saved.time_budget:
        raise utils.UsageError(f"{path} was trained without --time-budget, and a budget can only be set when a run "
                               f"starts (its schedule depends on it); use --max-steps N to train on, or start a "
                               f"new --run-name")
    if saved.time_budget and planned and changes.get("time_budget") == "" and not lengths:
        changes["max_steps"] = planned  # the budget's guard is off; the length it fixed stays
    if saved.time_budget and planned and changes.get("time_budget", "") != "":
        raise utils.UsageError(f"{path} was trained under --time-budget {saved.time_budget}, which fixed its length "
                               f"at {planned} steps, and a resumed run keeps that schedule; to train on past it, "
                               f"resume with --max-steps N instead")
    resumed = dataclasses.replace(saved, **changes, resume=cfg.resume)
    if changes and rank == 0:
        print(f"notice: resuming {path} with changed settings: "
              + ", ".join(f"{name}={value!r}" for name, value in changes.items()))
    return resumed, path, state


def initial_weights(path):
    """The checkpoint a new run starts --init-from: it must hold EMA weights in float (not compressed)."""
    state = utils.load_checkpoint(path)
    if "compression" in state or "ema" not in state:
        what = "is compressed" if "compression" in state else "holds no EMA weights"
        raise utils.CheckpointError(f"{path} {what}, so no run can start from it; start from a float checkpoint")
    if state["config"].get("teacher"):
        raise utils.UsageError(f"{path} is a distilled student, which learns from its teacher, not from the data; "
                               f"fine-tune or prune its teacher and distil again")
    return state


def fine_tune_config(cfg, source_cfg, overrides):
    """The config of a new run started --init-from a checkpoint trained with `source_cfg`: that run's settings,
    with the fields a user set (`overrides`, as `cfg` has them) and this run's name. A flag that
    would change the model raises ConfigError; a length (--max-steps, --epochs) replaces the other length and a
    time budget, as it does a preset's."""
    config.check_same_model(cfg, overrides, source_cfg, cfg.init_from, "fine-tuning keeps the model")
    # What the source learnt from (--distill-from) is not inherited: this run learns from the data unless told.
    own = {name: getattr(cfg, name) for name in (*overrides, "run_name", "resume", "init_from", "distill_from")}
    if "max_steps" in overrides or "epochs" in overrides:
        own.setdefault("time_budget", "")
        own.setdefault("epochs" if "max_steps" in overrides else "max_steps", 0)
    return dataclasses.replace(source_cfg, **own)


def infinite_batches(loader, sampler, batches_per_epoch, epoch, batch_in_epoch):
    """Yield (epoch, batches seen in that epoch, images, labels) forever, from a position saved mid-epoch.

    An epoch is `batches_per_epoch` micro-batches; the images left over at its end are not used.
    """
    while True:
        if batch_in_epoch < batches_per_epoch:
            sampler.set_epoch(epoch, skip=batch_in_epoch * loader.batch_size)
            for images, labels in loader:
                batch_in_epoch += 1
                yield epoch, batch_in_epoch, images, labels
                if batch_in_epoch == batches_per_epoch:
                    break
        epoch += 1
        batch_in_epoch = 0
