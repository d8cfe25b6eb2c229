"""Datasets and loaders: the Tiny-ImageNet-200 folder layout, the image dataset, and loaders that
deliver each epoch's augmentation strength to persistent worker processes.

Layout read (the official one)::

    ROOT/wnids.txt                      one wnid per line (e.g. n01443537)
    ROOT/words.txt                      wnid<TAB>human-readable names (optional here)
    ROOT/train/<wnid>/images/*.JPEG     500 per class in the real data
    ROOT/val/images/*.JPEG + ROOT/val/val_annotations.txt   (file<TAB>wnid<TAB>box...)
    ROOT/test/images/*.JPEG             unlabelled

Class index = position of the wnid in the *sorted* wnid list (not wnids.txt order), so indices
are stable however wnids.txt is ordered. Grayscale (and any non-RGB) images are converted to RGB.
"""

from __future__ import annotations

import logging
import random
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler

import transforms
from utils import UserError

# Set in the parent before any cv2 work: calling it inside a worker after the parent used cv2
# has hung workers on this project's machines. One thread per worker; parallelism = workers.
cv2.setNumThreads(1)

log = logging.getLogger("tin")

IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png", ".bmp", ".webp"}
GET_DATA_HINT = (
    "download http://cs231n.stanford.edu/tiny-imagenet-200.zip and extract it there, "
    "pass --data_dir, or run `make demo` for the built-in demo dataset"
)


class DatasetError(UserError):
    """A dataset folder that does not match the expected layout."""


@dataclass
class Split:
    paths: list[Path]
    labels: list[int] | None  # None for the unlabelled test split


@dataclass
class TinyImageNet:
    root: Path
    classes: list[str]  # sorted wnids; index = label
    names: dict[str, str]  # wnid -> human-readable name
    train: Split
    val: Split
    test: Split


# --------------------------------------------------------------------------- reading the layout
def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def _need(path: Path, what: str) -> Path:
    if not path.exists():
        raise DatasetError(f"{path} is missing ({what}); {GET_DATA_HINT}")
    return path


def read_tiny_imagenet(root: str | Path) -> TinyImageNet:
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset folder {root} does not exist; {GET_DATA_HINT}")
    wnids_file = _need(root / "wnids.txt", "the class list")
    wnids = [w.strip() for w in wnids_file.read_text().splitlines() if w.strip()]
    if not wnids:
        raise DatasetError(f"{wnids_file} lists no classes; re-extract the dataset ({GET_DATA_HINT})")
    if len(set(wnids)) != len(wnids):
        raise DatasetError(f"{wnids_file} lists a wnid more than once; re-extract the dataset")
    classes = sorted(wnids)
    index = {w: i for i, w in enumerate(classes)}
    return TinyImageNet(
        root=root,
        classes=classes,
        names=_read_names(root / "words.txt", classes),
        train=_read_train(root / "train", classes),
        val=_read_val(root / "val", index),
        test=Split(_read_test(root / "test" / "images"), None),
    )


def _read_names(words: Path, classes: list[str]) -> dict[str, str]:
    names = {w: w for w in classes}
    if not words.is_file():
        log.warning("%s is missing: class names are shown as wnids", words)
        return names
    for line in words.read_text(errors="replace").splitlines():
        wnid, _, name = line.partition("\t")
        if wnid in names and name.strip():
            names[wnid] = name.strip()
    return names


def _read_train(train_dir: Path, classes: list[str]) -> Split:
    _need(train_dir, "the training images")
    paths, labels = [], []
    for label, wnid in enumerate(classes):
        folder = train_dir / wnid / "images"
        if not folder.is_dir():
            raise DatasetError(f"{folder} is missing (class {wnid} is in wnids.txt); re-extract the dataset")
        images = _images_in(folder)
        if not images:
            raise DatasetError(f"{folder} holds no images (class {wnid}); re-extract the dataset")
        paths += images
        labels += [label] * len(images)
    return Split(paths, labels)


def _read_val(val_dir: Path, index: dict[str, int]) -> Split:
    ann = _need(val_dir / "val_annotations.txt", "the val labels")
    image_dir = _need(val_dir / "images", "the val images")
    paths, labels = [], []
    for n, line in enumerate(ann.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) < 2:
            raise DatasetError(f"{ann} line {n} is not 'file<TAB>wnid...': {line[:60]!r}")
        name, wnid = parts[0].strip(), parts[1].strip()
        if wnid not in index:
            raise DatasetError(
                f"{ann} line {n} names wnid {wnid}, which is not in wnids.txt; fix the line or wnids.txt"
            )
        path = image_dir / name
        if not path.is_file():
            raise DatasetError(f"{ann} line {n} names {path}, which does not exist; re-extract the dataset")
        paths.append(path)
        labels.append(index[wnid])
    if not paths:
        raise DatasetError(f"{ann} labels no images; re-extract the dataset")
    return Split(paths, labels)


def _read_test(test_dir: Path) -> list[Path]:
    _need(test_dir, "the unlabelled test images")
    return _images_in(test_dir)


# --------------------------------------------------------------------------- dataset
def load_rgb(path: Path) -> np.ndarray:
    """(H, W, 3) uint8; grayscale, palette and CMYK files become RGB."""
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except (OSError, ValueError) as exc:
        raise DatasetError(f"image {path} cannot be decoded ({exc}); delete or replace the file") from None


