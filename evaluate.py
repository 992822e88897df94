"""Score a diffusion model: FID, Inception Score and KID against CIFAR-10 with torch-fidelity, or the offline
classifier metric of its own dataset (quality.py).

    python evaluate.py --run-name cifar10             # 50,000 DDIM samples (100 steps) from the run's EMA weights
    python evaluate.py --run-name demo --num-samples 1000    # a shapes model: the classifier metric (the default
                                                             # for every dataset but CIFAR-10)
    python evaluate.py --pretrained google/ddpm-cifar10-32 --sampler ddpm   # the DDPM paper's model, all 1000 steps
    python evaluate.py --samples results/images/cifar10/eval_ddim_100steps_50000.npz   # score saved samples again
    python evaluate.py --run-name demo --num-samples 5000 --metrics fid     # quicker, but FID comes out higher

All three metrics look at the images through Inception-v3 (an ImageNet classifier), resized to 299x299:
  FID  Frechet Inception Distance (Heusel et al. 2017), lower is better. Fit a Gaussian to the 2048 pool features
       of each image set, N(mu_1, Sigma_1) for the samples and N(mu_2, Sigma_2) for the reference, and take the
       Frechet (2-Wasserstein) distance between the two Gaussians:
           FID = ||mu_1 - mu_2||^2 + Tr(Sigma_1 + Sigma_2 - 2 (Sigma_1 Sigma_2)^(1/2))
       It is biased: fewer samples give a higher FID, so compare only numbers from the same count (papers: 50,000).
  IS   Inception Score (Salimans et al. 2016), higher is better: exp(E_x KL(p(y|x) || p(y))), high when each image
       is clearly one class and the set covers many; mean and std over 10 splits. It ignores the reference
       (CIFAR-10's own training images score about 11.2).
  KID  Kernel Inception Distance (Binkowski et al. 2018), lower is better: the squared MMD of the two feature sets
       with the kernel k(x, y) = (x.y / 2048 + 1)^3, averaged over 100 subsets of 1,000 images. Unbiased, so it
       compares across sample counts; near 0 it can be slightly negative.
torch-fidelity's Inception gives the numbers of the original TensorFlow code that papers report (torchvision's
does not), and it caches the reference's features, so CIFAR-10 goes through Inception only once.

--metrics classifier (the default for models of any dataset but CIFAR-10; see quality.py) needs no download: a small
classifier of the model's own dataset, trained once and cached in data/classifiers/, gives
  cfid       the FID formula on that classifier's features, samples against the training set, lower is better
  confident  the fraction of samples it puts in one class with probability > 0.9, higher is better
  balance    the entropy of the predicted classes / log K, 1 when every class is made equally often
  accuracy   for class-conditional models, the fraction classified as the class asked for

Outputs (RUN is --run-name; with --samples, the run that wrote them, else their file or folder name):
    results/images/RUN/eval_ddim_100steps_50000.npz  the generated samples, arr_0 uint8 (N, H, W, 3), for --samples
    results/metrics/RUN.json                         every number and setting of RUN's latest evaluation
    results/metrics.csv                              one row per evaluation: run, step, sampler, steps, guidance,
                                                     num_samples, fid, isc, kid, cfid, confident, balance,
                                                     accuracy, seconds, date
Downloaded once into data/ (offline, put them there by hand): Inception's weights (or pass a copy with
--inception-weights), CIFAR-10 (cifar-10-python.tar.gz, shared with train.py), and in data/fidelity_cache/ the
reference's features and statistics.

On several processes or GPUs, `torchrun --nproc_per_node=N evaluate.py ...` shares out the sampling (the same images
as one process makes, see sample.py), and the first process scores them and writes the results. Until the samples
are saved, their finished batches are kept in results/images/RUN/unfinished/, so that a stopped evaluation goes on
from where it stopped when the same command runs again.
"""

import csv
import dataclasses
import json
import time
import urllib.error
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
import torch_fidelity
from PIL import Image
from torch.utils.data import Dataset
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
from torch_fidelity.registry import DATASETS_REGISTRY, FEATURE_EXTRACTORS_REGISTRY

import config
import inference
import jobs
import prompts
import quality
import text
import utils
from config import flag_field
from dataset import CaptionedShapes, build_dataset
from diffusion import create_diffusion
from utils import UsageError

