"""Build the built-in demo dataset: scikit-learn's bundled handwritten digits (1,797 real 8x8
scans, 10 classes), written as 64x64 JPEGs in the Tiny-ImageNet-200 folder layout, so the demo
runs exactly the code path real data runs. No download needed.

    python demo_data.py [--out data/demo-digits]

Each digit is upscaled to 56x56 and placed at a random offset on a 64x64 canvas with random
foreground/background colours and noise; about one in ten is saved as a grayscale JPEG (the
real dataset has ~2,000 of those). Split per class: 60 % train, 20 % labelled val, 20 % test.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from tin.data.readers import read_tiny_imagenet, write_tiny_imagenet_layout
from utils import UserError

DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def _render(digit: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """8x8 ink values in [0, 16] -> 64x64 RGB (or, one in ten, grayscale) image."""
    ink = Image.fromarray((digit * (255 / 16)).astype(np.uint8)).resize((56, 56), Image.BILINEAR)
    alpha = np.zeros((64, 64), np.float32)
    y, x = rng.integers(0, 9, size=2)
    alpha[y : y + 56, x : x + 56] = np.asarray(ink, np.float32) / 255.0
    bg, fg = rng.integers(0, 256, size=3), rng.integers(0, 256, size=3)
    while np.abs(fg.astype(int) - bg.astype(int)).sum() < 300:  # keep the digit clearly visible
        fg = rng.integers(0, 256, size=3)
    rgb = bg * (1 - alpha[..., None]) + fg * alpha[..., None] + rng.normal(0, 8, size=(64, 64, 3))
    image = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))
    return image.convert("L") if rng.random() < 0.1 else image


def make_demo_dataset(out: str | Path, seed: int = 0) -> Path:
    """Write the demo dataset to `out` (must not exist yet) and return it."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    names = {f"n090000{k:02d}": f"digit {DIGIT_NAMES[k]}" for k in range(10)}
    wnids = list(names)
    train: dict[str, list[Image.Image]] = {w: [] for w in wnids}
    val: list[tuple[Image.Image, str]] = []
    test: list[Image.Image] = []
    for k, wnid in enumerate(wnids):
        idx = rng.permutation(np.flatnonzero(digits.target == k))
        n_train, n_val = int(0.6 * len(idx)), int(0.2 * len(idx))
        for j, i in enumerate(idx):
            image = _render(digits.images[i], rng)
            if j < n_train:
                train[wnid].append(image)
            elif j < n_train + n_val:
                val.append((image, wnid))
            else:
                test.append(image)
    order = rng.permutation(len(val))  # val/test files are not grouped by class, as in the real data
    val = [val[i] for i in order]
    test = [test[i] for i in rng.permutation(len(test))]
    return write_tiny_imagenet_layout(out, names, train, val, test)


def ensure_demo_dataset(out: str | Path) -> Path:
    """Build the demo dataset unless a valid one is already there."""
    out = Path(out)
    if out.exists():
        read_tiny_imagenet(out)  # raises a clear error if the folder is not a dataset
        print(f"demo dataset already present: {out}")
        return out
    make_demo_dataset(out)
    data = read_tiny_imagenet(out)
    print(
        f"demo dataset written to {out}: {len(data.classes)} classes, {len(data.train.paths)} train, "
        f"{len(data.val.paths)} val, {len(data.test.paths)} test images"
    )
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="data/demo-digits", help="folder to create")
    try:
        ensure_demo_dataset(parser.parse_args().out)
    except UserError as exc:
        sys.exit(f"error: {exc}")
