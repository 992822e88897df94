"""Datasets: every dataset yields (image, label), the image a float32 tensor (C, H, W) in [-1, 1], the label an int.

    cifar10, mnist, fashion_mnist   read through torchvision, downloaded into cfg.data_dir when missing
    folder                          any folder of images at cfg.data_dir; class sub-folders become labels
    shapes                          built in: coloured circles, squares, triangles and crosses, drawn from a
                                    fixed seed, so it needs no download and is the same on every machine

A text-conditional config (--text-encoder) makes them yield (image, caption) instead: `shapes` draws shapes of
named colours, sizes and positions with their captions ("a small red triangle at the top left on a white
background"), some (shape, colour) pairs held out of the training split; a `folder` reads each image's caption
from the .txt file beside it or from one captions.jsonl.

Run it to download or prepare a dataset and save a grid of its images:

    python dataset.py --dataset cifar10
    python dataset.py --dataset folder --data-dir path/to/images --image-size 64
    python dataset.py --dataset shapes --text-encoder transformer     # the captioned shapes, and some captions
"""

import argparse
import contextlib
import json
import os
import re
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
    """The dataset named by cfg.dataset, yielding (image, label): float32 (C, H, W) in [-1, 1] and an int; for a
    text-conditional config (cfg.captioned), (image, caption) with a string, and a `captions` list of them all.

    Training sets flip images left-right at random when cfg.random_flip; test sets never do (a `folder`
    has no test split: train=False gives the same images, unflipped). Raises DatasetError for missing data.
    """
    random_flip = cfg.random_flip and train
    if cfg.dataset == "shapes" and cfg.captioned:
        return CaptionedShapes(train=train, image_size=cfg.image_size, random_flip=random_flip)
    if cfg.dataset == "shapes":
        return ShapesDataset(train=train, image_size=cfg.image_size, random_flip=random_flip)
    if cfg.dataset == "folder":
        folder_set = FolderDataset(cfg.data_dir, cfg.image_size, cfg.channels, random_flip, captions=cfg.captioned)
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
    With captions=True it yields (image, caption) instead, the captions read by read_captions.
    """

    def __init__(self, folder, image_size, channels, random_flip=False, captions=False):
        class_paths = _scan_folder(folder)
        self.classes = list(class_paths)
        self.samples = [(path, label) for label, paths in enumerate(class_paths.values()) for path in paths]
        self.captions = read_captions(folder, [path for path, _ in self.samples]) if captions else None
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
        if self.captions is None:
            return _to_model_range(TF.pil_to_tensor(image), self.random_flip), label
        image = _to_model_range(TF.pil_to_tensor(image), False)
        caption = self.captions[index]
        if self.random_flip and torch.rand(1).item() < 0.5:
            image = image.flip(-1)
            caption = mirror_caption(caption)
        return image, caption


CAPTIONS_FILE = "captions.jsonl"


def _read_text(path):
    """The text of a UTF-8 file; DatasetError when it cannot be read."""
    try:
        with open(path, encoding="utf-8") as text_file:
            return text_file.read()
    except OSError as error:
        raise DatasetError(f"cannot read {path} ({error.strerror})") from None
    except UnicodeDecodeError:
        raise DatasetError(f"cannot read {path}: it is not UTF-8 text") from None


def read_captions(folder, paths):
    """The caption of each image in `paths`: from FOLDER/captions.jsonl when it exists (one JSON object per line,
    {"file_name": path relative to the folder, "text": caption}), else from the text file beside each image
    (photo.png -> photo.txt). An empty caption is allowed: that image trains the unconditional prediction.
    Raises DatasetError naming the first image without a caption, or the line or file that is wrong."""
    jsonl = os.path.join(folder, CAPTIONS_FILE)
    if os.path.isfile(jsonl):
        found = {}
        for number, line in enumerate(_read_text(jsonl).splitlines(), 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                name, caption = os.path.normpath(entry["file_name"]), entry["text"]
            except (ValueError, KeyError, TypeError):
                name, caption = None, None
            if not isinstance(caption, str):
                raise DatasetError(f"line {number} of {jsonl} is not a JSON object with a \"file_name\" and a "
                                   f"\"text\" string: {line.strip()[:80]}")
            if name in found:
                raise DatasetError(f"line {number} of {jsonl} gives {entry['file_name']} a second caption; give "
                                   f"each image one line")
            found[name] = caption
        captions = [found.get(os.path.normpath(os.path.relpath(path, folder))) for path in paths]
        missing = [path for path, caption in zip(paths, captions) if caption is None]
        if missing:
            raise DatasetError(f"{len(missing)} image(s) have no caption in {jsonl}, the first "
                               f"{os.path.relpath(missing[0], folder)}; add a line for each")
        return captions
    captions = []
    for path in paths:
        text_file = os.path.splitext(path)[0] + ".txt"
        if not os.path.isfile(text_file):
            raise DatasetError(f"the image {path} has no caption: write it into {text_file}, or give every image "
                               f"a line in {jsonl}")
        captions.append(_read_text(text_file).strip())
    return captions


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
    background = (255 * background).round()
    foreground = (255 * foreground).round()
    return _render_shapes(labels, radius, centre_x, centre_y, background, foreground, image_size), labels


def _render_shapes(labels, radius, centre_x, centre_y, background, foreground, image_size):
    """Images (n, 3, S, S) uint8: shape labels[i] of `radius` at (centre_x, centre_y) in pixels, filled with
    `foreground` (n, 3) on `background` (n, 3), both whole numbers in [0, 255]; edges anti-aliased."""
    background = background[:, :, None, None]  # (n, 3, 1, 1)
    foreground = foreground[:, :, None, None]
    # Sample points at the centres of a grid SUPERSAMPLING times finer than the pixels, in pixel units.
    samples = (torch.arange(image_size * SUPERSAMPLING) + 0.5) / SUPERSAMPLING
    coverage = torch.zeros(len(labels), image_size, image_size, dtype=torch.uint8)
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
    return images.round().to(torch.uint8)


@contextlib.contextmanager
def _one_thread():
    """Run the block on one thread. Drawing is many small tensor operations: one thread does it in about 0.2 s,
    while sharing each one between threads can take ten times as long when other programs keep the cores busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def make_shapes(num_images, image_size=32, seed=0):
    """Images (N, 3, S, S) uint8 and labels (N,) of the shapes dataset: one random shape on a plain background.

    Image i depends only on (seed, i, image_size): each image has its own row of random numbers, drawn in
    order from one seeded generator, so a shorter dataset is the start of a longer one.
    """
    generator = torch.Generator().manual_seed(seed)
    params = torch.rand(num_images, 11, generator=generator)
    with _one_thread():
        # In chunks, to bound the memory of the fine sample grids.
        drawn = [_draw_shapes(chunk, image_size) for chunk in params.split(1000)]  # [(images, labels), ...]
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


