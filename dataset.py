"""Datasets: every dataset yields (image, label), the image a float32 tensor (C, H, W) in [-1, 1], the label an int.

    cifar10, mnist, fashion_mnist   read through torchvision, downloaded into cfg.data_dir when missing
    folder                          any folder of images at cfg.data_dir; class sub-folders become labels
    shapes                          built in: coloured circles, squares, triangles and crosses, drawn from a
                                    fixed seed, so it needs no download and is the same on every machine

Run it to download or prepare a dataset and save a grid of its images:

    python dataset.py --dataset cifar10
    python dataset.py --dataset folder --data-dir path/to/images --image-size 64
"""

import argparse
import os
import socket
from typing import NamedTuple

import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torch.utils.data import Dataset
from torchvision import datasets
from torchvision.utils import save_image

import config

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
MNIST_CLASSES = [str(digit) for digit in range(10)]
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot"]
IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp")
# Without it, a stalled server can keep a download waiting for ever; it applies to each read, not the whole file.
DOWNLOAD_TIMEOUT_SECONDS = 30


class DatasetError(config.UserError):
    """A dataset that cannot be read or downloaded."""


def build_dataset(cfg, train=True):
    """The dataset named by cfg.dataset, yielding (image, label): float32 (C, H, W) in [-1, 1] and an int.

    Training sets flip images left-right at random when cfg.random_flip; test sets never do (a `folder`
    has no test split: train=False gives the same images, unflipped). Raises DatasetError for missing data.
    """
    random_flip = cfg.random_flip and train
    if cfg.dataset == "shapes":
        return ShapesDataset(train=train, image_size=cfg.image_size, random_flip=random_flip)
    if cfg.dataset == "folder":
        folder_set = FolderDataset(cfg.data_dir, cfg.image_size, cfg.channels, random_flip)
        num_found = len(folder_set.classes)
        if cfg.num_classes > 0 and cfg.num_classes != num_found:
            raise DatasetError(f"the folder {cfg.data_dir} holds {num_found} class(es) "
                               f"({', '.join(folder_set.classes)}) but num_classes is {cfg.num_classes}; "
                               f"set --num-classes {num_found}, or 0 to train without labels")
        return folder_set
    images, labels = _load_torchvision_dataset(cfg, train)
    return InMemoryImages(images, labels, cfg.image_size, random_flip)


def class_names(cfg):
    """The names of the classes of cfg.dataset, in label order (for `folder`: its class sub-folders)."""
    if cfg.dataset == "folder":
        return list(_scan_folder(cfg.data_dir))
    fixed_names = {"cifar10": CIFAR10_CLASSES, "mnist": MNIST_CLASSES, "fashion_mnist": FASHION_MNIST_CLASSES,
                   "shapes": SHAPES_CLASSES}
    return list(fixed_names[cfg.dataset])


def _to_model_range(image, random_flip):
    """uint8 image (C, H, W) in [0, 255] -> float32 in [-1, 1], mirrored left-right half the time if random_flip."""
    image = image.float() / 127.5 - 1.0
    if random_flip and torch.rand(1).item() < 0.5:
        image = image.flip(-1)  # the last axis is the width
    return image


class InMemoryImages(Dataset):
    """Images held in memory as one uint8 tensor (N, C, H, W), served resized to image_size and in [-1, 1].

    Keeping uint8 costs a quarter of the memory of float32 and makes each item a cheap tensor operation.
    """

    def __init__(self, images, labels, image_size, random_flip=False):
        self.images = images
        self.labels = labels
        self.image_size = image_size
        self.random_flip = random_flip

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        image = self.images[index]
        if image.shape[-1] != self.image_size:
            image = TF.resize(image, [self.image_size, self.image_size], antialias=True)
        return _to_model_range(image, self.random_flip), int(self.labels[index])


# --- torchvision datasets -------------------------------------------------------------------------

class _Source(NamedTuple):
    """Where a torchvision dataset comes from, for the message shown when it cannot be downloaded."""
    loader: type     # the torchvision dataset class
    title: str       # its usual name
    files: str       # the files to download by hand
    url: str         # where to download them from
    subfolder: str   # where torchvision looks for them, under data_dir


MNIST_FILES = ("train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz "
               "and t10k-labels-idx1-ubyte.gz")
