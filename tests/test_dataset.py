"""dataset.py: the built-in shapes data, image folders, MNIST from local files, and clear errors for missing data."""

import hashlib
import socket

import numpy as np
import pytest
import torch
from PIL import Image

import config
import dataset
from dataset import DatasetError, ShapesDataset, build_dataset, class_names


def shapes_32_config(**overrides):
    """The demo's data config at 32x32 (attention at 16x16, which a 32x32 two-level U-Net has)."""
    return config.get_config("demo", image_size=32, attn_resolutions=(16,), **overrides)


@pytest.fixture(scope="module")
def shapes_train():
    return ShapesDataset(train=True)


@pytest.fixture
def no_network(monkeypatch):
    """Make every connection fail at once, as on a machine without internet (whether this one has it or not)."""
    def refuse(*args, **kwargs):
        raise OSError("network blocked by the test")
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


# --- shapes ----------------------------------------------------------------------------------------

def test_shapes_items_are_float_images_in_minus_one_to_one(shapes_train):
    items = [shapes_train[index] for index in range(256)]
    images = torch.stack([image for image, _ in items])
    assert images.dtype == torch.float32
    assert images.shape == (256, 3, 32, 32)
    assert images.min() >= -1 and images.max() <= 1
    assert images.min() < -0.9 and images.max() > 0.9  # the whole range is used, not only [0, 1]
    assert all(type(label) is int for _, label in items)


def test_shapes_has_four_balanced_classes(shapes_train):
    assert len(shapes_train) == 10_000
    assert class_names(config.get_config("demo")) == ["circle", "square", "triangle", "cross"]
    counts = torch.bincount(shapes_train.labels, minlength=4)
    assert len(counts) == 4
    assert counts.min() > 2_000 and counts.max() < 3_000  # about 2,500 each


def test_shapes_and_backgrounds_contrast(shapes_train):
    # Every image has pixels of the shape and of the background, at least 0.25 * 255 apart in every channel.
    images = shapes_train.images.int()  # (N, 3, H, W) uint8 -> int
    spread = images.amax(dim=(2, 3)) - images.amin(dim=(2, 3))
    assert spread.min() >= 63


def test_shapes_are_the_same_every_time(shapes_train):
    shorter = ShapesDataset(train=True, num_images=100)
    assert torch.equal(shorter.images, shapes_train.images[:100])
    assert torch.equal(shorter.labels, shapes_train.labels[:100])
    # The same bytes on every machine. If you change the drawing on purpose, update this number.
    digest = hashlib.sha256(shapes_train.images[:64].numpy().tobytes()).hexdigest()
    assert digest[:16] == "4da99bd9f0816dda"


def test_shapes_train_and_test_splits_differ(shapes_train):
    test = ShapesDataset(train=False)
    assert len(test) == 2_000
    differs = (test.images[:100] != shapes_train.images[:100]).flatten(1).any(dim=1)
    assert differs.all()


def test_shapes_image_size_is_followed():
    cfg = config.get_config("demo", image_size=16)
    image, _ = build_dataset(cfg)[0]
    assert image.shape == (3, 16, 16)


def test_random_flip_mirrors_training_images_only():
    plain = ShapesDataset(train=True, num_images=16)
    # A shape off the centre of its image, so that its mirror image is a different image.
    index = next(i for i in range(16) if not torch.equal(plain[i][0], plain[i][0].flip(-1)))
    original = plain[index][0]
    mirrored = original.flip(-1)

    torch.manual_seed(0)
    train_set = build_dataset(shapes_32_config(random_flip=True), train=True)
    draws = [train_set[index][0] for _ in range(30)]
    assert all(torch.equal(draw, original) or torch.equal(draw, mirrored) for draw in draws)
    assert any(torch.equal(draw, original) for draw in draws)
    assert any(torch.equal(draw, mirrored) for draw in draws)

    test_set = build_dataset(shapes_32_config(random_flip=True), train=False)
    assert all(torch.equal(test_set[index][0], test_set[index][0]) for _ in range(10))
    no_flip_set = build_dataset(shapes_32_config(random_flip=False), train=True)
    assert all(torch.equal(no_flip_set[index][0], original) for _ in range(10))


