"""How fast does the U-Net train and sample? One table: throughput, FLOPs, memory, and the share of the chip's peak.

    python benchmark.py                                   # ddpm-cifar10 at batch 8, as train.py would run it here
    python benchmark.py --amp bf16 --channels-last        # the speed levers of train.py: --amp, --channels-last
    python benchmark.py --amp bf16 --compile              #   and --compile (sample.py's --compile too)
    python benchmark.py --amp bf16 --compare diffusers    # side by side with diffusers' UNet2DModel
    python benchmark.py --device cuda --batch-size 128 --amp bf16 --channels-last --compile
    python benchmark.py --amp bf16 --profile 15           # and the 15 operators that take the most time
    python benchmark.py --runs demo,demo-int8 --batch-size 64   # sampling of checkpoints (compress.py's too)

What is timed, on random images (no data loading):
  train   one optimizer step as train.py takes it: autocast forward of diffusion.training_loss, backward, gradient
          clipping, Adam step, EMA update, and the one read of the loss and gradient norm that train.py does per step.
  sample  one DDIM call of --sample-steps steps as sample.py runs it: the model made ready by
          inference.prepare_for_sampling (channels-last, weights in the AMP dtype, compiled with --compile), eval
          mode, no_grad, autocast around the whole loop. Every denoising step counts batch-size images, so its
          img/s is batch x steps / seconds.
Each img/s is the median over --iters timed calls; 'best' is the fastest call. With --runs, each run's checkpoint
is loaded as sample.py loads it (an int8 one runs in int8 whatever --amp says) and only sampled, in turns.

--compare diffusers builds diffusers' UNet2DModel with the same architecture (the google/ddpm-cifar10-32 config)
and runs it the way diffusers' examples/unconditional_image_generation/train_unconditional.py does: under accelerate
(whose mixed precision is autocast around the forward), AdamW, DDPMScheduler.add_noise, MSE on eps, gradient
clipping at 1.0 and EMAModel; it samples as DDIMPipeline does. --channels-last and --compile apply to our model only:
that example has neither. The two models take turns call by call, so that other jobs on a shared machine slow both
alike, and the last column is ours / theirs.

FLOPs are FlopCounterMode's count of one forward pass (2 per multiply-add: convolutions, linear layers and the
attention matmuls); a training step counts as 3 forward passes (the backward pass costs about two). '% of matmul
peak' divides the FLOP rate by that of a large matmul in the same dtype, measured in the same run.
"""

import copy
import ctypes
import dataclasses
import itertools
import os
import platform
import re
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

import config
import inference
import quantization
import training
import utils
from config import flag_field
from diffusion import create_diffusion
from model import create_model
from pretrained import DIFFUSERS_DDPM_CIFAR10_CONFIG
from utils import UsageError

COMPARES = ("none", "diffusers")
MATMUL_SIZE = {"cpu": 2048, "cuda": 8192}  # n of the (n x n) @ (n x n) matmul that measures the peak


@dataclass
class BenchmarkOptions(inference.DeviceOptions):
    """What to measure and how: --amp, --device and --compile as sample.py has them (compile applies to our model's
    training step and sampling call alike; the first calls then include compiling), then these. Every field is a
    --flag of the same name (see --help)."""

    preset: str = flag_field("ddpm-cifar10", f"model preset: {', '.join(config.PRESETS)} (default ddpm-cifar10, the "
                                             f"DDPM paper's model: it has reference numbers and a diffusers twin)")
    batch_size: int = flag_field(8, "images per training step and per sampling call (default 8)")
    channels_last: bool = flag_field(False, "train our model in channels-last memory format, as train.py "
                                            "--channels-last (sampling always uses it, as sample.py does)")
    compare: str = flag_field("none", "none (default), or diffusers: also run diffusers' UNet2DModel as its training "
                                      "example does, in turns with ours")
    warmup: int = flag_field(2, "untimed training steps and sampling calls before the timed ones (default 2)")
    iters: int = flag_field(10, "timed training steps and sampling calls (default 10)")
    sample_steps: int = flag_field(5, "DDIM steps per sampling call (default 5)")
    threads: int = flag_field(0, "CPU threads for torch; 0 (default) = torch's own choice (one per core)")
    profile: int = flag_field(0, "after the table, where the time goes: the N operators that take the most time in "
                                 "our training step and sampling call, by torch.profiler (default 0: none)")
    seed: int = flag_field(0, "random seed of the weights and inputs (default 0)")
    runs: str = flag_field("", "instead of a preset's fresh model, time the sampling of these runs' checkpoints "
                               "(trained or compress.py's), in turns: RUN,RUN,...; no training step")


