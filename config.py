"""Configuration: one typed dataclass, named presets, and command-line flags built from it.

Every script imports this file; it imports no other module of the project. A field is declared once,
with its help text, and becomes a `--field-name` flag in every script that trains or samples.

    cfg = get_config("ddpm-cifar10", batch_size=64)   # a preset plus overrides
    cfg = config_from_dict(checkpoint["config"])       # what a run was trained with
"""

import argparse
import dataclasses
import json
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

DATASETS = ("cifar10", "mnist", "fashion_mnist", "folder", "shapes")
# Class counts of the datasets whose classes are fixed; a `folder` dataset counts its sub-folders.
DATASET_NUM_CLASSES = {"cifar10": 10, "mnist": 10, "fashion_mnist": 10, "shapes": 4}
DATASET_CHANNELS = {"cifar10": 3, "mnist": 1, "fashion_mnist": 1, "shapes": 3}
BETA_SCHEDULES = ("linear", "cosine")
OBJECTIVES = ("eps", "x0", "v")
NORM_GROUPS = ("divisor", "gcd")  # model.GroupNorm.groups_for
LOSS_WEIGHTINGS = ("none", "min_snr")
LR_SCHEDULES = ("cosine", "constant")
AMP_MODES = ("auto", "none", "fp16", "bf16")
DEVICES = ("auto", "cpu", "cuda")
TEXT_ENCODERS = ("none", "transformer", "clip")
CAPTIONED_DATASETS = ("shapes", "folder")


# Where runs write: checkpoints/RUN/ and results/{images,plots,logs}/RUN/, relative to the working directory.
CHECKPOINT_DIR = Path("checkpoints")
RESULTS_DIR = Path("results")


class UserError(Exception):
    """A mistake the user made and can fix (a flag, a file, a checkpoint, a dataset); the message is one sentence
    for them. Every script catches this one type and exits through `fail`. The modules raise its subclasses:
    ConfigError here, CheckpointError and UsageError (utils.py), DatasetError (dataset.py), PretrainedError
    (pretrained.py)."""


