"""A sample-quality metric that needs no download: a small classifier trained on the dataset's own labelled images.

Inception-based FID needs ImageNet weights, a network and images that look like ImageNet's. For digits, shapes or
any labelled folder, a classifier of the dataset itself says more and runs offline:

    cfid        Frechet distance between the classifier's penultimate features of the samples and of the training
                set (the FID formula, with this classifier in place of Inception); lower is better, 0 = same Gaussian
    confident   the fraction of samples the classifier gives one class with probability > CONFIDENCE (0.9)
    balance     entropy of the predicted classes / log K: 1 when every class is made equally often, 0 when one only
    accuracy    for a class-conditional model: the fraction of samples classified as the class they were asked for

The classifier is trained once per dataset (minutes on a CPU) and cached in data/classifiers/, named by a hash of
the training images, so a changed dataset gets a new one. Besides the dataset's images it sees random noise and
smooth random blobs with a uniform target ("outlier exposure"), so that it is not confident about pictures of
nothing, which a poorly trained diffusion model makes.

    python quality.py --dataset shapes                       # train or load the classifier, print the calibration
    python quality.py --dataset folder --data-dir DIGITS --channels 1 --image-size 32
    python quality.py --dataset shapes --text-encoder transformer --image-size 16   # the captioned shapes

The calibration table scores real held-out images (the floor: the best a model can get at that sample count),
degraded real images and uniform noise, so a user can read a model's numbers against them.

Imports config and dataset; no script.
"""

import argparse
import dataclasses
import hashlib
import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF

import config
import dataset as datasets

CLASSIFIER_DIR = Path("data") / "classifiers"
CLASSIFIER_VERSION = 1  # bump when the network or its training changes, so that cached classifiers are retrained
CONFIDENCE = 0.9
FOLDER_HOLDOUT = 10  # a folder has no test split: every FOLDER_HOLDOUT-th image (in a seeded order) is held out
CALIBRATION_SAMPLES = 1000
MIN_IMAGES = 10  # images to train the classifier on, at least (and 2 held out, to measure it and calibrate)


class QualityError(config.UserError):
    """A dataset the classifier metric cannot use (no labels, one class, a size that does not match)."""


class Classifier(nn.Module):
    """Three conv layers (width, 2 width, 4 width), each followed by halving the image, and a fourth at the
    smallest size, then a global average: the features (4 width numbers) that cfid compares, and a linear layer to
    the class logits. About 12 MFLOP per 32x32 image: a 2-core CPU trains it on 10,000 images in 3-4 minutes."""

    def __init__(self, channels, num_classes, width=32):
        super().__init__()
        layers = []
        for c_in, c_out in ((channels, width), (width, 2 * width), (2 * width, 4 * width)):
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(), nn.MaxPool2d(2)]
        layers += [nn.Conv2d(4 * width, 4 * width, 3, padding=1), nn.BatchNorm2d(4 * width), nn.ReLU()]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(4 * width, num_classes)

    def features(self, x):
        """x in [-1, 1], (B, C, H, W) -> (B, 4 width)."""
        return self.body(x).mean(dim=(2, 3))

    def forward(self, x):
        return self.head(self.features(x))


# --- the data the classifier learns from ----------------------------------------------------------------

def _as_uint8(image_set):
    """A dataset of (image in [-1, 1], label) -> uint8 images (N, C, H, W) and labels (N,)."""
    if isinstance(image_set, datasets.InMemoryImages) and image_set.images.shape[-1] == image_set.image_size:
        return image_set.images.clone(), torch.as_tensor(image_set.labels).long().clone()
    pairs = [image_set[index] for index in range(len(image_set))]
    images = torch.stack([((image + 1) * 127.5).round().to(torch.uint8) for image, _ in pairs])
    return images, torch.tensor([label for _, label in pairs])