SOURCES = {
    "cifar10": _Source(datasets.CIFAR10, "CIFAR-10", "cifar-10-python.tar.gz",
                       "https://www.cs.toronto.edu/~kriz/cifar.html", ""),
    "mnist": _Source(datasets.MNIST, "MNIST", MNIST_FILES, "https://ossci-datasets.s3.amazonaws.com/mnist/",
                     os.path.join("MNIST", "raw")),
    "fashion_mnist": _Source(datasets.FashionMNIST, "Fashion-MNIST", MNIST_FILES,
                             "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
                             os.path.join("FashionMNIST", "raw")),
}


def _one_line(error):
    """The gist of a download error on one line: a URLError's reason, or the last line of the message."""
    text = str(getattr(error, "reason", error)).strip()  # a URLError keeps the socket error in .reason
    return text.splitlines()[-1] if text else type(error).__name__


def _load_torchvision_dataset(cfg, train):
    """Images (N, C, H, W) uint8 and labels (N,) of CIFAR-10, MNIST or Fashion-MNIST, downloaded when missing.

    torchvision skips the download when the data, or a valid archive of it, is already in cfg.data_dir.
    MNIST's 28x28 digits are padded to 32x32 when image_size is 32 (as is usual); other sizes are resized.
    """
    source = SOURCES[cfg.dataset]
    previous_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_SECONDS)  # urllib's sockets have no timeout by default
    try:
        data = source.loader(cfg.data_dir, train=train, download=True)
    except (OSError, RuntimeError) as error:  # URLError is an OSError; MNIST wraps its errors in RuntimeError
        folder = os.path.normpath(os.path.join(cfg.data_dir, source.subfolder))
        raise DatasetError(f"could not download {source.title} ({_one_line(error)}); download {source.files} "
                           f"from {source.url} into the folder {folder} and run again, or use --dataset shapes, "
                           f"which works offline") from error
    finally:
        socket.setdefaulttimeout(previous_timeout)

    if cfg.dataset == "cifar10":
        images = torch.from_numpy(data.data).permute(0, 3, 1, 2).contiguous()  # (N, H, W, C) -> (N, C, H, W)
        return images, torch.tensor(data.targets)
    images = data.data.unsqueeze(1)  # (N, 28, 28) -> (N, 1, 28, 28)
    if cfg.image_size == 32:
        images = F.pad(images, (2, 2, 2, 2))  # black border, like the digits' own background
    return images, data.targets


# --- a folder of images ---------------------------------------------------------------------------

def _is_image_file(path):
    name = os.path.basename(path)
    # Names starting with "." are hidden files, e.g. the "._photo.jpg" files macOS leaves on USB drives.
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(path)


def _images_under(folder):
    """The image files under `folder` and its sub-folders, in a fixed (sorted) order."""
    found = []
    for root, subfolders, names in os.walk(folder):
        subfolders[:] = sorted(name for name in subfolders if not name.startswith("."))  # os.walk follows this order
        found += [os.path.join(root, name) for name in sorted(names) if _is_image_file(os.path.join(root, name))]
    return found


def _scan_folder(folder):
    """{class name: image paths} of an image folder: one class per sub-folder, or one class if it has none."""
    if not os.path.isdir(folder):
        raise DatasetError(f"the image folder {folder} does not exist; give a folder of images with --data-dir")
    entries = sorted(os.listdir(folder))
    loose_images = [os.path.join(folder, name) for name in entries if _is_image_file(os.path.join(folder, name))]
    subfolders = [name for name in entries if os.path.isdir(os.path.join(folder, name)) and not name.startswith(".")]
    classes = {name: _images_under(os.path.join(folder, name)) for name in subfolders}
    classes = {name: paths for name, paths in classes.items() if paths}  # folders without images are no class

    if classes and loose_images:
        raise DatasetError(f"the folder {folder} has both class sub-folders and loose images such as "
                           f"{os.path.basename(loose_images[0])}; move the loose images into a sub-folder")
    if not classes and not loose_images:
        raise DatasetError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in the folder {folder}")
    if not classes:
        return {os.path.basename(os.path.abspath(folder)): loose_images}
    return classes


def _unreadable(path):
    return DatasetError(f"cannot read the image file {path}: it is damaged or not an image; delete or replace it")


