"""Sample images from a trained diffusion model, and draw pictures that show how diffusion works.

    python sample.py                                     # 64 images from checkpoints/cifar10/last.pt, EMA weights
    python sample.py --run-name demo --sampler dpmpp2m   # another run, another sampler
    python sample.py --run-name demo --format npz --num-samples 50000   # for FID tools: arr_0 (N, H, W, 3) uint8
    python sample.py --pretrained data/ddpm-cifar10-32   # the original DDPM CIFAR-10 weights (diffusers format)
    python sample.py --export-diffusers out/my-ddpm      # write the EMA weights in the diffusers format, and stop
    python sample.py --run-name demo --class-label circle cross --guidance-scale 3   # the demo has labels: guidance
    python sample.py --run-name demo --class-grid   # one row per class
    python sample.py --run-name demo --init-image photo.png --strength 0.6     # SDEdit: image to image
    python sample.py --run-name demo --init-image photo.png --mask mask.png    # inpaint the mask's white pixels
    python sample.py --run-name demo --gif               # watch the reverse process: a GIF and a strip of steps
    python sample.py --run-name demo --forward-figure --plot-loss             # forward process, schedules, loss

Samplers and their default --steps: ddpm (ancestral sampling, DDPM Alg. 2: all T steps), ddim (DDIM, 100 steps;
--eta 0 is deterministic) and dpmpp2m (DPM-Solver++(2M), 20 steps). Image i draws all its noise from its own CPU
generator, seeded from --seed and i (inference.image_seed), so a seed gives the same images on a CPU and on a GPU (up
to floating-point rounding), in any batch size, and under torchrun:

    torchrun --nproc_per_node=4 sample.py --run-name demo --format npz --num-samples 50000   # 4 processes (GPUs)

Each process makes every 4th batch and the first one writes the output: the same images, in the same order, as
one process makes. A job of more batches than processes keeps its finished batches in
results/images/RUN/unfinished/ until its output is written: stopped (Ctrl-C, SIGTERM, a crash), the same command
goes on from there; other settings are refused rather than mixed (README: Sampling on several processes).

Image to image (SDEdit, Meng et al. 2022): the --init-image is noised to t0 = strength x T with q(x_t | x_0) and
denoised from there, so the result keeps the input's layout and takes on the look of the training data;
strength 0 returns the input, 1 starts from pure noise and ignores it. Only the steps below t0 run
(strength x steps of them). With --mask (a black-and-white image), WHITE pixels are repainted and BLACK pixels
are kept from the input: after every step the kept pixels are reset to the input noised to that step's level.

Outputs, never overwriting earlier ones (an existing name gets _1, _2, ...); RUN is --run-name. A name carries what
differs from the defaults: _large or _small (--ddpm-variance), _karras (--timestep-spacing karras; also _quadratic,
_logsnr), _w3 (--guidance-scale 3), _dt0.995
(--dynamic-threshold 0.995), _strength0.6 (image to image):
    results/images/RUN/samples_ddim_100steps.png      --format grid: one PNG grid (classes_*, sdedit_*, inpaint_*
                                                      for --class-grid, --init-image and --mask; the first row of
                                                      an image-to-image grid shows the input and the mask)
    results/images/RUN/samples_ddim_100steps/         --format png: one PNG per image, 000000.png, 000001.png, ...
    results/images/RUN/samples_ddim_100steps.npz      --format npz: arr_0 uint8 (N, H, W, 3), arr_1 the labels
                                                      (class indices, or the prompts as strings)
    results/images/RUN/process_ddim_100steps.gif      --gif: x_t (top row) and the predicted x_0 (bottom row) of
    results/images/RUN/process_ddim_100steps_strip.png      up to 8 samples, and 10 of those steps side by side
    results/plots/RUN/forward.png, schedules.png      --forward-figure: real images noised at growing t, and the
                                                      linear and cosine schedules (beta_t, alpha_bar_t, log-SNR)
    results/plots/RUN/loss.png                        --plot-loss: the loss curve from results/logs/RUN/metrics.csv
--gif, --forward-figure and --plot-loss make their pictures instead of the usual samples; combine them freely.
`python sample.py --help` lists every flag with its default.
"""

import argparse
import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import config
import inference
import jobs
import text
import utils
import visualize
from config import flag_field
from dataset import DatasetError, build_dataset, class_names
from diffusion import create_diffusion, make_beta_schedule
from pretrained import export_diffusers
from utils import UsageError

