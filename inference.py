"""A trained model and batched sampling from it: what sample.py and evaluate.py share.

    loaded = load_model(run_name="demo")                  # or checkpoint=PATH, or pretrained=PATH_OR_ID
    steps = sampling_steps(loaded.cfg, "ddim", 0, 1.0)    # the sampler's default: 100
    model = prepare_for_sampling(loaded.model, device, amp_dtype)   # channels-last, weights in the AMP dtype
    images = generate(model, create_diffusion(loaded.cfg), loaded.cfg, 64, sampler="ddim", steps=steps,
                      device=device, amp_dtype=amp_dtype) # (64, C, H, W) in [-1, 1]

Imports config, model and utils, and no script.
"""

import math
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn
from torch._inductor import config as inductor_config
from tqdm import tqdm

import config
from model import create_model, load_pretrained
import utils


DEFAULT_RUN = "cifar10"
PRETRAINED_RUN = "pretrained"  # the run name outputs go under for --pretrained
DEFAULT_STEPS = {"ddim": 100, "dpmpp2m": 20}  # ddpm: all T steps


class LoadedModel(NamedTuple):
    """A model to sample from, and what the outputs say about it."""
    model: torch.nn.Module  # in eval mode, on the CPU
    cfg: config.Config      # the config it was trained with
    run: str                # the run name outputs go under
    source: str             # where it came from, for messages
    step: int | None        # the training step of its checkpoint; None for pretrained weights


def runs_with_checkpoints():
    """Names of the folders under checkpoints/ that hold last.pt or a step file."""
    if not utils.CHECKPOINT_DIR.is_dir():
        return []
    return sorted(folder.name for folder in utils.CHECKPOINT_DIR.iterdir()
                  if folder.is_dir() and ((folder / "last.pt").exists() or utils.step_checkpoints(folder)))


def find_run_checkpoint(run):
    """(path, state) of the newest readable checkpoint of `run`; utils.UsageError naming the runs that exist."""
    run_dir = utils.CHECKPOINT_DIR / run
    path, state = utils.load_latest_checkpoint(run_dir)
    if path is not None:
        return path, state
    runs = runs_with_checkpoints()
    if run in runs:
        raise utils.UsageError(f"no checkpoint in {run_dir} can be read (see the warnings above); train the run again "
                         f"or name a good file with --checkpoint")
    known = f"runs with checkpoints: {', '.join(runs)}" if runs else "there are no trained runs yet"
    raise utils.UsageError(f"run {run!r} has no checkpoint in {run_dir} ({known}); choose one with --run-name, or train "
                     f"one with `python train.py --preset demo`")


def load_model_from_checkpoint(path, state, use_ema=True):
    """(model, cfg): the network the checkpoint's own config describes, with its EMA (or raw) weights, in eval mode."""
    cfg = config.config_from_dict(state["config"])
    key = "ema" if use_ema else "model"
    if key not in state:
        raise utils.CheckpointError(f"{path} holds no {key!r} weights; try {'--no-ema' if use_ema else '--ema'}")
    model = create_model(cfg)
    try:
        model.load_state_dict(state[key])
    except RuntimeError as error:
        reason = str(error).strip().splitlines()[0]
        raise utils.CheckpointError(f"the weights in {path} do not fit the model its config describes "
                              f"({reason[:200]})") from error
    return model.eval(), cfg


def load_model(run_name="", checkpoint="", pretrained="", use_ema=True):
    """The model of --pretrained (a diffusers folder or Hub id), else of --checkpoint, else the newest checkpoint
    of the run (default DEFAULT_RUN), as a LoadedModel. Raises UsageError, CheckpointError or
    PretrainedError."""
    if pretrained:
        # The DDPM paper's model: linear betas, T = 1000, eps prediction; exactly the ddpm-cifar10 preset.
        model = load_pretrained(pretrained)
        return LoadedModel(model, config.get_config("ddpm-cifar10"), run_name or PRETRAINED_RUN, pretrained, None)
    if checkpoint:
        path = Path(checkpoint)
        state = utils.load_checkpoint(path)
    else:
        path, state = find_run_checkpoint(run_name or DEFAULT_RUN)
    model, cfg = load_model_from_checkpoint(path, state, use_ema)
    step = state.get("step")
    source = f"{path} ({'EMA' if use_ema else 'raw'} weights, step {'?' if step is None else step})"
    return LoadedModel(model, cfg, run_name or cfg.name, source, step)


def check_sampling(sampler, steps, eta, guidance_scale, ddpm_variance="auto", dynamic_threshold=0.0):
    """Raise utils.UsageError for sampling options that cannot work whatever the model."""
    if sampler not in config.SAMPLERS:
        raise utils.UsageError(f"unknown sampler {sampler!r}; choose one of {', '.join(config.SAMPLERS)}")
    if ddpm_variance not in config.DDPM_VARIANCES or (ddpm_variance != "auto" and sampler != "ddpm"):
        raise utils.UsageError(f"--ddpm-variance must be one of {', '.join(config.DDPM_VARIANCES)} and only applies "
                               f"to --sampler ddpm, got {ddpm_variance} with {sampler}")
    if not 0 <= dynamic_threshold < 1:
        raise utils.UsageError(f"--dynamic-threshold must be a percentile in [0, 1) such as 0.995 (0 = static "
                               f"clipping to [-1, 1]), got {dynamic_threshold}")
    if steps < 0:
        raise utils.UsageError(f"--steps must be positive (or 0 for the sampler's default), got {steps}")
    if not 0 <= eta <= 1 or (eta != 0 and sampler != "ddim"):
        raise utils.UsageError(f"--eta must be in [0, 1] and only applies to --sampler ddim, got {eta} with {sampler}")
    if guidance_scale < 0 or not math.isfinite(guidance_scale):
        raise utils.UsageError(f"--guidance-scale must be 0 or more (0 = unconditional, 1 = plain conditional, "
                         f"2-5 = stronger guidance), got {guidance_scale}")