class FolderDataset(Dataset):
    """Any folder of images: class sub-folders (sorted by name) give labels 0, 1, ...; a flat folder is class 0.

    Each image is resized so its shorter side is image_size, center-cropped to a square, and converted
    to grayscale (channels=1) or RGB (channels=3). Images are read from disk on each access.
    """

    def __init__(self, folder, image_size, channels, random_flip=False):
        class_paths = _scan_folder(folder)
        self.classes = list(class_paths)
        self.samples = [(path, label) for label, paths in enumerate(class_paths.values()) for path in paths]
        self.image_size = image_size
        self.mode = "L" if channels == 1 else "RGB"
        self.random_flip = random_flip
        # Find a broken file now rather than hours into training; opening reads only the header, so it is quick.
        for path, _ in self.samples:
            try:
                Image.open(path).close()
            except (OSError, ValueError) as error:  # PIL's "cannot identify image file" is an OSError
                raise _unreadable(path) from error

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        path, label = self.samples[index]
        try:
            with Image.open(path) as image:
                image = image.convert(self.mode)  # decodes the pixels, so a truncated file fails here
        except (OSError, ValueError) as error:
            raise _unreadable(path) from error
        image = TF.resize(image, self.image_size, antialias=True)  # an int resizes the shorter side
        image = TF.center_crop(image, self.image_size)
        return _to_model_range(TF.pil_to_tensor(image), self.random_flip), label


# --- shapes: a small built-in dataset ---------------------------------------------------------------
# Each shape is a test on the offsets (dx, dy) of a point from the shape's centre, in pixels (y points down),
# and fills the box |dx| <= r, |dy| <= r.
SHAPES = {
    "circle": lambda dx, dy, r: dx ** 2 + dy ** 2 <= r ** 2,
    # A bit smaller than the box, so that squares look about as big as circles.
    "square": lambda dx, dy, r: (dx.abs() <= 0.8 * r) & (dy.abs() <= 0.8 * r),
    # Apex at the top centre (dy = -r), base along the bottom (dy = r): the width grows from 0 to 2r.
    "triangle": lambda dx, dy, r: (dy <= r) & (2 * dx.abs() <= dy + r),
    # A plus sign: a horizontal and a vertical bar, each 2r long and 2r/3 thick.
    "cross": lambda dx, dy, r: ((dy.abs() <= r / 3) & (dx.abs() <= r)) | ((dx.abs() <= r / 3) & (dy.abs() <= r)),
}
SHAPES_CLASSES = list(SHAPES)
SHAPES_SEEDS = {"train": 0, "test": 1}
SHAPES_LENGTHS = {"train": 10_000, "test": 2_000}
SUPERSAMPLING = 2  # each pixel's colour is the average of 2 x 2 sample points: smooth (anti-aliased) edges


def _draw_shapes(params, image_size):
    """Images (n, 3, S, S) uint8 and labels (n,) drawn from `params` (n, 11) of uniform numbers in [0, 1).

    The columns of `params` choose, in order: the shape (0), its size (1), its position (2, 3), the background
    colour (4-6), the shape's colour (7-9), and whether the background is dark or light (10).
    """
    labels = (params[:, 0] * len(SHAPES)).long().clamp(max=len(SHAPES) - 1)
    radius = image_size * (0.2 + 0.2 * params[:, 1])  # the shape is 40% to 80% of the image wide
    # Keep a 1-pixel margin so that every shape is whole.
    free_space = image_size - 2 - 2 * radius
    centre_x = 1 + radius + free_space * params[:, 2]
    centre_y = 1 + radius + free_space * params[:, 3]

    # Contrast: a dark background (channels in [0, 0.25]) under a light shape (channels in [0.5, 1]),
    # or the same colours inverted; so every colour channel of shape and background differs by at least 0.25.
    background = 0.25 * params[:, 4:7]
    foreground = 0.5 + 0.5 * params[:, 7:10]
    inverted = params[:, 10:11] < 0.5
    background = torch.where(inverted, 1 - background, background)
    foreground = torch.where(inverted, 1 - foreground, foreground)
    background = (255 * background).round()[:, :, None, None]  # (n, 3, 1, 1), whole numbers in [0, 255]
    foreground = (255 * foreground).round()[:, :, None, None]

    # Sample points at the centres of a grid SUPERSAMPLING times finer than the pixels, in pixel units.
    samples = (torch.arange(image_size * SUPERSAMPLING) + 0.5) / SUPERSAMPLING
    coverage = torch.zeros(len(params), image_size, image_size, dtype=torch.uint8)
    for label, draw in enumerate(SHAPES.values()):
        chosen = labels == label
        dx = samples[None, None, :] - centre_x[chosen, None, None]  # (n_label, 1, S * SUPERSAMPLING)
        dy = samples[None, :, None] - centre_y[chosen, None, None]  # (n_label, S * SUPERSAMPLING, 1)
        inside = draw(dx, dy, radius[chosen, None, None]).to(torch.uint8)  # (n_label, fine rows, fine columns)
        # Sample points inside each pixel: add up the SUPERSAMPLING x SUPERSAMPLING interleaved sub-grids.
        steps = range(SUPERSAMPLING)
        coverage[chosen] = sum(inside[:, row::SUPERSAMPLING, col::SUPERSAMPLING] for row in steps for col in steps)

    # Every value below is a whole number or a multiple of 1 / SUPERSAMPLING ** 2, which float32 holds exactly,
    # so the rounded result is the same on every machine.
    fraction = coverage[:, None].float() / SUPERSAMPLING ** 2  # (n, 1, S, S): how much of the pixel is shape
    images = background + (foreground - background) * fraction
    return images.round().to(torch.uint8), labels