FORMATS = ("grid", "png", "npz")
GIF_SAMPLES = 8          # samples shown in the GIF and the strip
GIF_MAX_FRAMES = 100     # steps shown in the GIF, evenly spread over the trajectory
GIF_FRAME_MS = 60
GIF_HOLD_MS = 1500       # how long the GIF shows the finished samples before it loops
STRIP_STEPS = 10         # steps shown side by side in the strip PNG
FORWARD_IMAGES = 4       # real images in the forward-process figure
FORWARD_FRACTIONS = (0.1, 0.25, 0.5, 0.75, 1)  # t / T of its noised columns: x_100 ... x_1000 for T = 1000


@dataclass
class SampleOptions(inference.SamplingOptions):
    """What to sample and from which model: the shared sampling options, then these. Every field is a --flag of the
    same name (see --help)."""

    export_diffusers: str = flag_field("", "write the loaded model (ddpm-cifar10 architecture only) as a diffusers "
                                           "UNet2DModel folder here, and exit")
    num_samples: int = flag_field(64, "images to generate (default 64)")
    batch_size: int = flag_field(64, "images per forward pass (default 64); lower it if memory runs out")
    class_label: tuple = flag_field(("all",), "class names (e.g. cat) or indices to generate, for models trained "
                                              "with labels; the samples are split between them (default: all)")
    class_grid: bool = flag_field(False, "one row per class (all, or those of --class-label), "
                                         "num-samples / classes images per row")
    prompt: tuple = flag_field((), "for a model trained with captions: what to draw, e.g. --prompt \"a large green "
                                   "cross\" (give it again for more prompts); the samples are split between the "
                                   "prompts, one grid row each, labelled; none = the empty caption (unconditional)",
                               repeat=True)
    prompt_file: str = flag_field("", "a text file of prompts, one per line (blank lines are skipped), after those "
                                      "of --prompt")
    init_image: str = flag_field("", "SDEdit image to image: start from this picture, noised to --strength")
    strength: float = flag_field(0.6, "how much of --init-image to replace, in [0, 1]: 0 = the input unchanged, "
                                      "1 = pure noise (default 0.6; 1.0 with --mask)")
    mask: str = flag_field("", "inpainting: a black-and-white image the size of --init-image; WHITE pixels are "
                               "repainted, BLACK pixels are kept from the input")
    out: str = flag_field("", "folder for the images (default results/images/RUN/)")
    zoom: int = flag_field(1, "show each pixel of the grid as N x N pixels, for small images (default 1)")
    format: str = flag_field("grid", "grid (default: one PNG), png (one PNG per image) or npz (uint8 array arr_0 "
                                     "of shape (N, H, W, 3), as OpenAI's FID tools read)")
    gif: bool = flag_field(False, f"animate the reverse process of up to {GIF_SAMPLES} samples (x_t above the "
                                  f"predicted x_0) as a GIF, plus a PNG strip of {STRIP_STEPS} steps")
    forward_figure: bool = flag_field(False, "draw real images noised at growing t (forward.png) and the linear "
                                             "and cosine noise schedules (schedules.png) into results/plots/RUN/")
    plot_loss: bool = flag_field(False, "redraw the run's loss curve from results/logs/RUN/metrics.csv into "
                                        "results/plots/RUN/loss.png")

    def __post_init__(self):
        self.class_label = tuple(self.class_label)  # argparse gives a list
        self.prompt = tuple(self.prompt)


def parse_options(argv=None):
    """SampleOptions from the command line; fields the user did not type keep the dataclass defaults."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    config.add_dataclass_flags(parser, SampleOptions, "options")
    args = parser.parse_args(argv)
    typed = {name: value for name, value in vars(args).items() if value is not None}
    if args.mask and args.strength is None:
        typed["strength"] = 1.0  # inpainting: by default the masked pixels are made from scratch
    return SampleOptions(**typed)


def check_options(opts):
    """Raise UsageError for options that cannot work whatever the model."""
    inference.check_sampling(opts)
    if opts.format not in FORMATS:
        raise UsageError(f"unknown format {opts.format!r}; choose one of {', '.join(FORMATS)}")
    for flag, value in (("--num-samples", opts.num_samples), ("--batch-size", opts.batch_size), ("--zoom", opts.zoom)):
        if value < 1:
            raise UsageError(f"{flag} must be at least 1, got {value}")
    if not 0 <= opts.strength <= 1:
        raise UsageError(f"--strength must be in [0, 1] (0 = keep the input, 1 = pure noise), got {opts.strength}")
    if opts.mask and not opts.init_image:
        raise UsageError("--mask needs --init-image, the picture whose black-masked pixels are kept")
    if opts.checkpoint and opts.pretrained:
        raise UsageError("give either --checkpoint or --pretrained, not both")


# --- the model ------------------------------------------------------------------------------------------

def model_class_names(cfg):
    """The class names of the model's dataset, or the indices as strings when they cannot be read."""
    try:
        names = class_names(cfg)
    except DatasetError:
        names = []
    return names if len(names) == cfg.num_classes else [str(index) for index in range(cfg.num_classes)]


