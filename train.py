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
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

import config
import distillation
import inference
import text
import training
import utils
from dataset import build_dataset, mirror_caption
from diffusion import create_diffusion
from distillation import OutputDistillation, ProgressiveDistillation
from training import (EpochSampler, TimeBudget, TrainingState, infinite_batches, random_flip, resolve_run,
                      time_serialisation, train_step)
from utils import StopRequest, any_process, setup_distributed

PREVIEW_SAMPLES = 36  # images in the 6x6 sample grid logged during training
PREVIEW_STEPS = 25    # DDIM steps for that grid: cheap, and good enough to watch progress
PREVIEW_SEED = 1234   # fixed starting noise, so grids are comparable across the run
UNPLANNED = 10 ** 12  # the length of a --time-budget run until it has timed its first steps


# --- setup ----------------------------------------------------------------------------------------------

def setup(argv):
    """Parse the flags, join the process group, resolve the config and the checkpoint to resume from, and pick the
    device: (cfg, resume_path, checkpoint, device, amp_dtype, rank, local_rank, world_size, teacher_state,
    init_state), where teacher_state is the --teacher checkpoint of a distillation run and init_state the
    --init-from checkpoint of a new fine-tuning run (else None). A user mistake exits with one sentence."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    config.add_config_flags(parser)
    args = parser.parse_args(argv)
    rank, local_rank, world_size = setup_distributed()
    try:
        overrides = config.overrides_from_args(args)
        cfg, resume_path, checkpoint = resolve_run(args.preset, overrides, rank)
        preset_classes = config.PRESETS[args.preset].get("num_classes", 0)
        if checkpoint is None and preset_classes and not cfg.num_classes and "num_classes" not in overrides \
                and rank == 0:
            why = "captions replace them" if cfg.captioned else f"dataset {cfg.dataset} has no known class count"
            print(f"note: preset {args.preset} learns with {preset_classes} class labels, but {why}; this run is "
                  f"unconditional (give --num-classes N to train with N labels)")
        teacher_state = utils.load_checkpoint(cfg.teacher) if cfg.teacher else None
        if teacher_state is not None and checkpoint is None:  # a new distillation run: the teacher's model and data
            teacher_cfg = config.config_from_dict(teacher_state["config"])
            cfg = distillation.student_config(cfg, teacher_cfg, overrides)
        init_state = None
        if cfg.init_from and checkpoint is None:  # a new fine-tuning run: the model and settings of the checkpoint
            init_state = training.initial_weights(cfg.init_from)
            cfg = training.fine_tune_config(cfg, config.config_from_dict(init_state["config"]), overrides)
        elif cfg.init_from and checkpoint["config"].get("init_from") != cfg.init_from:
            raise utils.UsageError(f"{resume_path} is a run that did not start from {cfg.init_from}, and a run "
                                   f"starts --init-from a checkpoint only when it is new; choose another --run-name")
        device = utils.process_device(utils.resolve_device(cfg.device))
        amp_dtype = utils.resolve_amp(cfg.amp, device)
    except config.UserError as error:
        fail_once(error, local_rank)
    return cfg, resume_path, checkpoint, device, amp_dtype, rank, local_rank, world_size, teacher_state, init_state


def fail_once(error, local_rank):
    """Exit with a user mistake that every process met: one sentence per machine (from its first process)."""
    if local_rank == 0:
        config.fail(error)
    sys.exit(1)


def teacher_model(cfg, teacher_state, device, path=None):
    """The frozen EMA model of the --teacher checkpoint (or the one at `path`: --distill-from), on `device` in the
    run's memory format."""
    # Building the network initialises weights (then replaced) from the global RNG: on a side copy of it, or a
    # resumed run would draw other noise than the run it continues.
    with torch.random.fork_rng(devices=[]):
        model, _ = inference.load_model_from_checkpoint(Path(path or cfg.teacher), teacher_state, use_ema=True)
    return model.to(device, memory_format=torch.channels_last if cfg.channels_last else torch.preserve_format)


def build_loader(cfg, device, rank, world_size):
    """The training data: (dataset, its EpochSampler, the DataLoader, optimizer steps per epoch)."""
    try:
        # Flips happen in the loop (see random_flip), so the dataset is built without them.
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
    return dataset, sampler, loader, steps_per_epoch


