"""What the scripts share: devices and mixed precision, torchrun processes and stop signals, checkpoint files, EMA,
RNG state, metrics, pictures.

Imports config and no other project module (inference.py holds the shared model loading and sampling of sample.py and evaluate.py).
"""

import contextlib
import csv
import math
import os
import random
import re
import signal
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import config


from config import CHECKPOINT_DIR, RESULTS_DIR, UserError, fail  # noqa: F401 (the scripts use them from here too)


class CheckpointError(UserError):
    """A checkpoint that cannot be read or written."""


class UsageError(UserError):
    """Options that cannot work together or with this model."""


# --- device and mixed precision ---------------------------------------------------------------------

def resolve_device(name):
    """torch.device for `auto` (CUDA when available), `cpu` or `cuda`; asking for a missing GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda was given but PyTorch sees no CUDA GPU; use --device cpu")
    return torch.device(name)


def cpu_flags():
    """The CPU's feature flags from /proc/cpuinfo (avx2, amx_bf16, ...); empty where they cannot be read."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return set(f.read().split())
    except OSError:
        return set()


def cpu_has_fast_bf16():
    """Whether this CPU does bf16 matrix work in hardware (Intel AMX or AVX-512 BF16, read from /proc/cpuinfo);
    elsewhere oneDNN emulates bf16, many times slower than float32. False where the flags cannot be read."""
    return bool(cpu_flags() & {"amx_bf16", "avx512_bf16"})


def cpu_has_int8_dot():
    """Whether this CPU has an int8 dot-product instruction (VNNI, or AMX): without one, oneDNN multiplies uint8
    activations by int8 weights in pairs summed to int16, which saturates unless activations keep to 7 bits."""
    return bool(cpu_flags() & {"avx512_vnni", "avx_vnni", "amx_int8"})


def resolve_amp(amp, device):
    """The autocast dtype for an `amp` setting on `device`, or None for full fp32.

    `auto` means bf16 on CUDA GPUs that support it (Ampere and newer), fp16 on older GPUs, bf16 on CPUs that do
    bf16 in hardware (AMX or AVX-512 BF16, where it is several times faster), and fp32 on other CPUs.
    """
    if amp == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if device.type == "cpu" and cpu_has_fast_bf16() else None
    if amp == "none":
        return None
    if amp == "fp16" and device.type != "cuda":
        raise UsageError("--amp fp16 needs a CUDA GPU; on a CPU use --amp bf16 (fast on CPUs with AMX) or none")
    if amp == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UsageError("this GPU does not support bf16; use --amp fp16")
    if amp == "bf16" and device.type == "cpu" and not cpu_has_fast_bf16():
        print("warning: this CPU has neither AMX nor AVX-512 BF16, so bf16 runs emulated, many times slower than "
              "float32; pass --amp none", file=sys.stderr)
    return {"fp16": torch.float16, "bf16": torch.bfloat16}[amp]


def resolve_device_and_amp(device_name, amp):
    """(torch.device, autocast dtype or None) for --device and --amp; UsageError for a choice that cannot work."""
    if amp not in config.AMP_MODES:
        raise UsageError(f"unknown --amp {amp!r}; choose one of {', '.join(config.AMP_MODES)}")
    try:
        device = resolve_device(device_name)
        return device, resolve_amp(amp, device)
    except RuntimeError:  # torch.device("tpu") and the like
        raise UsageError(f"unknown --device {device_name!r}; use auto, cpu or cuda") from None