def load_splits(cfg):
    """(train images, train labels, held-out images, held-out labels, class names) of cfg's dataset at its image
    size, uint8 (N, C, H, W). A folder holds out every FOLDER_HOLDOUT-th image of a seeded shuffle. For a
    text-conditional config: a folder's class sub-folders, or the captioned shapes with their shape labels, every
    (shape, colour) pair in both splits: the classifier reads the shape of held-out pairs too (trained without them
    it takes colour for a sign of shape), and the samples are asked for every pair."""
    if cfg.captioned and cfg.dataset == "shapes":
        images, _, attributes = datasets.make_captioned_shapes(datasets.SHAPES_LENGTHS["train"], cfg.image_size,
                                                               datasets.CAPTIONED_CLASSIFIER_SEED, held_out=True)
        test = datasets.CaptionedShapes(train=False, image_size=cfg.image_size)
        return images, attributes[:, 0], test.images, test.attributes[:, 0], list(datasets.SHAPES_CLASSES)
    cfg = dataclasses.replace(cfg, random_flip=False, text_encoder="none")
    names = datasets.class_names(cfg)
    if len(names) < 2:
        raise QualityError(f"the classifier metric needs a dataset with at least 2 classes, but {cfg.dataset} "
                           f"({cfg.data_dir}) has {len(names)}; put each class in its own sub-folder")
    images, labels = _as_uint8(datasets.build_dataset(cfg, train=True))
    if cfg.dataset == "folder":
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
        held_out = order[::FOLDER_HOLDOUT]
        kept = torch.cat([order[start::FOLDER_HOLDOUT] for start in range(1, FOLDER_HOLDOUT)]).sort().values
        return images[kept], labels[kept], images[held_out], labels[held_out], names
    test_images, test_labels = _as_uint8(datasets.build_dataset(cfg, train=False))
    return images, labels, test_images, test_labels, names


def check_sizes(cfg, train_images, held_out_images):
    """Raise QualityError when the dataset is too small for the classifier metric."""
    if len(train_images) < MIN_IMAGES or len(held_out_images) < 2:
        total = len(train_images) + len(held_out_images)
        raise QualityError(f"the classifier metric needs at least {2 * FOLDER_HOLDOUT} images in {cfg.data_dir} "
                           f"(2 of them are held out to measure it), but it holds {total}")


def fingerprint(images, labels):
    """A hash of the images and labels the classifier learns from, and of this file's CLASSIFIER_VERSION."""
    digest = hashlib.sha1(f"v{CLASSIFIER_VERSION} {tuple(images.shape)}".encode())
    digest.update(images.contiguous().numpy().tobytes())
    digest.update(labels.numpy().astype(np.int64).tobytes())
    return digest.hexdigest()[:12]


def to_model_range(images):
    """uint8 (N, C, H, W) -> float32 in [-1, 1]."""
    return images.float() / 127.5 - 1


def outliers(count, shape, generator):
    """Pictures of nothing, in [-1, 1]: uniform noise, and smooth blobs (noise upsampled from 2x2 to 8x8)."""
    channels, height, width = shape
    noise = torch.rand(count, channels, height, width, generator=generator) * 2 - 1
    coarse = 2 ** torch.randint(1, 4, (1,), generator=generator).item()  # 2, 4 or 8 cells across
    blobs = torch.rand(count, channels, coarse, coarse, generator=generator) * 2 - 1
    blobs = F.interpolate(blobs, size=(height, width), mode="bicubic", align_corners=False).clamp(-1, 1)
    return torch.where(torch.rand(count, 1, 1, 1, generator=generator) < 0.5, noise, blobs)