def device_batches(batches, state, cfg, device, tokenizer=None):
    """(images, labels or None) on `device`, flipped and laid out as the config says, from infinite_batches; it
    keeps the state's epoch and batch_in_epoch up to date for the checkpoints. A text-conditional run's labels are
    its captions' token ids (`tokenizer`), mirrored with the images they describe."""
    for epoch, batch_in_epoch, images, labels in batches:
        state.epoch = epoch
        state.batch_in_epoch = batch_in_epoch
        images = images.to(device, non_blocking=True)
        if tokenizer is None:
            labels = labels.to(device, non_blocking=True) if cfg.num_classes > 0 else None
        if cfg.random_flip:
            images, flipped = random_flip(images, return_flips=True)
            if tokenizer is not None:  # the captions of flipped images say left for right
                labels = [mirror_caption(caption) if flip else caption
                          for caption, flip in zip(labels, flipped.tolist())]
        if tokenizer is not None:
            labels = tokenizer(list(labels)).to(device)
        if cfg.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        yield images, labels


# --- logging --------------------------------------------------------------------------------------------

class RunLog:
    """What rank 0 writes while training: the metrics CSV, TensorBoard, the progress bar, the loss plot and the
    preview grids. On the other ranks every method does nothing."""

    def __init__(self, cfg, state, total_steps, is_main, preview_labels=None):
        self.cfg = cfg
        self.is_main = is_main
        self.preview_labels = preview_labels  # the captions' token ids of a text-conditional run's previews
        self.log_dir = utils.RESULTS_DIR / "logs" / cfg.name
        self.plot_dir = utils.RESULTS_DIR / "plots" / cfg.name
        self.image_dir = utils.RESULTS_DIR / "images" / cfg.name
        self.loss_sum = None
        self.loss_steps = 0
        self.mean_loss = float("nan")
        self.clock = time.perf_counter()
        self.clock_step = state.step
        if not is_main:
            return
        for folder in (utils.CHECKPOINT_DIR / cfg.name, self.log_dir, self.plot_dir, self.image_dir):
            folder.mkdir(parents=True, exist_ok=True)
        config.save_config(cfg, self.log_dir / "config.json")
        from torch.utils.tensorboard import SummaryWriter
        from tqdm import tqdm
        self.writer = SummaryWriter(self.log_dir, purge_step=state.step if state.step > 0 else None)
        self.writer.add_text("config", "```\n" + json.dumps(config.config_to_dict(cfg), indent=2) + "\n```", state.step)
        self.metrics = utils.MetricsCSV(self.log_dir / "metrics.csv", resume_step=state.step)
        self.progress = tqdm(total=None if total_steps == UNPLANNED else total_steps, initial=state.step,
                             dynamic_ncols=True, desc=cfg.name)

    def step(self, state, loss, grad_norm, finite, images_per_step, total_steps):
        """After each optimizer step: accumulate the loss (on the device, no sync), and every log_every steps (or
        at the end) write the mean loss, learning rate, gradient norm and images/s."""
        if finite:
            self.loss_sum = loss if self.loss_sum is None else self.loss_sum + loss
            self.loss_steps += 1
        if state.step % self.cfg.log_every == 0 or state.step == total_steps:
            now = time.perf_counter()
            img_per_sec = (state.step - self.clock_step) * images_per_step / (now - self.clock)
            self.mean_loss = (self.loss_sum.item() / self.loss_steps) if self.loss_steps else float("nan")
            if self.is_main:
                lr = state.lr_scheduler.get_last_lr()[0]
                self.metrics.log({"step": state.step, "epoch": state.epoch, "loss": f"{self.mean_loss:.6g}",
                                  "lr": f"{lr:.6g}", "grad_norm": f"{grad_norm:.6g}",
                                  "img_per_sec": f"{img_per_sec:.2f}", "bad_steps": state.bad_steps})
                for name, value in (("loss", self.mean_loss), ("lr", lr), ("grad_norm", grad_norm),
                                    ("img_per_sec", img_per_sec)):
                    self.writer.add_scalar(f"train/{name}", value, state.step)
                self.progress.set_postfix(loss=f"{self.mean_loss:.4f}", lr=f"{lr:.2e}", img_s=f"{img_per_sec:.1f}")
            self.loss_sum = None
            self.loss_steps = 0
            self.clock = now
            self.clock_step = state.step
        if self.is_main:
            self.progress.update(1)

    def planned(self, state, budget, world_size):
        """After a time budget has fixed the run's length: say what it chose and why."""
        if not self.is_main:
            return
        self.progress.total = state.total_steps
        self.progress.refresh()
        img_per_sec = self.cfg.batch_size * self.cfg.grad_accum * world_size / budget.step_seconds
        self.progress.write(
            f"time budget {self.cfg.time_budget}: {budget.step_seconds:.3g} s per step ({img_per_sec:.1f} img/s) "
            f"over the first {state.step} steps, so {state.total_steps:,} steps in all; the warmup and the "
            f"cosine decay end there, with the last checkpoint and samples (estimated {budget.save_seconds:.2g} s "
            f"per checkpoint, {budget.preview_seconds:.2g} s per preview grid), {TimeBudget.MARGIN:.0%} kept spare")
        if self.cfg.warmup_steps > state.total_steps // 2:
            self.progress.write(f"warning: the warmup ({self.cfg.warmup_steps} steps) takes more than half of the "
                                f"{state.total_steps} steps; lower --warmup-steps")

    def preview(self, state, diffusion, device, amp_dtype):
        if self.is_main:
            log_preview(state.ema_model, diffusion, self.cfg, device, amp_dtype, state.step, self.writer,
                        self.image_dir, self.preview_labels)

    def saved(self):
        """After a checkpoint: redraw the loss plot."""
        if self.is_main and self.metrics.fieldnames:  # at least one row logged
            utils.plot_loss(self.log_dir / "metrics.csv", self.plot_dir / "loss.png",
                            title=f"{self.cfg.name}: training loss")

    def finish(self):
        """The run's hyperparameters and final loss into TensorBoard's HParams tab."""
        if self.is_main:
            self.writer.add_hparams({key: str(value) if isinstance(value, (tuple, list)) else value
                                     for key, value in config.config_to_dict(self.cfg).items()},
                                    {"hparam/final_loss": self.mean_loss}, run_name="hparams")

    def close(self):
        if self.is_main:
            self.progress.close()
            self.writer.close()