def parse_options(argv=None):
    """BenchmarkOptions from the command line; fields the user did not type keep the dataclass defaults."""
    return config.parse_dataclass_args(BenchmarkOptions, argv, __doc__, "benchmark options")


def check_options(opts):
    """Raise UsageError for options that cannot work."""
    if opts.preset not in config.PRESETS:
        raise UsageError(f"unknown --preset {opts.preset!r}; choose one of {', '.join(config.PRESETS)}")
    if opts.compare not in COMPARES:
        raise UsageError(f"unknown --compare {opts.compare!r}; choose one of {', '.join(COMPARES)}")
    if opts.runs and opts.compare != "none":
        raise UsageError("--compare diffusers builds the preset's model; with --runs, list the runs to compare")
    for flag, value, least in (("--batch-size", opts.batch_size, 1), ("--iters", opts.iters, 1),
                               ("--sample-steps", opts.sample_steps, 1), ("--warmup", opts.warmup, 0),
                               ("--threads", opts.threads, 0), ("--profile", opts.profile, 0)):
        if value < least:
            raise UsageError(f"{flag} must be at least {least}, got {value}")


# --- measuring ------------------------------------------------------------------------------------------

def synchronize(device):
    """Wait for the GPU: it runs kernels asynchronously, so a clock read alone would time only their launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(function, device):
    """Seconds that function() takes, its GPU work included."""
    synchronize(device)
    start = time.perf_counter()
    function()
    synchronize(device)
    return time.perf_counter() - start


def matmul_peak(device, dtype, repeats=5):
    """The best FLOP/s of an n x n by n x n matmul in `dtype` (on CUDA, fp32 means TF32, as train.py sets it)."""
    n = MATMUL_SIZE[device.type]
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    torch.mm(a, b)  # the first call picks and loads its kernel
    seconds = min(timed(lambda: torch.mm(a, b), device) for _ in range(repeats))
    return 2 * n ** 3 / seconds


def _process_memory_mib(field):
    """VmRSS (resident now) or VmHWM (the peak since the last reset) of this process in MiB; None off Linux."""
    try:
        with open("/proc/self/status") as status:
            return int(re.search(rf"{field}:\s+(\d+) kB", status.read()).group(1)) / 1024
    except (OSError, AttributeError):
        return None


def _reset_process_peak():
    """Hand free heap memory back to the OS, so the resident size is what is in use, and restart VmHWM from there.
    False where Linux's /proc or glibc is missing."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")  # "5" resets the peak resident size (Linux 4.0 and later)
        return True
    except OSError:
        return False


def peak_memory_mib(function, device):
    """The most memory in use while function() runs, above what was in use when it started, in MiB; None where the
    system cannot tell. CUDA: allocated tensors (max_memory_allocated). CPU: the process's resident size, which also
    counts oneDNN's scratch. What was held before the call (weights, Adam state, EMA) is left out, so two models
    in one process are measured alike."""
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        function()
        synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - start) / 2 ** 20
    start = _process_memory_mib("VmRSS") if _reset_process_peak() else None
    function()
    peak = _process_memory_mib("VmHWM")
    return None if start is None or peak is None else peak - start


# --- the contenders -------------------------------------------------------------------------------------

