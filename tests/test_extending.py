"""docs/ARCHITECTURE.md's "to add X" table, kept true: a dataset format, an augmentation op, a
learning-rate schedule, a metric and a model, each added exactly the documented way (here: the same
registry entries, made at run time), then one real run that uses all five."""

from __future__ import annotations

import csv
import re

import numpy as np
import pytest
import torch
from timm.scheduler import StepLRScheduler
from torch import nn

import arch
import main
import transforms as T
import val
from conftest import PINNED
from tin import optim
from tin.data import readers
from tin.data.readers import DataSplits, Split
from utils import topk_correct


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


class ToyNet(nn.Module):
    def __init__(self, num_classes: int, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, 2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Sequential(nn.Dropout(drop_rate), nn.Linear(8, num_classes))

    def forward(self, x):
        return self.head(self.body(x))


@pytest.fixture
def extended(monkeypatch):
    """The documented edits: READERS, OPS + RECIPE, SCHEDULES, val.METRICS, arch.REGISTRY + FAMILY_GROUPS."""
    monkeypatch.setitem(readers.READERS, "toy", read_toy)
    monkeypatch.setitem(T.OPS, "invert", Invert())
    monkeypatch.setitem(T.RECIPE, "invert", {"p": 0.5})
    monkeypatch.setitem(optim.SCHEDULES, "halfway", _halfway)
    monkeypatch.setitem(val.METRICS, "top2", (lambda logits, labels: topk_correct(logits, labels, (2,))[0], 100.0))
    monkeypatch.setitem(arch.REGISTRY, "toy_net", arch.ArchSpec("toy_net", "", "toy", ("drop_rate",), local=ToyNet))
    monkeypatch.setitem(optim.FAMILY_GROUPS, "toy", "small")


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
