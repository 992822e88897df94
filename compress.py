"""Smaller, faster models from a trained run: quantized weights, an int8 U-Net for the CPU, or a pruned U-Net.

    python compress.py quantize --run-name demo                    # int8: checkpoints/demo-int8/last.pt
    python compress.py quantize --run-name demo --mode bf16        # bf16 weights: checkpoints/demo-bf16/last.pt
    python compress.py quantize --run-name demo --steps 50 --calibration-images 128
    python compress.py prune --run-name demo --ratio 0.3           # checkpoints/demo-prune0.3/: pruned.pt, then
                                                                   # fine-tuned for 10% of demo's steps: last.pt
    python sample.py --run-name demo-int8                          # sampled, evaluated and loaded like any run
    python evaluate.py --run-name demo-int8 --steps 50 --num-samples 1000

quantize --mode int8 calibrates the activation ranges on the model's own inputs along the sampler's trajectory:
--calibration-images images sampled with --sampler / --steps / --timestep-spacing (and --guidance-scale for a
class-conditional model), so every timestep that sampler visits is in the calibration data. The sampling flags
are the same as sample.py's; sample the int8 model with the same ones. quantization.py has the method. bf16 and
fp16 store the weights in half precision: half the file, nothing to calibrate.

prune removes --ratio of the channels of every group of layers that must shrink together, the least important
first, scored by the gradients of the diffusion loss on --importance-batches batches of training images
(pruning.py has the method), and writes pruned.pt. Then it fine-tunes the pruned model as a train.py run of the
same name that starts --init-from pruned.pt with the original run's settings, for --finetune-steps (default 10% of
the original run's steps) at --lr (default 3 times the original's): checkpoints, EMA, TensorBoard and an exact
resume, as every run has. By default (--finetune-loss distill) the pruned model learns the original's outputs at the
same noisy images (train.py --distill-from original.pt, the original's weights saved beside pruned.pt), which
recovers far faster than the data's own targets (README, Compression). Running the same command again resumes a stopped fine-tuning and reuses pruned.pt. The pruned
checkpoints hold the pruned layer shapes in their weights and load without the pruning library.

Every compressed checkpoint is a run of its own (--output, default RUN-MODE or RUN-pruneR), written atomically;
its file holds tensors and plain values only. At the end the script samples --compare-images images with the
original model in float32 and with the new one (in int8, or under --amp) from the same noise, and prints the file
sizes, the mean difference of the images and their speed side by side. An int8 model runs on the CPU only.
"""

import argparse
import copy
import dataclasses
import io
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

import config
import inference
import pruning
import quantization
import train
import utils
from config import flag_field
from dataset import build_dataset
from diffusion import create_diffusion
from model import GroupNorm

ACTIONS = ("quantize", "prune")
FINETUNE_LOSSES = ("distill", "data")
LR_FACTOR = 3  # the fine-tuning's default peak learning rate, times the original's (README, Compression: measured)


@dataclass
class CompressOptions(inference.SamplingOptions):
    """Which run to compress, how, and where to: sample.py's model and sampling flags, then these. Every field is a
    --flag of the same name (see --help)."""

    mode: str = flag_field("int8", "quantize: int8 (default; convolutions and linear layers in int8 on the CPU, "
                                   "calibrated), bf16 or fp16 (the weights stored in half precision)",
                           quantization.MODES)
    calibration_images: int = flag_field(64, "quantize --mode int8: images whose sampling trajectories calibrate "
                                             "the activation ranges (default 64)")
    compare_images: int = flag_field(64, "images sampled by the original and the compressed model from the same "
                                         "noise at the end, for the report (default 64; 0 = none)")
    float_layers: str = flag_field("skips", "quantize --mode int8: the layers kept in float32: skips (default: the "
                                            "first and last convolutions, and the decoder's that read a skip), ends "
                                            "(the first and last only: a smaller file) or none",
                                   quantization.FLOAT_LAYERS)
    ratio: float = flag_field(0.3, "prune: the fraction of channels removed from every prunable group of layers, "
                                   "in [0, 1) (default 0.3)")
    importance_batches: int = flag_field(8, "prune: batches of --batch-size training images whose diffusion loss "
                                            "scores the channels (default 8)")
    finetune_steps: int = flag_field(-1, "prune: optimizer steps of the fine-tuning after pruning (default -1: 10% "
                                         "of the original run's steps; 0 = none)")
    lr: float = flag_field(0.0, "prune: peak learning rate of the fine-tuning (default 0: 3 times the original "
                                "run's)")
    finetune_loss: str = flag_field("distill", "prune: what the fine-tuning learns: distill (default: the original "
                                               "model's outputs at the same noisy images, train.py --distill-from) "
                                               "or data (the diffusion loss on the training images)",
                                    FINETUNE_LOSSES)
    batch_size: int = flag_field(64, "images per batch of the calibration, the comparison and the pruning's "
                                     "scores (default 64)")
    output: str = flag_field("", "run name of the compressed model (default RUN-MODE, e.g. demo-int8, or "
                                 "RUN-pruneR, e.g. demo-prune0.3)")