# --- a folder of images ----------------------------------------------------------------------------

def make_image_folder(root):
    """Two classes: apples (a gray portrait and a red|green|blue landscape) and bananas (a blue square)."""
    (root / "apples").mkdir(parents=True)
    (root / "bananas").mkdir()
    Image.new("L", (20, 50), color=200).save(root / "apples" / "gray.png")
    stripes = np.zeros((20, 60, 3), dtype=np.uint8)  # (H, W, C): red left, green middle, blue right
    stripes[:, :15, 0] = 255
    stripes[:, 15:45, 1] = 255
    stripes[:, 45:, 2] = 255
    Image.fromarray(stripes).save(root / "apples" / "wide.png")
    Image.new("RGB", (33, 33), color=(0, 0, 255)).save(root / "bananas" / "blue.png")
    # Neither of these is an image of the dataset: a text file, and a hidden macOS "._" file.
    (root / "notes.txt").write_text("not an image")
    (root / "apples" / "._wide.png").write_bytes(b"macOS metadata")
    return root


def folder_config(root, **overrides):
    return config.get_config("demo", dataset="folder", data_dir=str(root), image_size=16, random_flip=False,
                             **overrides)


def test_folder_gives_labels_by_subfolder_resized_and_center_cropped(tmp_path):
    cfg = folder_config(make_image_folder(tmp_path))
    folder_set = build_dataset(cfg)
    assert class_names(cfg) == ["apples", "bananas"]
    assert len(folder_set) == 3
    items = [folder_set[index] for index in range(3)]
    assert [label for _, label in items] == [0, 0, 1]  # apples/gray, apples/wide, bananas/blue
    for image, _ in items:
        assert image.dtype == torch.float32 and image.shape == (3, 16, 16)
        assert image.min() >= -1 and image.max() <= 1

    gray, wide, blue = (image for image, _ in items)
    assert torch.allclose(gray, torch.full_like(gray, 200 / 127.5 - 1), atol=0.02)
    # 60x20 -> 48x16, then the central 16x16: only the green middle stripe is left.
    assert torch.allclose(wide, torch.tensor([-1.0, 1.0, -1.0]).view(3, 1, 1).expand(3, 16, 16), atol=0.02)
    assert torch.allclose(blue, torch.tensor([-1.0, -1.0, 1.0]).view(3, 1, 1).expand(3, 16, 16), atol=0.02)


def test_folder_is_grayscale_with_one_channel(tmp_path):
    folder_set = build_dataset(folder_config(make_image_folder(tmp_path), channels=1))
    gray = folder_set[0][0]
    blue = folder_set[2][0]
    assert gray.shape == (1, 16, 16) and blue.shape == (1, 16, 16)
    assert torch.allclose(gray, torch.full_like(gray, 200 / 127.5 - 1), atol=0.02)
    assert torch.allclose(blue, torch.full_like(blue, 29 / 127.5 - 1), atol=0.02)  # PIL: L = 0.114 * 255 for blue


def test_flat_folder_is_one_class(tmp_path):
    flat = tmp_path / "pictures"
    flat.mkdir()
    for index in range(3):
        Image.new("RGB", (24, 24), color=(index * 100, 0, 0)).save(flat / f"{index}.png")
    cfg = folder_config(flat)
    assert class_names(cfg) == ["pictures"]
    assert [label for _, label in build_dataset(cfg)] == [0, 0, 0]