def autocast(device, dtype):
    """An autocast context for `dtype` on `device`, or a no-op context when dtype is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


# --- processes: torchrun and stop signals -------------------------------------------------------

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
        return any_process(self.signal_name is not None, distributed, device)


def any_process(flag, distributed, device):
    """Whether `flag` is true on any process: the processes must take the same branch after it (or the next
    collective hangs), and their clocks and signals differ."""
    if not distributed:
        return flag
    tensor = torch.tensor([int(flag)], device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item())


def setup_distributed(timeout=None):
    """(rank, local_rank, world_size) under torchrun, after joining the process group; (0, 0, 1) otherwise.

    On a machine with a GPU for every local process the group has both backends, NCCL for CUDA tensors and gloo
    for CPU ones, so that --device cpu works there too; with fewer GPUs than processes, all keep to gloo (every
    process decides alike). timeout (a timedelta): how long a collective may wait for the slowest process (None:
    torch's default)."""
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) == 1:
        return 0, 0, 1
    rank = int(os.environ["RANK"])
    local_rank, local_processes = local_processes_of_torchrun()
    use_nccl = torch.cuda.is_available() and local_processes <= torch.cuda.device_count()
    if use_nccl:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("cpu:gloo,cuda:nccl" if use_nccl else "gloo", timeout=timeout)
    return rank, local_rank, dist.get_world_size()


def local_processes_of_torchrun():
    """(LOCAL_RANK, the number of torchrun's processes on this machine) of this process."""
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    return local_rank, int(os.environ.get("LOCAL_WORLD_SIZE", local_rank + 1))


def process_device(device):
    """The device of this process: under torchrun on GPUs, the GPU of its LOCAL_RANK, one process per GPU (NCCL
    refuses two processes on one GPU). More processes on a machine than it has GPUs is a UsageError."""
    if device.type != "cuda" or not dist.is_initialized():
        return device
    local_rank, local_processes = local_processes_of_torchrun()
    gpus = torch.cuda.device_count()
    if local_processes > gpus:
        raise UsageError(f"torchrun started {local_processes} processes on this machine, which has {gpus} GPU(s); "
                         f"start one per GPU (--nproc_per_node={gpus}), or use --device cpu")
    return torch.device("cuda", local_rank)


def leave_distributed(wait):
    """Leave the process group, if this process joined one. wait: first wait until every process has got here,
    which a process that finished normally must do: one that tears down its connections while another still
    writes a checkpoint or an output can abort ("terminate called without an active exception" from gloo). After
    an unexpected error the others may never arrive, so that path leaves at once."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    if wait:
        dist.barrier()
    dist.destroy_process_group()


# --- exponential moving average of the weights --------------------------------------------------------

@torch.no_grad()
def update_ema(ema_model, model, decay):
    """ema <- decay * ema + (1 - decay) * theta for every parameter; buffers are copied."""
    ema_params = list(ema_model.parameters())
    params = [p.detach() for p in model.parameters()]
    # lerp(ema, theta, 1 - decay) = ema + (1 - decay)(theta - ema) = decay * ema + (1 - decay) * theta
    torch._foreach_lerp_(ema_params, params, 1.0 - decay)
    for ema_buffer, buffer in zip(ema_model.buffers(), model.buffers()):
        ema_buffer.copy_(buffer)


# --- random number generators --------------------------------------------------------------------------

def get_rng_state():
    """Every RNG state a training step touches, as tensors and plain types (loadable with weights_only)."""
    numpy_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(numpy_state[1].astype(np.int64)), "pos": int(numpy_state[2]),
                  "has_gauss": int(numpy_state[3]), "cached_gaussian": float(numpy_state[4])},
        "python": list(random.getstate()[1]),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    """Restore what `get_rng_state` returned."""
    torch.set_rng_state(state["torch"])
    numpy_state = state["numpy"]
    np.random.set_state(("MT19937", numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
                         numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    random.setstate((3, tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed):
    """Seed python, numpy and torch (CPU and every GPU)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# --- checkpoints ----------------------------------------------------------------------------------------

