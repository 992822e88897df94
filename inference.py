"""A trained model and batched sampling from it: what sample.py and evaluate.py share.

    opts = SamplingOptions(run_name="demo", sampler="ddim")   # what the shared --flags say
    loaded = load_model(opts.run_name)                    # or checkpoint=PATH, or pretrained=PATH_OR_ID
    opts.steps = sampling_steps(loaded.cfg, opts)         # the sampler's default: 100
    model = prepare_for_sampling(loaded.model, device, amp_dtype)   # channels-last, weights in the AMP dtype
    images = generate(model, create_diffusion(loaded.cfg), loaded.cfg, opts, 64, device=device,
                      amp_dtype=amp_dtype)                # (64, C, H, W) in [-1, 1]; jobs.py for long jobs

Imports config, diffusion, model, pretrained, quantization, samplers and utils, and no script.
"""

import math
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn
from torch._inductor import config as inductor_config
from tqdm import tqdm

import config
from config import flag_field
from model import create_model
from pretrained import load_pretrained
from diffusion import SKIP_TYPES
import quantization
from samplers import DDPM_VARIANCES, SAMPLERS, randn
import utils


DEFAULT_RUN = "cifar10"
PRETRAINED_RUN = "pretrained"  # the run name outputs go under for --pretrained


@dataclass
class DeviceOptions:
    """Where and how fast to run the network. Every field is a --flag of the same name (see --help)."""

    amp: str = flag_field("auto", "mixed precision: auto (default: bf16 or fp16 on CUDA, bf16 on CPUs with AMX or "
                                  "AVX-512 BF16, none on other CPUs), none, fp16, bf16")
    device: str = flag_field("auto", "auto (default: CUDA when available), cpu or cuda")
    compile: bool = flag_field(False, "torch.compile the network; for sampling with inductor's freezing (on CUDA with "
                                      "CUDA graphs too), which pays off after a few hundred network calls "
                                      "(README: Speed notes)")


@dataclass
class SamplingOptions(DeviceOptions):
    """Which trained model to load and how to sample from it: the options sample.py and evaluate.py share."""

    run_name: str = flag_field("", f"run to load: checkpoints/RUN/last.pt (or its newest readable step file); "
                                   f"outputs go under results/*/RUN/ (default {DEFAULT_RUN}; with --checkpoint the "
                                   f"checkpoint's own run, with --pretrained '{PRETRAINED_RUN}')")
    checkpoint: str = flag_field("", "a checkpoint file to load instead of the run's newest one")
    pretrained: str = flag_field("", "a diffusers-format DDPM CIFAR-10 folder (or Hub id such as "
                                     "google/ddpm-cifar10-32) to load instead of a checkpoint")
    ema: bool = flag_field(True, "use the EMA weights (default); --no-ema uses the raw trained weights")
    sampler: str = flag_field("ddim", "sampler (default ddim)", tuple(SAMPLERS))
    steps: int = flag_field(0, "sampling steps; 0 = the sampler's default: "
                               + ", ".join(f"{name} {sampler.default_steps or 'all T'}"
                                           for name, sampler in SAMPLERS.items()))
    eta: float = flag_field(0.0, "DDIM noise scale in [0, 1]: 0 (default) is deterministic, 1 is DDPM-like")
    ddpm_variance: str = flag_field("auto", "sigma_t^2 of --sampler ddpm: large (beta_t, DDPM's choice for the full "
                                            "chain), small (the posterior variance), or auto (default): large for "
                                            "all T steps, small for fewer (far better there: DDIM Table 1)",
                                    DDPM_VARIANCES)
    timestep_spacing: str = flag_field("uniform", "where the steps fall: uniform (default: evenly in t, as DDIM), "
                                                  "quadratic (DDIM's, dense near the data), logsnr (evenly in "
                                                  "log-SNR, as DPM-Solver) or karras (EDM's rho = 7)", SKIP_TYPES)
    dynamic_threshold: float = flag_field(0.0, "dynamic thresholding of the predicted x_0 at this percentile (Imagen; "
                                               "0.995 is usual), against saturated colours at high guidance; 0 "
                                               "(default) clips x_0 to [-1, 1]")
    guidance_scale: float = flag_field(1.0, "classifier-free guidance scale w >= 0 for models trained with labels: "
                                            "1 (default) = plain conditional, 0 = unconditional, 2-5 = more typical "
                                            "of the class")
    seed: int = flag_field(0, "random seed; the same seed gives the same images (default 0)")


class LoadedModel(NamedTuple):
    """A model to sample from, and what the outputs say about it."""
    model: torch.nn.Module  # in eval mode, on the CPU
    cfg: config.Config      # the config it was trained with
    run: str                # the run name outputs go under
    source: str             # where it came from, for messages
    step: int | None        # the training step of its checkpoint; None for pretrained weights
    compression: dict | None = None  # compress.py's record of a compressed checkpoint (quantization.py), or None


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
    if "compression" in state:  # compress.py quantize: bf16 / fp16 weights, or an int8 model
        return quantization.load_quantized(state[key], cfg, state["compression"]), cfg
    try:
        model = create_model(cfg, state[key])  # in the weights' layer shapes: a pruned model's are its own
        model.load_state_dict(state[key])
    except (RuntimeError, ValueError) as error:
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
    if "compression" in state:
        source = f"{path} ({quantization.describe(state['compression'])} of {state['compression']['source']})"
    return LoadedModel(model, cfg, run_name or cfg.name, source, step, state.get("compression"))


