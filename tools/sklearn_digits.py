"""Write scikit-learn's 1,797 real 8x8 handwritten digits as an image folder of 28x28 PNGs, one sub-folder per digit.

    python tools/sklearn_digits.py                     # -> data/digits/0/0000.png ... data/digits/9/...
    python train.py --preset mnist-cpu --dataset folder --data-dir data/digits --num-classes 10   # 10 CPU minutes

A development set that ships with scikit-learn (a dev-only dependency, see requirements-dev.txt), so that recipes
for real digits can be tried offline; scikit-learn's copy comes from the UCI "optical recognition of handwritten
digits" data. The 8x8 images have 17 grey levels; they are scaled up with bicubic interpolation inside a 4-pixel
black border, as MNIST centres its digits in a 20x20 box within 28x28.
"""

import argparse
from pathlib import Path

import numpy as np
from PIL import Image


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="data/digits", help="folder to write (default data/digits)")
    parser.add_argument("--size", type=int, default=28, help="image size in pixels (default 28)")
    args = parser.parse_args(argv)
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise SystemExit("error: this tool needs scikit-learn: pip install -r requirements-dev.txt")

    digits = load_digits()
    border = args.size // 7  # 4 pixels of 28
    inner = args.size - 2 * border
    out = Path(args.out)
    for index, (pixels, label) in enumerate(zip(digits.images, digits.target)):
        small = Image.fromarray(np.round(pixels * 255 / 16).astype(np.uint8))  # values 0..16 -> 0..255
        digit = small.resize((inner, inner), Image.BICUBIC)
        canvas = Image.new("L", (args.size, args.size))
        canvas.paste(digit, (border, border))
        folder = out / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        canvas.save(folder / f"{index:04d}.png")
    print(f"wrote {len(digits.images)} images of {args.size}x{args.size} to {out}/<digit>/")


if __name__ == "__main__":
    main()
