"""Train a diffusion model.

    python train.py                                   # our CIFAR-10 recipe (preset cifar10)
    python train.py --preset demo                     # a tiny model on built-in shapes, minutes on a CPU
    python train.py --preset ddpm-cifar10 --amp bf16  # the DDPM paper's model and recipe
    torchrun --nproc_per_node=4 train.py ...          # DistributedDataParallel on 4 GPUs

The run is named by --run-name (default: the preset's name) and writes
checkpoints/RUN/{last.pt, step_<N>.pt}, results/logs/RUN/{metrics.csv, TensorBoard events},
results/plots/RUN/loss.png and results/images/RUN/step_<N>.png. Run the same command again and it resumes
from checkpoints/RUN/last.pt exactly where it stopped.
"""

import argparse
import contextlib
import copy
import dataclasses
import json
import math
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Sampler

import config
import utils
from dataset import build_dataset
from diffusion import create_diffusion
from model import create_model

PREVIEW_SAMPLES = 36  # images in the 6x6 sample grid logged during training
PREVIEW_STEPS = 25    # DDIM steps for that grid: cheap, and good enough to watch progress
PREVIEW_SEED = 1234   # fixed starting noise, so grids are comparable across the run


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


def ema_decay_at(step, decay):
    """EMA decay after `step` optimizer steps: min(decay, (1 + step) / (10 + step)).

    The warmup keeps the average from being dominated by the random initial weights in short runs;
    past a few thousand steps it is `decay` itself.
    """
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


def random_flip(images):
    """Flip each image horizontally with probability 1/2, using torch's global RNG.

    Flipping here rather than in the dataset keeps every random draw of a step in RNG states that checkpoints
    save, which is what makes a resumed run identical to an uninterrupted one.
    """
    flip = torch.rand(images.shape[0], device=images.device) < 0.5
    return torch.where(flip[:, None, None, None], images.flip(3), images)


class StopRequest:
    """Turns SIGINT and SIGTERM into a flag the loop checks after each step, so it can save and exit."""

    def __init__(self):
        self.signal_name = None
        self.previous = {signum: signal.signal(signum, self._handle) for signum in (signal.SIGINT, signal.SIGTERM)}

    def _handle(self, signum, frame):
        self.signal_name = signal.Signals(signum).name
        # A second Ctrl-C interrupts at once, in case the step itself hangs.
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def restore(self):
        """Put back the handlers that were installed before."""
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def requested(self, distributed, device):
        """Whether any process got a signal (all processes must agree, or the next collective hangs)."""
        stop = self.signal_name is not None
        if distributed:
            flag = torch.tensor([int(stop)], device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            stop = bool(flag.item())
        return stop


def setup_distributed():
    """(rank, local_rank, world_size) under torchrun, after joining the process group; (0, 0, 1) otherwise."""
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) == 1:
        return 0, 0, 1
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ["LOCAL_RANK"])
    use_nccl = torch.cuda.is_available()
    if use_nccl:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if use_nccl else "gloo")
    return rank, local_rank, dist.get_world_size()


def resolve_config(args, rank):
    """The run's config and the checkpoint to resume from: (cfg, checkpoint_path, checkpoint_state).

    When resuming, the architecture comes from the checkpoint; flags that would change it are refused, and
    training-only flags (say a larger --max-steps) are applied with a notice.
    """
    overrides = config.overrides_from_args(args)
    cfg = config.config_from_args(args)
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
    for name in config.ARCHITECTURE_FIELDS:
        if name in overrides and getattr(saved, name) != getattr(cfg, name):
            raise utils.UsageError(f"--{name.replace('_', '-')} {getattr(cfg, name)} would change the model of "
                             f"checkpoint {path} (trained with {getattr(saved, name)}); use another --run-name "
                             f"to train a new model")
    changes = {name: value for name, value in overrides.items()
               if name != "resume" and getattr(saved, name) != value}
    resumed = dataclasses.replace(saved, **changes, resume=cfg.resume)
    if changes and rank == 0:
        print(f"notice: resuming {path} with changed settings: "
              + ", ".join(f"{name}={value!r}" for name, value in changes.items()))
    return resumed, path, state


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


