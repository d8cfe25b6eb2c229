"""docs/ARCHITECTURE.md's "to add X" table, kept true: a dataset format, an augmentation op, a
learning-rate schedule, a metric and a model, each added exactly the documented way (here: the same
registry entries, made at run time), then one real run that uses all five; a transformer family (its
fixed input grid refuses --eval_size, its learning-rate group is the ViTs'); and a flag, added to a
copy of the source as the table says, then given on the command line, in a preset and on resume."""

from __future__ import annotations

import csv
import re
import shutil
import subprocess
import sys
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from timm.scheduler import StepLRScheduler
from torch import nn

import arch
import main
import transforms as T
import val
from conftest import FAST_RUN, PINNED, ROOT
from tin import optim
from tin.data import readers
from tin.data.readers import DataSplits, Split
from utils import UserError, topk_correct


# --------------------------------------------------------------------------- a dataset format
def read_toy(root):
    """`toy`: ROOT/toy.npz with x_train, y_train, x_val, y_val (uint8 images, integer labels)."""
    d = np.load(root / "toy.npz")
    classes = ["dark", "light"]

    def split(name):
        return Split([f"{name}_{i}" for i in range(len(d[f"y_{name}"]))], d[f"y_{name}"].tolist(), array=d[f"x_{name}"])

    return DataSplits(root, classes, {c: c for c in classes}, split("train"), split("val"), None)


def _toy_data(root):
    rng = np.random.default_rng(0)

    def images(n):
        y = rng.integers(0, 2, n)
        x = (rng.integers(0, 60, (n, 32, 32, 3)) + 150 * y[:, None, None, None]).astype(np.uint8)
        return x, y

    (x_train, y_train), (x_val, y_val) = images(64), images(16)
    root.mkdir()
    np.savez(root / "toy.npz", x_train=x_train, y_train=y_train, x_val=x_val, y_val=y_val)
    return root


# --------------------------------------------------------------------------- an augmentation op
class Invert(T.BatchOp):
    """255 - x for the images that draw it (p), as albumentations' InvertImg."""

    name = "invert"

    def device_params(self, d):
        return {"on": d["on"].float()}

    def pixels(self, x, dev, d):
        if not bool(d["on"].any()):
            return x
        return torch.where(dev["on"].view(-1, 1, 1, 1) > 0, 255.0 - x, x)

    def albumentations(self, A, p, size):
        return [A.InvertImg(p=p["p"])]