def train_classifier(images, labels, num_classes, epochs=4, min_steps=800, batch_size=128, seed=0, log=print):
    """A Classifier trained with Adam on uint8 images (N, C, H, W) for `epochs`, or more on a small dataset so that
    it takes at least `min_steps` steps: shifted by up to 2 pixels at random, and a quarter-batch of outliers with a
    uniform target in every batch."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # the initial weights
    classifier = Classifier(images.shape[1], num_classes)
    steps_per_epoch = math.ceil(len(images) / batch_size)
    epochs = max(epochs, math.ceil(min_steps / steps_per_epoch))
    steps = epochs * steps_per_epoch
    optimizer = torch.optim.Adam(classifier.parameters(), lr=2e-3)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps)
    classifier.train()
    for epoch in range(epochs):
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, len(images), batch_size):
            index = order[start:start + batch_size]
            x = to_model_range(images[index])
            # A random shift of up to 2 pixels (reflect-padded), the same for the whole batch: cheap augmentation.
            dx, dy = torch.randint(-2, 3, (2,), generator=generator).tolist()
            x = torch.roll(F.pad(x, (2, 2, 2, 2), mode="reflect"), shifts=(dy, dx), dims=(2, 3))[..., 2:-2, 2:-2]
            x_out = outliers(max(1, len(index) // 4), x.shape[1:], generator)
            logits = classifier(torch.cat([x, x_out]))
            loss = (F.cross_entropy(logits[:len(index)], labels[index])
                    # Cross-entropy against the uniform distribution: mean of -log p over classes.
                    - 0.5 * F.log_softmax(logits[len(index):], dim=1).mean())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
        if (epoch + 1) % max(1, epochs // 4) == 0 or epoch + 1 == epochs:
            log(f"  classifier epoch {epoch + 1}/{epochs}: loss {loss.item():.4f}")
    return classifier.eval()


@torch.no_grad()
def run_classifier(classifier, images, batch_size=500):
    """Features (N, D) as float64 and class probabilities (N, K) of uint8 images (N, C, H, W)."""
    features = []
    probabilities = []
    for batch in images.split(batch_size):
        feature = classifier.features(to_model_range(batch))
        features.append(feature.double())
        probabilities.append(classifier.head(feature).softmax(dim=1))
    return torch.cat(features), torch.cat(probabilities)


# --- the numbers ----------------------------------------------------------------------------------------

def gaussian_stats(features):
    """Mean (D,) and covariance (D, D) of features (N, D), in float64 numpy (the covariance with N - 1)."""
    features = np.asarray(features, dtype=np.float64)
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu_1, sigma_1, mu_2, sigma_2):
    """||mu_1 - mu_2||^2 + Tr(Sigma_1 + Sigma_2 - 2 (Sigma_1 Sigma_2)^(1/2)) (Frechet 1957; the FID formula).

    Tr (Sigma_1 Sigma_2)^(1/2) is the sum of the square roots of the eigenvalues of Sigma_1 Sigma_2, which are
    those of the symmetric S = Sigma_1^(1/2) Sigma_2 Sigma_1^(1/2); eigh of symmetric matrices is stable."""
    eigenvalues, eigenvectors = np.linalg.eigh(sigma_1)
    sqrt_sigma_1 = (eigenvectors * np.sqrt(eigenvalues.clip(min=0))) @ eigenvectors.T
    trace_sqrt = np.sqrt(np.linalg.eigvalsh(sqrt_sigma_1 @ sigma_2 @ sqrt_sigma_1).clip(min=0)).sum()
    return float(((mu_1 - mu_2) ** 2).sum() + np.trace(sigma_1) + np.trace(sigma_2) - 2 * trace_sqrt)


def class_balance(predicted, num_classes):
    """Entropy of the histogram of predicted classes, divided by log K: 1 = uniform, 0 = a single class."""
    counts = torch.bincount(predicted, minlength=num_classes).double()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log()).sum() / math.log(num_classes)) + 0.0  # + 0.0: one class gives 0.0, not -0.0


class QualityMetric:
    """The trained classifier of one dataset and its training set's feature statistics; `score` rates samples."""

    def __init__(self, classifier, class_names, mu, sigma, held_out_accuracy, image_shape, key):
        self.classifier = classifier
        self.class_names = class_names
        self.mu = mu
        self.sigma = sigma
        self.held_out_accuracy = held_out_accuracy
        self.image_shape = tuple(image_shape)  # (C, H, W)
        self.key = key

    def score(self, images, labels=None):
        """cfid, confident, balance (and accuracy, given the labels asked for) of uint8 images (N, C, H, W), or
        (N, H, W, 3) as sample.py and evaluate.py store them: 3 channels are averaged for a grayscale dataset."""
        images = to_classifier_layout(images, self.image_shape)
        if len(images) < 2:
            raise QualityError(f"the classifier metric needs at least 2 images to compare, got {len(images)}")
        features, probabilities = run_classifier(self.classifier, images)
        mu, sigma = gaussian_stats(features.numpy())
        confidence, predicted = probabilities.max(dim=1)
        result = {"cfid": frechet_distance(mu, sigma, self.mu, self.sigma),
                  "confident": float((confidence > CONFIDENCE).double().mean()),
                  "balance": class_balance(predicted, len(self.class_names)),
                  "accuracy": None}
        if labels is not None:
            result["accuracy"] = float((predicted == torch.as_tensor(labels)).double().mean())
        return result