def folder_error(cfg):
    with pytest.raises(DatasetError) as caught:
        build_dataset(cfg)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_folder_errors_say_what_is_wrong(tmp_path):
    missing = tmp_path / "missing"
    message = folder_error(folder_config(missing))
    assert "does not exist" in message and str(missing) in message

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images here")
    assert "no images" in folder_error(folder_config(empty))

    root = make_image_folder(tmp_path / "fruit")
    message = folder_error(folder_config(root, num_classes=3))
    assert "2 class" in message and "num_classes is 3" in message and "--num-classes 2" in message

    Image.new("RGB", (8, 8)).save(root / "loose.png")
    assert "loose.png" in folder_error(folder_config(root))
    (root / "loose.png").unlink()

    (root / "bananas" / "broken.png").write_bytes(b"this is not a PNG file")
    assert "broken.png" in folder_error(folder_config(root))


# --- torchvision datasets --------------------------------------------------------------------------

def write_idx(path, array):
    """Write a uint8 array in the IDX format of the MNIST files: a magic number, the sizes, the bytes."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(size.to_bytes(4, "big") for size in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def write_fake_mnist(root, folder_name):
    """Three all-white 28x28 'digits' labelled 3, 1, 4, as torchvision leaves MNIST after extracting it."""
    raw = root / folder_name / "raw"
    raw.mkdir(parents=True)
    for split in ("train", "t10k"):
        write_idx(raw / f"{split}-images-idx3-ubyte", np.full((3, 28, 28), 255))
        write_idx(raw / f"{split}-labels-idx1-ubyte", np.array([3, 1, 4]))


@pytest.mark.parametrize("name, folder_name", [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_mnist_is_padded_to_32_or_resized(tmp_path, no_network, name, folder_name):
    write_fake_mnist(tmp_path, folder_name)
    padded_set = build_dataset(config.get_config("mnist", dataset=name, data_dir=str(tmp_path)))
    assert len(padded_set) == 3
    assert [label for _, label in padded_set] == [3, 1, 4]
    image = padded_set[0][0]
    assert image.dtype == torch.float32 and image.shape == (1, 32, 32)
    assert torch.all(image[:, 2:30, 2:30] == 1)  # the digit
    image[:, 2:30, 2:30] = -1
    assert torch.all(image == -1)  # a 2-pixel black border

    resized_set = build_dataset(config.get_config("mnist", dataset=name, data_dir=str(tmp_path), image_size=16))
    image = resized_set[0][0]
    assert image.shape == (1, 16, 16) and image.min() > 0.99  # all digit, no border
    assert len(class_names(config.get_config("mnist", dataset=name))) == 10


def test_cifar10_without_network_says_what_to_download(tmp_path, no_network):
    with pytest.raises(DatasetError) as caught:
        build_dataset(config.get_config("cifar10", data_dir=str(tmp_path)))
    message = str(caught.value)
    assert "\n" not in message
    assert "cifar-10-python.tar.gz" in message and "https://www.cs.toronto.edu/~kriz/cifar.html" in message
    assert str(tmp_path) in message and "--dataset shapes" in message
    assert socket.getdefaulttimeout() is None  # the download timeout does not outlive the download
    assert class_names(config.get_config("cifar10")) == dataset.CIFAR10_CLASSES


# --- command line ----------------------------------------------------------------------------------

def test_main_prints_one_line_error_and_exits_nonzero(tmp_path, no_network, capsys):
    with pytest.raises(SystemExit) as caught:
        dataset.main(["--dataset", "cifar10", "--data-dir", str(tmp_path)])
    assert caught.value.code != 0
    error_output = capsys.readouterr().err
    assert error_output.startswith("error: could not download CIFAR-10") and error_output.count("\n") == 1


def test_main_describes_the_data_and_saves_a_preview(tmp_path, no_network, monkeypatch, capsys):
    write_fake_mnist(tmp_path, "MNIST")
    monkeypatch.chdir(tmp_path)
    dataset.main(["--dataset", "mnist", "--data-dir", str(tmp_path)])  # channels=1 follows from the dataset
    output = capsys.readouterr().out
    assert "3 training images and 3 test images of shape (1, 32, 32), 10 classes" in output
    preview = Image.open(tmp_path / "results" / "images" / "dataset_mnist.png")
    assert preview.size == (3 * 34 + 2, 34 + 2)  # one row of three 32x32 images, 2-pixel gaps around each