# --------------------------------------------------------------------------- a schedule, a model
def _halfway(opt, total, per_epoch, common, o):
    """The rate halves once, halfway through the run."""
    return StepLRScheduler(opt, decay_t=max(total // 2, 1), decay_rate=0.5, **common)


class ToyFormer(nn.Module):
    """A transformer's essentials for the test: patches, a position embedding built for one input
    size (the grid that cannot change after building), one attention layer, a head."""

    def __init__(self, num_classes: int, img_size: int = 32, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, 16, 8, 8)
        self.pos = nn.Parameter(torch.zeros(1, (img_size // 8) ** 2, 16))
        self.attn = nn.TransformerEncoderLayer(16, 2, 32, dropout=drop_rate, batch_first=True)
        self.head = nn.Linear(16, num_classes)

    def forward(self, x):
        tokens = self.patch(x).flatten(2).transpose(1, 2) + self.pos  # a size other than img_size fails here
        return self.head(self.attn(tokens).mean(1))


class ToyNet(nn.Module):
    def __init__(self, num_classes: int, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, 2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Sequential(nn.Dropout(drop_rate), nn.Linear(8, num_classes))

    def forward(self, x):
        return self.head(self.body(x))


@pytest.fixture
def extended(monkeypatch):
    """The documented edits: READERS, OPS + RECIPE, SCHEDULES, val.METRICS, arch.REGISTRY (two models: a
    CNN, and a transformer family with its fixed grid)."""
    monkeypatch.setitem(readers.READERS, "toy", read_toy)
    monkeypatch.setitem(T.OPS, "invert", Invert())
    monkeypatch.setitem(T.RECIPE, "invert", {"p": 0.5})
    monkeypatch.setitem(optim.SCHEDULES, "halfway", _halfway)
    monkeypatch.setitem(val.METRICS, "top2", (lambda logits, labels: topk_correct(logits, labels, (2,))[0], 100.0))
    toy_net = arch.ArchSpec("toy_net", "", "toy", ("drop_rate",), local=ToyNet, lr_group="small")
    monkeypatch.setitem(arch.REGISTRY, "toy_net", toy_net)
    former = partial(ToyFormer, img_size=32)  # a local builder is given its input size as resolution_kwargs would
    toy_former = arch.ArchSpec(
        "toy_former", "", "toyformer", ("drop_rate",), local=former, lr_group="vit", fixed_grid=True
    )
    monkeypatch.setitem(arch.REGISTRY, "toy_former", toy_former)


def test_a_new_op_runs_in_both_backends_and_changes_no_other_ops_draws(extended):
    image = np.full((32, 32, 3), 40, np.uint8)
    x = torch.from_numpy(image).permute(2, 0, 1).unsqueeze(0).expand(200, -1, -1, -1).contiguous()
    recipe = T.build_recipe("invert.p=0.5")
    aug = T.BatchAugment(seed=1, recipe=recipe)
    aug.set_epoch(0, 1.0, 32)
    inverted = (aug(x, 0).mean((1, 2, 3)) > 127).float().mean()
    assert 0.35 < inverted < 0.65  # p 0.5 at strength 1
    pipeline = T.train_pipeline(32, 1.0, recipe)
    assert any(type(t).__name__ == "InvertImg" for t in pipeline.transforms)
    # each op draws from its own stream: the op switched off, every other op's result is what it was
    without = {k: v for k, v in T.build_recipe().items() if k != "invert"}
    off = T.BatchAugment(seed=1, recipe={**without, "invert": {"p": 0.0}})
    before = T.BatchAugment(seed=1, recipe=without)
    for a in (off, before):
        a.set_epoch(0, 1.0, 32)
    assert torch.equal(off(x, 3), before(x, 3))


def test_a_run_uses_the_new_dataset_op_schedule_metric_and_model(extended, tmp_path):
    data = _toy_data(tmp_path / "toy")
    run = main.main(
        [
            *"--dataset toy --arch toy_net --sched halfway --epochs 2 --batch_size 8 --img_size 32 --workers 0".split(),
            *"--aug_ops invert.p=1 --aug_schedule constant --warmup_epochs 0 --wandb disabled --no_analysis".split(),
            *PINNED,
            "--data_dir",
            str(data),
            "--output_dir",
            str(tmp_path / "runs"),
        ]
    )
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert len(rows) == 2 and all(r["val_top2"] for r in rows)  # the metric: a metrics.csv column...
    assert all(float(r["val_top1"]) <= float(r["val_top2"]) <= 100 for r in rows)
    log = (run / "log.txt").read_text()
    assert re.search(r"epoch 2/2 .* val_top2 \d", log)  # ...and in the log line
    assert float(rows[1]["lr"]) == pytest.approx(float(rows[0]["lr"]) / 2)  # the schedule: halved halfway
    assert "small CNN from scratch" in log  # the model: its family's learning-rate recipe
    assert "toy_net: " in log and "2 classes" in log  # the model and the dataset
    assert not (run / "best_test_preds.csv").exists()  # the toy format has no unlabelled test split


def test_a_new_transformer_family_refuses_another_eval_size_and_takes_the_vit_recipe(extended, tmp_path):
    data = _toy_data(tmp_path / "toy")
    argv = [*"--dataset toy --arch toy_former --epochs 1 --batch_size 8 --img_size 32 --workers 0".split()]
    argv += [*"--wandb disabled --no_analysis".split(), *PINNED, "--data_dir", str(data), "--output_dir", str(tmp_path)]
    with pytest.raises(UserError, match="--eval_size 40: toy_former is built for 32x32 inputs"):
        main.main([*argv, "--eval_size", "40"])
    run = main.main(argv)
    log = (run / "log.txt").read_text()
    assert "ViT/DeiT from scratch" in log and "epoch 1/1" in log


FIELD_BEFORE = "    kd_views: int = _opt("
NEW_FIELD = '    loss_scale: float = _opt("multiply the training loss by this (a test flag)", default=1.0)\n'


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, (path, old)
    path.write_text(text.replace(old, new, 1))


def test_a_new_flag_is_the_documented_edits_and_the_command_line_presets_and_resume_follow(tiny_data, tmp_path):
    """The table's edits for a flag, made in a copy of the source: a Config field (tin/config/schema.py),
    its value handed down by the build (a Parts field, tin/run/build.py), read where it is used (the
    step, train.py), and its README line. Then, with nothing else edited: --help shows it, a preset and
    the command line set it, config.yaml records it, and a resumed run refuses a changed value."""
    tree = tmp_path / "src"
    skip = {".venv", ".git", "data", "checkpoints", "bench", "tests", "docs"}  # the root's; tin/data is code
    shutil.copytree(
        ROOT, tree, ignore=lambda d, names: [n for n in names if n == "__pycache__" or (Path(d) == ROOT and n in skip)]
    )
    _edit(tree / "tin/config/schema.py", FIELD_BEFORE, NEW_FIELD + FIELD_BEFORE)
    _edit(
        tree / "train.py",
        "    progress_every: float = 30.0",
        "    loss_scale: float = 1.0\n    progress_every: float = 30.0",
    )
    _edit(
        tree / "train.py",
        "loss = loss_fn(logits.float(), targets)",
        "loss = loss_fn(logits.float(), targets) * parts.loss_scale",
    )
    _edit(
        tree / "tin/run/build.py",
        "        progress_every=cfg.progress_every,",
        "        progress_every=cfg.progress_every,\n        loss_scale=cfg.loss_scale,",
    )
    _edit(tree / "README.md", "## Reference", "## Reference\n\n`--loss_scale` multiplies the training loss.")

    def main_py(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "main.py", *args], cwd=tree, capture_output=True, text=True, timeout=300)

    assert "--loss_scale" in main_py("--help").stdout
    preset = tmp_path / "preset.yaml"
    preset.write_text("loss_scale: 0.5\n")
    common = [*FAST_RUN, "--epochs", "1", "--data_dir", str(tiny_data), "--output_dir", str(tmp_path / "runs")]
    done = main_py("--config", str(preset), *common, "--wandb", "disabled")
    assert done.returncode == 0, done.stderr[-2000:]
    (run,) = (tmp_path / "runs").iterdir()
    assert yaml.safe_load((run / "config.yaml").read_text())["loss_scale"] == 0.5
    halved = float(next(csv.DictReader(open(run / "metrics.csv")))["train_loss"])
    again = main_py(*common, "--wandb", "disabled", "--loss_scale", "1")
    assert again.returncode == 0, again.stderr[-2000:]
    (second,) = [p for p in (tmp_path / "runs").iterdir() if p != run]
    whole = float(next(csv.DictReader(open(second / "metrics.csv")))["train_loss"])
    assert halved == pytest.approx(whole / 2, rel=0.02)  # the step reads it: the same run, its loss halved
    refused = main_py("--resume", str(run), "--loss_scale", "2")
    assert refused.returncode != 0 and "--loss_scale 2.0 (the run has 0.5)" in refused.stderr
