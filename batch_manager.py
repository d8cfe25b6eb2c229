"""Datasets and loaders: prepare the splits (read any supported format, decode once into a
memory-mapped cache, hold out or merge val), and build loaders that deliver each epoch's
augmentation strength to persistent worker processes.

Formats and their layouts: see data_sources.py. The decode-once cache: see decode_cache.py.
"""

from __future__ import annotations

import logging
import random
import signal
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

import decode_cache
import transforms
from data_sources import DatasetError, DataSplits, Split, hold_out_val, merge_train_val, read_dataset

# Set in the parent before any cv2 work: calling it inside a worker after the parent used cv2
# has hung workers on this project's machines. One thread per worker; parallelism = workers.
cv2.setNumThreads(1)

log = logging.getLogger("tin")


# --------------------------------------------------------------------------- preparing the splits
def prepare_data(
    kind: str,
    data_dir: str | Path,
    img_size: int,
    workers: int,
    *,
    use_cache: bool = True,
    cache_dir: str | Path | None = None,
    skip_bad: bool = False,
    val_split: float = 0.0,
    trainval: bool = False,
    seed: int = 0,
) -> DataSplits:
    """Read the dataset, check or cache every image file (unreadable files are listed before
    training starts), then apply --val_split / --trainval."""
    data = read_dataset(kind, data_dir)
    # Tiny-ImageNet is stored at its native 64x64 (odd-sized files are resized to it); other
    # image folders at the training resolution.
    store = 64 if kind == "tiny-imagenet" else img_size
    cache = (Path(cache_dir) if cache_dir else data.root / ".cache") if use_cache else None
    splits = {}
    for name in ("train", "val", "test"):
        split = getattr(data, name)
        splits[name] = None if split is None else decode_cache.materialize(split, name, store, cache, workers, skip_bad)
    data = replace(data, **splits)
    if val_split > 0:
        data = hold_out_val(data, val_split, seed)
        log.info(
            "--val_split %.2f: %d train / %d val images held out from train", val_split, len(data.train), len(data.val)
        )
    if trainval:
        data = merge_train_val(data)
        log.info("--trainval: training on train + val (%d images); no val metrics", len(data.train))
    return data


# --------------------------------------------------------------------------- dataset
class AugmentedDataset(Dataset):
    """(uint8 image (3, H, W), label) pairs of a Split; label -1 for unlabelled images.

    Augmentation is a pure function of (seed, epoch, index): every sample is seeded from those
    three numbers, so results do not depend on worker count or scheduling. Epoch and strength live
    in a shared-memory tensor that persistent workers read, so the loader is never rebuilt.
    """

    def __init__(self, split: Split, make_pipeline: Callable, seed: int = 0) -> None:
        self.split = split
        self.labels = split.labels if split.labels is not None else [-1] * len(split)
        self.make_pipeline = make_pipeline  # strength -> albumentations pipeline
        self.seed = seed
        self.state = torch.zeros(2, dtype=torch.float64).share_memory_()  # [strength, epoch]
        self._pipeline_for: tuple[float, object] | None = None  # per-process cache

    def set_epoch(self, epoch: int, strength: float) -> None:
        self.state[0] = float(strength)
        self.state[1] = float(epoch)

    def __len__(self) -> int:
        return len(self.split)

    def _pipeline(self, strength: float):
        if self._pipeline_for is None or self._pipeline_for[0] != strength:
            self._pipeline_for = (strength, self.make_pipeline(strength))
        return self._pipeline_for[1]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        strength, epoch = self.state.tolist()
        pipeline = self._pipeline(strength)
        seq = np.random.SeedSequence([self.seed, int(epoch), i])
        pipeline.set_random_state(np.random.default_rng(seq), random.Random(int(seq.generate_state(1)[0])))
        image = pipeline(image=self.split.image(i))["image"]
        return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))), self.labels[i]

    def __getstate__(self) -> dict:
        # Under the spawn start method, send a memory map's file name, not its gigabytes.
        state = dict(self.__dict__)
        array = self.split.array
        if isinstance(array, np.memmap) and array.filename:
            state["split"] = replace(self.split, array=None)
            state["_memmap_file"] = array.filename
        return state

    def __setstate__(self, state: dict) -> None:
        filename = state.pop("_memmap_file", None)
        self.__dict__.update(state)
        if filename is not None:
            self.split = replace(self.split, array=np.load(filename, mmap_mode="r"))