DATA_DIR = Path("data")
CACHE_DIR = DATA_DIR / "fidelity_cache"  # torch-fidelity's cache_root: the reference's features and statistics
INCEPTION = "inception-v3-compat"  # torch-fidelity's port of the TensorFlow Inception that FID was defined with
INCEPTION_FILE = URL_INCEPTION_V3.rsplit("/", 1)[-1]  # weights-inception-2015-12-05-6726825d.pth
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
INCEPTION_METRICS = ("fid", "isc", "kid")
METRICS = (*INCEPTION_METRICS, "classifier")
MIN_SAMPLES = 10  # the Inception Score averages over 10 splits of the samples
PAPER_SAMPLES = 50_000  # what papers compute FID on
KID_SUBSET_SIZE = 1000
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
CSV_COLUMNS = ("run", "step", "sampler", "steps", "guidance", "num_samples", "fid", "isc", "kid", "cfid", "confident",
               "balance", "accuracy", "prompt_accuracy", "prompt_accuracy_seen", "prompt_accuracy_held_out",
               "seconds", "date")


@dataclass
class EvalOptions(inference.SamplingOptions):
    """What to score and how: the shared sampling options (a model trained with labels samples every class equally
    often), then these. Every field is a --flag of the same name (see --help)."""

    samples: str = flag_field("", "score these images instead of sampling: a folder of PNG/JPEG files or an .npz "
                                  "whose arr_0 is uint8 (N, H, W, 3)")
    num_samples: int = flag_field(PAPER_SAMPLES, f"images to generate (default {PAPER_SAMPLES}, as papers use)")
    batch_size: int = flag_field(256, "images per forward pass of the model and of Inception (default 256)")
    metrics: str = flag_field("auto", f"comma-separated metrics to compute, of {', '.join(METRICS)}; auto (default) "
                                      f"is fid,isc,kid for CIFAR-10 and classifier for every other dataset")
    inception_weights: str = flag_field("", f"a local copy of {URL_INCEPTION_V3}, for machines without network "
                                            f"(default {DATA_DIR / INCEPTION_FILE}, downloaded when missing)")
    feature_extractor: str = flag_field(INCEPTION, f"torch-fidelity feature extractor (default {INCEPTION}); "
                                                   f"another one gives numbers that are not FID, IS or KID")
    reference: str = flag_field("cifar10-train", "torch-fidelity input that FID and KID compare with (default "
                                                 "cifar10-train: CIFAR-10's 50,000 training images)")
    dataset: str = flag_field("", "the dataset whose classifier scores --samples (default: the one their run was "
                                  "trained on, when evaluate.py made them)", ("", *config.DATASETS))
    data_dir: str = flag_field("data", "where that dataset is (for folder: the image folder; default data)")
    channels: int = flag_field(0, "that dataset's channels (default: the dataset's own, or 3 for a folder)")


def parse_options(argv=None):
    """EvalOptions from the command line; fields the user did not type keep the dataclass defaults."""
    return config.parse_dataclass_args(EvalOptions, argv, __doc__, "options")


def check_options(opts):
    """Raise UsageError for options that cannot work; returns the metrics to compute, e.g. ["fid", "kid"], or
    ["auto"] (see choose_metrics)."""
    metrics = [name.strip() for name in opts.metrics.lower().split(",") if name.strip()]
    for name in [] if metrics == ["auto"] else metrics or [opts.metrics]:
        if name not in METRICS:
            raise UsageError(f"unknown metric {name!r}; --metrics takes a comma-separated list of "
                             f"{', '.join(METRICS)}")
    inference.check_sampling(opts)
    if opts.num_samples < MIN_SAMPLES or opts.batch_size < 1:
        raise UsageError(f"--num-samples must be at least {MIN_SAMPLES} and --batch-size at least 1, got "
                         f"{opts.num_samples} and {opts.batch_size}")
    if sum(bool(source) for source in (opts.samples, opts.checkpoint, opts.pretrained)) > 1:
        raise UsageError("give only one of --samples, --checkpoint and --pretrained")
    if (opts.dataset or opts.channels) and not opts.samples:
        raise UsageError("--dataset and --channels name the dataset of --samples; a model is scored on its own "
                         "dataset")
    if opts.samples and not Path(opts.samples).exists():
        raise UsageError(f"--samples {opts.samples} does not exist; give a folder of PNG images or an .npz file")
    if opts.feature_extractor not in FEATURE_EXTRACTORS_REGISTRY:
        raise UsageError(f"unknown --feature-extractor {opts.feature_extractor!r}; torch-fidelity has "
                         f"{', '.join(FEATURE_EXTRACTORS_REGISTRY)}")
    if opts.reference not in DATASETS_REGISTRY:
        raise UsageError(f"unknown --reference {opts.reference!r}; torch-fidelity has {', '.join(DATASETS_REGISTRY)}")
    return metrics