@dataclass
class Contender:
    """A model, and one training step and one sampling call of it to time (functions of no arguments)."""

    name: str
    forward: Callable  # forward(x_t, t) -> the model's output tensor, for counting FLOPs
    parameters: int
    train_step: Callable | None  # None: a checkpoint that is only sampled (--runs)
    sample_call: Callable
    cfg: config.Config | None = None  # the model's config when it is not the preset's (--runs)
    int8: bool = False  # an int8 model: no float matmul peak to compare with


def random_batch(cfg, batch_size, device, channels_last, seed):
    """Training images in [-1, 1] and starting noise x_T, both (B, C, H, W), in the chosen memory format."""
    generator = torch.Generator().manual_seed(seed)
    shape = (batch_size, cfg.channels, cfg.image_size, cfg.image_size)
    images = (torch.rand(shape, generator=generator) * 2 - 1).to(device)
    x_T = torch.randn(shape, generator=generator).to(device)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
        x_T = x_T.contiguous(memory_format=torch.channels_last)
    return images, x_T


def build_ours(cfg, device, amp_dtype, batch_size, sample_steps, channels_last=False, compile=False, seed=0):
    """Our U-Net, trained by train.py's own step (training.train_step) and sampled as sample.py samples it."""
    torch.manual_seed(seed)
    cfg = dataclasses.replace(cfg, grad_accum=1)  # one batch per step, as --batch-size says
    state = training.TrainingState(cfg, device, amp_dtype, total_steps=cfg.max_steps or 1)
    sample_forward = inference.prepare_for_sampling(copy.deepcopy(state.model).eval(), device, amp_dtype, compile)
    state.prepare(device, channels_last, compile=compile)
    diffusion = create_diffusion(cfg)
    images, _ = random_batch(cfg, batch_size, device, channels_last, seed)
    _, x_T = random_batch(cfg, batch_size, device, False, seed)  # inference.generate's noise is NCHW
    batches = itertools.repeat((images, None))  # the same batch every step: no data loading is timed

    def train_step():
        training.train_step(state, diffusion, batches, device, amp_dtype)

    def sample_call():
        with utils.autocast(device, amp_dtype):
            diffusion.sample(sample_forward, x_T.shape, sampler="ddim", steps=sample_steps, x_T=x_T)

    return Contender("ours", state.model, sum(p.numel() for p in state.model.parameters()), train_step, sample_call)


def build_run(run, device, amp_dtype, batch_size, sample_steps, compile=False, seed=0):
    """A run's checkpoint (inference.load_model: a trained run or a compressed one), sampled as sample.py samples
    it; it is not trained. Its parameters and FLOPs are those of its float U-Net (a pruned one has its own), for an
    int8 model those of the float U-Net it was made from (an int8 layer does the same multiply-adds)."""
    loaded = inference.load_model(run)
    print(f"{run}: {loaded.source}")
    int8 = isinstance(loaded.model, quantization.Int8UNet)
    # In float32, for counting: sampling stores the weights in the autocast dtype.
    if int8:  # the shapes alone, on the meta device: no weights are copied
        shapes = {name: torch.empty(shape, device="meta") for name, shape in loaded.model.weight_shapes.items()}
        float_model = create_model(loaded.cfg, shapes)
    else:
        float_model = copy.deepcopy(loaded.model)
    float_model = float_model.to(device).eval()
    sample_forward = inference.prepare_for_sampling(loaded.model, device, None if int8 else amp_dtype, compile)
    diffusion = create_diffusion(loaded.cfg)
    _, x_T = random_batch(loaded.cfg, batch_size, device, False, seed)

    def sample_call():
        with utils.autocast(device, None if int8 else amp_dtype):
            diffusion.sample(sample_forward, x_T.shape, sampler="ddim", steps=sample_steps, x_T=x_T)

    parameters = sum(p.numel() for p in float_model.parameters())
    return Contender(run, float_model, parameters, None, sample_call, loaded.cfg, int8)


