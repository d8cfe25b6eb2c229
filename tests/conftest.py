"""Shared fixtures: a tiny dataset in the real Tiny-ImageNet-200 layout (real JPEG files, some
grayscale, val_annotations.txt, unlabelled test/) and one short real training run."""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

from tin.data.readers import write_tiny_imagenet_layout

# Offline everything: wandb writes real files without an account; no hub look-ups; quiet bars.
os.environ["WANDB_MODE"] = "offline"
os.environ["WANDB_SILENT"] = "true"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TQDM_DISABLE"] = "1"

ROOT = Path(__file__).resolve().parents[1]

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


def odd_images(folder: Path, seed: int = 0) -> dict[str, Path]:
    """The image files users bring, of every mode and size, plus one that cannot be read and one
    that is not an image: name -> path. The unreadable one sits in a subfolder (found recursively)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    rgb = toy_image(0, rng).convert("RGB")
    rgba = rgb.convert("RGBA")
    rgba.putalpha(Image.fromarray(np.tile(np.linspace(0, 255, 64, dtype=np.uint8), (64, 1))))
    images = {
        "gray.jpg": toy_image(1, rng).convert("L"),
        "cmyk.jpg": toy_image(2, rng).convert("CMYK"),
        "alpha.png": rgba,
        "deep.png": Image.fromarray(np.asarray(toy_image(3, rng).convert("L"), np.uint16) * 257),  # 16-bit
        "palette.gif": rgb.convert("P"),
        "large.jpg": toy_image(1, rng, size=256).convert("RGB").resize((320, 200)),
    }
    paths = {}
    for name, image in images.items():
        image.save(folder / name)
        paths[name] = folder / name
    (folder / "sub").mkdir(exist_ok=True)
    paths["corrupt.jpg"] = folder / "sub" / "corrupt.jpg"
    paths["corrupt.jpg"].write_bytes(b"\xff\xd8\xff\xe0 a JPEG header, then nothing")
    (folder / "notes.txt").write_text("not an image: folders are searched for image files only")
    return paths


def bench_module(name: str):
    """A script of bench/ imported as a module (bench/ is not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """Read-only tiny dataset; tests that damage a layout build their own with make_layout."""
    return make_layout(tmp_path_factory.mktemp("data") / "tiny-imagenet-200")


# metrics.csv columns that measure time, not what was computed: left out when runs are compared
TIMING = (  # metrics.csv's columns that depend on the machine's speed
    *("epoch_seconds", "train_seconds", "wall_seconds", "images_per_second", "data_wait_fraction"),
    *("update_seconds", "eval_seconds", "save_seconds"),
)

# fp32 and the plain memory format, pinned: the tests check training behaviour, not this machine's
# precision default (bf16 would be emulated, 10x slower, on a CPU without native bf16).
PINNED = ["--no-amp", "--no-channels_last"]
# The tests' model: a ResNet-9 of width 16 (0.4 M parameters, ~14 ms an update at 32 px on a 2-core CPU
# against resnet18's ~115 ms): what the tests check does not depend on the model's size.
FAST_ARCH = "resnet9_w16"
FAST_RUN = [
    *f"--arch {FAST_ARCH} --img_size 32 --batch_size 8 --workers 0 --no_analysis --lr_base 2e-3 --warmup_epochs 0 --drop_rate 0".split(),
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
        if "cache_dir" not in prepare:
            prepare["cache_dir"] = tempfile.mkdtemp(prefix="tin-cache-")
            atexit.register(shutil.rmtree, prepare["cache_dir"], ignore_errors=True)
    data = batch_manager.prepare_data(kind, root, img_size, workers, seed=seed, **prepare)
    return batch_manager.build_loaders(data, img_size, batch_size, workers, seed, aug_backend=aug_backend)


class HostTraffic(TorchDispatchMode):
    """What a training step would send between host and GPU, seen on a machine without one: the
    step runs with its device tensors (model, optimizer state, resident data) on torch's `meta`
    device, which has shapes but no values, and every operation is inspected on its way:

    - `copies`: (what, non_blocking) for each copy of host memory to the device: explicit ones
      (`.to(device)`), a host tensor of one or more dimensions mixed into an operation on device
      tensors, and device tensors that no operation made — `torch.tensor(data, device=...)` or
      indexing with a Python list, which on a GPU copy from host memory without asking;
    - `reads`: each read of a device value by the host (`.item()`, `bool()`, `.tolist()`,
      `.cpu()`), every one of which makes a GPU run wait. Reads return zeros (-1 for integers).

    `known`: the device tensors that exist before the step (parameters, buffers, resident data)."""

    def __init__(self, known=()) -> None:
        super().__init__()
        self.copies: list[tuple] = []
        self.reads: list[str] = []
        self.made = WeakIdKeyDictionary({t: True for t in known})

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        aten = torch.ops.aten
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        for t in tensors:
            if t.is_meta and t not in self.made:  # appeared without an operation: copied from host data
                self.copies.append((f"{tuple(t.shape)} from host data, into {func}", False))
                self.made[t] = True
        if func is aten._local_scalar_dense.default and args[0].is_meta:
            self.reads.append(f"{func} {args[0].dtype}")
            return 0.0 if args[0].dtype.is_floating_point else -1
        if func is aten._to_copy.default:
            target = torch.device(kwargs.get("device") or args[0].device)
            if args[0].device.type == "cpu" and target.type == "meta":
                self.copies.append((tuple(args[0].shape), bool(kwargs.get("non_blocking", False))))
            elif args[0].is_meta and target.type == "cpu":
                self.reads.append(f"{func} {tuple(args[0].shape)}")
                return torch.zeros(args[0].shape, dtype=kwargs.get("dtype") or args[0].dtype)
        elif any(t.is_meta for t in tensors) and any(t.device.type == "cpu" and t.ndim > 0 for t in tensors):
            self.copies.append((f"a host tensor in {func}", False))
        out = func(*args, **kwargs)
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.is_meta:
                self.made[t] = True
        return out


def device_tensors(parts) -> list:
    """Every tensor a training run keeps on its device: weights, buffers, optimizer state, EMA,
    normalisation constants, resident data."""
    modules = [parts.model, parts.normalize] + ([parts.ema.module] if parts.ema is not None else [])
    modules += parts.teacher.models if parts.teacher is not None else []
    found = [t for m in modules for t in (*m.parameters(), *m.buffers())]
    found += [t for state in parts.optimizer.state.values() for t in state.values() if isinstance(t, torch.Tensor)]
    train = parts.loaders.train
    return found + ([train.images, train.labels] if hasattr(train, "images") else [])


def parts_on_meta(parts):
    """The training parts of a CPU run with every device tensor moved to the meta device (see
    HostTraffic); fp32, channels-last."""
    import dataclasses

    meta = torch.device("meta")
    parts.model.to(meta)  # in place: the optimizer keeps its parameters
    if parts.ema is not None:
        parts.ema.module.to(meta)
    parts.normalize.to(meta)
    for teacher in parts.teacher.models if parts.teacher is not None else []:
        teacher.to(meta)
    if parts.teacher is not None:
        parts.teacher.channels_last = True
    train = parts.loaders.train
    if hasattr(train, "images"):  # resident data (--data_on_device)
        train.images, train.labels = train.images.to(meta), train.labels.to(meta)
    parts.runtime = dataclasses.replace(parts.runtime, device=meta, amp_dtype=None, channels_last=True)
    return parts


class TinyNet(torch.nn.Module):
    """No batch norm, no dropout: accumulation must equal a larger batch exactly up to float error."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, stride=2),
            torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(1),
            torch.nn.Flatten(),
            torch.nn.Linear(8, 4),
        )

    def forward(self, x):
        return self.net(x)


def tiny_parts(model, loaders, lr=0.5, **step):
    """train.Parts around `model`: fp32 on the CPU, SGD with momentum; `step`: accum_steps, grad_clip,
    sync_every."""
    from tin import optim
    from tin.runtime import hardware
    from train import Parts
    from transforms import Normalize

    return Parts(
        model=model,
        net=model,
        optimizer=optim.build_optimizer(model, "sgd", lr, 0.0, momentum=0.9),
        scaler=torch.amp.GradScaler("cpu", enabled=False),
        ema=None,
        mixer=None,
        normalize=Normalize(),
        loaders=loaders,
        runtime=hardware.Runtime(torch.device("cpu"), None, False, "test: fp32"),
        num_classes=4,
        **step,
    )


def train_epoch(parts, end_batch, scheduler=None, strength=0.0, size=None, **kw):
    """One epoch of train.train_one_epoch from a fresh position: (its figures, the TrainState after)."""
    from tin.engine.state import TrainState
    from train import train_one_epoch

    state = TrainState()
    size = size or parts.loaders.img_size
    stats = train_one_epoch(parts, scheduler, state, epoch=0, end_batch=end_batch, strength=strength, size=size, **kw)
    return stats, state


def same_weights(a: Path, b: Path) -> bool:
    """Two checkpoints hold exactly the same weights."""
    wa, wb = (torch.load(p, map_location="cpu", weights_only=True)["state_dict"] for p in (a, b))
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


def render(page: Path, tmp_path: Path) -> str:
    """The page's DOM after it loaded in headless Chromium (skipped without one; CI installs it)."""
    if CHROMIUM is None:
        pytest.skip("no Chromium on this machine (.ci/run installs Debian's chromium)")
    proc = subprocess.run(
        [
            CHROMIUM,
            *"--headless --no-sandbox --disable-gpu --no-first-run --disable-background-networking".split(),
            *"--disable-component-update --disable-sync --virtual-time-budget=10000 --dump-dom".split(),
            f"--user-data-dir={tmp_path / 'chromium'}",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout
