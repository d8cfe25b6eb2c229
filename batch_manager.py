"""Datasets and loaders: prepare the splits (read any supported format, decode once into a
memory-mapped cache, hold out or merge val), and build loaders that deliver each epoch's
augmentation strength to persistent worker processes.

Formats and their layouts: see readers.py. The decode-once cache: see decode_cache.py.
"""

from __future__ import annotations

import logging
import random
import signal
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler, default_collate

import transforms
from tin.data import decode_cache
from tin.data.readers import DatasetError, DataSplits, Split, hold_out_val, merge_train_val, read_dataset

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
    listing: DataSplits | None = None,
) -> DataSplits:
    """Read the dataset (or take `listing`, read already), check or cache every image file
    (unreadable files are listed before training starts), then apply --val_split / --trainval."""
    data = listing if listing is not None else read_dataset(kind, data_dir, val=not val_split)
    store = store_size(kind, img_size)
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


def store_size(kind: str, img_size: int) -> int:
    """The size image files are decoded to and cached at: Tiny-ImageNet at its native 64x64 (odd-sized
    files are resized to it), other image folders at the training resolution."""
    return 64 if kind == "tiny-imagenet" else img_size


# --------------------------------------------------------------------------- dataset
def resize_to(image: np.ndarray, size: int) -> np.ndarray:
    """(H, W, 3) uint8 -> (size, size, 3): the evaluation resize (cv2 bilinear), only where needed."""
    if image.shape[:2] == (size, size):
        return image
    return cv2.resize(image, (size, size), interpolation=cv2.INTER_LINEAR)


class AugmentedDataset(Dataset):
    """(uint8 image (3, H, W), label) pairs of a Split; label -1 for unlabelled images.

    With `make_pipeline` ((strength, size) -> albumentations pipeline), augmentation is a pure
    function of (seed, epoch, index): every sample is seeded from those three numbers, so results
    do not depend on worker count or scheduling. Epoch, strength and training size live in a
    shared-memory tensor that persistent workers read, so the loader is never rebuilt.

    Without it, images come out as stored (the fast path for evaluation and for augmentation on
    the device), resized with cv2's bilinear to `size` only where they differ from it.
    """

    def __init__(self, split: Split, make_pipeline: Callable | None = None, seed: int = 0, size: int = 0) -> None:
        self.split = split
        self.labels = split.labels if split.labels is not None else [-1] * len(split)
        self.make_pipeline = make_pipeline
        self.seed = seed
        self.size = size
        self.state = torch.tensor([0.0, 0.0, float(size)], dtype=torch.float64).share_memory_()  # strength, epoch, size
        self._pipeline_for: tuple[tuple, object] | None = None  # per-process cache

    def set_epoch(self, epoch: int, strength: float, size: int | None = None) -> None:
        self.state[0] = float(strength)
        self.state[1] = float(epoch)
        self.state[2] = float(size or self.size)

    def __len__(self) -> int:
        return len(self.split)

    def _pipeline(self, strength: float, size: int):
        if self._pipeline_for is None or self._pipeline_for[0] != (strength, size):
            self._pipeline_for = ((strength, size), self.make_pipeline(strength, size))
        return self._pipeline_for[1]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image = self.split.image(i)
        if self.make_pipeline is None:
            image = resize_to(image, self.size) if self.size else image
        else:
            strength, epoch, size = self.state.tolist()
            pipeline = self._pipeline(strength, int(size))
            seq = np.random.SeedSequence([self.seed, int(epoch), i])
            pipeline.set_random_state(np.random.default_rng(seq), random.Random(int(seq.generate_state(1)[0])))
            image = pipeline(image=image)["image"]
        return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))), self.labels[i]

    def __getitems__(self, indices: list[int]):
        """A whole batch at once (the DataLoader calls this instead of __getitem__ per index): stored
        images straight from the array with one gather, already stacked — no per-image work."""
        if self.make_pipeline is not None or self.split.array is None or self.split.array.shape[1] != self.size:
            return [self[i] for i in indices]
        index = np.asarray(indices, dtype=np.int64)
        rows = index if self.split.rows is None else self.split.rows[index]
        images = torch.from_numpy(np.ascontiguousarray(self.split.array[rows])).permute(0, 3, 1, 2)  # channels-last
        return Stacked(images, torch.tensor([self.labels[i] for i in indices], dtype=torch.long))

    def __getstate__(self) -> dict:
        # Under the spawn start method, send a memory map's file name, not its gigabytes.
        state = dict(self.__dict__)
        state["_pipeline_for"] = None  # rebuilt where it is used
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


@dataclass
class Stacked:
    """A batch already stacked by AugmentedDataset.__getitems__: (B, 3, H, W) uint8 (channels-last
    memory, as the models want it) and (B,) labels."""

    images: torch.Tensor
    labels: torch.Tensor


def collate(batch):
    """default_collate, except for batches that arrive already stacked."""
    if isinstance(batch, Stacked):
        return batch.images, batch.labels
    return default_collate(batch)