def to_classifier_layout(images, image_shape):
    """uint8 images as the classifier takes them, (N, C, H, W), from (N, C, H, W) or (N, H, W, 3) arrays."""
    images = torch.as_tensor(np.asarray(images))
    channels, height, width = image_shape
    if images.ndim == 4 and images.shape[-1] in (1, 3) and images.shape[1] not in (1, 3):
        images = images.permute(0, 3, 1, 2)  # (N, H, W, C) -> (N, C, H, W)
    if images.dtype != torch.uint8 or images.ndim != 4 or tuple(images.shape[2:]) != (height, width):
        raise QualityError(f"the classifier metric takes uint8 images of {height}x{width} pixels, as the dataset "
                           f"has them, but got {images.dtype} images of shape {tuple(images.shape)}")
    if channels == 1 and images.shape[1] == 3:
        images = images.float().mean(dim=1, keepdim=True).round().to(torch.uint8)
    if images.shape[1] != channels:
        raise QualityError(f"the dataset has {channels}-channel images, the samples {images.shape[1]}")
    return images.contiguous()


def dataset_label(cfg):
    """A short name of the dataset for file names: shapes, mnist, folder-DIGITS, ..."""
    if cfg.dataset == "folder":
        return "folder-" + "".join(c if c.isalnum() else "_" for c in Path(cfg.data_dir).resolve().name)
    if cfg.dataset == "shapes" and cfg.captioned:
        return "shapes-captioned"
    return cfg.dataset


def load_metric(cfg, log=print, cache_dir=None, splits=None):
    """The QualityMetric of cfg's dataset (dataset, data_dir, image_size, channels): loaded from
    data/classifiers/ when its images have not changed, else trained (minutes on a CPU) and saved there."""
    cache_dir = Path(cache_dir or CLASSIFIER_DIR)
    train_images, train_labels, test_images, test_labels, names = splits or load_splits(cfg)
    check_sizes(cfg, train_images, test_images)
    key = fingerprint(train_images, train_labels)
    path = cache_dir / f"{dataset_label(cfg)}-{cfg.image_size}px-{cfg.channels}ch-{key}.pt"
    if path.is_file():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        classifier = Classifier(cfg.channels, len(names))
        classifier.load_state_dict(saved["classifier"])
        log(f"classifier metric: {path} (held-out accuracy {saved['held_out_accuracy']:.2%})")
        return QualityMetric(classifier.eval(), saved["class_names"], saved["mu"].numpy(), saved["sigma"].numpy(),
                             saved["held_out_accuracy"], train_images.shape[1:], key)

    log(f"classifier metric: training a classifier on {len(train_images):,} images of {dataset_label(cfg)} "
        f"({len(names)} classes), once; it is cached in {cache_dir}/")
    with torch.random.fork_rng():  # leave the caller's random state as it was
        classifier = train_classifier(train_images, train_labels, len(names), log=log)
    features, _ = run_classifier(classifier, train_images)
    mu, sigma = gaussian_stats(features.numpy())
    _, probabilities = run_classifier(classifier, test_images)
    accuracy = float((probabilities.argmax(dim=1) == test_labels).double().mean())
    log(f"classifier metric: held-out accuracy {accuracy:.2%} on {len(test_images):,} images")
    cache_dir.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    torch.save({"classifier": classifier.state_dict(), "class_names": names, "mu": torch.from_numpy(mu),
                "sigma": torch.from_numpy(sigma), "held_out_accuracy": accuracy, "fingerprint": key,
                "dataset": config.config_to_dict(cfg)}, temporary)
    temporary.replace(path)  # atomic: a crash leaves no half-written classifier behind
    return QualityMetric(classifier, names, mu, sigma, accuracy, train_images.shape[1:], key)


