"""Input-pipeline throughput: the seed-style path against ours, at the same augmentation strength.

    python -m bench.pipeline --data_dir data/tiny-imagenet-200 [--images 6000] [--workers 2] [--reps 3]

seed-style:  every epoch, decode each JPEG, run albumentations, normalise to float32 in the
             worker, collate float32 batches; the DataLoader (and its workers) is rebuilt every epoch.
albu:        `--aug_backend albumentations`: decode once into the memory-mapped uint8 cache;
             workers run the same albumentations pipeline on uint8 arrays and collate uint8
             batches (normalised later, on the device); persistent workers.
torch:       `--aug_backend torch`: the loader collates stored uint8 images from the cache and
             the same recipe runs on whole batches in the training process (transforms.BatchAugment)
             up to normalised float batches, with one torch thread, on the CPU.

All run over the same random subset of the train split at the same strength, alternating,
`--reps` times each; the table gives the median images/s and the ratios to seed-style. Prints a
Markdown table and writes JSON (default bench/results/pipeline.json). Not part of the test suite.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

if __package__ in (None, ""):  # run as a file (python bench/X.py): the repository root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import batch_manager  # noqa: E402
import transforms  # noqa: E402
from tin.data.readers import load_rgb, read_dataset  # noqa: E402
from utils import write_json  # noqa: E402

MEAN = np.array(transforms.IMAGENET_MEAN, np.float32)
STD = np.array(transforms.IMAGENET_STD, np.float32)


class SeedStyleDataset(Dataset):
    """What the seed project did: decode + augment + float32 normalise per sample, every epoch."""

    def __init__(self, paths, labels, img_size: int, strength: float) -> None:
        self.paths, self.labels = paths, labels
        self.pipeline = transforms.train_pipeline(img_size, strength)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        image = self.pipeline(image=load_rgb(self.paths[i]))["image"]
        image = (image.astype(np.float32) / 255.0 - MEAN) / STD
        return torch.from_numpy(image.transpose(2, 0, 1).copy()), self.labels[i]


def _drain(loader) -> int:
    n = 0
    for x, _ in loader:
        n += x.shape[0]
    return n


def seed_style_epoch(paths, labels, args, workers: int) -> float:
    start = time.perf_counter()
    loader = DataLoader(
        SeedStyleDataset(paths, labels, args.img_size, args.strength),
        batch_size=args.batch_size,
        shuffle=True,
        num_workers=workers,
    )
    n = _drain(loader)
    return n / (time.perf_counter() - start)


def ours_epoch(loader, dataset, epoch: int, strength: float) -> float:
    start = time.perf_counter()
    loader.sampler.set_epoch(epoch) if hasattr(loader.sampler, "set_epoch") else None
    dataset.set_epoch(epoch, strength)
    n = _drain(loader)
    return n / (time.perf_counter() - start)


def torch_epoch(loader, augment, normalize, epoch: int, strength: float, img_size: int) -> float:
    start = time.perf_counter()
    loader.sampler.set_epoch(epoch) if hasattr(loader.sampler, "set_epoch") else None
    augment.set_epoch(epoch, strength, img_size)
    n = 0
    for b, (x, _) in enumerate(loader):
        normalize(augment(x, b))
        n += x.shape[0]
    return n / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data_dir", default="data/tiny-imagenet-200")
    p.add_argument("--dataset", default="tiny-imagenet")
    p.add_argument("--images", type=int, default=6000, help="train images per epoch (a random subset)")
    p.add_argument("--workers", type=int, default=2, help="worker processes for the multi-process rows")
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--img_size", type=int, default=64)
    p.add_argument("--strength", type=float, default=1.0)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", default="bench/results/pipeline.json")
    args = p.parse_args()
    torch.set_num_threads(1)

    start = time.perf_counter()
    data = batch_manager.prepare_data(args.dataset, args.data_dir, args.img_size, args.workers)
    cache_seconds = time.perf_counter() - start
    files = read_dataset(args.dataset, args.data_dir).train
    index = np.random.default_rng(0).permutation(len(files))[: args.images]
    paths, labels = [files.paths[i] for i in index], [files.labels[i] for i in index]
    cached = data.train.subset(index)

    rows = []
    normalize = transforms.Normalize()
    for workers in (0, args.workers):
        dataset = batch_manager.AugmentedDataset(
            cached, batch_manager._Pipelines(transforms.RECIPE), seed=0, size=args.img_size
        )
        loader = batch_manager._loader(dataset, args.batch_size, workers, False, shuffle=True, drop_last=False)
        raw = batch_manager.AugmentedDataset(cached, None, seed=0, size=64 if args.dataset == "tiny-imagenet" else 0)
        raw_loader = batch_manager._loader(raw, args.batch_size, workers, False, shuffle=True, drop_last=False)
        augment = transforms.BatchAugment(seed=0)
        seed_ips, ours_ips, torch_ips = [], [], []
        ours_epoch(loader, dataset, 0, args.strength)  # warm-up: starts the persistent workers
        torch_epoch(raw_loader, augment, normalize, 0, args.strength, args.img_size)
        for rep in range(args.reps):
            seed_ips.append(seed_style_epoch(paths, labels, args, workers))
            ours_ips.append(ours_epoch(loader, dataset, rep + 1, args.strength))
            torch_ips.append(torch_epoch(raw_loader, augment, normalize, rep + 1, args.strength, args.img_size))
        del loader, raw_loader
        seed_med, ours_med, torch_med = (statistics.median(v) for v in (seed_ips, ours_ips, torch_ips))
        rows.append(
            {
                "workers": workers,
                "seed_style_ips": seed_med,
                "ours_ips": ours_med,
                "ratio": ours_med / seed_med,
                "torch_ips": torch_med,
                "torch_ratio": torch_med / seed_med,
                "seed_style_all": seed_ips,
                "ours_all": ours_ips,
                "torch_all": torch_ips,
            }
        )

    machine = f"{platform.machine()}, {os.cpu_count()} cores, {platform.processor() or platform.platform()}"
    print(f"\ninput pipeline, {args.images} train images/epoch, strength {args.strength}, batch {args.batch_size}")
    print(f"machine: {machine}; cache prepared in {cache_seconds:.1f} s (0 if it already existed)\n")
    print("| loader processes | seed-style img/s | albu img/s (ratio) | torch img/s (ratio) |")
    print("|---|---|---|---|")
    for r in rows:
        procs = "main process" if r["workers"] == 0 else f"{r['workers']} workers"
        print(
            f"| {procs} | {r['seed_style_ips']:,.0f} | {r['ours_ips']:,.0f} ({r['ratio']:.2f}x) "
            f"| {r['torch_ips']:,.0f} ({r['torch_ratio']:.2f}x) |"
        )
    out = write_json({"args": vars(args), "machine": machine, "cache_seconds": cache_seconds, "rows": rows}, args.out)
    print(f"\nwritten: {out}")


if __name__ == "__main__":
    main()