# --- what the metrics need: Inception's weights and the reference images --------------------------------

def reason(error):
    """A download error in a few words: a URLError's reason (e.g. 'Name or service not known'), else its text."""
    return str(getattr(error, "reason", error)).strip().splitlines()[-1]


def inception_weights(path):
    """The file of Inception's weights: `path` (--inception-weights), or data/INCEPTION_FILE, downloaded when
    missing. Checked here, so that a wrong file fails in one sentence rather than deep inside torch-fidelity."""
    if not path:
        path = DATA_DIR / INCEPTION_FILE
        if not path.is_file():
            print(f"downloading Inception's weights to {path}")
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                torch.hub.download_url_to_file(URL_INCEPTION_V3, str(path))
            except OSError as error:  # no network: urllib's URLError is an OSError
                raise UsageError(f"could not download Inception's weights ({reason(error)}); download "
                                 f"{URL_INCEPTION_V3} into the folder {DATA_DIR}/, or anywhere and pass the file "
                                 f"with --inception-weights PATH, and run again") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # a missing file, a half-downloaded file, an HTML page saved by hand, ...
        state = None
    if not isinstance(state, dict) or "fc.weight" not in state:
        raise UsageError(f"{path} does not hold Inception's weights (it is missing, incomplete or another file); "
                         f"download {URL_INCEPTION_V3} and pass it with --inception-weights")
    return str(path)


def load_reference(name):
    """The images FID and KID compare with: torch-fidelity's registered input `name`, yielding uint8 (3, H, W);
    cifar10-train is downloaded into data/ when missing (torchvision unpacks cifar-10-python.tar.gz found there)."""
    try:
        return DATASETS_REGISTRY[name](str(DATA_DIR), True)  # arguments: root folder, download
    except (OSError, RuntimeError) as error:  # no network (URLError is an OSError), or a damaged archive
        if name.startswith("cifar10"):
            raise UsageError(f"could not download CIFAR-10 for the reference statistics ({reason(error)}); download "
                             f"{CIFAR10_URL} into the folder {DATA_DIR}/ (no need to unpack it) and run again"
                             ) from None
        raise UsageError(f"could not load the reference images {name!r} ({reason(error)})") from None


# --- the images to score --------------------------------------------------------------------------------

def choose_metrics(metrics, data_cfg):
    """The metrics to compute: `metrics`, or for ["auto"] fid, isc and kid on CIFAR-10 (or when the dataset is
    not known) and the classifier metric on every other dataset."""
    if metrics != ["auto"]:
        return metrics
    if data_cfg is None or data_cfg.dataset == "cifar10":
        return list(INCEPTION_METRICS)
    return ["classifier"]


def samples_dataset(opts, settings, images):
    """The config of the dataset whose classifier scores --samples: --dataset, else the dataset of the run that
    evaluate.py stored with them; None when neither says."""
    if opts.dataset:
        channels = opts.channels or config.DATASET_CHANNELS.get(opts.dataset, 3)
        saved = settings.get("config", {})
        # Only the data fields matter (captions among them); a one-level U-Net without attention accepts any size.
        return config.get_config("cifar10", dataset=opts.dataset, data_dir=opts.data_dir, channels=channels,
                                 image_size=images.shape[1], channel_mults=(1,), attn_resolutions=(),
                                 num_classes=saved.get("num_classes", 0),
                                 text_encoder=saved.get("text_encoder", "none"),
                                 vocabulary=tuple(saved.get("vocabulary", ())))
    if "config" in settings:
        return config.config_from_dict(settings["config"])
    return None


def caption_prompts(cfg, count):
    """The prompts of `count` images of a text-conditional model: image i asks for caption i (cycling) of the
    captioned shapes' test split, which has every (shape, colour) pair, the held-out ones too; or of a folder's
    captions. Also, for the shapes, the attributes (count, 5) asked for; None for a folder."""
    if cfg.dataset == "shapes":
        test = CaptionedShapes(train=False, image_size=cfg.image_size)
        index = torch.arange(count) % len(test)
        return [test.captions[i] for i in index], test.attributes[index]
    captions = build_dataset(cfg, train=True).captions
    return [captions[i % len(captions)] for i in range(count)], None