@torch.no_grad()
def log_preview(ema_model, diffusion, cfg, device, amp_dtype, step, writer, image_dir):
    """Sample a grid from the EMA model, from the same starting noise every time, into TensorBoard and a PNG."""
    generator = torch.Generator(device).manual_seed(PREVIEW_SEED)
    shape = (PREVIEW_SAMPLES, cfg.channels, cfg.image_size, cfg.image_size)
    x_T = torch.randn(shape, generator=generator, device=device)
    labels = None
    if cfg.num_classes > 0:
        labels = torch.arange(PREVIEW_SAMPLES, device=device) % cfg.num_classes
    with utils.autocast(device, amp_dtype):
        images = diffusion.sample(ema_model, shape, sampler="ddim", steps=min(PREVIEW_STEPS, cfg.timesteps),
                                  x_T=x_T, y=labels, generator=generator)
    path = utils.save_grid(images, image_dir / f"step_{step:07d}.png", nrow=6)
    writer.add_image("samples/ema", utils.make_grid(images, nrow=6), step, dataformats="HWC")
    return path


# --- the script -----------------------------------------------------------------------------------------

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    config.add_config_flags(parser)
    args = parser.parse_args(argv)

    # -- setup: processes, config, device --
    rank, local_rank, world_size = setup_distributed()
    distributed = world_size > 1
    is_main = rank == 0
    try:
        cfg, resume_path, checkpoint = resolve_config(args, rank)
        device = utils.resolve_device(cfg.device)
        if distributed and device.type == "cuda":
            device = torch.device("cuda", local_rank)
        amp_dtype = utils.resolve_amp(cfg.amp, device)
    except config.UserError as error:
        config.fail(error)

    run = cfg.name
    checkpoint_dir = utils.CHECKPOINT_DIR / run
    log_dir = utils.RESULTS_DIR / "logs" / run
    plot_dir = utils.RESULTS_DIR / "plots" / run
    image_dir = utils.RESULTS_DIR / "images" / run
    if is_main:
        for folder in (checkpoint_dir, log_dir, plot_dir, image_dir):
            folder.mkdir(parents=True, exist_ok=True)
        config.save_config(cfg, log_dir / "config.json")
    # Each process draws its own noise and timesteps; the seed decides them all.
    utils.seed_everything(cfg.seed + rank)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    # -- data --
    # Flips happen in the loop (see random_flip), so the dataset is built without them.
    try:
        dataset = build_dataset(dataclasses.replace(cfg, random_flip=False), train=True)
    except config.UserError as error:
        config.fail(error)
    sampler = EpochSampler(len(dataset), cfg.seed, rank, world_size)
    loader = DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler, drop_last=True,
                        num_workers=cfg.num_workers, pin_memory=device.type == "cuda",
                        persistent_workers=cfg.num_workers > 0,  # no worker restart at every epoch
                        # Its own generator, so creating a loader never draws from the global RNG.
                        generator=torch.Generator().manual_seed(cfg.seed))
    steps_per_epoch = sampler.per_rank // cfg.batch_size // cfg.grad_accum
    if steps_per_epoch == 0:
        config.fail(f"the dataset has {len(dataset)} images, fewer than one optimizer step needs "
                   f"(batch_size x grad_accum x processes = {cfg.batch_size * cfg.grad_accum * world_size})")
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch

    # -- model, EMA, diffusion, optimizer --
    model = create_model(cfg).to(device)
    ema_model = copy.deepcopy(model).eval().requires_grad_(False)
    diffusion = create_diffusion(cfg)
    # fused: one kernel per tensor, where the default on a CPU is a Python loop of ~10 ops per tensor (the gain
    # is in README, Speed notes); also the fastest Adam on CUDA.
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), fused=True)
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg, total_steps))
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

    step = 0
    epoch = 0
    batch_in_epoch = 0
    bad_steps = 0
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        ema_model.load_state_dict(checkpoint["ema"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        for group in optimizer.param_groups:
            group["fused"] = True  # the checkpoint's param_groups replace ours, and may say fused=None
        lr_scheduler.load_state_dict(checkpoint["lr_scheduler"])
        scaler.load_state_dict(checkpoint["scaler"])
        step = checkpoint["step"]
        epoch = checkpoint["epoch"]
        batch_in_epoch = checkpoint["batch_in_epoch"]
        bad_steps = checkpoint.get("bad_steps", 0)
        rng_states = checkpoint["rng"]
        if len(rng_states) == world_size:
            utils.set_rng_state(rng_states[rank])
        elif is_main:
            print(f"notice: the checkpoint was written by {len(rng_states)} process(es), this run has "
                  f"{world_size}; random draws are re-seeded, so the run will not repeat exactly")
        if is_main:
            print(f"resuming {resume_path} at step {step} (epoch {epoch})")
    if cfg.channels_last:
        # The EMA too: the per-step lerp between weights in two layouts is much slower than within one.
        model = model.to(memory_format=torch.channels_last)
        ema_model = ema_model.to(memory_format=torch.channels_last)
    train_model = model
    if distributed:
        train_model = DistributedDataParallel(model, device_ids=[local_rank] if device.type == "cuda" else None)
    ddp_model = train_model
    if cfg.compile:
        train_model = torch.compile(train_model)

    # -- logging --
    writer = None
    metrics = None
    if is_main:
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(log_dir, purge_step=step if step > 0 else None)
        writer.add_text("config", "```\n" + json.dumps(config.config_to_dict(cfg), indent=2) + "\n```", step)
        metrics = utils.MetricsCSV(log_dir / "metrics.csv", resume_step=step)
        print(f"run {run}: {sum(p.numel() for p in model.parameters()):,} parameters, {len(dataset):,} images, "
              f"{total_steps:,} steps of {cfg.batch_size * cfg.grad_accum * world_size} images, "
              f"device {device}, amp {amp_dtype or 'none'}, {world_size} process(es)")

    def save(path_name):
        """Write a checkpoint (rank 0; all processes hold the same weights), then prune and redraw the plot."""
        rng_states = [utils.get_rng_state()]
        if distributed:
            rng_states = [None] * world_size
            dist.all_gather_object(rng_states, utils.get_rng_state())
        if not is_main:
            return None
        state = {
            "model": model.state_dict(), "ema": ema_model.state_dict(), "optimizer": optimizer.state_dict(),
            "lr_scheduler": lr_scheduler.state_dict(), "scaler": scaler.state_dict(), "step": step,
            "epoch": epoch, "batch_in_epoch": batch_in_epoch, "bad_steps": bad_steps,
            "config": config.config_to_dict(cfg), "rng": rng_states,
        }
        path = checkpoint_dir / path_name
        utils.save_checkpoint(state, path)
        utils.save_checkpoint(state, checkpoint_dir / "last.pt")
        utils.prune_checkpoints(checkpoint_dir, cfg.keep_checkpoints)
        if metrics.fieldnames:  # at least one row logged
            utils.plot_loss(log_dir / "metrics.csv", plot_dir / "loss.png", title=f"{run}: training loss")
        return path

    # -- the loop --
    stop = StopRequest()
    batches = infinite_batches(loader, sampler, steps_per_epoch * cfg.grad_accum, epoch, batch_in_epoch)
    progress = None
    if is_main:
        from tqdm import tqdm
        progress = tqdm(total=total_steps, initial=step, dynamic_ncols=True, desc=run)
    logged_loss = torch.zeros((), device=device)
    logged_steps = 0
    mean_loss = float("nan")
    clock = time.perf_counter()
    clock_step = step
    exit_message = None
    failed = False
    train_model.train()
    try:
        while step < total_steps:
            # Forward and backward over grad_accum micro-batches; DDP syncs gradients on the last one only.
            loss_sum = torch.zeros((), device=device)
            for micro in range(cfg.grad_accum):
                epoch, batch_in_epoch, images, labels = next(batches)
                images = images.to(device, non_blocking=True)
                labels = labels.to(device, non_blocking=True) if cfg.num_classes > 0 else None
                if cfg.random_flip:
                    images = random_flip(images)
                if cfg.channels_last:
                    images = images.contiguous(memory_format=torch.channels_last)
                skip_sync = distributed and micro < cfg.grad_accum - 1
                with ddp_model.no_sync() if skip_sync else contextlib.nullcontext():
                    with utils.autocast(device, amp_dtype):
                        loss = diffusion.training_loss(train_model, images, labels) / cfg.grad_accum
                    scaler.scale(loss).backward()
                loss_sum += loss.detach()
            if distributed:  # every process must see the same loss, to take the same decisions below
                dist.all_reduce(loss_sum)
                loss_sum /= world_size

            grad_norm_value, finite = apply_gradients(model, optimizer, scaler, loss_sum, cfg.grad_clip)
            if finite:
                bad_steps = 0
            else:
                bad_steps += 1
                if is_main:
                    print(f"\nwarning: non-finite loss at step {step + 1}, step skipped "
                          f"({bad_steps} in a row)", file=sys.stderr)
            step += 1
            lr_scheduler.step()
            utils.update_ema(ema_model, model, ema_decay_at(step, cfg.ema_decay))
            if finite:
                logged_loss += loss_sum
                logged_steps += 1
            if bad_steps >= cfg.max_bad_steps:
                failed = True
                exit_message = (f"stopped: {bad_steps} non-finite losses in a row (--max-bad-steps "
                                f"{cfg.max_bad_steps}); try a lower --lr or --amp bf16/none. The last good "
                                f"checkpoint in {checkpoint_dir} is intact")
                break

            # Log, preview and save on schedule.
            if step % cfg.log_every == 0 or step == total_steps:
                now = time.perf_counter()
                img_per_sec = (step - clock_step) * cfg.batch_size * cfg.grad_accum * world_size / (now - clock)
                mean_loss = logged_loss.item() / max(1, logged_steps)
                if is_main:
                    lr = lr_scheduler.get_last_lr()[0]
                    metrics.log({"step": step, "epoch": epoch, "loss": f"{mean_loss:.6g}", "lr": f"{lr:.6g}",
                                 "grad_norm": f"{grad_norm_value:.6g}", "img_per_sec": f"{img_per_sec:.2f}",
                                 "bad_steps": bad_steps})
                    writer.add_scalar("train/loss", mean_loss, step)
                    writer.add_scalar("train/lr", lr, step)
                    writer.add_scalar("train/grad_norm", grad_norm_value, step)
                    writer.add_scalar("train/img_per_sec", img_per_sec, step)
                    progress.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", img_s=f"{img_per_sec:.1f}")
                logged_loss.zero_()
                logged_steps = 0
                clock = now
                clock_step = step
            if is_main:
                progress.update(1)
            if cfg.sample_every and step % cfg.sample_every == 0 and is_main:
                log_preview(ema_model, diffusion, cfg, device, amp_dtype, step, writer, image_dir)
            if step % cfg.save_every == 0 and step < total_steps and bad_steps == 0:
                save(f"step_{step:07d}.pt")
            if stop.requested(distributed, device):
                path = save(f"step_{step:07d}.pt")
                exit_message = f"{stop.signal_name or 'signal'}: saved {path} at step {step}; run again to resume"
                break
        else:
            path = save(f"step_{step:07d}.pt")
            if is_main:
                if cfg.sample_every and step % cfg.sample_every != 0:  # else the loop just did
                    log_preview(ema_model, diffusion, cfg, device, amp_dtype, step, writer, image_dir)
                writer.add_hparams({key: str(value) if isinstance(value, (tuple, list)) else value
                                    for key, value in config.config_to_dict(cfg).items()},
                                   {"hparam/final_loss": mean_loss}, run_name="hparams")
                exit_message = f"done: {step} steps; checkpoint {path}, metrics {log_dir / 'metrics.csv'}"
    except utils.CheckpointError as error:
        exit_message = f"error: {error}"
        failed = True
    finally:
        stop.restore()
        if progress is not None:
            progress.close()
        if writer is not None:
            writer.close()
        if distributed:
            dist.destroy_process_group()

    if is_main and exit_message:
        print(exit_message, file=sys.stderr if failed else sys.stdout)
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