def build_diffusers(cfg, device, amp_dtype, batch_size, sample_steps, channels_last=False, compile=False, seed=0):
    """diffusers' UNet2DModel at the ddpm-cifar10 architecture, trained as diffusers' unconditional training example
    trains it (with that example's default hyperparameters) and sampled as DDIMPipeline samples.

    accelerate, which the example runs under, is emulated: its mixed precision wraps the model's forward in autocast
    and casts the outputs to fp32, and adds a GradScaler for fp16. The example casts the batch and the noise to the
    mixed-precision dtype, reads the loss every step to log it, and keeps the EMA with EMAModel's defaults.
    channels_last and compile are there for experiments; the command line leaves them off.
    """
    try:
        from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel
        from diffusers.training_utils import EMAModel
    except ImportError:
        raise UsageError("--compare diffusers needs the diffusers package, a development requirement: "
                         "pip install -r requirements-dev.txt") from None
    reference = config.get_config("ddpm-cifar10")
    different = [name for name in config.ARCHITECTURE_FIELDS if getattr(cfg, name) != getattr(reference, name)]
    if different:
        raise UsageError(f"--compare diffusers needs the ddpm-cifar10 model (google/ddpm-cifar10-32's architecture, "
                         f"eps objective), but preset {cfg.preset} differs from it in {', '.join(different)}")

    torch.manual_seed(seed)
    unet_config = {key: value for key, value in DIFFUSERS_DDPM_CIFAR10_CONFIG.items() if not key.startswith("_")}
    unet = UNet2DModel(**{**unet_config, "dropout": cfg.dropout}).to(device)
    ema = EMAModel(unet.parameters(), decay=0.9999, use_ema_warmup=True, inv_gamma=1.0, power=3 / 4,
                   model_cls=UNet2DModel, model_config=unet.config)
    ema.to(device)
    sample_unet = copy.deepcopy(unet).eval()  # the example copies the EMA weights into its model to sample
    if channels_last:
        unet = unet.to(memory_format=torch.channels_last)
        sample_unet = sample_unet.to(memory_format=torch.channels_last)
    noise_scheduler = DDPMScheduler(num_train_timesteps=cfg.timesteps)
    ddim = DDIMScheduler(num_train_timesteps=cfg.timesteps)
    ddim.set_timesteps(sample_steps)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4, betas=(0.95, 0.999), weight_decay=1e-6, eps=1e-8)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    train_forward = torch.compile(unet) if compile else unet
    sample_forward = torch.compile(sample_unet) if compile else sample_unet
    weight_dtype = amp_dtype or torch.float32
    images, x_T = random_batch(cfg, batch_size, device, channels_last, seed)

    def train_step():
        clean_images = images.to(weight_dtype)
        noise = torch.randn(clean_images.shape, dtype=weight_dtype, device=device)
        timesteps = torch.randint(0, cfg.timesteps, (batch_size,), device=device).long()
        noisy_images = noise_scheduler.add_noise(clean_images, noise, timesteps)
        with utils.autocast(device, amp_dtype):  # accelerate's mixed precision ...
            model_output = train_forward(noisy_images, timesteps).sample
        model_output = model_output.float()  # ... and its convert_outputs_to_fp32
        loss = F.mse_loss(model_output.float(), noise.float())
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()
        ema.step(unet.parameters())
        loss.detach().item()  # logged every step

    @torch.no_grad()
    def sample_call():
        image = x_T
        for t in ddim.timesteps:
            with utils.autocast(device, amp_dtype):  # accelerate wraps each forward call, so casts are not reused
                model_output = sample_forward(image, t).sample.float()
            image = ddim.step(model_output, t, image, eta=0.0).prev_sample

    return Contender("diffusers", lambda x, t: unet(x, t).sample, sum(p.numel() for p in unet.parameters()),
                     train_step, sample_call)


# --- the run --------------------------------------------------------------------------------------------