def check_sampling(opts):
    """Raise utils.UsageError for sampling options (a SamplingOptions) that cannot work whatever the model."""
    if opts.sampler not in SAMPLERS:
        raise utils.UsageError(f"unknown sampler {opts.sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if opts.steps < 0:
        raise utils.UsageError(f"--steps must be positive (or 0 for the sampler's default), got {opts.steps}")
    # Every sampler's own options: at their default unless this sampler takes them.
    for name, sampler in SAMPLERS.items():
        for option, default in sampler.options.items():
            if getattr(opts, option) != default and option not in SAMPLERS[opts.sampler].options:
                raise utils.UsageError(f"--{option.replace('_', '-')} only applies to --sampler {name}, got "
                                       f"{getattr(opts, option)} with {opts.sampler}")
    if not 0 <= opts.eta <= 1:
        raise utils.UsageError(f"--eta must be in [0, 1], got {opts.eta}")
    if opts.timestep_spacing not in SKIP_TYPES:
        raise utils.UsageError(f"--timestep-spacing must be one of {', '.join(SKIP_TYPES)}, got "
                               f"{opts.timestep_spacing}")
    if opts.ddpm_variance not in DDPM_VARIANCES:
        raise utils.UsageError(f"--ddpm-variance must be one of {', '.join(DDPM_VARIANCES)}, got {opts.ddpm_variance}")
    if not 0 <= opts.dynamic_threshold < 1:
        raise utils.UsageError(f"--dynamic-threshold must be a percentile in [0, 1) such as 0.995 (0 = static "
                               f"clipping to [-1, 1]), got {opts.dynamic_threshold}")
    if opts.guidance_scale < 0 or not math.isfinite(opts.guidance_scale):
        raise utils.UsageError(f"--guidance-scale must be 0 or more (0 = unconditional, 1 = plain conditional, "
                               f"2-5 = stronger guidance), got {opts.guidance_scale}")


def sampling_steps(cfg, opts):
    """The number of steps to sample this model with: opts.steps, or when it is 0 a distilled model's student_steps,
    else the sampler's default (ddpm all T, ddim 100, dpmpp2m 20, never more than T). Raises utils.UsageError for
    options this model cannot follow."""
    T = cfg.timesteps
    if opts.steps > T:
        raise utils.UsageError(f"--steps {opts.steps} is more than the model's {T} timesteps; use at most {T}")
    if cfg.num_classes == 0 and not cfg.captioned and opts.guidance_scale != 1:
        raise utils.UsageError(f"--guidance-scale {opts.guidance_scale} needs a model trained with labels or "
                               f"captions; this one is unconditional, so leave it at 1")
    if not opts.steps and cfg.student_steps:  # a distilled student: the step count it was trained for
        return cfg.student_steps
    return opts.steps or min(SAMPLERS[opts.sampler].default_steps or T, T)


def prepare_for_sampling(model, device, amp_dtype=None, compile=False):
    """The model, moved to `device` and made faster to sample from; the same numbers up to rounding.

    - Channels-last memory format: oneDNN's convolutions run in it natively, where the default (NCHW) layout costs
      a reorder of every input and output.
    - With mixed precision, the weights of convolutions and linear layers are stored in `amp_dtype`. Autocast would
      cast them to it at every use anyway; stored, they skip the cast. GroupNorm keeps
      its float32 weights, as under autocast.
    - compile: torch.compile with inductor's freezing, which folds the weights into the compiled graph as constants
      (on a CPU in oneDNN's own layout) and fuses each convolution with what follows it. On CUDA
      also in mode "reduce-overhead", which replays the network's kernels as one CUDA graph. Freezing is a
      process-wide inductor setting; it only touches graphs compiled without gradients, as sampling's are.
      The first calls compile, which is paid back after several hundred network calls (README, Speed notes, has
      the measured gains of all three).

    Changes `model` itself (its layout and dtypes) and returns it, or its compiled wrapper. An int8 model
    (quantization.Int8UNet) is returned as it is: it runs in its own precision and compiles itself, on a CPU only.
    """
    if isinstance(model, quantization.Int8UNet):
        if device.type != "cpu":
            raise utils.UsageError("an int8 checkpoint runs on the CPU (its kernels are x86 oneDNN ones); use "
                                   "--device cpu, or the float run it was made from on a GPU")
        return model
    model = model.to(device, memory_format=torch.channels_last)
    if amp_dtype is not None:
        for module in model.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                module.to(amp_dtype)
    if compile:
        inductor_config.freezing = True
        return torch.compile(model, mode="reduce-overhead" if device.type == "cuda" else None)
    return model


GOLDEN = 0x9E3779B9  # 2^32 / golden ratio: multiples of it mod 2^32 spread as evenly as any sequence can


def image_seed(seed, index):
    """The 32-bit seed of image `index` of a job with --seed `seed`: (seed x GOLDEN + index) mod 2^32.

    PyTorch's CPU generator keeps 32 bits of a seed, so (seed, index) has to fit in 32 bits. Within a job the
    images get consecutive seeds, each its own noise; the multiples of GOLDEN put the jobs of different --seed
    values far apart: those of seeds 0 ... 9,999 start at least 287,291 seeds from each other, so their jobs of up
    to that many images never share an image. --seed 0 gives image i the seed i."""
    return (seed * GOLDEN + index) % 2 ** 32


def image_generators(seed, start, count):
    """One CPU generator for each of the images start ... start + count - 1 of a sampling job: image i draws all of
    its noise (x_T, and the z of every stochastic step) from its own generator, seeded with image_seed(seed, i). So
    an image is the same in any batch, and in any process of a torchrun job (jobs.py), for every sampler."""
    return [torch.Generator().manual_seed(image_seed(seed, index)) for index in range(start, start + count)]


def network_calls(diffusion, opts, init_image=None, strength=1.0):
    """The network calls of one batch: opts.steps, or for SDEdit (an init_image) the chain's steps below its t0."""
    if init_image is None:
        return opts.steps
    return diffusion.sdedit_steps(opts.steps, strength)[1]


@torch.no_grad()
def generate_batch(model, diffusion, cfg, opts, start, count, *, device, amp_dtype=None, labels=None, init_image=None,
                   strength=1.0, keep_mask=None, return_trajectory=False, on_call=None):
    """Images start ... start + count - 1 of a sampling job as one batch, as `opts` (a SamplingOptions) says:
    float32 (count, C, H, W) on the CPU, in [-1, 1].

    opts.steps must already be resolved (> 0; see sampling_steps). labels: (count,) class labels of these images, or
    None. init_image (1, C, H, W): SDEdit from it at `strength`; keep_mask (1, 1, H, W), 1 = keep: inpaint it.
    The noise of image i comes from image_generators. on_call() runs at every network call (progress bars). With
    return_trajectory, returns (images, trajectory): a list of (t, x_t, x0_pred), as GaussianDiffusion.sample gives it.
    """
    sampler_options = {name: getattr(opts, name) for name in SAMPLERS[opts.sampler].options}
    if init_image is None:
        strength = 1.0  # only image to image has a strength
    generators = image_generators(opts.seed, start, count)
    shape = (count, cfg.channels, cfg.image_size, cfg.image_size)
    x_T = randn(shape, generators, device)

    def model_with_progress(*args):
        if on_call is not None:
            on_call()  # every sampling step calls the model once (guidance batches both calls into one)
        return model(*args)

    with utils.autocast(device, amp_dtype):
        result = diffusion.sample(
            model_with_progress, shape, opts.sampler, opts.steps, generator=generators,
            y=labels.to(device) if labels is not None else None, guidance_scale=opts.guidance_scale, x_T=x_T,
            return_trajectory=return_trajectory, skip_type=opts.timestep_spacing,
            dynamic_threshold=opts.dynamic_threshold, init_image=init_image,
            strength=strength, mask=keep_mask, device=device, **sampler_options)
    if return_trajectory:
        images, trajectory = result
        return images.float().cpu(), trajectory
    return result.float().cpu()


def generate(model, diffusion, cfg, opts, num_samples, *, device, batch_size=64, amp_dtype=None, labels=None,
             init_image=None, strength=1.0, keep_mask=None, return_trajectory=False):
    """Sample images 0 ... num_samples - 1 as `opts` says, in batches of batch_size (generate_batch), in this
    process: float32 (N, C, H, W) on the CPU, in [-1, 1]. labels: (N,) class labels, or None. Each image's noise is
    its own (image_generators), so the batch size does not change the images beyond rounding. With
    return_trajectory, returns (images, the first batch's trajectory). jobs.py makes long jobs, across processes."""
    num_batches = math.ceil(num_samples / batch_size)
    calls = network_calls(diffusion, opts, init_image, strength)
    progress = tqdm(total=num_batches * calls, unit="step", dynamic_ncols=True,
                    desc=f"{opts.sampler}, {calls} steps x {num_batches} batch(es)")
    images = []
    trajectory = None
    for start in range(0, num_samples, batch_size):
        count = min(batch_size, num_samples - start)
        first = start == 0
        result = generate_batch(model, diffusion, cfg, opts, start, count, device=device, amp_dtype=amp_dtype,
                                labels=labels[start:start + count] if labels is not None else None,
                                init_image=init_image, strength=strength, keep_mask=keep_mask,
                                return_trajectory=return_trajectory and first, on_call=progress.update)
        if return_trajectory and first:
            result, trajectory = result
        images.append(result)
    progress.close()
    images = torch.cat(images)
    return (images, trajectory) if return_trajectory else images