class ImageDataset(Dataset):
    """(uint8 image (3, H, W), label) pairs; label -1 for unlabelled images.

    Augmentation is a pure function of (seed, epoch, index): every sample is seeded from those
    three numbers, so results do not depend on worker count or scheduling. Epoch and strength live
    in a shared-memory tensor that persistent workers read, so the loader is never rebuilt.
    """

    def __init__(
        self, paths: Sequence[Path], labels: Sequence[int] | None, make_pipeline: Callable, seed: int = 0
    ) -> None:
        self.paths = list(paths)
        self.labels = list(labels) if labels is not None else [-1] * len(self.paths)
        self.make_pipeline = make_pipeline  # strength -> albumentations pipeline
        self.seed = seed
        self.state = torch.zeros(2, dtype=torch.float64).share_memory_()  # [strength, epoch]
        self._pipeline_for: tuple[float, object] | None = None  # per-process cache

    def set_epoch(self, epoch: int, strength: float) -> None:
        self.state[0] = float(strength)
        self.state[1] = float(epoch)

    def __len__(self) -> int:
        return len(self.paths)

    def _pipeline(self, strength: float):
        if self._pipeline_for is None or self._pipeline_for[0] != strength:
            self._pipeline_for = (strength, self.make_pipeline(strength))
        return self._pipeline_for[1]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        strength, epoch = self.state.tolist()
        pipeline = self._pipeline(strength)
        seq = np.random.SeedSequence([self.seed, int(epoch), i])
        pipeline.set_random_state(np.random.default_rng(seq), random.Random(int(seq.generate_state(1)[0])))
        image = pipeline(image=load_rgb(self.paths[i]))["image"]
        return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))), self.labels[i]


# --------------------------------------------------------------------------- loaders
@dataclass
class Loaders:
    train: DataLoader
    val: DataLoader
    test: DataLoader
    data: TinyImageNet

    def set_epoch(self, epoch: int, strength: float) -> None:
        """Call before iterating the epoch: new shuffle order and augmentation strength."""
        self.train.sampler.set_epoch(epoch)
        self.train.dataset.set_epoch(epoch, strength)


def _loader(dataset: Dataset, batch_size: int, workers: int, pin: bool, **kw) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=workers,
        pin_memory=pin,
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
        **kw,
    )


def build_loaders(
    data_dir: str | Path, img_size: int, batch_size: int, workers: int, seed: int, pin_memory: bool = False
) -> Loaders:
    data = read_tiny_imagenet(data_dir)
    if len(data.train.paths) < batch_size:
        raise DatasetError(
            f"{data.root}/train has {len(data.train.paths)} images, fewer than --batch_size {batch_size}; "
            "lower --batch_size"
        )
    train_set = ImageDataset(data.train.paths, data.train.labels, partial(transforms.train_pipeline, img_size), seed)
    # Epoch-seeded shuffling by torch's own sampler (the same one DDP needs).
    sampler = DistributedSampler(train_set, num_replicas=1, rank=0, shuffle=True, seed=seed)
    train = _loader(train_set, batch_size, workers, pin_memory, sampler=sampler, drop_last=True)
    val, test = eval_loaders(data, img_size, batch_size, workers, pin_memory)
    return Loaders(train=train, val=val, test=test, data=data)


def eval_loaders(
    data: TinyImageNet, img_size: int, batch_size: int, workers: int, pin_memory: bool = False
) -> tuple[DataLoader, DataLoader]:
    """(val, test) loaders in file order, without augmentation."""
    make = partial(_eval_pipeline, img_size)
    val = _loader(ImageDataset(data.val.paths, data.val.labels, make), batch_size, workers, pin_memory)
    test = _loader(ImageDataset(data.test.paths, None, make), batch_size, workers, pin_memory)
    return val, test


def _eval_pipeline(img_size: int, strength: float):
    return transforms.eval_pipeline(img_size)


# --------------------------------------------------------------------------- writing the layout
def write_tiny_imagenet_layout(
    root: str | Path,
    names: dict[str, str],
    train: dict[str, list[Image.Image]],
    val: list[tuple[Image.Image, str]],
    test: list[Image.Image],
) -> Path:
    """Write images in the official Tiny-ImageNet-200 layout (JPEG files, annotations, boxes).

    Built in a temporary sibling folder and renamed into place at the end, so an interrupted
    write never leaves a folder that looks like a complete dataset.
    """
    root = Path(root)
    if root.exists():
        raise UserError(f"{root} already exists; remove it or choose another folder (nothing was overwritten)")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    try:
        (tmp / "wnids.txt").write_text("".join(f"{w}\n" for w in names))
        (tmp / "words.txt").write_text("".join(f"{w}\t{n}\n" for w, n in names.items()))
        for wnid, images in train.items():
            folder = tmp / "train" / wnid / "images"
            folder.mkdir(parents=True)
            boxes = []
            for i, im in enumerate(images):
                im.save(folder / f"{wnid}_{i}.JPEG", quality=90)
                boxes.append(f"{wnid}_{i}.JPEG\t0\t0\t{im.width - 1}\t{im.height - 1}\n")
            (tmp / "train" / wnid / f"{wnid}_boxes.txt").write_text("".join(boxes))
        (tmp / "val" / "images").mkdir(parents=True)
        lines = []
        for i, (im, wnid) in enumerate(val):
            im.save(tmp / "val" / "images" / f"val_{i}.JPEG", quality=90)
            lines.append(f"val_{i}.JPEG\t{wnid}\t0\t0\t{im.width - 1}\t{im.height - 1}\n")
        (tmp / "val" / "val_annotations.txt").write_text("".join(lines))
        (tmp / "test" / "images").mkdir(parents=True)
        for i, im in enumerate(test):
            im.save(tmp / "test" / "images" / f"test_{i}.JPEG", quality=90)
        tmp.rename(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root