def load_quality_metric(data_cfg):
    """quality.py's classifier metric of the dataset, trained and cached on first use."""
    if data_cfg is None:
        raise UsageError("the classifier metric needs to know the dataset of --samples; give --dataset (and "
                         "--data-dir for a folder)")
    return quality.load_metric(data_cfg)


def sample_images(opts, loaded, device, amp_dtype):
    """opts.num_samples images from the loaded model, made by all processes: uint8 (N, H, W, 3) on the first process
    (None on the others), the labels asked for (or None), the settings used, and the job to close once they are
    saved."""
    cfg = loaded.cfg
    opts = dataclasses.replace(opts, steps=inference.sampling_steps(cfg, opts))
    # A model trained with labels gets every class equally often, as CIFAR-10 has them.
    labels = torch.arange(opts.num_samples) % cfg.num_classes if cfg.num_classes > 0 else None
    conditions = labels
    if cfg.captioned:  # the test captions, as token ids (the attributes they ask for are scored in `run`)
        conditions = text.create_tokenizer(cfg, loaded.model.text_encoder)(caption_prompts(cfg, opts.num_samples)[0])
    amp = str(amp_dtype).removeprefix("torch.") if amp_dtype else "none"
    if jobs.first_process():
        print(f"sampling {opts.num_samples} images from {loaded.source} with {opts.sampler}, {opts.steps} steps, on "
              f"{device}, amp {amp}")
    model = inference.prepare_for_sampling(loaded.model, device, amp_dtype, opts.compile)
    settings = dict(run=loaded.run, step=loaded.step, sampler=opts.sampler, steps=opts.steps,
                    guidance=opts.guidance_scale, source=loaded.source, eta=opts.eta, seed=opts.seed, amp=amp,
                    ddpm_variance=opts.ddpm_variance, spacing=opts.timestep_spacing,
                    dynamic_threshold=opts.dynamic_threshold,
                    # image i asked for class i % K, or for caption i (caption_prompts)
                    labels="captions" if cfg.captioned else "cycle" if labels is not None else "none",
                    config=config.config_to_dict(cfg))
    images, job = jobs.make_images(model, create_diffusion(cfg), cfg, opts, opts.num_samples,
                                   image_dir=utils.RESULTS_DIR / "images" / loaded.run,
                                   name=f"{samples_stem(settings, opts.num_samples)}_seed{opts.seed}", device=device,
                                   batch_size=opts.batch_size, amp_dtype=amp_dtype, labels=conditions)
    return images, labels, settings, job


def samples_stem(settings, num_samples):
    """The name of the samples' file without its suffix, e.g. eval_ddim_100steps_50000_w3."""
    stem = f"eval_{settings['sampler']}_{settings['steps']}steps_{num_samples}"
    if settings.get("ddpm_variance", "auto") != "auto":
        stem += f"_{settings['ddpm_variance']}"
    if settings.get("spacing", "uniform") != "uniform":
        stem += f"_{settings['spacing']}"
    if settings["guidance"] != 1:
        stem += f"_w{settings['guidance']:g}"
    if settings.get("dynamic_threshold"):
        stem += f"_dt{settings['dynamic_threshold']:g}"
    return stem


def save_samples(images, settings):
    """Write uint8 images (N, H, W, 3) to results/images/RUN/eval_*.npz as arr_0 (what sample.py --format npz
    writes), with the settings that made them, so that --samples scores them again; returns the path."""
    stem = samples_stem(settings, len(images))
    path = utils.unique_path(utils.RESULTS_DIR / "images" / settings["run"] / f"{stem}.npz")
    path.parent.mkdir(parents=True, exist_ok=True)
    utils.write_atomically(path, lambda f: np.savez(f, arr_0=images, settings=json.dumps(settings)))
    return path


def read_picture(path):
    """One image file as uint8 (H, W, 3)."""
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except (OSError, ValueError):  # PIL's "cannot identify image file", a truncated file, ...
        raise UsageError(f"cannot read the image {path}: it is damaged or not a picture") from None