def fail(message, code=1):
    """Print `error: message` to stderr and exit with a non-zero code (for mistakes a user can fix)."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


class ConfigError(UserError, ValueError):
    """A config value that cannot work."""


def flag_field(default, help, choices=None, flag=True, repeat=False):
    """A dataclass field whose help text serves as its docstring and as its flag's --help; `choices`, if given,
    limits the flag's values (argparse rejects others with a one-line message). flag=False: a field the scripts
    fill in, with no flag. repeat=True (a tuple): the flag takes one value and may be given several times, the
    values collected."""
    metadata = {"help": help, "choices": choices, "flag": flag, "repeat": repeat}
    if isinstance(default, (list, tuple)):
        return field(default_factory=lambda: tuple(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class Config:
    """All settings of a run. Presets override the defaults below, flags override presets."""

    preset: str = flag_field("cifar10", "name of the preset this config started from")

    # --- data ---
    dataset: str = flag_field("cifar10", "dataset to train on", DATASETS)
    data_dir: str = flag_field("data", "where datasets are downloaded or read from (for 'folder': the image folder)")
    image_size: int = flag_field(32, "height and width of the images the model sees, in pixels")
    channels: int = flag_field(3, "image channels: 3 for RGB, 1 for grayscale")
    num_classes: int = flag_field(0, "number of class labels for conditional training; 0 = unconditional. A "
                                     "conditional preset (demo) keeps its labels on a dataset with known classes "
                                     "and drops them for a folder or captions, unless this is given")
    random_flip: bool = flag_field(True, "flip training images horizontally at random")

    # --- model (the U-Net in model.py) ---
    base_channels: int = flag_field(64, "channels of the first U-Net level")
    channel_mults: tuple = flag_field((1, 2, 4, 8), "channel multiplier of each level; the image is halved between levels")
    num_res_blocks: int = flag_field(2, "residual blocks per level")
    attn_resolutions: tuple = flag_field((16, 8), "feature-map sizes (in pixels) that get self-attention")
    num_heads: int = flag_field(8, "attention heads")
    dropout: float = flag_field(0.1, "dropout probability inside the residual blocks")
    norm_groups: str = flag_field("divisor", "the groups of a GroupNorm whose width 32 does not divide (a pruned "
                                             "layer): divisor (the most up to 32 that divide the width) or gcd "
                                             "(gcd(width, 32), what checkpoints saved before this field have)",
                                  NORM_GROUPS, flag=False)

    # --- text conditioning (text.py; cross-attention in model.py) ---
    text_encoder: str = flag_field("none", "condition on captions, through cross-attention at attn_resolutions and "
                                           "in the middle: transformer = a small text encoder trained with the "
                                           "U-Net over the words of the training captions; clip = a frozen "
                                           "pretrained CLIP text encoder (pip install transformers); none = no "
                                           "captions", TEXT_ENCODERS)
    text_model: str = flag_field("", "for --text-encoder clip: a local folder or Hugging Face Hub id of a CLIP "
                                     "model; empty = openai/clip-vit-base-patch32")
    text_dim: int = flag_field(128, "width of the transformer text encoder")
    text_layers: int = flag_field(2, "layers of the transformer text encoder")
    max_caption_length: int = flag_field(16, "longest caption, in words (transformer) or CLIP tokens with its "
                                             "start and end (clip); longer captions are refused")
    vocabulary: tuple = flag_field((), "the words the transformer text encoder knows, built by train.py from the "
                                       "training captions and saved with the run", flag=False)

    # --- diffusion (diffusion.py) ---
    timesteps: int = flag_field(1000, "diffusion steps T")
    beta_schedule: str = flag_field("linear", "noise schedule beta_t", BETA_SCHEDULES)
    objective: str = flag_field("eps", "what the network predicts: the noise, the clean image, or v", OBJECTIVES)
    loss_weighting: str = flag_field("none", "loss weight over timesteps (min_snr = Min-SNR-5)", LOSS_WEIGHTINGS)

    # --- training (train.py) ---
    batch_size: int = flag_field(64, "images per optimizer step on each process (global batch = this x GPUs x grad_accum)")
    epochs: int = flag_field(100, "passes over the dataset; ignored when max_steps > 0")
    max_steps: int = flag_field(0, "optimizer steps to train for; 0 = derive from epochs")
    time_budget: str = flag_field("", "train for this long instead (e.g. 90s, 10m, 2h, 1h30m): the run times its "
                                      "first steps, then fixes the number of steps so that the LR schedule and the "
                                      "last checkpoint end on time; replaces max_steps and epochs; empty = off")
    lr: float = flag_field(2e-4, "peak learning rate of Adam")
    adam_beta1: float = flag_field(0.9, "Adam beta1")
    adam_beta2: float = flag_field(0.999, "Adam beta2")
    warmup_steps: int = flag_field(1000, "steps of linear learning-rate warmup from 0")
    lr_schedule: str = flag_field("cosine", "after warmup: cosine anneals to 0 at the end, or constant", LR_SCHEDULES)
    grad_clip: float = flag_field(1.0, "clip the global gradient norm to this; 0 = no clipping")
    ema_decay: float = flag_field(0.9999, "decay of the exponential moving average of the weights, in [0, 1)")
    ema_gamma: float = flag_field(0.0, "power-function EMA (Karras et al. 2024) instead: the average weighs step s "
                                       "by s^gamma, so it covers the same late part of any run length (e.g. 7); "
                                       "0 = off, use ema_decay (giving only --ema-decay turns it off)")
    amp: str = flag_field("auto", "mixed precision: auto = bf16 (or fp16) on CUDA, bf16 on CPUs with AMX or "
                                   "AVX-512 BF16, none on other CPUs", AMP_MODES)
    grad_accum: int = flag_field(1, "micro-batches accumulated into one optimizer step")
    compile: bool = flag_field(False, "compile the model with torch.compile (no faster on a CPU: see README, "
                                       "Speed notes)")
    channels_last: bool = flag_field(False, "keep activations in channels-last memory format (no faster on "
                                             "a CPU, where GroupNorm is slow in it)")
    seed: int = flag_field(0, "random seed; the same seed on CPU reproduces a run bit for bit")
    device: str = flag_field("auto", "auto = CUDA when available", DEVICES)
    num_workers: int = flag_field(2, "DataLoader worker processes")
    run_name: str = flag_field("", "name of the run's folders under checkpoints/ and results/; empty = the preset's name")
    resume: str = flag_field("auto", "auto (continue from checkpoints/RUN/last.pt if it exists), none, or a checkpoint path")
    save_every: int = flag_field(5000, "write a checkpoint every this many steps (and always at the end)")
    sample_every: int = flag_field(5000, "log a grid of EMA samples every this many steps; 0 = never")
    log_every: int = flag_field(50, "write metrics every this many steps")
    keep_checkpoints: int = flag_field(3, "how many step_<N>.pt files to keep besides last.pt")
    cond_drop_prob: float = flag_field(0.1, "probability of replacing a label by the null label, or a caption by the "
                                                "empty one (classifier-free guidance)")
    max_bad_steps: int = flag_field(20, "stop the run when this many steps in a row have a non-finite loss")

    # --- progressive distillation (distill.py; distillation.py) ---
    teacher: str = flag_field("", "distil this checkpoint: the run starts from its EMA weights and model, and learns "
                                  "to do in one DDIM step what two of its steps do; empty = ordinary training")
    student_steps: int = flag_field(0, "the student's DDIM steps N (the teacher takes 2N); sampling defaults to it")
    distill_guidance: float = flag_field(1.0, "classifier-free guidance scale of the teacher's steps, for a model "
                                              "trained with labels; the student learns the guided result")

    # --- fine-tuning (compress.py prune) ---
    init_from: str = flag_field("", "start a new run from this checkpoint's EMA weights, in their layer shapes (a "
                                    "model pruned by compress.py prune), and its settings: flags given change them, "
                                    "but not the model; needs --run-name; empty = random initial weights")
    distill_from: str = flag_field("", "learn the outputs of this checkpoint's EMA model instead of the data's "
                                       "targets, at the same noisy images, timesteps and labels (knowledge "
                                       "distillation; compress.py prune fine-tunes so from the original); empty = "
                                       "the data's")

    def __post_init__(self):
        # JSON and argparse give lists; the config stores tuples so it stays hashable and comparable.
        self.channel_mults = tuple(int(m) for m in self.channel_mults)
        self.attn_resolutions = tuple(int(r) for r in self.attn_resolutions)
        self.vocabulary = tuple(str(word) for word in self.vocabulary)
        validate(self)

    @property
    def name(self):
        """The run's name: `run_name`, or the preset's name when it is empty."""
        return self.run_name or self.preset

    @property
    def captioned(self):
        """Whether the model is conditioned on captions (text_encoder is not "none")."""
        return self.text_encoder != "none"


# Fields that decide the shape of the network's weights or what its input and output mean: the diffusion it was
# trained in (T, the schedule that maps t to a noise level, and what it predicts). A resumed run keeps the
# checkpoint's values, and a flag that would change one of them is refused.
ARCHITECTURE_FIELDS = ("image_size", "channels", "num_classes", "base_channels", "channel_mults",
                       "num_res_blocks", "attn_resolutions", "num_heads", "timesteps", "beta_schedule", "objective",
                       "norm_groups", "text_encoder", "text_model", "text_dim", "text_layers", "max_caption_length", "vocabulary")


def check_same_model(cfg, overrides, saved, source, advice):
    """Raise ConfigError when a field the user set (a name in `overrides`, its value as `cfg` has it) would change
    the model or the diffusion (ARCHITECTURE_FIELDS) of `saved`, the config of `source`; `advice` ends the
    sentence."""
    for name in ARCHITECTURE_FIELDS:
        if name in overrides and getattr(cfg, name) != getattr(saved, name):
            raise ConfigError(f"--{name.replace('_', '-')} {getattr(cfg, name)} would change the model of {source} "
                              f"(its {name} is {getattr(saved, name)}); {advice}")


DURATION_UNITS = {"h": 3600, "m": 60, "s": 1}


def parse_duration(text):
    """Seconds in a duration such as "90s", "10m", "2h" or "1h30m" (units h, m, s; decimals allowed)."""
    parts = re.fullmatch(r"\s*(?:(\d+(?:\.\d+)?)h)?\s*(?:(\d+(?:\.\d+)?)m)?\s*(?:(\d+(?:\.\d+)?)s)?\s*",
                         str(text).lower())
    seconds = sum(float(value) * unit for value, unit in zip(parts.groups(), DURATION_UNITS.values())
                  if value) if parts else 0
    if not parts or seconds <= 0:
        raise ConfigError(f"time_budget must be a duration such as 90s, 10m, 2h or 1h30m, not {text!r}")
    return seconds


def _check(ok, message):
    if not ok:
        raise ConfigError(message)


def validate(cfg):
    """Raise ConfigError with one sentence for the first value in `cfg` that cannot work."""
    _check(cfg.preset in PRESETS, f"preset must be one of {', '.join(PRESETS)}, not {cfg.preset!r}")
    _check(cfg.dataset in DATASETS, f"dataset must be one of {', '.join(DATASETS)}, not {cfg.dataset!r}")
    _check(cfg.beta_schedule in BETA_SCHEDULES,
           f"beta_schedule must be one of {', '.join(BETA_SCHEDULES)}, not {cfg.beta_schedule!r}")
    _check(cfg.norm_groups in NORM_GROUPS, f"norm_groups must be one of {', '.join(NORM_GROUPS)}, not "
                                           f"{cfg.norm_groups!r}")
    _check(cfg.objective in OBJECTIVES, f"objective must be one of {', '.join(OBJECTIVES)}, not {cfg.objective!r}")
    _check(cfg.loss_weighting in LOSS_WEIGHTINGS,
           f"loss_weighting must be one of {', '.join(LOSS_WEIGHTINGS)}, not {cfg.loss_weighting!r}")
    _check(cfg.lr_schedule in LR_SCHEDULES,
           f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, not {cfg.lr_schedule!r}")
    _check(cfg.amp in AMP_MODES, f"amp must be one of {', '.join(AMP_MODES)}, not {cfg.amp!r}")
    _check(cfg.device in DEVICES, f"device must be one of {', '.join(DEVICES)}, not {cfg.device!r}")
    _check(cfg.text_encoder in TEXT_ENCODERS,
           f"text_encoder must be one of {', '.join(TEXT_ENCODERS)}, not {cfg.text_encoder!r}")

    for name in ("image_size", "channels", "base_channels", "num_res_blocks", "num_heads", "timesteps",
                 "batch_size", "grad_accum", "save_every", "log_every", "max_bad_steps"):
        _check(getattr(cfg, name) > 0, f"{name} must be a positive integer, got {getattr(cfg, name)}")
    for name in ("num_classes", "epochs", "max_steps", "warmup_steps", "sample_every", "num_workers",
                 "keep_checkpoints"):
        _check(getattr(cfg, name) >= 0, f"{name} must be zero or positive, got {getattr(cfg, name)}")
    _check(cfg.epochs > 0 or cfg.max_steps > 0, "give either epochs > 0 or max_steps > 0, or training never ends")
    if cfg.time_budget:
        parse_duration(cfg.time_budget)  # raises ConfigError
    _check(cfg.lr > 0, f"lr must be positive, got {cfg.lr}")
    _check(cfg.grad_clip >= 0, f"grad_clip must be zero (off) or positive, got {cfg.grad_clip}")
    _check(0 <= cfg.ema_decay < 1, f"ema_decay must be in [0, 1), got {cfg.ema_decay}")
    _check(cfg.ema_gamma >= 0, f"ema_gamma must be zero (off) or positive, got {cfg.ema_gamma}")
    _check(0 <= cfg.dropout < 1, f"dropout must be in [0, 1), got {cfg.dropout}")
    _check(0 <= cfg.cond_drop_prob < 1, f"cond_drop_prob must be in [0, 1), got {cfg.cond_drop_prob}")
    for name in ("adam_beta1", "adam_beta2"):
        _check(0 <= getattr(cfg, name) < 1, f"{name} must be in [0, 1), got {getattr(cfg, name)}")
    _check(cfg.channels in (1, 3), f"channels must be 1 or 3, got {cfg.channels}")
    if cfg.teacher or cfg.student_steps:
        _check(bool(cfg.teacher) and 1 <= cfg.student_steps <= cfg.timesteps // 2,
               f"distillation needs both teacher and student_steps, from 1 to timesteps / 2 = {cfg.timesteps // 2} "
               f"(got teacher {cfg.teacher!r}, student_steps {cfg.student_steps})")
    if cfg.init_from:
        _check(not cfg.teacher, "a run starts from either --init-from or --teacher (a student starts as its "
                                "teacher), not both")
        _check(bool(cfg.run_name), "a run started --init-from a checkpoint needs its own --run-name")
    _check(not (cfg.distill_from and cfg.teacher), "a run learns from either --teacher (progressive distillation) "
                                                   "or --distill-from (the teacher's outputs), not both")
    _check(cfg.distill_guidance >= 0, f"distill_guidance must be 0 or more, got {cfg.distill_guidance}")
    if cfg.captioned:
        _check(cfg.num_classes == 0, "a model is conditioned on class labels (num_classes) or on captions "
                                     "(text_encoder), not both; set --num-classes 0")
        _check(cfg.dataset in CAPTIONED_DATASETS, f"captions come with the datasets {', '.join(CAPTIONED_DATASETS)}, "
                                                  f"not {cfg.dataset}")
        _check(cfg.max_caption_length >= 2, f"max_caption_length must be at least 2, got {cfg.max_caption_length}")
        for name in ("text_dim", "text_layers"):
            _check(getattr(cfg, name) > 0, f"{name} must be a positive integer, got {getattr(cfg, name)}")
        _check(cfg.text_dim % 4 == 0, f"text_dim must be a multiple of 4 (the text encoder's 4 heads), "
                                      f"got {cfg.text_dim}")

    if cfg.dataset in DATASET_CHANNELS:
        _check(cfg.channels == DATASET_CHANNELS[cfg.dataset],
               f"dataset {cfg.dataset} has {DATASET_CHANNELS[cfg.dataset]} channel(s), so channels must be "
               f"{DATASET_CHANNELS[cfg.dataset]}, not {cfg.channels}")
    if cfg.dataset in DATASET_NUM_CLASSES and cfg.num_classes > 0:
        _check(cfg.num_classes == DATASET_NUM_CLASSES[cfg.dataset],
               f"dataset {cfg.dataset} has {DATASET_NUM_CLASSES[cfg.dataset]} classes, so num_classes must be "
               f"{DATASET_NUM_CLASSES[cfg.dataset]} (or 0 for unconditional), not {cfg.num_classes}")

    # The U-Net halves the image between levels and needs GroupNorm(32) to divide every width.
    _check(len(cfg.channel_mults) > 0 and all(m > 0 for m in cfg.channel_mults),
           f"channel_mults must be a non-empty list of positive integers, got {list(cfg.channel_mults)}")
    halvings = len(cfg.channel_mults) - 1
    _check(cfg.image_size % 2 ** halvings == 0,
           f"image_size {cfg.image_size} cannot be halved {halvings} times (one per level after the first); "
           f"use a multiple of {2 ** halvings} or fewer channel_mults")
    resolutions = [cfg.image_size // 2 ** level for level in range(len(cfg.channel_mults))]
    for resolution in cfg.attn_resolutions:
        _check(resolution in resolutions,
               f"attn_resolutions has {resolution}, but the U-Net only sees the sizes {resolutions}")
    for mult in cfg.channel_mults:
        width = cfg.base_channels * mult
        _check(width % 32 == 0, f"every level's width (base_channels x mult) must be a multiple of 32 for "
                                f"GroupNorm(32), but {cfg.base_channels} x {mult} = {width}")
        _check(width % cfg.num_heads == 0,
               f"num_heads {cfg.num_heads} must divide every level's width, but not {width}")


# Presets are overrides of the defaults above. `cifar10` is the defaults themselves: our recommended recipe.
PRESETS = {
    # Our recommended CIFAR-10 recipe: a 4-level U-Net with widths 64-128-256-512, warmup + cosine LR.
    "cifar10": {},
    # The DDPM paper's CIFAR-10 model and training recipe (Ho et al. 2020, Appendix B): 35.7M parameters.
    "ddpm-cifar10": dict(
        base_channels=128, channel_mults=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,), num_heads=1,
        dropout=0.1, batch_size=128, epochs=0, max_steps=800_000, warmup_steps=5000, lr_schedule="constant",
        save_every=10_000, sample_every=10_000,
    ),
    # A GPU recipe: 28x28 digits padded to 32x32, a small 3-level U-Net, 20 epochs (about 9,400 steps). Digits are
    # not flipped: a mirrored 2 is no digit.
    "mnist": dict(
        dataset="mnist", channels=1, random_flip=False, base_channels=32, channel_mults=(1, 2, 2),
        attn_resolutions=(8,), num_heads=4, batch_size=128, epochs=20, warmup_steps=500, ema_decay=0.999,
        save_every=2000, sample_every=2000,
    ),
    # A CPU recipe for digits: 10 minutes (--time-budget) on 2 cores. The digits at 16x16 (as USPS has them), which
    # trains about 2.5x faster than 32x32, with their labels; the demo's model and recipe otherwise (README, Results:
    # what was tried). On a folder of digits give --num-classes 10 (one sub-folder per digit).
    "mnist-cpu": dict(
        dataset="mnist", num_classes=10, channels=1, image_size=16, random_flip=False, base_channels=32,
        channel_mults=(1, 2), num_res_blocks=1, attn_resolutions=(8,), num_heads=4, dropout=0.0, objective="v",
        loss_weighting="min_snr", batch_size=64, epochs=0, max_steps=1500, time_budget="10m", lr=1e-3,
        warmup_steps=100, ema_gamma=7.0, num_workers=0, save_every=1000, sample_every=1000, log_every=50,
        keep_checkpoints=2,
    ),
    # A tiny class-conditional model on the built-in offline `shapes` data, for a CPU: 5 minutes (--time-budget) on
    # 2 cores. The labels are the largest lever found: told which shape to draw, the model stops drawing hybrids of
    # two (0.53 -> 0.91 of the samples confidently one shape, README, Results: what was tried). v-prediction with
    # Min-SNR-5 learns in far fewer steps than eps-prediction; 16x16 trains 2.5x faster than 32x32; batch 64, two
    # levels and the power-function EMA won the trials. amp auto: bf16 on CPUs with AMX or AVX-512 BF16, else fp32.
    "demo": dict(
        dataset="shapes", num_classes=4, image_size=16, base_channels=32, channel_mults=(1, 2), num_res_blocks=1,
        attn_resolutions=(8,), num_heads=4, dropout=0.0, objective="v", loss_weighting="min_snr", batch_size=64,
        epochs=0, max_steps=1000, time_budget="5m", lr=1e-3, warmup_steps=100, ema_gamma=7.0, num_workers=0,
        save_every=500, sample_every=500, log_every=20, keep_checkpoints=2,
    ),
    # Text-conditional generation on a CPU: the captioned shapes (16x16) and the prompts that name them, 30 minutes
    # on 2 cores. The demo's recipe, with the demo trials' winners (batch 64, two levels, the power-function EMA),
    # a small transformer text encoder and cross-attention at 8x8 (README, Text-conditional generation).
    "demo-text": dict(
        dataset="shapes", image_size=16, base_channels=32, channel_mults=(1, 2), num_res_blocks=1,
        attn_resolutions=(8,), num_heads=4, dropout=0.0, objective="v", loss_weighting="min_snr",
        text_encoder="transformer", batch_size=64, epochs=0, max_steps=4000, time_budget="30m", lr=1e-3,
        warmup_steps=100, ema_gamma=7.0, num_workers=0, save_every=1000, sample_every=1000, log_every=20,
        keep_checkpoints=2,
    ),
}

FIELD_NAMES = tuple(f.name for f in dataclasses.fields(Config))


def get_config(preset="cifar10", **overrides):
    """The config of a preset with `overrides` (field names) applied; raises ConfigError for bad values."""
    if preset not in PRESETS:
        raise ConfigError(f"preset must be one of {', '.join(PRESETS)}, not {preset!r}")
    unknown = sorted(set(overrides) - set(FIELD_NAMES))
    if unknown:
        raise ConfigError(f"unknown config field(s): {', '.join(unknown)}")
    overrides = implied_overrides(overrides)
    values = {**PRESETS[preset], **overrides, "preset": preset}
    # Naming a dataset with a known channel count sets `channels` too, unless it was given.
    if "dataset" in overrides and "channels" not in overrides and values["dataset"] in DATASET_CHANNELS:
        values["channels"] = DATASET_CHANNELS[values["dataset"]]
    # A class-conditional preset (demo) keeps its labels on another dataset only where their number is known (a
    # folder's is not: give --num-classes), and gives them up for captions; unless num_classes was given.
    if values.get("num_classes", 0) > 0 and "num_classes" not in overrides:
        if overrides.get("text_encoder", "none") != "none":
            values["num_classes"] = 0
        elif "dataset" in overrides:
            values["num_classes"] = DATASET_NUM_CLASSES.get(values["dataset"], 0)
    return Config(**values)


def implied_overrides(overrides):
    """`overrides` with what they imply: an ema_decay given alone means that EMA, so it turns the power-function EMA
    off, be it a preset's (demo), a resumed run's or that of the checkpoint a run starts --init-from."""
    if "ema_decay" in overrides and "ema_gamma" not in overrides:
        return {**overrides, "ema_gamma": 0.0}
    return overrides


def config_to_dict(cfg):
    """The config as a plain dict of JSON types (what checkpoints and config.json hold)."""
    values = asdict(cfg)
    return {key: list(value) if isinstance(value, tuple) else value for key, value in values.items()}


def config_from_dict(values):
    """Rebuild a Config from `config_to_dict` output; fields added since it was written take their defaults."""
    unknown = sorted(set(values) - set(FIELD_NAMES))
    if unknown:
        raise ConfigError(f"the saved config has field(s) this version does not know: {', '.join(unknown)}")
    preset = values.get("preset", "cifar10")
    base = asdict(get_config(preset)) if preset in PRESETS else {}
    # A run saved before time budgets, the power-function EMA or norm_groups existed had neither, and grouped a
    # pruned GroupNorm by gcd, whatever its preset has today.
    return Config(**{**base, "time_budget": "", "ema_gamma": 0.0, "norm_groups": "gcd", **values})


def save_config(cfg, path):
    """Write the config as indented JSON."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(config_to_dict(cfg), f, indent=2)
        f.write("\n")