def make_shapes(num_images, image_size=32, seed=0):
    """Images (N, 3, S, S) uint8 and labels (N,) of the shapes dataset: one random shape on a plain background.

    Image i depends only on (seed, i, image_size): each image has its own row of random numbers, drawn in
    order from one seeded generator, so a shorter dataset is the start of a longer one.
    """
    generator = torch.Generator().manual_seed(seed)
    params = torch.rand(num_images, 11, generator=generator)
    # Drawing is many small tensor operations: one thread does it in about 0.2 s, while sharing each one
    # between threads can take ten times as long when other programs keep the CPU cores busy.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        # In chunks, to bound the memory of the fine sample grids.
        drawn = [_draw_shapes(chunk, image_size) for chunk in params.split(1000)]  # [(images, labels), ...]
    finally:
        torch.set_num_threads(threads)
    return torch.cat([images for images, _ in drawn]), torch.cat([labels for _, labels in drawn])


class ShapesDataset(InMemoryImages):
    """Coloured circles, squares, triangles and crosses (labels 0-3), drawn once when the dataset is built.

    10,000 training and 2,000 test images from different seeds; the same index gives the same image on
    every run and every machine. Needs no download: the demo trains on it and the tests use it.
    """

    def __init__(self, train=True, image_size=32, random_flip=False, num_images=None):
        split = "train" if train else "test"
        if num_images is None:
            num_images = SHAPES_LENGTHS[split]
        images, labels = make_shapes(num_images, image_size, SHAPES_SEEDS[split])
        super().__init__(images, labels, image_size, random_flip)


# --- command line -----------------------------------------------------------------------------------

def main(argv=None):
    """Download or prepare the dataset of the given config flags, print what it holds, save a preview grid."""
    parser = config.add_config_flags(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
    args = parser.parse_args(argv)
    # `--dataset mnist` alone should work: take the dataset's channel count unless --channels was given.
    if args.channels is None and args.dataset in config.DATASET_CHANNELS:
        args.channels = config.DATASET_CHANNELS[args.dataset]
    try:
        cfg = config.config_from_args(args)
        train_set = build_dataset(cfg, train=True)
        # A folder has no separate test split; for the others, this also fetches the test data.
        test_set = None if cfg.dataset == "folder" else build_dataset(cfg, train=False)
        names = class_names(cfg)
    except config.UserError as error:
        config.fail(error)

    where = "built in" if cfg.dataset == "shapes" else f"in {cfg.data_dir}"
    sizes = f"{len(train_set):,} training images"
    if test_set is not None:
        sizes += f" and {len(test_set):,} test images"
    image_shape = tuple(train_set[0][0].shape)
    print(f"{cfg.dataset} ({where}): {sizes} of shape {image_shape}, {len(names)} classes: {', '.join(names)}")

    preview = torch.stack([train_set[index][0] for index in range(min(64, len(train_set)))])
    path = config.RESULTS_DIR / "images" / f"dataset_{cfg.dataset}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(preview * 0.5 + 0.5, path, nrow=8)  # save_image expects [0, 1]
    print(f"preview: {path}")


if __name__ == "__main__":
    main()
