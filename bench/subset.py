"""A Tiny-ImageNet layout of a few classes, for measurements that must be short.

    python -m bench.subset --classes 20 --out data/tin20 [--data_dir data/tiny-imagenet-200] [--test_images 200]

Every k-th wnid of the sorted list (k = 200 // classes: the same classes as bench/lr_recipes.py's
figures), their train images and val lines, and the unlabelled test split (all of it, or its first
--test_images files: a run predicts every test image, which a short measurement need not pay for),
as symbolic links to the real files (a few MB). Run again, it returns the folder as it is.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def make_subset(root: Path, classes: int, dest: Path, test_images: int = 0) -> Path:
    """`dest`: the layout of `classes` classes of the dataset at `root` (symbolic links); the first
    `test_images` test files (0: the whole test folder)."""
    wnids = sorted(w.strip() for w in (root / "wnids.txt").read_text().split() if w.strip())
    keep = wnids[:: max(1, len(wnids) // classes)][:classes]
    if (dest / "wnids.txt").is_file():
        return dest
    (dest / "train").mkdir(parents=True, exist_ok=True)
    (dest / "val" / "images").mkdir(parents=True, exist_ok=True)
    (dest / "test").mkdir(parents=True, exist_ok=True)
    for w in keep:
        link = dest / "train" / w
        if not link.exists():
            link.symlink_to((root / "train" / w).resolve())
    lines = [ln for ln in (root / "val" / "val_annotations.txt").read_text().splitlines() if ln.split("\t")[1] in keep]
    for ln in lines:
        name = ln.split("\t")[0]
        link = dest / "val" / "images" / name
        if not link.exists():
            link.symlink_to((root / "val" / "images" / name).resolve())
    (dest / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    test = dest / "test" / "images"
    if not test_images and not test.exists():
        test.symlink_to((root / "test" / "images").resolve())
    elif test_images:
        test.mkdir(exist_ok=True)
        for image in sorted((root / "test" / "images").iterdir())[:test_images]:
            if not (test / image.name).exists():
                (test / image.name).symlink_to(image.resolve())
    words = root / "words.txt"
    if words.is_file():
        (dest / "words.txt").write_text(words.read_text())
    (dest / "wnids.txt").write_text("\n".join(keep) + "\n")  # last: its presence means complete
    return dest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="A Tiny-ImageNet layout of a few classes (symbolic links).")
    p.add_argument("--data_dir", default="data/tiny-imagenet-200", help="the full dataset")
    p.add_argument("--classes", type=int, default=20, help="how many classes (every k-th wnid)")
    p.add_argument("--out", required=True, help="the subset's folder, e.g. data/tin20")
    p.add_argument("--test_images", type=int, default=0, help="link only the first N test images (0: all)")
    args = p.parse_args(argv)
    root = Path(args.data_dir)
    if not (root / "wnids.txt").is_file():
        print(f"error: {root} holds no wnids.txt; pass the Tiny-ImageNet folder as --data_dir", file=sys.stderr)
        return 2
    dest = make_subset(root, args.classes, Path(args.out), args.test_images)
    print(f"{dest}: {args.classes} classes of {root} (links); train with --data_dir {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