def parse_options(argv=None):
    """(action, CompressOptions) from the command line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=ACTIONS, help="what to do")
    config.add_dataclass_flags(parser, CompressOptions, "options")
    args = parser.parse_args(argv)
    action = args.action
    typed = {name: value for name, value in vars(args).items() if value is not None and name != "action"}
    return action, CompressOptions(**typed)


def check_options(opts):
    """Raise UsageError for options that cannot work whatever the model."""
    inference.check_sampling(opts)
    quantization.check_options(opts.mode, opts.float_layers)
    for flag, value, least in (("--calibration-images", opts.calibration_images, 1),
                               ("--compare-images", opts.compare_images, 0), ("--batch-size", opts.batch_size, 1),
                               ("--importance-batches", opts.importance_batches, 1),
                               ("--finetune-steps", opts.finetune_steps, -1)):
        if value < least:
            raise utils.UsageError(f"{flag} must be at least {least}, got {value}")
    if not 0 <= opts.ratio < 1:
        raise utils.UsageError(f"--ratio must be in [0, 1), got {opts.ratio}")
    if opts.finetune_loss not in FINETUNE_LOSSES:
        raise utils.UsageError(f"--finetune-loss must be one of {', '.join(FINETUNE_LOSSES)}, got "
                               f"{opts.finetune_loss!r}")
    if opts.lr < 0:
        raise utils.UsageError(f"--lr must be 0 ({LR_FACTOR} times the original run's) or positive, got {opts.lr}")


def output_run(opts, loaded, suffix):
    """The compressed model's run name (default RUN-suffix), and its folder, which must not hold the checkpoints
    of a trained run other than the fine-tuning of its own pruned.pt."""
    name = opts.output or f"{loaded.run}-{suffix}"
    if name == loaded.run:
        raise utils.UsageError(f"--output {name} is the run being compressed; choose another name")
    run_dir = utils.CHECKPOINT_DIR / name
    path, state = utils.load_latest_checkpoint(run_dir) if run_dir.is_dir() else (None, None)
    if path is None:
        return name, run_dir
    pruning = suffix.startswith("prune")
    ours = state["config"].get("init_from") == str(run_dir / "pruned.pt") if pruning else "compression" in state
    if not ours:
        raise utils.UsageError(f"{run_dir} holds the checkpoints of another run, which this would replace; choose "
                               f"another --output")
    return name, run_dir


def labels_for(cfg, start, count):
    """Class labels of images start ... start + count - 1 (cycling through the classes), or None."""
    if cfg.num_classes == 0:
        return None
    return torch.arange(start, start + count) % cfg.num_classes


class Recorder(torch.nn.Module):
    """The model, noting every input it is called with: (x_t, t, y or None), on the CPU."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.inputs = []

    def forward(self, x, t, y=None):
        self.inputs.append((x.detach().cpu(), t.detach().cpu(), None if y is None else y.detach().cpu()))
        return self.model(x, t, y) if y is not None else self.model(x, t)