def measure(contenders, device, opts):
    """Warm every contender up, then time them in turns. Returns {contender name: {row name: value}}."""
    results = {contender.name: {} for contender in contenders}
    for phase in ("train", "sample"):
        calls = {contender.name: contender.train_step if phase == "train" else contender.sample_call
                 for contender in contenders}
        for name in [name for name, call in calls.items() if call is None]:
            del calls[name]
            results[name].update({f"{phase} {row}": None for row in ("img/s", "img/s best", "peak memory MiB",
                                                                       "first call s")})
        for name, call in calls.items():
            # The first call builds kernels (with --compile it compiles): a cost paid once per run.
            results[name][f"{phase} first call s"] = timed(call, device)
            for _ in range(opts.warmup - 1):
                call()
            results[name][f"{phase} peak memory MiB"] = peak_memory_mib(call, device)
        seconds = {name: [] for name in calls}
        for _ in range(opts.iters):
            for name, call in calls.items():
                seconds[name].append(timed(call, device))
        images_per_call = opts.batch_size * (1 if phase == "train" else opts.sample_steps)
        for name, values in seconds.items():
            results[name][f"{phase} img/s"] = images_per_call / statistics.median(values)
            results[name][f"{phase} img/s best"] = images_per_call / min(values)
    return results


ROWS = [  # (row name, format)
    ("parameters", "{:,}"), ("GFLOP / image (forward)", "{:.2f}"),
    ("train img/s", "{:.2f}"), ("train img/s best", "{:.2f}"), ("train % of matmul peak", "{:.1f}"),
    ("train peak memory MiB", "{:.0f}"), ("train first call s", "{:.1f}"),
    ("sample img/s", "{:.2f}"), ("sample img/s best", "{:.2f}"), ("sample % of matmul peak", "{:.1f}"),
    ("sample peak memory MiB", "{:.0f}"), ("sample first call s", "{:.1f}"),
]


def print_profile(contender, device, opts):
    """The opts.profile operators with the most self time (time in the operator itself, not in those it calls) over
    --iters training steps and sampling calls of `contender`, per step or call, as torch.profiler measures them."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    sort_by = "self_cpu_time_total"
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
        sort_by = "self_device_time_total"  # the GPU time of the kernels each operator launched
    for phase, call in (("training step", contender.train_step), ("sampling call", contender.sample_call)):
        if call is None:
            continue
        with torch.profiler.profile(activities=activities) as profiler:
            for _ in range(opts.iters):
                call()
            synchronize(device)
        # Operators only: the kernels' own rows would count their GPU time a second time.
        operators = [event for event in profiler.key_averages()
                     if event.device_type == torch.autograd.DeviceType.CPU]
        operators.sort(key=lambda event: getattr(event, sort_by), reverse=True)
        total = sum(getattr(event, sort_by) for event in operators) / opts.iters / 1000
        print(f"\nwhere the time of one {phase} goes ({total:.0f} ms of {sort_by.removesuffix('_total')} in "
              f"operators, per {phase.split()[1]}; the profiler itself adds some):")
        print(f"{'ms':>8} {'calls':>6}  operator")
        for event in operators[:opts.profile]:
            print(f"{getattr(event, sort_by) / opts.iters / 1000:8.1f} {event.count / opts.iters:6g}  "
                  f"{event.key[:90]}")


def print_table(results):
    """One column per contender and, for two, their ratio."""
    names = list(results)
    width = max(12, *(len(name) + 2 for name in names))
    header = f"{'':26}" + "".join(f"{name:>{width}}" for name in names)
    first = "ours" if names[0] == "ours" else names[0]
    print(header + (f"{first + '/' + names[1]:>17}" if len(names) == 2 else ""))
    for row, fmt in ROWS:
        values = [results[name][row] for name in names]
        line = f"{row:26}" + "".join(f"{'n/a' if value is None else fmt.format(value):>{width}}" for value in values)
        if len(values) == 2 and None not in values:
            line += f"{values[0] / values[1]:>17.2f}"
        print(line)


def device_name(device):
    """The GPU's or the CPU's model name."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return re.search(r"model name\s*:\s*(.+)", cpuinfo.read()).group(1).strip()
    except (OSError, AttributeError):
        return platform.processor() or "CPU"