def load_samples(path):
    """Images to score, uint8 (N, H, W, 3), from a folder of PNG/JPEG files or an npz's arr_0; and the settings
    that evaluate.py stores with its own samples (empty for other files)."""
    if path.is_dir():
        pictures = [read_picture(file) for file in sorted(path.iterdir()) if file.suffix.lower() in IMAGE_SUFFIXES]
        if len({picture.shape for picture in pictures}) != 1:
            raise UsageError(f"the folder {path} must hold PNG or JPEG images all of one size, but holds "
                             f"{len(pictures)} image(s) of size(s) {sorted({p.shape for p in pictures})}")
        return np.stack(pictures), {}
    try:
        with np.load(path) as data:
            images = data["arr_0"]
            settings = json.loads(str(data["settings"])) if "settings" in data.files else {}
    except Exception as error:  # not an npz, no arr_0, a damaged file: all the same to the user
        raise UsageError(f"cannot read {path} as an .npz file with an arr_0 array ({type(error).__name__})") from None
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3 or len(images) < MIN_SAMPLES:
        raise UsageError(f"arr_0 in {path} is {images.dtype} of shape {images.shape}, but must be uint8 images "
                         f"(N, H, W, 3) with N >= {MIN_SAMPLES}, as sample.py --format npz writes them")
    return images, settings


class ImageArray(Dataset):
    """uint8 images (N, H, W, 3), served as torch-fidelity reads images: uint8 tensors (3, H, W)."""

    def __init__(self, images):
        self.images = torch.from_numpy(images).permute(0, 3, 1, 2)  # (N, 3, H, W), a view without a copy

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return self.images[index]


# --- scores and results ---------------------------------------------------------------------------------

def score(images, reference, metrics, weights, opts, device):
    """The asked-for metrics of uint8 images (N, H, W, 3) against the reference, computed by torch-fidelity."""
    # KID averages over random subsets of KID_SUBSET_SIZE images of each set; smaller sets need smaller subsets.
    kid_subset_size = min(KID_SUBSET_SIZE, len(images), len(reference)) if "kid" in metrics else None
    print(f"scoring {len(images)} images by {', '.join(metrics)} with {opts.feature_extractor}"
          + (f" against {opts.reference} ({len(reference)} images)" if reference is not None else ""))
    try:
        result = torch_fidelity.calculate_metrics(
            input1=ImageArray(images), input2=reference, fid="fid" in metrics, isc="isc" in metrics,
            kid="kid" in metrics, kid_subset_size=kid_subset_size or KID_SUBSET_SIZE,
            feature_extractor=opts.feature_extractor, feature_extractor_weights_path=weights,
            # Named like torch-fidelity's own input, the reference's features are cached under that name.
            input2_cache_name=opts.reference if reference is not None else None, cache_root=str(CACHE_DIR),
            batch_size=opts.batch_size, cuda=device.type == "cuda",
            save_cpu_ram=True)  # no DataLoader worker processes: the samples are in memory already
    except urllib.error.URLError as error:  # feature extractors other than Inception download their own weights
        raise UsageError(f"the feature extractor {opts.feature_extractor} could not download its weights "
                         f"({reason(error)}); run once on a machine with network") from None
    return {"fid": result.get(torch_fidelity.KEY_METRIC_FID),
            "isc": result.get(torch_fidelity.KEY_METRIC_ISC_MEAN),
            "isc_std": result.get(torch_fidelity.KEY_METRIC_ISC_STD),
            "kid": result.get(torch_fidelity.KEY_METRIC_KID_MEAN),
            "kid_std": result.get(torch_fidelity.KEY_METRIC_KID_STD),
            "kid_subset_size": kid_subset_size}