@torch.no_grad()
def log_preview(ema_model, diffusion, cfg, device, amp_dtype, step, writer, image_dir, labels=None):
    """Sample a grid from the EMA model, from the same starting noise every time, into TensorBoard and a PNG;
    labels: the captions' token ids of a text-conditional model (PREVIEW_SAMPLES rows)."""
    generator = torch.Generator(device).manual_seed(PREVIEW_SEED)
    shape = (PREVIEW_SAMPLES, cfg.channels, cfg.image_size, cfg.image_size)
    x_T = torch.randn(shape, generator=generator, device=device)
    if labels is not None:
        labels = labels.to(device)
    elif cfg.num_classes > 0:
        labels = torch.arange(PREVIEW_SAMPLES, device=device) % cfg.num_classes
    with utils.autocast(device, amp_dtype):
        steps = cfg.student_steps or min(PREVIEW_STEPS, cfg.timesteps)  # a distilled student: its own step count
        images = diffusion.sample(ema_model, shape, sampler="ddim", steps=steps,
                                  x_T=x_T, y=labels, generator=generator)
    path = utils.save_grid(images, image_dir / f"step_{step:07d}.png", nrow=6)
    writer.add_image("samples/ema", utils.make_grid(images, nrow=6), step, dataformats="HWC")
    return path


# --- the loop -------------------------------------------------------------------------------------------

def save(state, cfg, log, distributed):
    """A checkpoint of every process's state (rank 0 writes it; all hold the same weights). Returns its path."""
    rng_states = [utils.get_rng_state()]
    if distributed:
        rng_states = [None] * dist.get_world_size()
        dist.all_gather_object(rng_states, utils.get_rng_state())
    if not log.is_main:
        return None
    path = state.save(utils.CHECKPOINT_DIR / cfg.name, f"step_{state.step:07d}.pt", rng_states, cfg.keep_checkpoints)
    log.saved()
    return path


def preview_seconds(cfg, step_seconds):
    """About how long one preview grid takes: PREVIEW_STEPS forward passes over PREVIEW_SAMPLES images, each about
    half of what a training step spends on one of its images (which also runs backward)."""
    return PREVIEW_STEPS * PREVIEW_SAMPLES * step_seconds / (2 * cfg.batch_size * cfg.grad_accum)