def write_atomically(path, write):
    """Write a file so that a crash at any moment leaves the previous one (or none) intact: write(f) fills a
    temporary binary file in the same folder, which is flushed, fsync'd and renamed over `path` (an atomic operation
    on POSIX file systems), and the folder is fsync'd so that the rename survives a power cut. Raises OSError and
    leaves nothing half-written behind."""
    path = Path(path)
    tmp_path = path.with_name(f".{path.name}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp_path, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    finally:
        with contextlib.suppress(OSError):
            tmp_path.unlink()  # only still there if something failed before the rename


def save_checkpoint(state, path):
    """Write `state` to `path` atomically (write_atomically): a crash at any moment leaves the previous file intact.
    A full disk or an unwritable folder raises CheckpointError."""
    try:
        write_atomically(path, lambda f: torch.save(state, f))
    except OSError as error:
        raise CheckpointError(f"could not write checkpoint {path} ({error.strerror or error}); "
                              f"the previous checkpoint is intact") from error


def load_checkpoint(path, map_location="cpu"):
    """Read a checkpoint with `torch.load(weights_only=True)`: tensors and plain types only, so a file from a
    stranger cannot run code. Missing, truncated, corrupt or unsafe files raise CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises many types here: UnpicklingError, RuntimeError, EOFError, ...
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"checkpoint {path} cannot be read: it is truncated, corrupt, or holds "
                              f"something other than tensors and plain values ({reason[:200]})") from error
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise CheckpointError(f"{path} is not a checkpoint of this repository (no 'model' and 'config' entries)")
    return state


def step_checkpoints(run_dir):
    """The run's step_<N>.pt files, newest (highest N) first."""
    pattern = re.compile(r"step_(\d+)\.pt$")
    found = []
    for path in Path(run_dir).glob("step_*.pt"):
        match = pattern.match(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found, reverse=True)]


def load_latest_checkpoint(run_dir, map_location="cpu"):
    """(path, state) of the newest readable checkpoint of a run: `last.pt`, else the newest step file.

    An unreadable file is skipped with a warning naming it. Returns (None, None) when the run has none.
    """
    candidates = [Path(run_dir) / "last.pt"] + step_checkpoints(run_dir)
    for path in candidates:
        if not path.exists():
            continue
        try:
            return path, load_checkpoint(path, map_location)
        except CheckpointError as error:
            print(f"warning: {error}; trying an older checkpoint", file=sys.stderr)
    return None, None


def finished_step(run):
    """The step of the run's newest checkpoint, or 0 when it has none."""
    path, state = load_latest_checkpoint(CHECKPOINT_DIR / run)
    return 0 if path is None else state["step"]


def prune_checkpoints(run_dir, keep):
    """Delete all but the newest `keep` step_<N>.pt files (last.pt is never deleted)."""
    for path in step_checkpoints(run_dir)[keep:]:
        with contextlib.suppress(OSError):
            path.unlink()


# --- metrics --------------------------------------------------------------------------------------------

class MetricsCSV:
    """Appends rows of metrics to a CSV file, one column per key of the first row.

    When a run resumes from step N, rows logged after N by the interrupted run are dropped first, so the file
    reads as one uninterrupted run.
    """

    def __init__(self, path, resume_step=0):
        self.path = Path(path)
        self.fieldnames = None
        if self.path.exists():
            with open(self.path, newline="") as f:
                reader = csv.DictReader(f)
                self.fieldnames = reader.fieldnames
                rows = [row for row in reader if resume_step and int(row["step"]) <= resume_step]
            self._rewrite(rows)

    def _rewrite(self, rows):
        with open(self.path, "w", newline="") as f:
            if self.fieldnames and rows:
                writer = csv.DictWriter(f, fieldnames=self.fieldnames)
                writer.writeheader()
                writer.writerows(rows)
            elif not rows:
                self.fieldnames = None

    def log(self, row):
        """Append one row (a dict); the first row fixes the columns."""
        write_header = self.fieldnames is None
        if write_header:
            self.fieldnames = list(row)
        with open(self.path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.fieldnames)
            if write_header:
                writer.writeheader()
            writer.writerow(row)