def run(opts):
    """Build the contenders, measure them, and print what ran and the table."""
    check_options(opts)
    device, amp_dtype = utils.resolve_device_and_amp(opts.device, opts.amp)
    cfg = config.get_config(opts.preset)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    if device.type == "cuda":  # as train.py sets them
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    dtype = amp_dtype or torch.float32
    precision = str(dtype).removeprefix("torch.")
    if device.type == "cuda" and amp_dtype is None:
        precision += " (TF32 matmuls)"
    where = device_name(device)
    if device.type == "cpu":
        where += f", {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f} at the start"
    layout = "on" if opts.channels_last else "off"
    print(f"{opts.runs or opts.preset}, batch {opts.batch_size}, {precision}, channels_last {layout}"
          f", compile {'on' if opts.compile else 'off'}; {where}; torch {torch.__version__}")

    common = dict(device=device, amp_dtype=amp_dtype, batch_size=opts.batch_size, sample_steps=opts.sample_steps,
                  seed=opts.seed)
    if opts.runs:
        contenders = [build_run(run, **common, compile=opts.compile) for run in opts.runs.split(",")]
    else:
        contenders = [build_ours(cfg, **common, channels_last=opts.channels_last, compile=opts.compile)]
    if opts.compare == "diffusers":
        contenders.append(build_diffusers(cfg, **common))
    peak = matmul_peak(device, dtype)
    results = measure(contenders, device, opts)
    peak = max(peak, matmul_peak(device, dtype))  # the better of two moments of a machine that may be shared

    for contender in contenders:
        model_cfg = contender.cfg or cfg
        x = torch.randn(1, model_cfg.channels, model_cfg.image_size, model_cfg.image_size, device=device)
        t = torch.zeros(1, dtype=torch.long, device=device)  # every timestep costs the same
        row = results[contender.name]
        row["parameters"] = contender.parameters
        row["GFLOP / image (forward)"] = utils.count_flops(contender.forward, x, t) / 1e9
        for phase, forward_passes in (("train", 3), ("sample", 1)):
            row[f"{phase} % of matmul peak"] = None
            if row[f"{phase} img/s"] is not None and not contender.int8:
                flops_per_second = row[f"{phase} img/s"] * forward_passes * row["GFLOP / image (forward)"] * 1e9
                row[f"{phase} % of matmul peak"] = 100 * flops_per_second / peak

    print(f"matmul peak ({MATMUL_SIZE[device.type]}^3, {precision}): {peak / 1e12:.3f} TFLOP/s; img/s: median of "
          f"{opts.iters} calls, 'best' the fastest; a sampling call is {opts.sample_steps} DDIM steps")
    print_table(results)
    memory = "the process's resident size" if device.type == "cpu" else "max_memory_allocated"
    print(f"peak memory: {memory} at its peak during a call, above what it was before the call (weights, Adam "
          f"state and EMA are not in it)")
    if device.type == "cpu":
        load = os.getloadavg()[0]
        print(f"load average at the end: {load:.1f}"
              + (f"; above the {torch.get_num_threads()} threads used, so other jobs shared the cores: expect low, "
                 f"noisy numbers (a quiet moment or fewer --threads gives steadier ones)"
                 if load > torch.get_num_threads() + 0.5 else ""))
    if opts.profile:
        print_profile(contenders[0], device, opts)


def main(argv=None):
    """The command line: parse the flags, measure, print the table; one sentence on a bad input."""
    opts = parse_options(argv)
    try:
        run(opts)
    except config.UserError as error:
        config.fail(error)


if __name__ == "__main__":
    main()
