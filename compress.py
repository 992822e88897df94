"""Smaller, faster models from a trained run: quantized weights, or an int8 U-Net for the CPU.

    python compress.py quantize --run-name demo                    # int8: checkpoints/demo-int8/last.pt
    python compress.py quantize --run-name demo --mode bf16        # bf16 weights: checkpoints/demo-bf16/last.pt
    python compress.py quantize --run-name demo --steps 50 --calibration-images 128
    python sample.py --run-name demo-int8                          # sampled, evaluated and loaded like any run
    python evaluate.py --run-name demo-int8 --steps 50 --num-samples 1000

quantize --mode int8 calibrates the activation ranges on the model's own inputs along the sampler's trajectory:
--calibration-images images sampled with --sampler / --steps / --timestep-spacing (and --guidance-scale for a
class-conditional model), so every timestep that sampler visits is in the calibration data. The sampling flags
are the same as sample.py's; sample the int8 model with the same ones. quantization.py has the method. bf16 and
fp16 store the weights in half precision: half the file, nothing to calibrate.

Every compressed checkpoint is a run of its own (--output, default RUN-MODE), written atomically; its file holds
tensors and plain values only. At the end the script samples --compare-images images with the original model and
with the new one from the same noise, and prints the file sizes, the mean difference of the images and their
speed side by side. An int8 model runs on the CPU only.
"""

import argparse
import dataclasses
import io
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

import config
import inference
import quantization
import utils
from config import flag_field
from diffusion import create_diffusion

ACTIONS = ("quantize",)


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
    batch_size: int = flag_field(64, "images per sampling batch of the calibration and the comparison (default 64)")
    output: str = flag_field("", "run name of the compressed model (default RUN-MODE, e.g. demo-int8)")


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
                               ("--compare-images", opts.compare_images, 0), ("--batch-size", opts.batch_size, 1)):
        if value < least:
            raise utils.UsageError(f"{flag} must be at least {least}, got {value}")


def output_run(opts, loaded):
    """The compressed model's run name, and its folder, which must not hold a trained run's checkpoints."""
    name = opts.output or f"{loaded.run}-{opts.mode}"
    if name == loaded.run:
        raise utils.UsageError(f"--output {name} is the run being compressed; choose another name")
    run_dir = utils.CHECKPOINT_DIR / name
    path, state = utils.load_latest_checkpoint(run_dir) if run_dir.is_dir() else (None, None)
    if path is not None and "compression" not in state:
        raise utils.UsageError(f"{run_dir} holds the checkpoints of a trained run, which this would replace; choose "
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


def quantize(opts):
    """Write the quantized checkpoint of opts.run_name; returns its path."""
    loaded = inference.load_model(opts.run_name, opts.checkpoint, opts.pretrained, opts.ema)
    if loaded.compression:
        raise utils.UsageError(f"{loaded.source} is already compressed; quantize the float run it was made from")
    opts = dataclasses.replace(opts, steps=inference.sampling_steps(loaded.cfg, opts))
    name, run_dir = output_run(opts, loaded)
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
    for label, model, amp in (("original", loaded.model, amp_dtype),
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