# --------------------------------------------------------------------------- loaders
class ResumableSampler(DistributedSampler):
    """torch's epoch-seeded shuffling (the sampler DDP needs), able to start an epoch mid-way:
    after set_epoch(epoch, skip=k) it yields the same order minus its first k indices."""

    def __init__(self, dataset: Dataset, seed: int, num_replicas: int = 1, rank: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        super().set_epoch(epoch)
        self.skip = skip

    def __iter__(self):
        return iter(list(super().__iter__())[self.skip :])

    def __len__(self) -> int:
        return max(self.num_samples - self.skip, 0)


def _worker_init(worker_id: int) -> None:
    # Ctrl-C reaches the whole process group: the main process stops cleanly at the next update
    # boundary, and the workers must keep serving it until then.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@dataclass
class Loaders:
    train: DataLoader
    val: DataLoader | None  # None with --trainval
    test: DataLoader | None  # None when the dataset has no unlabelled test split
    data: DataSplits

    def set_epoch(self, epoch: int, strength: float, start_batch: int = 0) -> None:
        """Call before iterating the epoch: shuffle order, augmentation strength, and where in the
        epoch to start (a resumed epoch skips the batches already trained on)."""
        self.train.sampler.set_epoch(epoch, skip=start_batch * self.train.batch_size)
        self.train.dataset.set_epoch(epoch, strength)


def _loader(dataset: Dataset, batch_size: int, workers: int, pin: bool, **kw) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=workers,
        pin_memory=pin,
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
        worker_init_fn=_worker_init if workers > 0 else None,
        # A private generator: creating an iterator must not draw from the global torch RNG, or a
        # resumed run (which creates one iterator more) would diverge from an uninterrupted one.
        generator=torch.Generator().manual_seed(0),
        **kw,
    )


def build_loaders(
    data: DataSplits,
    img_size: int,
    batch_size: int,
    workers: int,
    seed: int,
    pin_memory: bool = False,
    rank: int = 0,
    world: int = 1,
) -> Loaders:
    """Loaders for this process: train shuffled and sharded (rank of world), val/test sharded in
    order without padding, so reduced metrics count every image exactly once."""
    if len(data.train) < batch_size:
        raise DatasetError(
            f"{data.root}: the train split has {len(data.train)} images, fewer than --batch_size {batch_size}; "
            "lower --batch_size"
        )
    train_set = AugmentedDataset(data.train, partial(transforms.train_pipeline, img_size), seed)
    sampler = ResumableSampler(train_set, seed, num_replicas=world, rank=rank)
    train = _loader(train_set, batch_size, workers, pin_memory, sampler=sampler, drop_last=True)
    val, test = eval_loaders(data, img_size, batch_size, workers, pin_memory, rank, world)
    return Loaders(train=train, val=val, test=test, data=data)


def eval_loaders(
    data: DataSplits,
    img_size: int,
    batch_size: int,
    workers: int,
    pin_memory: bool = False,
    rank: int = 0,
    world: int = 1,
) -> tuple[DataLoader | None, DataLoader | None]:
    """(val, test) loaders in split order (images rank, rank + world, ...), without augmentation;
    None for an absent split."""
    make = partial(_eval_pipeline, img_size)
    return tuple(
        None
        if split is None
        else _loader(
            AugmentedDataset(split, make), batch_size, workers, pin_memory, sampler=list(range(rank, len(split), world))
        )  # fmt: skip
        for split in (data.val, data.test)
    )


def _eval_pipeline(img_size: int, strength: float):
    return transforms.eval_pipeline(img_size)