# --- captioned shapes: the built-in data of text-conditional models --------------------------------------
# Each image is one shape of a named colour, size and position on a plain background, with its caption, e.g.
# "a small red triangle at the top left on a white background". Some (shape, colour) pairs never occur in the
# training split, so that a model's prompts of them measure how it generalises; the test split has every pair.
CAPTION_COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 90, 230), "yellow": (235, 205, 40),
                   "purple": (150, 60, 200)}
CAPTION_BACKGROUNDS = {"black": (20, 20, 20), "gray": (128, 128, 128), "white": (235, 235, 235)}
CAPTION_SIZES = {"small": 0.2, "large": 0.3}  # the radius, as a fraction of the image size
# Where the shape's centre lies in the free space (0 = touching the left or top margin, 1 = the other side).
CAPTION_POSITIONS = {"at the top left": (0.0, 0.0), "at the top right": (1.0, 0.0), "at the bottom left": (0.0, 1.0),
                     "at the bottom right": (1.0, 1.0), "in the middle": (0.5, 0.5)}
HELD_OUT_PAIRS = (("circle", "yellow"), ("square", "blue"), ("triangle", "green"), ("cross", "red"))
POSITION_JITTER = 0.05  # of the free space, either way
CAPTIONED_CLASSIFIER_SEED = 2  # the images, of every pair, that quality.py's classifier of the captioned shapes sees


def shape_caption(shape, colour, size, position, background):
    """The caption of one captioned shape, from the names of its attributes."""
    return f"a {size} {colour} {shape} {position} on a {background} background"


