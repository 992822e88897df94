"""Prompt following of a text-conditional model on the captioned shapes: read each image's shape, colour and
position back, and compare them with its prompt.

    colour, position   exact geometry: the background is the median colour of the image's border; the shape is the
                       pixels far from it; its colour is the median of those farthest from it, named by the
                       nearest of CAPTION_COLOURS; its position is the centre of their bounding box: in the
                       middle when that is near the image's centre, else the corner on its side
    shape              the classifier of quality.py, trained on the captioned shapes' own images and shape labels

    accuracy           the fraction of images whose shape, colour and position all match the prompt; also each
                       attribute alone, and the same over the prompts of HELD_OUT_PAIRS (never seen in training)

    python prompts.py --image-size 16       # the real test images read back: the best a model can score

Imports config, dataset and quality; no script.
"""

import argparse

import torch

import config
import dataset as datasets
import quality

ATTRIBUTES = ("shape", "colour", "position")
FAR_FROM_BACKGROUND = 0.25 * 255  # a pixel is part of the shape when its colour is this far from the background's


def load_shape_metric(cfg, log=print):
    """The quality metric of the captioned shapes at cfg's image size: its classifier reads the shape."""
    return quality.load_metric(cfg, log=log)


def middle_threshold(image_size):
    """How far (pixels) a centroid may be from the image's centre and still be "in the middle": halfway between
    the farthest a middle shape's centre lies and the nearest a corner shape's does, for the large shapes, whose
    free space is smallest. A centre lies free_space * (where - 0.5) from the image's centre (make_captioned_shapes),
    where `where` is in [0.5 - jitter, 0.5 + jitter] in the middle and in [0, 2 jitter] or [1 - 2 jitter, 1] at a
    side."""
    free_space = image_size - 2 - 2 * image_size * max(datasets.CAPTION_SIZES.values())
    jitter = datasets.POSITION_JITTER
    return free_space * (jitter + (0.5 - 2 * jitter)) / 2


def read_colour_and_position(images):
    """(colour, position) indices (N,) each, into CAPTION_COLOURS and CAPTION_POSITIONS, of uint8 images
    (N, 3, H, W); -1 where no pixel stands out from the background."""
    pixels = images.float()  # (N, 3, H, W)
    border = torch.cat([pixels[:, :, 0], pixels[:, :, -1], pixels[:, :, :, 0], pixels[:, :, :, -1]], dim=2)
    background = border.median(dim=2).values  # (N, 3)
    shape_mask = (pixels - background[:, :, None, None]).norm(dim=1) > FAR_FROM_BACKGROUND  # (N, H, W)

    palette = torch.tensor(list(datasets.CAPTION_COLOURS.values()), dtype=torch.float32)  # (K, 3)
    names = list(datasets.CAPTION_POSITIONS)
    size = images.shape[-1]
    ys, xs = torch.meshgrid(torch.arange(size, dtype=torch.float32) + 0.5,
                            torch.arange(size, dtype=torch.float32) + 0.5, indexing="ij")
    threshold = middle_threshold(size)
    colours = torch.full((len(images),), -1, dtype=torch.long)
    positions = torch.full((len(images),), -1, dtype=torch.long)
    for index in range(len(images)):
        chosen = shape_mask[index]
        if not chosen.any():
            continue
        # The median of the pixels that stand out most: edge pixels blend the colour with the background's.
        distance = (pixels[index] - background[index, :, None, None]).norm(dim=0)  # (H, W)
        core = chosen & (distance >= 0.8 * distance[chosen].max())
        colour = pixels[index][:, core].median(dim=1).values  # (3,)
        colours[index] = (palette - colour).norm(dim=1).argmin()
        # The centre of the bounding box, which is the shape's centre for every shape (a triangle's centroid is not).
        dx = (xs[chosen].min() + xs[chosen].max()).item() / 2 - size / 2
        dy = (ys[chosen].min() + ys[chosen].max()).item() / 2 - size / 2
        if max(abs(dx), abs(dy)) < threshold:
            positions[index] = names.index("in the middle")
        else:
            vertical = "bottom" if dy > 0 else "top"
            horizontal = "right" if dx > 0 else "left"
            positions[index] = names.index(f"at the {vertical} {horizontal}")
    return colours, positions


def read_attributes(images, shape_metric):
    """(N, 3) indices of the shape, colour and position read from uint8 images (N, 3, H, W) or (N, H, W, 3)."""
    images = quality.to_classifier_layout(images, shape_metric.image_shape)
    _, probabilities = quality.run_classifier(shape_metric.classifier, images)
    colours, positions = read_colour_and_position(images)
    return torch.stack([probabilities.argmax(dim=1), colours, positions], dim=1)


def held_out(attributes):
    """(N,) bool: whether each (shape, colour) of attributes (N, >= 2) is one of HELD_OUT_PAIRS."""
    colours = list(datasets.CAPTION_COLOURS)
    pairs = {(datasets.SHAPES_CLASSES.index(shape), colours.index(colour)) for shape, colour in datasets.HELD_OUT_PAIRS}
    return torch.tensor([(shape, colour) in pairs for shape, colour in attributes[:, :2].tolist()], dtype=torch.bool)


def prompt_accuracy(read, asked):
    """{name: fraction} comparing attributes read (N, 3) with those asked for (N, >= 4: shape, colour, size,
    position, ...): prompt_accuracy (all three right) and each attribute's accuracy, over all prompts, then the same
    over the held-out and the seen prompts (None when there are none)."""
    asked = torch.stack([asked[:, 0], asked[:, 1], asked[:, 3]], dim=1)  # shape, colour, position
    right = read == asked  # (N, 3)
    unseen = held_out(asked)
    result = {}
    for group, chosen in (("", torch.ones_like(unseen)), ("_seen", ~unseen), ("_held_out", unseen)):
        count = int(chosen.sum())
        result[f"prompt_accuracy{group}"] = float(right[chosen].all(dim=1).double().mean()) if count else None
        if not group:
            for column, name in enumerate(ATTRIBUTES):
                result[f"{name}_accuracy"] = float(right[:, column].double().mean())
    return result


def main(argv=None):
    """Read back the real test images of the captioned shapes: the best prompt accuracy a model can score."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--image-size", type=int, default=16, help="image size of the captioned shapes (default 16)")
    args = parser.parse_args(argv)
    if args.image_size < 8:
        config.fail(f"--image-size must be at least 8, got {args.image_size}")
    cfg = config.get_config("demo", image_size=args.image_size, text_encoder="transformer",
                            channel_mults=(1,), attn_resolutions=())
    metric = load_shape_metric(cfg)
    test = datasets.CaptionedShapes(train=False, image_size=args.image_size)
    scores = prompt_accuracy(read_attributes(test.images, metric), test.attributes)
    print(f"captioned shapes at {args.image_size}px, the {len(test):,} real test images read back:")
    print("   ".join(f"{name} {value:.4f}" for name, value in scores.items()))


if __name__ == "__main__":
    main()