def parse_class_labels(values, names):
    """Class indices for --class-label values, each a class name (any case) or an index into `names`;
    the default ("all",) gives every class."""
    if tuple(values) in ((), ("all",)):
        return list(range(len(names)))
    lookup = {name.lower(): index for index, name in enumerate(names)}
    indices = []
    for value in values:
        if value.isdigit() and int(value) < len(names):
            indices.append(int(value))
        elif value.lower() in lookup:
            indices.append(lookup[value.lower()])
        else:
            listing = ", ".join(f"{index} {name}" for index, name in enumerate(names))
            raise UsageError(f"unknown class {value!r}; the model's classes are {listing}")
    return indices


def job_labels(classes, num_samples):
    """The label of each of num_samples images: `classes` in equal consecutive blocks, in the given order."""
    return torch.tensor([classes[i * len(classes) // num_samples] for i in range(num_samples)])


def read_prompts(opts):
    """The prompts of --prompt, then those of --prompt-file (one per line, blank lines skipped)."""
    prompts = list(opts.prompt)
    if opts.prompt_file:
        try:
            with open(opts.prompt_file, encoding="utf-8") as lines:
                prompts += [line.strip() for line in lines if line.strip()]
        except OSError as error:
            raise UsageError(f"cannot read the prompt file {opts.prompt_file} ({error.strerror})") from None
        except UnicodeDecodeError:
            raise UsageError(f"cannot read the prompt file {opts.prompt_file}: it is not UTF-8 text") from None
        if len(prompts) == len(opts.prompt):
            raise UsageError(f"the prompt file {opts.prompt_file} has no prompts; write one per line")
    return prompts


def check_against_model(opts, cfg):
    """Raise UsageError for options this model cannot follow; returns the number of sampling steps to use."""
    if cfg.num_classes == 0 and (opts.class_label not in ((), ("all",)) or opts.class_grid):
        raise UsageError("this model was trained without labels (num_classes = 0), so it takes no --class-label "
                         "or --class-grid" + ("; it takes --prompt" if cfg.captioned else ""))
    if not cfg.captioned and (opts.prompt or opts.prompt_file):
        raise UsageError("this model was trained without captions, so it takes no --prompt or --prompt-file"
                         + ("; it takes --class-label" if cfg.num_classes else ""))
    return inference.sampling_steps(cfg, opts)


# --- inputs for image to image -------------------------------------------------------------------------

def read_picture(path, image_size, mode):
    """A picture file as uint8 (C, H, W): converted to `mode` ("RGB" or "L"), shorter side resized to
    image_size, then center-cropped to a square, as dataset.py does for image folders."""
    import torchvision.transforms.v2.functional as TF
    from PIL import Image

    if not Path(path).is_file():
        raise UsageError(f"cannot read the image {path}: there is no such file")
    try:
        with Image.open(path) as image:
            image = image.convert(mode)
    except (OSError, ValueError):  # PIL's "cannot identify image file", a truncated file, ...
        raise UsageError(f"cannot read the image {path}: it is not a picture PIL can open (PNG, JPEG, ...)") from None
    image = TF.center_crop(TF.resize(image, image_size, antialias=True), image_size)
    return TF.pil_to_tensor(image)


def load_init_image(path, cfg):
    """The --init-image as the model sees images: (1, C, H, W) float32 in [-1, 1]."""
    image = read_picture(path, cfg.image_size, "L" if cfg.channels == 1 else "RGB")
    return (image.float() / 127.5 - 1)[None]


def load_keep_mask(path, cfg):
    """The --mask as (1, 1, H, W) float32: 1 where the input is kept (black pixels), 0 where it is repainted."""
    gray = read_picture(path, cfg.image_size, "L")
    return (gray < 128).float()[None]


# --- outputs --------------------------------------------------------------------------------------------

def output_stem(kind, opts):
    """The name of an output without its suffix, e.g. samples_ddim_100steps or classes_ddpm_1000steps_w3."""
    stem = f"{kind}_{opts.sampler}_{opts.steps}steps"
    if opts.ddpm_variance != "auto":
        stem += f"_{opts.ddpm_variance}"
    if opts.timestep_spacing != "uniform":
        stem += f"_{opts.timestep_spacing}"
    if opts.guidance_scale != 1:
        stem += f"_w{opts.guidance_scale:g}"
    if opts.dynamic_threshold:
        stem += f"_dt{opts.dynamic_threshold:g}"
    if opts.init_image:
        stem += f"_strength{opts.strength:g}"
    return stem


def save_samples(images, folder, stem, file_format, nrow, labels=None, header=None, zoom=1, row_labels=None):
    """Write images (N, C, H, W) in [-1, 1] as a grid PNG, a folder of PNGs, or an npz; returns the new path.

    header: images for the grid's first row (the input and the mask of image to image), padded with white.
    zoom: the grid shows each pixel as zoom x zoom pixels (nearest neighbour), for small images.
    row_labels: a text per grid row (the prompts), written to the left of it.
    """
    import imageio.v3 as iio

    folder.mkdir(parents=True, exist_ok=True)
    if file_format == "grid":
        if zoom > 1:
            images = torch.nn.functional.interpolate(images, scale_factor=zoom, mode="nearest")
            if header is not None:
                header = torch.nn.functional.interpolate(header, scale_factor=zoom, mode="nearest")
        if header is not None:
            nrow = max(nrow, len(header))
            padding = torch.ones(nrow - len(header), *header.shape[1:])  # white
            images = torch.cat([header, padding, images])
        return utils.save_grid(images, utils.unique_path(folder / f"{stem}.png"), nrow=nrow, row_labels=row_labels)
    if file_format == "npz":
        path = utils.unique_path(folder / f"{stem}.npz")
        arrays = {"arr_0": utils.to_uint8(images)}  # (N, H, W, 3) uint8, as guided-diffusion's evaluator reads
        if labels is not None:
            arrays["arr_1"] = np.asarray(labels)
        utils.write_atomically(path, lambda f: np.savez(f, **arrays))  # a stop mid-write leaves no broken file
        return path
    path = utils.unique_path(folder / stem)
    path.mkdir(parents=True)
    for index, picture in enumerate(utils.to_uint8(images)):
        iio.imwrite(path / f"{index:06d}.png", picture)
    return path


def export(model, cfg, out_dir):
    """Write the model in the diffusers format into a new or empty folder; returns the folder."""
    folder = Path(out_dir)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise UsageError(f"{folder} already exists and is not an empty folder; choose a new one (nothing was "
                         f"overwritten)")
    if (cfg.objective, cfg.beta_schedule, cfg.timesteps) != ("eps", "linear", 1000):
        print(f"notice: this model predicts {cfg.objective} over a {cfg.beta_schedule} schedule of "
              f"{cfg.timesteps} steps; set up the diffusers scheduler to match (DDPM's is eps, linear, 1000)")
    return export_diffusers(model, folder)


# --- figures --------------------------------------------------------------------------------------------

def real_images(cfg, count):
    """`count` test images (count, C, H, W) of the model's dataset, or of the built-in shapes when it is not
    available offline (with a notice)."""
    try:
        data = build_dataset(cfg, train=False)
    except DatasetError as error:
        print(f"notice: the forward-process figure uses the built-in shapes, since {cfg.dataset} is not "
              f"available: {error}")
        data = build_dataset(dataclasses.replace(cfg, dataset="shapes", channels=3, num_classes=0), train=False)
    return torch.stack([data[index * len(data) // count][0] for index in range(count)])


def forward_figure(cfg, diffusion, seed, plot_dir):
    """forward.png: real images x_0 (first column) noised by q(x_t | x_0) at the paper's steps t = FORWARD_FRACTIONS
    x T, the same eps in every column, so the picture shows the signal fading as alpha_bar_t falls. Returns the path."""
    images = real_images(cfg, FORWARD_IMAGES)
    T = diffusion.num_timesteps
    eps = torch.randn(images.shape, generator=torch.Generator().manual_seed(seed))
    columns = [(0, 1.0, images)]  # x_0, the data itself
    for fraction in FORWARD_FRACTIONS:
        t = max(1, round(fraction * T))  # the paper's step t, 1 ... T, which is table index t - 1
        x_t = diffusion.q_sample(images, torch.full((len(images),), t - 1), eps)
        columns.append((t, diffusion.alphas_cumprod[t - 1].item(), x_t))
    title = (r"forward process $q(x_t \mid x_0)$: $x_t = \sqrt{\bar\alpha_t}\,x_0 + \sqrt{1 - \bar\alpha_t}\,"
             r"\epsilon$, the same $\epsilon$ in every column" + f" ({cfg.beta_schedule} schedule, T = {T})")
    return visualize.forward_process_figure(columns, utils.unique_path(plot_dir / "forward.png"), title)


def schedule_figure(cfg, plot_dir):
    """schedules.png: beta_t, alpha_bar_t and log-SNR of the linear and cosine schedules over the model's T."""
    schedules = {name: make_beta_schedule(name, cfg.timesteps) for name in config.BETA_SCHEDULES}
    return visualize.schedule_figure(schedules, utils.unique_path(plot_dir / "schedules.png"), cfg.beta_schedule)


def plot_run_loss(run, plot_dir):
    """loss.png: the run's loss curve, redrawn from results/logs/RUN/metrics.csv. Returns the path."""
    csv_path = utils.RESULTS_DIR / "logs" / run / "metrics.csv"
    if not csv_path.is_file():
        raise UsageError(f"--plot-loss needs the training log {csv_path}, which does not exist; train the run "
                         f"here first, or name another run with --run-name")
    try:
        return utils.plot_loss(csv_path, utils.unique_path(plot_dir / "loss.png"), title=f"{run}: training loss")
    except (ValueError, KeyError) as error:
        raise UsageError(f"cannot plot {csv_path}: {error}") from None


# --- the script -----------------------------------------------------------------------------------------

def run(opts, world_size=1):
    """Do what the options ask; returns the paths written (by the first process, under torchrun)."""
    check_options(opts)
    single = [flag for flag, on in (("--gif", opts.gif), ("--export-diffusers", opts.export_diffusers),
                                    ("--plot-loss", opts.plot_loss), ("--forward-figure", opts.forward_figure)) if on]
    if world_size > 1 and single:
        raise UsageError(f"{single[0]} runs in one process; torchrun shares out the sampling of images, so run it "
                         f"as python sample.py ...")
    device, amp_dtype = utils.resolve_device_and_amp(opts.device, opts.amp)
    device = utils.process_device(device)
    loaded = inference.load_model(opts.run_name, opts.checkpoint, opts.pretrained, opts.ema)
    model, cfg, run_name, source = loaded.model, loaded.cfg, loaded.run, loaded.source
    if opts.export_diffusers and loaded.compression:
        raise UsageError(f"--export-diffusers writes float weights; {source} is compressed, so export the run it "
                         f"was made from")
    model.to(device)
    if opts.export_diffusers:
        return [export(model, cfg, opts.export_diffusers)]
    opts = dataclasses.replace(opts, steps=check_against_model(opts, cfg))
    tokenizer = text.create_tokenizer(cfg, model.text_encoder) if cfg.captioned else None
    model = inference.prepare_for_sampling(model, device, amp_dtype, opts.compile)
    diffusion = create_diffusion(cfg)
    image_dir = Path(opts.out) if opts.out else utils.RESULTS_DIR / "images" / run_name
    plot_dir = utils.RESULTS_DIR / "plots" / run_name

    written = []
    if opts.plot_loss:
        written.append(plot_run_loss(run_name, plot_dir))
    if opts.forward_figure:
        written += [forward_figure(cfg, diffusion, opts.seed, plot_dir), schedule_figure(cfg, plot_dir)]
    if opts.gif or not written:  # the figures replace the samples, the GIF does not
        written += make_samples(model, diffusion, cfg, opts, device, amp_dtype, image_dir, source, tokenizer)
    return written


def prompt_tokens(cfg, opts, tokenizer):
    """For a model trained with captions: the prompts (one per grid row; without any, a square grid of the empty one),
    the token ids (N, L) of every sample's prompt in equal consecutive blocks, N being opts.num_samples rounded down
    to whole rows, and the row length."""
    prompts = read_prompts(opts)
    if not prompts and jobs.first_process():
        print("no --prompt: sampling with the empty caption, which is the model unconditioned")
    prompts = prompts or [""]
    if len(prompts) > opts.num_samples:
        raise UsageError(f"{len(prompts)} prompts need at least as many samples; raise --num-samples to "
                         f"{len(prompts)} or more")
    per_prompt = opts.num_samples // len(prompts)
    rows = [prompt for prompt in prompts for _ in range(per_prompt)]
    row_length = per_prompt if prompts != [""] else math.ceil(math.sqrt(per_prompt))  # no prompt: a square grid
    return prompts, tokenizer(rows), row_length


def make_samples(model, diffusion, cfg, opts, device, amp_dtype, image_dir, source, tokenizer=None):
    """Sample what the options ask (labels, prompts, image to image, GIF or not) and write it; returns the
    paths."""
    classes = None
    prompts = None
    nrow = math.ceil(math.sqrt(opts.num_samples))
    if cfg.captioned:
        prompts, tokens, nrow = prompt_tokens(cfg, opts, tokenizer)
        opts = dataclasses.replace(opts, num_samples=len(tokens))
    if cfg.num_classes > 0:
        names = model_class_names(cfg)
        classes = parse_class_labels(opts.class_label, names)
        if opts.class_grid:
            nrow = max(1, opts.num_samples // len(classes))
            opts = dataclasses.replace(opts, num_samples=nrow * len(classes))
            if jobs.first_process():
                print("rows of the class grid: " + ", ".join(names[index] for index in classes))
    if opts.gif:
        opts = dataclasses.replace(opts, num_samples=min(GIF_SAMPLES, opts.num_samples),
                                   batch_size=min(GIF_SAMPLES, opts.num_samples))
    labels = job_labels(classes, opts.num_samples) if classes else None
    if prompts is not None:
        labels = tokens[:opts.num_samples]
    init_image = load_init_image(opts.init_image, cfg) if opts.init_image else None
    keep_mask = load_keep_mask(opts.mask, cfg) if opts.mask else None
    if jobs.first_process():
        print(f"sampling {opts.num_samples} image(s) from {source} with {opts.sampler}, {opts.steps} steps, "
              f"on {device}" + (f", amp {str(amp_dtype).removeprefix('torch.')}" if amp_dtype else ""))
    sampling = dict(device=device, batch_size=opts.batch_size, amp_dtype=amp_dtype, labels=labels,
                    init_image=init_image, strength=opts.strength, keep_mask=keep_mask)

    if opts.gif:
        images, trajectory = inference.generate(model, diffusion, cfg, opts, opts.num_samples,
                                                return_trajectory=True, **sampling)
        if not trajectory:
            raise UsageError("--strength 0 leaves no step to animate; use a larger --strength with --gif")
        stem = output_stem("process", opts)
        gif = visualize.write_gif(trajectory, images, utils.unique_path(image_dir / f"{stem}.gif"),
                                  max_frames=GIF_MAX_FRAMES, frame_ms=GIF_FRAME_MS, hold_ms=GIF_HOLD_MS)
        return [gif, visualize.write_strip(trajectory, utils.unique_path(image_dir / f"{stem}_strip.png"),
                                           STRIP_STEPS)]

    kind = "inpaint" if opts.mask else "sdedit" if opts.init_image else "classes" if opts.class_grid else "samples"
    stem = output_stem(kind, opts)
    images, job = jobs.make_images(model, diffusion, cfg, opts, opts.num_samples, image_dir=image_dir,
                                   name=f"{stem}_{opts.format}_{opts.num_samples}_seed{opts.seed}", **sampling)
    if images is None:  # not the first process: it wrote its share into the job
        return []
    images = torch.from_numpy(images).permute(0, 3, 1, 2)[:, :cfg.channels].float() / 127.5 - 1  # (N, C, H, W)
    header = None
    if init_image is not None:
        header = init_image if keep_mask is None else torch.cat([init_image, init_image * keep_mask])  # grey = repaint
    row_labels = prompts if prompts not in (None, [""]) else None
    if prompts is not None:  # the npz keeps each image's prompt, which a reader can use without the vocabulary
        labels = np.array([prompt for prompt in prompts for _ in range(len(images) // len(prompts))])
    path = save_samples(images, image_dir, stem, opts.format, nrow, labels, header, opts.zoom,
                        row_labels if header is None else None)
    job.close()
    return [path]


def main(argv=None):
    """The command line: parse the flags, do the work, print every path written; one sentence on a bad input."""
    written = jobs.run_script(run, parse_options(argv))
    if written is None:  # not the first process under torchrun
        return
    print("wrote:")
    for path in written:
        print(f"  {path}" + (f"/ ({sum(1 for _ in path.iterdir())} files)" if path.is_dir() else ""))


if __name__ == "__main__":
    main()