def calibration_inputs(model, diffusion, cfg, opts, start=0):
    """The model's inputs (x_t, t, y or None) over the sampling trajectories of opts.calibration_images images
    (indices start, start + 1, ...), sampled in float32 as opts says: one batch per network call."""
    recorder = Recorder(model)
    for first in range(start, start + opts.calibration_images, opts.batch_size):
        count = min(opts.batch_size, start + opts.calibration_images - first)
        inference.generate_batch(recorder, diffusion, cfg, opts, first, count, device=torch.device("cpu"),
                                 labels=labels_for(cfg, first, count))
    return recorder.inputs


@torch.no_grad()
def quantize_int8(model, cfg, inputs, float_layers="skips"):
    """(state dict, compression entries) of the int8 model calibrated on `inputs` (calibration_inputs). On a CPU
    without an int8 dot product (VNNI) the activations keep to 7 bits, which its int8 kernels need."""
    reduce_range = not utils.cpu_has_int8_dot()
    keep_float = quantization.float_modules(model, float_layers)
    prepared = quantization.prepare_int8(model, cfg, reduce_range, keep_float)
    for x, t, y in tqdm(inputs, desc="calibrating", unit="call", dynamic_ncols=True):
        if cfg.num_classes and y is None:  # the sampler's unconditional call: the null label, as the U-Net takes it
            y = torch.full((x.shape[0],), cfg.num_classes, dtype=torch.long)
        prepared(x, t.float(), *([] if y is None else [y]))
    state, scales, zero_points = quantization.int8_entries(prepared)
    return state, {"weight_scales": scales, "weight_zero_points": zero_points, "reduce_range": reduce_range,
                   "float_modules": keep_float}


def float32_bytes(model):
    """The size of a file holding the model's float32 weights alone (no optimizer, no second copy)."""
    buffer = io.BytesIO()
    torch.save({name: tensor.float() for name, tensor in model.state_dict().items()}, buffer)
    return buffer.tell()


def refuse_captioned(loaded):
    """Raise UsageError for a text-conditional model: its calibration and importance data would need captions."""
    if loaded.cfg.captioned:
        raise utils.UsageError(f"{loaded.source} is conditioned on captions, and compress.py does not compress "
                               f"text-conditional models yet")


def quantize(opts):
    """Write the quantized checkpoint of opts.run_name; returns its path."""
    loaded = inference.load_model(opts.run_name, opts.checkpoint, opts.pretrained, opts.ema)
    if loaded.compression:
        raise utils.UsageError(f"{loaded.source} is already compressed; quantize the float run it was made from")
    refuse_captioned(loaded)
    opts = dataclasses.replace(opts, steps=inference.sampling_steps(loaded.cfg, opts))
    name, run_dir = output_run(opts, loaded, opts.mode)
    cfg = dataclasses.replace(loaded.cfg, run_name=name)
    model = loaded.model.float().eval()
    compression = {"mode": opts.mode, "source": loaded.source}
    if opts.mode in quantization.HALF_DTYPES:
        weights = quantization.half_weights(model.state_dict(), quantization.HALF_DTYPES[opts.mode])
    else:
        diffusion = create_diffusion(loaded.cfg)
        # Images after the compared ones: the report's images are not among those the ranges were fitted to.
        inputs = calibration_inputs(model, diffusion, loaded.cfg, opts, start=opts.compare_images)
        weights, entries = quantize_int8(model, loaded.cfg, inputs, opts.float_layers)
        compression.update(entries, float_layers=opts.float_layers, calibration_images=opts.calibration_images,
                           calibration_steps=opts.steps,
                           calibration_sampler=opts.sampler, calibration_spacing=opts.timestep_spacing,
                           calibration_timesteps=sorted({int(t) for _, ts, _ in inputs for t in ts.unique()}))
    state = {"model": weights, "ema": weights, "config": config.config_to_dict(cfg), "step": loaded.step,
             "compression": compression}
    path = run_dir / "last.pt"
    utils.save_checkpoint(state, path)
    print(f"wrote {path}: {quantization.describe(compression)} of {loaded.source}")
    report(opts, loaded, path)
    return path


def importance_batches(cfg, opts):
    """opts.importance_batches batches (x0, y or None) of opts.batch_size training images, in a fixed order."""
    data = build_dataset(dataclasses.replace(cfg, random_flip=False), train=True)
    loader = torch.utils.data.DataLoader(data, batch_size=opts.batch_size, shuffle=True,
                                         generator=torch.Generator().manual_seed(opts.seed))
    batches = []
    for images, labels in loader:
        batches.append((images, labels if cfg.num_classes else None))
        if len(batches) == opts.importance_batches:
            break
    return batches