def train_loop(state, diffusion, batches, log, cfg, budget, device, amp_dtype, distributed):
    """Train until state.total_steps, a signal, the end of the time budget, or too many non-finite steps in a row;
    log, preview and save on schedule. Returns (message for the user, whether the run failed)."""
    stop = StopRequest()
    world_size = dist.get_world_size() if distributed else 1
    images_per_step = cfg.batch_size * cfg.grad_accum * world_size
    planning = bool(cfg.time_budget) and state.budget_steps is None
    if cfg.time_budget and not planning:  # resumed after the plan: what the final checkpoint will take
        budget.save_seconds = 2 * time_serialisation(state)
    # The learning rates of the warmup's steps do not depend on the run's length (a constant schedule: none do).
    last_free_step = cfg.warmup_steps if cfg.lr_schedule == "cosine" else UNPLANNED
    state.train_model.train()
    try:
        while state.step < state.total_steps:
            loss, grad_norm, finite = train_step(state, diffusion, batches, device, amp_dtype, distributed)
            state.train_seconds = budget.elapsed()
            if not finite and log.is_main:
                print(f"\nwarning: non-finite loss at step {state.step}, step skipped ({state.bad_steps} in a row)",
                      file=sys.stderr)
            if state.bad_steps >= cfg.max_bad_steps:
                return (f"stopped: {state.bad_steps} non-finite losses in a row (--max-bad-steps {cfg.max_bad_steps}); "
                        f"try a lower --lr or --amp bf16/none. The last good checkpoint in "
                        f"{utils.CHECKPOINT_DIR / cfg.name} is intact"), True
            if planning and any_process(budget.measured(state.step, last_free_step), distributed, device):
                budget.save_seconds = 2 * time_serialisation(state)
                budget.preview_seconds = preview_seconds(cfg, budget.step_seconds) if cfg.sample_every else 0.0
                # Every process must train the same number of steps: rank 0's plan is everyone's.
                state.budget_steps = broadcast(budget.plan_steps(state.step, cfg), distributed, device)
                state.total_steps = state.budget_steps
                planning = False
                log.planned(state, budget, world_size)
            log.step(state, loss, grad_norm, finite, images_per_step, state.total_steps)
            if cfg.sample_every and state.step % cfg.sample_every == 0:
                log.preview(state, diffusion, device, amp_dtype)
            if state.step % cfg.save_every == 0 and state.step < state.total_steps and state.bad_steps == 0:
                save(state, cfg, log, distributed)
            if (cfg.time_budget and not planning and state.step < state.total_steps
                    and any_process(budget.over(budget.save_seconds + budget.preview_seconds), distributed, device)):
                path = finish(state, diffusion, cfg, log, device, amp_dtype, distributed)
                return (f"time budget {cfg.time_budget} reached at step {state.step} of {state.total_steps} (the "
                        f"machine got slower than its first steps): saved {path}"), False
            if stop.requested(distributed, device):
                path = save(state, cfg, log, distributed)
                return f"{stop.signal_name or 'signal'}: saved {path} at step {state.step}; run again to resume", False
        path = finish(state, diffusion, cfg, log, device, amp_dtype, distributed)
        spent = f" in {state.train_seconds / 60:.1f} min of training" if cfg.time_budget else ""
        return f"done: {state.step} steps{spent}; checkpoint {path}, metrics {log.log_dir / 'metrics.csv'}", False
    except utils.CheckpointError as error:
        return f"error: {error}", True
    finally:
        stop.restore()


def finish(state, diffusion, cfg, log, device, amp_dtype, distributed):
    """The end of a run: the last checkpoint, the last preview grid (unless the loop just made it), the HParams."""
    path = save(state, cfg, log, distributed)
    if cfg.sample_every and state.step % cfg.sample_every != 0:
        log.preview(state, diffusion, device, amp_dtype)
    log.finish()
    return path


def broadcast(value, distributed, device):
    """Rank 0's integer `value` on every process."""
    if not distributed:
        return value
    tensor = torch.tensor([value], device=device)
    dist.broadcast(tensor, src=0)
    return int(tensor.item())


# --- the script -----------------------------------------------------------------------------------------