# --------------------------------------------------------------------------- samplers
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
        return iter(self.order()[self.skip :])

    def order(self) -> list[int]:
        """The whole epoch's order, whatever the skip (a function of seed and epoch only)."""
        return list(super().__iter__())

    def __len__(self) -> int:
        return max(self.num_samples - self.skip, 0)


def _worker_init(worker_id: int) -> None:
    # Ctrl-C reaches the whole process group: the main process stops cleanly at the next update
    # boundary, and the workers must keep serving it until then.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


# --------------------------------------------------------------------------- data on the device
def resident_bytes(data: DataSplits) -> int | None:
    """Bytes the decoded splits take as uint8 arrays; None when a split is not cached as an array
    (--no_cache), so it cannot live on the device."""
    splits = [s for s in (data.train, data.val, data.test) if s is not None]
    if any(s.array is None for s in splits):
        return None
    return sum(len(s) * int(np.prod(s.array.shape[1:])) for s in splits)


def _resident(split: Split, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, H, W, 3) uint8 images and (N,) labels (-1 when unlabelled) of `split`, on `device`."""
    array = np.ascontiguousarray(split.array if split.rows is None else split.array[split.rows])
    with warnings.catch_warnings():  # a read-only memory map: never written to (on a CPU it is used in place)
        warnings.simplefilter("ignore", UserWarning)
        images = torch.from_numpy(array).to(device)
    labels = torch.tensor(split.labels if split.labels is not None else [-1] * len(split), dtype=torch.long)
    return images, labels.to(device)


class DeviceBatches:
    """--data_on_device: training batches gathered by index from uint8 images resident on the
    device: no DataLoader, no worker, no host copy per batch. The order is the loader path's (the
    same ResumableSampler, so the same batches for the same seed; its indices reach the device once
    per epoch) and a resumed epoch skips the same batches."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, sampler: ResumableSampler, batch_size: int) -> None:
        self.images, self.labels, self.sampler, self.batch_size = images, labels, sampler, batch_size

    def __len__(self) -> int:
        return len(self.sampler) // self.batch_size  # drop_last, as the training loader

    def __iter__(self):
        order = torch.tensor(list(self.sampler), dtype=torch.long)  # once per epoch, one non-blocking copy
        order = order.pin_memory() if self.images.is_cuda else order
        order = order.to(self.images.device, non_blocking=True)
        for b in range(len(self)):
            idx = order[b * self.batch_size : (b + 1) * self.batch_size]
            yield self.images.index_select(0, idx).permute(0, 3, 1, 2), self.labels.index_select(0, idx)