def describe_size(label, size):
    """One line: parameters and GFLOP per image, from pruning.size_of."""
    params, flops = size
    return f"  {label:10s} {params / 1e6:7.3f}M parameters, {flops / 1e9:6.3f} GFLOP per image"


def prune(opts):
    """Prune opts.run_name into RUN-pruneR/pruned.pt (or reuse the one there), then fine-tune it (a train.py run
    of that name) unless --finetune-steps 0; returns the path of the newest model."""
    loaded = inference.load_model(opts.run_name, opts.checkpoint, opts.pretrained, opts.ema)
    if loaded.compression:
        raise utils.UsageError(f"{loaded.source} is already compressed; prune the float run it was made from")
    refuse_captioned(loaded)
    if loaded.cfg.teacher:
        raise utils.UsageError(f"{loaded.source} is a distilled student, which learns from its teacher, not from "
                               f"the data; prune its teacher and distil again")
    if loaded.cfg.norm_groups == "gcd" and any(layer.num_channels % 32 for layer in loaded.model.modules()
                                               if isinstance(layer, GroupNorm)):
        raise utils.UsageError(f"{loaded.source} was pruned by an earlier version, whose GroupNorms are grouped "
                               f"otherwise; prune the run it was made from")
    if opts.finetune_steps == -1 and not loaded.step:
        raise utils.UsageError(f"{loaded.source} does not say how many steps it was trained, so 10% of them is "
                               f"unknown; give --finetune-steps N")
    opts = dataclasses.replace(opts, steps=inference.sampling_steps(loaded.cfg, opts))
    name, run_dir = output_run(opts, loaded, f"prune{opts.ratio:g}")
    path = run_dir / "pruned.pt"
    settings = {"source": loaded.source, "ratio": opts.ratio, "importance_batches": opts.importance_batches,
                "batch_size": opts.batch_size, "seed": opts.seed}
    if path.exists():
        state = utils.load_checkpoint(path)
        if "pruning" not in state:
            raise utils.UsageError(f"{path} was not written by compress.py prune; move it away, or choose another "
                                   f"--output")
        if {key: state["pruning"].get(key) for key in settings} != settings:
            raise utils.UsageError(f"{path} was pruned with other settings ({state['pruning']}); choose another "
                                   f"--output, or move {run_dir} away")
        print(f"{path}: pruned before with these settings, reused")
    else:
        model = copy.deepcopy(loaded.model).float()
        before = pruning.size_of(model, loaded.cfg)
        pruning.prune_unet(model, create_diffusion(loaded.cfg), importance_batches(loaded.cfg, opts), opts.ratio,
                           loaded.cfg, opts.seed)
        after = pruning.size_of(model, loaded.cfg)
        weights = model.state_dict()
        cfg = dataclasses.replace(loaded.cfg, run_name=name, norm_groups="divisor")  # as the pruner grouped them
        state = {"model": weights, "ema": weights, "config": config.config_to_dict(cfg), "step": loaded.step,
                 "pruning": {**settings, "parameters": [before[0], after[0]], "flops": [before[1], after[1]]}}
        utils.save_checkpoint(state, path)
        print(f"wrote {path}: {opts.ratio:g} of the channels of {loaded.source} pruned")
        print(describe_size("original", before))
        print(describe_size("pruned", after) + f" ({after[1] / before[1]:.2f}x the FLOPs)")
        report(opts, loaded, path)
    steps = opts.finetune_steps if opts.finetune_steps >= 0 else max(1, round(0.1 * loaded.step))
    if steps == 0:
        print(f"no fine-tuning; sample the pruned model with python sample.py --checkpoint {path}")
        return path
    if utils.finished_step(name) < steps:
        lr = opts.lr or LR_FACTOR * loaded.cfg.lr
        distill = ["--distill-from", ""]
        _, started = utils.load_latest_checkpoint(run_dir)
        if started is not None:  # a stopped fine-tuning goes on as it started
            loss = "distill" if started["config"].get("distill_from") else "data"
            if loss != opts.finetune_loss:
                raise utils.UsageError(f"{run_dir} holds a fine-tuning started with --finetune-loss {loss}, which "
                                       f"it keeps; run with --finetune-loss {loss} to finish it, or choose another "
                                       f"--output")
            lr = started["config"]["lr"]
        if opts.finetune_loss == "distill":  # the original, beside the pruned model: the teacher of the fine-tuning
            original = run_dir / "original.pt"
            if not original.exists():
                weights = loaded.model.float().state_dict()
                utils.save_checkpoint({"model": weights, "ema": weights, "config": config.config_to_dict(loaded.cfg),
                                       "step": loaded.step}, original)
            distill = ["--distill-from", str(original)]
        print(f"fine-tuning {path} for {steps} steps at lr {lr:g} as run {name}, learning "
              f"{'the outputs of ' + distill[1] if distill[1] else 'from the data'}")
        train.main(["--init-from", str(path), "--run-name", name, "--max-steps", str(steps),
                    "--warmup-steps", str(max(1, steps // 10)), "--lr", str(lr), *distill])
        if utils.finished_step(name) < steps:  # stopped by a signal: train.py saved and said so
            raise utils.UsageError(f"the fine-tuning of {name} stopped before its {steps} steps; run the same "
                                   f"command again to resume it")
    last = run_dir / "last.pt"
    report(opts, loaded, last)
    return last


def report(opts, loaded, path):
    """Sizes, and the original against the compressed model on opts.compare_images images from the same noise."""
    print(f"file: {path.stat().st_size / 2 ** 20:.2f} MiB; the float32 weights alone: "
          f"{float32_bytes(loaded.model) / 2 ** 20:.2f} MiB")
    if not opts.compare_images:
        return
    device, amp_dtype = utils.resolve_device_and_amp("cpu", opts.amp)
    compressed = inference.load_model(checkpoint=str(path)).model
    diffusion = create_diffusion(loaded.cfg)
    labels = labels_for(loaded.cfg, 0, opts.compare_images)
    int8 = isinstance(compressed, quantization.Int8UNet)  # int8 runs in its own precision, whatever --amp says
    rows = []
    # The original in float32: the images the compressed model is measured against (--amp applies to the other).
    for label, model, amp in (("original", loaded.model, None),
                              ("compressed", compressed, None if int8 else amp_dtype)):
        model = inference.prepare_for_sampling(model, device, amp, opts.compile and label == "original")
        # An untimed network call first: it compiles a compiled model (the int8 one always is).
        count = min(opts.batch_size, opts.compare_images)
        inference.generate_batch(model, diffusion, loaded.cfg, dataclasses.replace(opts, steps=1), 0, count,
                                 device=device, amp_dtype=amp, labels=None if labels is None else labels[:count])
        start = time.perf_counter()
        images = inference.generate(model, diffusion, loaded.cfg, opts, opts.compare_images, device=device,
                                    batch_size=opts.batch_size, amp_dtype=amp, labels=labels)
        speed = opts.compare_images / (time.perf_counter() - start)
        rows.append((label, images, speed, str(amp).removeprefix("torch.") if amp else "none"))
    difference = (rows[0][1] - rows[1][1]).abs().mean().item() * 127.5  # [-1, 1] -> 0 ... 255 levels
    for label, _, speed, amp in rows:
        print(f"  {label:10s} {speed:7.1f} img/s ({opts.sampler}, {opts.steps} steps, amp {amp})")
    print(f"mean |difference| of {opts.compare_images} images from the same noise: {difference:.2f} of 255 levels")


def run(action, opts):
    """Do what the action asks; returns the path written."""
    check_options(opts)
    if action == "quantize":
        return quantize(opts)
    if action == "prune":
        return prune(opts)
    raise utils.UsageError(f"unknown action {action!r}; choose one of {', '.join(ACTIONS)}")


def main(argv=None):
    """The command line: one sentence on a bad input."""
    action, opts = parse_options(argv)
    try:
        run(action, opts)
    except config.UserError as error:
        config.fail(error)


if __name__ == "__main__":
    main()