# --- command-line flags -------------------------------------------------------------------------

def add_dataclass_flags(parser, cls, title, skip=()):
    """Add one `--field-name` flag per field of dataclass `cls` (built with `flag_field`), defaulting to None so
    that only what the user typed overrides the defaults. Booleans get --name / --no-name; tuples take N values."""
    group = parser.add_argument_group(title)
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.metadata.get("flag", True):
            continue
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata["help"].replace("%", "%%")  # argparse formats help with %: "10%" must be "10%%"
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        if isinstance(default, bool):
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif isinstance(default, tuple) and f.metadata.get("repeat"):
            group.add_argument(flag, type=str, action="append", default=None, help=help_text, metavar="TEXT")
        elif isinstance(default, tuple):
            item_type = type(default[0]) if default else int
            group.add_argument(flag, type=item_type, nargs="*", default=None, help=help_text,
                               metavar="N" if item_type is int else "VALUE")
        else:
            choices = f.metadata.get("choices")
            group.add_argument(flag, type=type(default), default=None, choices=choices, help=help_text,
                               metavar="{" + ",".join(choices) + "}" if choices else f.name.upper())
    return parser


def parse_dataclass_args(cls, argv=None, description=None, title="options"):
    """An instance of dataclass `cls` from the command line, one flag per field (see add_dataclass_flags); fields
    the user did not type keep their defaults."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_flags(parser, cls, title)
    args = parser.parse_args(argv)
    return cls(**{name: value for name, value in vars(args).items() if value is not None})


def add_config_flags(parser):
    """Add `--preset` and one `--field-name` flag per Config field to an argparse parser."""
    parser.add_argument("--preset", default="cifar10", choices=list(PRESETS), help="named starting config")
    return add_dataclass_flags(parser, Config, "config (override the preset)", skip=("preset",))


def overrides_from_args(args):
    """The config fields the user set on the command line, and those they imply (implied_overrides), as a dict."""
    overrides = {}
    for name in FIELD_NAMES:
        value = getattr(args, name, None)
        if name != "preset" and value is not None:
            overrides[name] = tuple(value) if isinstance(value, list) else value
    return implied_overrides(overrides)


def config_from_args(args):
    """The preset named by `--preset` with every flag the user typed applied."""
    return get_config(args.preset, **overrides_from_args(args))