def write_results(record):
    """Write results/metrics/RUN.json (replacing RUN's previous one) and append a row to results/metrics.csv,
    with a header when the file is new; a file with older columns is rewritten with today's. Returns both paths."""
    json_path = utils.RESULTS_DIR / "metrics" / f"{record['run']}.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    csv_path = utils.RESULTS_DIR / "metrics.csv"
    new_file = not csv_path.exists()
    if not new_file:
        with open(csv_path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
        if tuple(reader.fieldnames or ()) != CSV_COLUMNS:  # written by an older version: keep its rows
            with open(csv_path, "w", newline="", encoding="utf-8") as f:
                writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
                writer.writeheader()
                writer.writerows(rows)
    with open(csv_path, "a", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")  # the JSON keeps the rest
        if new_file:
            writer.writeheader()
        writer.writerow(record)
    return [json_path, csv_path]


# --- the script -----------------------------------------------------------------------------------------

def run(opts, world_size=1):
    """Check what the metrics need, sample (or read) the images, score them and write the results; returns the
    paths written (by the first process, under torchrun)."""
    metrics = check_options(opts)
    if opts.samples and world_size > 1:
        raise UsageError("--samples scores saved images in one process; torchrun shares out sampling, so run it as "
                         "python evaluate.py --samples ...")
    device, amp_dtype = utils.resolve_device_and_amp(opts.device, opts.amp)
    device = utils.process_device(device)
    start = time.perf_counter()
    written = []
    if opts.samples:
        samples_path = Path(opts.samples)
        images, settings = load_samples(samples_path)
        settings["run"] = opts.run_name or settings.get("run") or samples_path.stem
        data_cfg = samples_dataset(opts, settings, images)
        labels = None
        if settings.get("labels") == "cycle" and data_cfg is not None and data_cfg.num_classes > 0:
            labels = torch.arange(len(images)) % data_cfg.num_classes
    else:
        loaded = inference.load_model(opts.run_name, opts.checkpoint, opts.pretrained, opts.ema)
        data_cfg = loaded.cfg
        opts = dataclasses.replace(opts, steps=inference.sampling_steps(data_cfg, opts))  # checked before training
    metrics = choose_metrics(metrics, data_cfg)

    # Fetch (or train) what the metrics need before sampling, which can take hours, rather than after it; only the
    # first process scores.
    inception = [name for name in metrics if name in INCEPTION_METRICS]

    def prepare():
        weights = None
        if inception and opts.feature_extractor == INCEPTION:
            weights = inception_weights(opts.inception_weights)
        reference = load_reference(opts.reference) if "fid" in metrics or "kid" in metrics else None
        quality_metric = load_quality_metric(data_cfg) if "classifier" in metrics else None
        return weights, reference, quality_metric

    prepared = jobs.on_first_process(prepare)

    if not opts.samples:
        images, labels, settings, job = sample_images(opts, loaded, device, amp_dtype)
        if images is None:  # not the first process: its share is made
            return []
        samples_path = save_samples(images, settings)
        job.close()
        written.append(samples_path)
        print(f"samples: {samples_path}")
    weights, reference, quality_metric = prepared
    scores = {}
    if inception:
        if "fid" in metrics and len(images) < PAPER_SAMPLES:
            print(f"note: FID from {len(images)} samples is higher than from the {PAPER_SAMPLES} papers use")
        scores.update(score(images, reference, inception, weights, opts, device))
    asked = None
    if quality_metric is not None and settings.get("labels") == "captions" and data_cfg.dataset == "shapes":
        _, asked = caption_prompts(data_cfg, len(images))  # the shape, colour and position each image asked for
        labels = asked[:, 0]
    if quality_metric is not None:
        scores.update(quality_metric.score(images, labels),
                      classifier=quality_metric.key, classifier_accuracy=quality_metric.held_out_accuracy)
    if asked is not None:
        scores.update(prompts.prompt_accuracy(prompts.read_attributes(images, quality_metric), asked))
    settings.pop("config", None)  # the run's config is in its checkpoint

    # The CSV's columns first, then what only the JSON keeps.
    record = {**dict.fromkeys(CSV_COLUMNS), **settings, "num_samples": len(images), **scores,
              "seconds": round(time.perf_counter() - start, 1), "date": datetime.now().isoformat(timespec="seconds"),
              "samples": str(samples_path), "feature_extractor": opts.feature_extractor, "reference": opts.reference}
    shown = [*inception, *(["cfid", "confident", "balance"] if quality_metric else []),
             *(["accuracy"] if quality_metric and labels is not None else []),
             *(["prompt_accuracy", "prompt_accuracy_seen", "prompt_accuracy_held_out"] if asked is not None else [])]
    print("   ".join(f"{name.upper()} {record[name]:.4g}" for name in shown))  # the stds are in the JSON
    return written + write_results(record)


def main(argv=None):
    """The command line: parse the flags, do the work, print every path written; one sentence on a bad input."""
    written = jobs.run_script(run, parse_options(argv))
    if written is None:  # not the first process under torchrun
        return
    print("wrote:")
    for path in written:
        print(f"  {path}")


if __name__ == "__main__":
    main()
