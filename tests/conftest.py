"""Shared fixtures: a tiny dataset in the real Tiny-ImageNet-200 layout (real JPEG files, some
grayscale, val_annotations.txt, unlabelled test/) and one short real training run."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# Offline everything: wandb writes real files without an account; no hub look-ups; quiet bars.
os.environ["WANDB_MODE"] = "offline"
os.environ["WANDB_SILENT"] = "true"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TQDM_DISABLE"] = "1"

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data_sources import write_tiny_imagenet_layout  # noqa: E402

WNIDS = ["n02000003", "n01000001", "n04000002", "n03000004"]  # deliberately not sorted
NAMES = ["goldfish", "tabby cat", "school bus", "teapot"]


def toy_image(label: int, rng: np.random.Generator, size: int = 64) -> Image.Image:
    """A learnable class signal that survives grayscale: a per-class stripe pattern, random tint."""
    yy, xx = np.mgrid[0:size, 0:size]
    pattern = [yy // 8 % 2, xx // 8 % 2, (yy // 8 + xx // 8) % 2, ((yy - size / 2) ** 2 + (xx - size / 2) ** 2 < 300)]
    base = pattern[label % 4].astype(np.float32)
    tint = rng.uniform(0.4, 1.0, size=3)
    rgb = base[..., None] * tint * 200 + 30 + rng.normal(0, 20, size=(size, size, 3))
    image = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))
    return image.convert("L") if rng.random() < 0.2 else image


def make_layout(root: Path, n_train: int = 16, n_val: int = 5, n_test: int = 9, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    index = {w: i for i, w in enumerate(sorted(WNIDS))}
    train = {w: [toy_image(index[w], rng) for _ in range(n_train)] for w in WNIDS}
    val = [(toy_image(index[w], rng), w) for _ in range(n_val) for w in WNIDS]
    test = [toy_image(int(rng.integers(4)), rng) for _ in range(n_test)]
    return write_tiny_imagenet_layout(root, dict(zip(WNIDS, NAMES, strict=True)), train, val, test)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """Read-only tiny dataset; tests that damage a layout build their own with make_layout."""
    return make_layout(tmp_path_factory.mktemp("data") / "tiny-imagenet-200")


# metrics.csv columns that measure time, not what was computed: left out when runs are compared
TIMING = ("epoch_seconds", "train_seconds", "wall_seconds", "images_per_second", "data_wait_fraction")

# fp32 and the plain memory format, pinned: the tests check training behaviour, not this machine's
# precision default (bf16 would be emulated, 10x slower, on a CPU without native bf16).
PINNED = ["--no-amp", "--no-channels_last"]
FAST_RUN = [
    *"--arch resnet18 --img_size 32 --batch_size 8 --workers 0 --no_analysis --lr_base 2e-3 --warmup_epochs 0 --drop_rate 0 --drop_path_rate 0 --attn_drop_rate 0".split(),
    *PINNED,
]


@pytest.fixture(scope="session")
def trained_run(tiny_data, tmp_path_factory) -> Path:
    """A real 2-epoch main() run with wandb offline; returns its run folder."""
    import main

    out = tmp_path_factory.mktemp("checkpoints")
    return main.main(
        [*FAST_RUN, "--data_dir", str(tiny_data), "--output_dir", str(out), "--epochs", "2", "--wandb", "offline"]
    )


@pytest.fixture
def tin_log(caplog):
    """caplog for the toolkit's own logger (which does not propagate once main.py set it up)."""
    import logging

    logger = logging.getLogger("tin")
    old = logger.propagate
    logger.propagate = True
    caplog.set_level(logging.INFO, logger="tin")
    yield caplog
    logger.propagate = old


def loaders_for(
    root, batch_size=8, workers=0, seed=0, img_size=64, kind="tiny-imagenet", aug_backend="albumentations", **prepare
):
    """Loaders over a dataset folder the way main.py builds them (no cache unless asked)."""
    import batch_manager

    prepare.setdefault("use_cache", aug_backend == "torch")  # the batch backend gathers from the cache
    if prepare["use_cache"]:
        prepare.setdefault("cache_dir", tempfile.mkdtemp(prefix="tin-cache-"))
    data = batch_manager.prepare_data(kind, root, img_size, workers, seed=seed, **prepare)
    return batch_manager.build_loaders(data, img_size, batch_size, workers, seed, aug_backend=aug_backend)