def read_metrics(path):
    """The columns of a metrics CSV as a dict of float lists."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return {}
    return {key: [float(row[key]) for row in rows] for key in rows[0]}


def smooth(values, weight=0.9):
    """Exponential moving average with bias correction (what TensorBoard's smoothing slider does)."""
    smoothed = []
    average = 0.0
    for i, value in enumerate(values):
        average = weight * average + (1 - weight) * value
        smoothed.append(average / (1 - weight ** (i + 1)))
    return smoothed


def plot_loss(csv_path, png_path, title=None):
    """Draw the loss curve of a metrics CSV (raw and smoothed, log scale) into a PNG. Returns the PNG path."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = read_metrics(csv_path)
    if not metrics.get("loss"):
        raise ValueError(f"{csv_path} holds no loss values yet")
    steps = metrics["step"]
    loss = metrics["loss"]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    ax.plot(steps, loss, color="tab:blue", alpha=0.3, linewidth=1, label="loss")
    ax.plot(steps, smooth(loss), color="tab:blue", linewidth=2, label="smoothed")
    if all(value > 0 for value in loss):
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(title or "training loss")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    return save_figure(fig, png_path)


def save_figure(fig, path):
    """Lay out a matplotlib figure, write it to `path` (making its folder) and close it. Returns the path."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


# --- pictures -------------------------------------------------------------------------------------------

def to_uint8(images):
    """Images in [-1, 1], (B, C, H, W) -> uint8 numpy (B, H, W, C) with 3 channels (grayscale repeated)."""
    images = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    if images.shape[1] == 1:
        images = images.repeat(1, 3, 1, 1)
    return images.permute(0, 2, 3, 1).numpy()


def make_grid(images, nrow=None, padding=2):
    """Images in [-1, 1], (B, C, H, W) -> one uint8 grid image (H', W', 3), `nrow` images per row."""
    import torchvision

    nrow = nrow or max(1, math.ceil(math.sqrt(images.shape[0])))
    grid = torchvision.utils.make_grid(images.detach().float().cpu().clamp(-1, 1), nrow=nrow, padding=padding,
                                       pad_value=1.0)  # (3, H', W'), white gaps between images
    return to_uint8(grid.unsqueeze(0))[0]


def save_grid(images, path, nrow=None, row_labels=None):
    """Save images in [-1, 1], (B, C, H, W) as one PNG grid. Returns the path. row_labels: a text per row of the
    grid (the prompts of a text-conditional model), written in a white margin to the left of it."""
    import imageio.v3 as iio

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    grid = make_grid(images, nrow)
    if row_labels:
        grid = label_rows(grid, row_labels, images.shape[-2])
    iio.imwrite(path, grid)
    return Path(path)


def label_rows(grid, labels, image_height, padding=2):
    """A uint8 grid (H, W, 3) of make_grid with each row's label written in black in a white margin on its left."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    width = max(int(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(label, font=font)) for label in labels)
    picture = Image.new("RGB", (grid.shape[1] + width + 3 * padding, grid.shape[0]), "white")
    picture.paste(Image.fromarray(grid), (width + 3 * padding, 0))
    draw = ImageDraw.Draw(picture)
    for row, label in enumerate(labels):
        middle = padding + row * (image_height + padding) + image_height // 2
        draw.text((padding, middle), label, fill="black", font=font, anchor="lm")
    return np.asarray(picture)


def unique_path(path):
    """`path` if it does not exist yet, else the same name with _1, _2, ... so nothing is overwritten."""
    path = Path(path)
    candidate = path
    index = 1
    while candidate.exists():
        candidate = path.with_name(f"{path.stem}_{index}{path.suffix}")
        index += 1
    return candidate


# --- FLOPs -----------------------------------------------------------------------------------------------

def count_flops(function, *inputs):
    """FLOPs of function(*inputs) as FlopCounterMode counts them: 2 per multiply-add of every convolution, matmul
    and linear layer; bias additions, norms and activations are not counted.

    Attention runs on PyTorch's math kernel here: the counter sees its two matmuls (q k^T and the weights times v)
    on every device, whereas it has no formula for the CPU's fused attention kernel and would count nothing there.
    """
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        function(*inputs)
    return counter.get_total_flops()