def make_captioned_shapes(num_images, image_size=32, seed=0, held_out=False):
    """Images (N, 3, S, S) uint8, captions (N strings) and attributes (N, 5) int64 of the captioned shapes: per
    image the indices of its shape, colour, size, position and background in SHAPES_CLASSES, CAPTION_COLOURS,
    CAPTION_SIZES, CAPTION_POSITIONS and CAPTION_BACKGROUNDS. held_out=False leaves out HELD_OUT_PAIRS; True draws
    every (shape, colour) pair. Image i depends only on (seed, i, image_size, held_out)."""
    colours = list(CAPTION_COLOURS)
    pairs = [(shape, colour) for shape in range(len(SHAPES)) for colour in range(len(colours))
             if held_out or (SHAPES_CLASSES[shape], colours[colour]) not in HELD_OUT_PAIRS]
    generator = torch.Generator().manual_seed(seed)
    params = torch.rand(num_images, 6, generator=generator)
    pair = torch.tensor(pairs)[(params[:, 0] * len(pairs)).long().clamp(max=len(pairs) - 1)]  # (N, 2)
    size = (params[:, 1] * len(CAPTION_SIZES)).long().clamp(max=len(CAPTION_SIZES) - 1)
    position = (params[:, 2] * len(CAPTION_POSITIONS)).long().clamp(max=len(CAPTION_POSITIONS) - 1)
    background = (params[:, 3] * len(CAPTION_BACKGROUNDS)).long().clamp(max=len(CAPTION_BACKGROUNDS) - 1)
    attributes = torch.stack([pair[:, 0], pair[:, 1], size, position, background], dim=1)

    radius = image_size * torch.tensor(list(CAPTION_SIZES.values()))[size]
    free_space = image_size - 2 - 2 * radius  # a 1-pixel margin, as in the plain shapes
    where = torch.tensor(list(CAPTION_POSITIONS.values()))[position]  # (N, 2): x, y in [0, 1]
    jitter = POSITION_JITTER * (2 * params[:, 4:6] - 1)
    where = (where * (1 - 2 * POSITION_JITTER) + POSITION_JITTER + jitter).clamp(0, 1)
    centre_x = 1 + radius + free_space * where[:, 0]
    centre_y = 1 + radius + free_space * where[:, 1]
    foreground = torch.tensor(list(CAPTION_COLOURS.values()), dtype=torch.float32)[pair[:, 1]]
    backdrop = torch.tensor(list(CAPTION_BACKGROUNDS.values()), dtype=torch.float32)[background]
    with _one_thread():
        images = torch.cat([_render_shapes(*chunk, image_size) for chunk in zip(
            *(part.split(1000) for part in (pair[:, 0], radius, centre_x, centre_y, backdrop, foreground)))])
    names = [SHAPES_CLASSES, colours, list(CAPTION_SIZES), list(CAPTION_POSITIONS), list(CAPTION_BACKGROUNDS)]
    captions = [shape_caption(*(names[k][index] for k, index in enumerate(row))) for row in attributes.tolist()]
    return images, captions, attributes


MIRRORED_WORDS = {"left": "right", "right": "left"}


def mirror_caption(caption):
    """The caption of the image flipped left-right: the words "left" and "right" swap places, in any case
    ("Left" becomes "Right", "LEFT" becomes "RIGHT")."""
    def mirrored(match):
        word = match.group(0)
        swapped = MIRRORED_WORDS[word.lower()]
        return swapped.upper() if word.isupper() else swapped.capitalize() if word[0].isupper() else swapped
    return re.sub(r"\b(left|right)\b", mirrored, caption, flags=re.IGNORECASE)


class CaptionedImages(InMemoryImages):
    """Images held in memory with a caption each: yields (image in [-1, 1], caption). A random flip mirrors the
    caption too ("left" and "right" swap)."""

    def __init__(self, images, captions, image_size, random_flip=False):
        super().__init__(images, torch.zeros(len(images), dtype=torch.long), image_size, random_flip=False)
        self.captions = list(captions)
        self.flip_captions = random_flip

    def __getitem__(self, index):
        image, _ = super().__getitem__(index)
        caption = self.captions[index]
        if self.flip_captions and torch.rand(1).item() < 0.5:
            image = image.flip(-1)
            caption = mirror_caption(caption)
        return image, caption


class CaptionedShapes(CaptionedImages):
    """The captioned shapes: 10,000 training images without the held-out (shape, colour) pairs, 2,000 test images
    with every pair, from the seeds of the plain shapes; `attributes` holds each image's attribute indices."""

    def __init__(self, train=True, image_size=32, random_flip=False, num_images=None):
        split = "train" if train else "test"
        images, captions, self.attributes = make_captioned_shapes(
            num_images or SHAPES_LENGTHS[split], image_size, SHAPES_SEEDS[split], held_out=not train)
        super().__init__(images, captions, image_size, random_flip)


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
        names = [] if cfg.captioned else class_names(cfg)
    except config.UserError as error:
        config.fail(error)

    where = "built in" if cfg.dataset == "shapes" else f"in {cfg.data_dir}"
    sizes = f"{len(train_set):,} training images"
    if test_set is not None:
        sizes += f" and {len(test_set):,} test images"
    image_shape = tuple(train_set[0][0].shape)
    if cfg.captioned:
        print(f"{cfg.dataset} ({where}): {sizes} of shape {image_shape}, with captions such as:")
        for caption in train_set.captions[:4]:
            print(f"  {caption!r}")
    else:
        print(f"{cfg.dataset} ({where}): {sizes} of shape {image_shape}, {len(names)} classes: {', '.join(names)}")

    preview = torch.stack([train_set[index][0] for index in range(min(64, len(train_set)))])
    path = config.RESULTS_DIR / "images" / f"dataset_{cfg.dataset}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(preview * 0.5 + 0.5, path, nrow=8)  # save_image expects [0, 1]
    print(f"preview: {path}")


if __name__ == "__main__":
    main()