def main(argv=None):
    start = training.clock()  # a --time-budget counts from here
    # -- setup: processes, config, checkpoint, device --
    (cfg, resume_path, checkpoint, device, amp_dtype, rank, local_rank, world_size, teacher_state,
     init_state) = setup(argv)
    distributed = world_size > 1
    is_main = rank == 0
    # Each process draws its own noise and timesteps; the seed decides them all.
    utils.seed_everything(cfg.seed + rank)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    # -- data --
    dataset, sampler, loader, steps_per_epoch = build_loader(cfg, device, rank, world_size)
    tokenizer = None
    if cfg.captioned:  # captions: the vocabulary of a new run comes from them, and every one must fit the model
        captions = list(dataset.captions)
        if cfg.random_flip:  # and those of the flipped images, which say left for right
            captions += [mirror_caption(caption) for caption in captions]
        if cfg.text_encoder == "transformer" and not cfg.vocabulary:
            cfg = dataclasses.replace(cfg, vocabulary=text.build_vocabulary(captions))
        try:
            tokenizer = text.create_tokenizer(cfg)
            preview_labels = tokenizer([captions[index % len(dataset)] for index in range(PREVIEW_SAMPLES)])
            tokenizer(captions)
        except config.UserError as error:
            config.fail(f"training caption: {error}")
    # A --time-budget run fixes its length after its first steps (TimeBudget); a resumed one kept it (restore).
    total_steps = UNPLANNED if cfg.time_budget else cfg.max_steps or cfg.epochs * steps_per_epoch

    # -- state: model, EMA, optimizer, LR schedule, scaler; restored from the checkpoint --
    # The layer shapes come with the weights (a pruned model's are its own): from the checkpoint, else the start.
    start_weights = (teacher_state or init_state or {}).get("ema")
    try:
        state = TrainingState(cfg, device, amp_dtype, total_steps,
                              weights=checkpoint["model"] if checkpoint is not None else start_weights)
        if init_state is not None:  # fine-tuning: the run starts as the model it fine-tunes
            state.model.load_state_dict(init_state["ema"])
            state.ema_model.load_state_dict(init_state["ema"])
    except (RuntimeError, ValueError) as error:
        reason = str(error).strip().splitlines()[0]
        config.fail(f"the weights of {resume_path or cfg.init_from or cfg.teacher} do not fit the model its config "
                    f"describes ({reason[:200]})")
    if checkpoint is not None:
        try:
            notice = state.restore(checkpoint, rank, world_size)
        except config.UserError as error:
            config.fail(error)
        if is_main:
            if notice:
                print(f"notice: {notice}")
            print(f"resuming {resume_path} at step {state.step} (epoch {state.epoch})")
    diffusion = create_diffusion(cfg)
    if teacher_state is not None:  # progressive distillation: the student starts as its teacher, which stays frozen
        try:
            teacher = teacher_model(cfg, teacher_state, device)
        except config.UserError as error:
            config.fail(error)
        if checkpoint is None:
            state.model.load_state_dict(teacher_state["ema"])
            state.ema_model.load_state_dict(teacher_state["ema"])
        guidance = distillation.teacher_guidance(cfg, config.config_from_dict(teacher_state["config"]))
        diffusion = ProgressiveDistillation(diffusion, teacher, cfg.student_steps, guidance)
    if cfg.distill_from:  # knowledge distillation: the outputs of a frozen model are the targets
        try:
            source = utils.load_checkpoint(cfg.distill_from)
            distillation.check_output_teacher(cfg, source)
            teacher = teacher_model(cfg, source, device, cfg.distill_from)
        except config.UserError as error:
            config.fail(error)
        diffusion = OutputDistillation(diffusion, teacher)
    state.prepare(device, cfg.channels_last, distributed, local_rank, cfg.compile)
    # Without a budget it only counts the training time, which checkpoints keep.
    budget = TimeBudget(config.parse_duration(cfg.time_budget) if cfg.time_budget else math.inf,
                        spent=state.train_seconds, start=start)

    # -- the loop --
    log = RunLog(cfg, state, state.total_steps, is_main, preview_labels if tokenizer is not None else None)
    if is_main:
        length = f"{state.total_steps:,} steps"
        if state.total_steps == UNPLANNED:
            length = f"a time budget of {cfg.time_budget} ({budget.elapsed() / 60:.1f} min used)"
        elif cfg.time_budget:
            length += f" (fixed by the time budget {cfg.time_budget}; {state.train_seconds / 60:.1f} min used)"
        print(f"run {cfg.name}: {sum(p.numel() for p in state.model.parameters()):,} parameters, {len(dataset):,} "
              f"images, {length} of {cfg.batch_size * cfg.grad_accum * world_size} images, "
              f"device {device}, amp {amp_dtype or 'none'}, {world_size} process(es)")
    batches = device_batches(infinite_batches(loader, sampler, steps_per_epoch * cfg.grad_accum, state.epoch,
                                              state.batch_in_epoch), state, cfg, device, tokenizer)
    try:
        message, failed = train_loop(state, diffusion, batches, log, cfg, budget, device, amp_dtype, distributed)
    except BaseException:
        log.close()
        utils.leave_distributed(wait=False)
        raise
    log.close()
    utils.leave_distributed(wait=True)  # rank 0 may still be writing the last checkpoint and preview

    # -- end --
    if is_main:
        print(message, file=sys.stderr if failed else sys.stdout)
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