def sampling_steps(cfg, sampler, steps, guidance_scale):
    """The number of steps to sample this model with: `steps`, or when it is 0 the sampler's default (ddpm all T,
    ddim 100, dpmpp2m 20, never more than T). Raises utils.UsageError for options this model cannot follow."""
    T = cfg.timesteps
    if steps > T:
        raise utils.UsageError(f"--steps {steps} is more than the model's {T} timesteps; use at most {T}")
    if cfg.num_classes == 0 and guidance_scale != 1:
        raise utils.UsageError(f"--guidance-scale {guidance_scale} needs a model trained with labels; this one is "
                         f"unconditional, so leave it at 1")
    return steps or min(DEFAULT_STEPS.get(sampler, T), T)


def prepare_for_sampling(model, device, amp_dtype=None, compile=False):
    """The model, moved to `device` and made faster to sample from; the same numbers up to rounding.

    - Channels-last memory format: oneDNN's convolutions run in it natively, where the default (NCHW) layout costs
      a reorder of every input and output (sampling ddpm-cifar10 in bf16 on a 2-core CPU: 1.3x the images/s).
    - With mixed precision, the weights of convolutions and linear layers are stored in `amp_dtype`. Autocast would
      cast them to it at every use anyway; stored, they skip the cast (another 1.1x on that CPU). GroupNorm keeps
      its float32 weights, as under autocast.
    - compile: torch.compile with inductor's freezing, which folds the weights into the compiled graph as constants
      (on a CPU in oneDNN's own layout) and fuses each convolution with what follows it (1.3x again there). On CUDA
      also in mode "reduce-overhead", which replays the network's kernels as one CUDA graph. Freezing is a
      process-wide inductor setting; it only touches graphs compiled without gradients, as sampling's are.
      The first calls compile (15-60 s on that CPU); that is paid back after several hundred network calls.

    Changes `model` itself (its layout and dtypes) and returns it, or its compiled wrapper.
    """
    model = model.to(device, memory_format=torch.channels_last)
    if amp_dtype is not None:
        for module in model.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                module.to(amp_dtype)
    if compile:
        inductor_config.freezing = True
        return torch.compile(model, mode="reduce-overhead" if device.type == "cuda" else None)
    return model


@torch.no_grad()
def generate(model, diffusion, cfg, num_samples, *, sampler, steps, device, batch_size=64, seed=0, eta=0.0,
             guidance_scale=1.0, ddpm_variance="auto", dynamic_threshold=0.0, amp_dtype=None, labels=None,
             init_image=None, strength=1.0, keep_mask=None, return_trajectory=False):
    """Sample num_samples images in batches of batch_size: float32 (N, C, H, W) on the CPU, in [-1, 1].

    `steps` must already be resolved (> 0; see sampling_steps). labels: (N,) class labels, or None. init_image
    (1, C, H, W): SDEdit from it at `strength`; keep_mask (1, 1, H, W), 1 = keep: inpaint it. All noise comes from
    one CPU generator seeded with `seed`, so the batch size does not change deterministic samples. With
    return_trajectory, returns (images, the first batch's trajectory): a list of (t, x_t, x0_pred), as
    GaussianDiffusion.sample gives it.
    """
    T = diffusion.num_timesteps
    generator = torch.Generator().manual_seed(seed)
    # SDEdit starts at t0 = strength x T and runs only the chain's steps below it (none when t0 = 0).
    t0 = T if init_image is None else round(strength * T)
    steps = steps if t0 == T else math.ceil(steps * t0 / T)
    num_batches = math.ceil(num_samples / batch_size)
    progress = tqdm(total=num_batches * steps, desc=f"{sampler}, {steps} steps x {num_batches} batch(es)",
                    unit="step", dynamic_ncols=True)

    def model_with_progress(*args):
        progress.update()  # every sampling step calls the model once (guidance batches both calls into one)
        return model(*args)

    images = []
    trajectory = None
    for start in range(0, num_samples, batch_size):
        size = min(batch_size, num_samples - start)
        shape = (size, cfg.channels, cfg.image_size, cfg.image_size)
        noise = torch.randn(shape, generator=generator).to(device)
        x_T = noise
        start_t = None
        if init_image is not None and t0 < T:
            # SDEdit: x_{t0} ~ q(x_{t0} | x_0 = input), which is table index t0 - 1; t0 = 0 is the input itself.
            x0 = init_image.to(device).expand(shape)
            start_t = t0
            x_T = x0 if t0 == 0 else diffusion.q_sample(x0, torch.full((size,), t0 - 1, device=device), noise)
        y = labels[start:start + size].to(device) if labels is not None else None
        first = start == 0
        with utils.autocast(device, amp_dtype):
            result = diffusion.sample(
                model_with_progress, shape, sampler=sampler, steps=steps, eta=eta, generator=generator,
                y=y, guidance_scale=guidance_scale, ddpm_variance=ddpm_variance, dynamic_threshold=dynamic_threshold,
                x_T=x_T, return_trajectory=return_trajectory and first,
                start_t=start_t, mask=None if keep_mask is None else keep_mask.to(device),
                x_known=None if keep_mask is None else init_image.to(device), device=device)
        if return_trajectory and first:
            result, trajectory = result
        images.append(result.float().cpu())
    progress.close()
    images = torch.cat(images)
    return (images, trajectory) if return_trajectory else images