class DeviceEval:
    """Evaluation batches of a resident split, in split order, this process's share (rank::world),
    resized on the device (bilinear) where the stored size differs from `size`."""

    def __init__(
        self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, size: int, rank: int = 0, world: int = 1
    ) -> None:
        self.images, self.labels, self.batch_size, self.size = images, labels, batch_size, size
        self.index = torch.arange(rank, len(images), world, device=images.device)

    def __len__(self) -> int:
        return -(-len(self.index) // self.batch_size)

    def __iter__(self):
        for idx in self.index.split(self.batch_size):
            x = self.images.index_select(0, idx).permute(0, 3, 1, 2)
            if x.shape[-1] != self.size or x.shape[-2] != self.size:
                # bilinear to uint8 as the loader's cv2 INTER_LINEAR: the same pixels when the stored size
                # is a multiple of `size`, otherwise within 1 grey level (cv2's fixed-point weights)
                x = F.interpolate(x.float(), size=(self.size, self.size), mode="bilinear", align_corners=False)
                # contiguous (N, C, H, W), as the loader's resized images come: the same memory layout
                # gives the same floating-point sums in the model, so both paths evaluate identically
                x = (x + 0.5).floor_().clamp_(0, 255).to(torch.uint8).contiguous()
            yield x, self.labels.index_select(0, idx)


def _on_device(
    data: DataSplits,
    sampler: ResumableSampler,
    img_size: int,
    batch_size: int,
    eval_batch: int,
    device: torch.device,
    rank: int,
    world: int,
):
    train = DeviceBatches(*_resident(data.train, device), sampler, batch_size)
    evals = [
        None if s is None else DeviceEval(*_resident(s, device), eval_batch, img_size, rank, world)
        for s in (data.val, data.test)
    ]
    return train, *evals


# --------------------------------------------------------------------------- loaders
@dataclass
class Loaders:
    train: DataLoader | DeviceBatches
    val: DataLoader | DeviceEval | None  # None with --trainval
    test: DataLoader | DeviceEval | None  # None when the dataset has no unlabelled test split
    data: DataSplits
    augment: transforms.BatchAugment | None = None  # --aug_backend torch: applied by the trainer
    img_size: int = 64
    epoch: int = 0
    _order: np.ndarray | None = None  # the epoch's order, made when batch_indices first asks

    def set_epoch(self, epoch: int, strength: float, start_batch: int = 0, size: int | None = None) -> None:
        """Call before iterating the epoch: shuffle order, augmentation strength, training size
        (None = the loaders' img_size) and where in the epoch to start (a resumed epoch skips the
        batches already trained on)."""
        self.epoch, self._order = epoch, None
        self.train.sampler.set_epoch(epoch, skip=start_batch * self.train.batch_size)
        if self.augment is None:
            self.train.dataset.set_epoch(epoch, strength, size or self.img_size)
        else:
            self.augment.set_epoch(epoch, strength, size or self.img_size)

    def batch_indices(self, b: int) -> np.ndarray:
        """Which training images (positions in the train split) batch `b` of this epoch holds: the
        sampler's order, cut into batches as the loaders cut it (both drop the last partial batch)."""
        if self._order is None:
            self._order = np.asarray(self.train.sampler.order(), dtype=np.int64)
        size = self.train.batch_size
        return self._order[b * size : (b + 1) * size]


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
        collate_fn=collate,
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
    aug_backend: str = "albumentations",
    recipe: dict | None = None,
    on_device: torch.device | None = None,
    eval_size: int = 0,
) -> Loaders:
    """Loaders for this process: train shuffled and sharded (rank of world), val/test sharded in
    order without padding, so reduced metrics count every image exactly once; evaluation batches
    are twice the training batch (no gradients to keep). With aug_backend 'torch' the train loader
    delivers stored images and `Loaders.augment` augments on the device. With `on_device` the
    decoded splits live on that device and batches are gathered there (no DataLoader at all).
    val and test are at `eval_size` (0 = img_size)."""
    if len(data.train) < batch_size:
        raise DatasetError(
            f"{data.root}: the train split has {len(data.train)} images, fewer than --batch_size {batch_size}; "
            "lower --batch_size"
        )
    if aug_backend not in _TRAIN_SETS:
        raise ValueError(f"unknown augmentation backend {aug_backend!r}; use {', '.join(transforms.AUG_BACKENDS)}")
    train_set, augment = _TRAIN_SETS[aug_backend](data.train, img_size, seed, rank, recipe or transforms.RECIPE)
    sampler = ResumableSampler(train_set, seed, num_replicas=world, rank=rank)
    if on_device is not None:
        if augment is None:
            raise ValueError(
                "data on the device needs --aug_backend torch (albumentations works per image on the host)"
            )
        train, val, test = _on_device(
            data, sampler, eval_size or img_size, batch_size, 2 * batch_size, on_device, rank, world
        )
        return Loaders(train=train, val=val, test=test, data=data, augment=augment, img_size=img_size)
    train = _loader(train_set, batch_size, workers, pin_memory, sampler=sampler, drop_last=True)
    eval_workers = min(workers, 2)  # evaluation gathers stored images: little work per batch
    val, test = eval_loaders(data, eval_size or img_size, 2 * batch_size, eval_workers, pin_memory, rank, world)
    return Loaders(train=train, val=val, test=test, data=data, augment=augment, img_size=img_size)


def eval_loaders(
    data: DataSplits,
    img_size: int,
    batch_size: int,
    workers: int,
    pin_memory: bool = False,
    rank: int = 0,
    world: int = 1,
) -> tuple[DataLoader | None, DataLoader | None]:
    """(val, test) loaders in split order (images rank, rank + world, ...), without augmentation
    (images as stored, resized only where they differ from img_size); None for an absent split."""
    return tuple(
        None
        if split is None
        else _loader(
            AugmentedDataset(split, size=img_size),
            batch_size,
            workers,
            pin_memory,
            sampler=list(range(rank, len(split), world)),
        )
        for split in (data.val, data.test)
    )


@dataclass(frozen=True, eq=False)
class _Pipelines:
    """(strength, size) -> the albumentations pipeline of `recipe` (picklable for spawned workers)."""

    recipe: dict

    def __call__(self, strength: float, size: int):
        return transforms.train_pipeline(size, strength, self.recipe)


def _albumentations_backend(split: Split, img_size: int, seed: int, rank: int, recipe: dict):
    """Per image in the loader workers, seeded by (seed, epoch, index)."""
    transforms.require_albumentations()  # its absence is an error now, not in a worker later
    return AugmentedDataset(split, _Pipelines(recipe), seed, size=img_size), None


def _torch_backend(split: Split, img_size: int, seed: int, rank: int, recipe: dict):
    """The loader gathers stored uint8 images; BatchAugment augments whole batches on the device."""
    augment = transforms.BatchAugment(seed, rank, recipe)
    augment.set_epoch(0, 0.0, img_size)
    stored = split.array.shape[1] if split.array is not None else img_size
    return AugmentedDataset(split, None, seed, size=stored), augment


# --aug_backend NAME -> (train split, img_size, seed, rank) -> (train dataset, batch augmenter or None)
# transforms.AUG_BACKENDS names the choices; each has its training set here
_TRAIN_SETS: dict[str, Callable] = {"torch": _torch_backend, "albumentations": _albumentations_backend}