# --- calibration: what real, degraded and random images score ---------------------------------------------

def degrade(images, how, generator):
    """Real uint8 images (N, C, H, W) made worse in one way: blurred, at half resolution, noised, or replaced by
    uniform noise."""
    x = to_model_range(images)
    if how == "blur":
        x = TF.gaussian_blur(x, kernel_size=5, sigma=1.0)
    elif how == "half_res":
        x = F.interpolate(F.avg_pool2d(x, 2), scale_factor=2, mode="bilinear", align_corners=False)
    elif how == "noised":
        x = x + 0.2 * torch.randn(x.shape, generator=generator)
    elif how == "uniform_noise":
        x = torch.rand(x.shape, generator=generator) * 2 - 1
    elif how != "real":
        raise ValueError(f"unknown degradation {how!r}")
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


CALIBRATION = {
    "real": "held-out real images (the floor)",
    "blur": "real, Gaussian blur of 1 pixel",
    "half_res": "real, at half resolution and scaled back up",
    "noised": "real + Gaussian noise of std 0.2 (of the range -1..1)",
    "uniform_noise": "uniform noise",
}


def calibrate(metric, held_out_images, num_images=CALIBRATION_SAMPLES, seed=0):
    """{degradation: scores} for num_images held-out real images, unchanged and degraded in each CALIBRATION way."""
    generator = torch.Generator().manual_seed(seed)
    chosen = held_out_images[torch.randperm(len(held_out_images), generator=generator)[:num_images]]
    return {how: metric.score(degrade(chosen, how, generator)) for how in CALIBRATION}


def main(argv=None):
    """Train or load the classifier of a dataset (config flags) and print its calibration table."""
    parser = config.add_config_flags(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
    parser.add_argument("--num-images", type=int, default=CALIBRATION_SAMPLES,
                        help=f"held-out images per calibration row (default {CALIBRATION_SAMPLES})")
    args = parser.parse_args(argv)
    num_images = args.num_images
    del args.num_images
    if args.channels is None and args.dataset in config.DATASET_CHANNELS:
        args.channels = config.DATASET_CHANNELS[args.dataset]
    try:
        if num_images < MIN_IMAGES:
            raise QualityError(f"--num-images must be at least {MIN_IMAGES}, got {num_images}")
        cfg = config.config_from_args(args)
        splits = load_splits(cfg)
        metric = load_metric(cfg, splits=splits)
        held_out = splits[2]
        rows = calibrate(metric, held_out, min(num_images, len(held_out)))
    except config.UserError as error:
        config.fail(error)
    count = min(num_images, len(held_out))
    print(f"\n{dataset_label(cfg)}, {count} images per row, classifier held-out accuracy "
          f"{metric.held_out_accuracy:.2%}\n")
    print("| images | cfid | confident | balance |\n|---|---|---|---|")
    for how, scores in rows.items():
        print(f"| {CALIBRATION[how]} | {scores['cfid']:.3g} | {scores['confident']:.3f} | {scores['balance']:.3f} |")
    path = config.RESULTS_DIR / "metrics" / f"calibration_{dataset_label(cfg)}_{cfg.image_size}px.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"dataset": config.config_to_dict(cfg), "num_images": count,
                                "held_out_accuracy": metric.held_out_accuracy, "rows": rows}, indent=2) + "\n")
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
