"""The datasets users bring: CIFAR-10/100 pickles, image folders, .npy arrays, --val_split, --trainval."""

from __future__ import annotations

import csv
import json
import os
import pickle

import numpy as np
import pytest
from PIL import Image

import batch_manager as bm
import main
from conftest import FAST_RUN
from tin.data.readers import DatasetError, hold_out_val, read_tiny_imagenet


def _pickle(path, obj):
    with open(path, "wb") as fh:
        pickle.dump(obj, fh)


def _cifar_batch(n, num_classes, key, rng):
    return {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), key: rng.integers(0, num_classes, n).tolist()}


def make_cifar10(root, rng):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for i in range(1, 6):
        _pickle(folder / f"data_batch_{i}", _cifar_batch(4, 10, "labels", rng))
    _pickle(folder / "test_batch", _cifar_batch(6, 10, "labels", rng))
    _pickle(folder / "batches.meta", {"label_names": [f"class{i}" for i in range(10)]})
    return root


def test_cifar10_pickles(tmp_path):
    rng = np.random.default_rng(0)
    root = make_cifar10(tmp_path, rng)
    data = bm.prepare_data("cifar10", root, 32, 0)
    assert len(data.train) == 20 and len(data.val) == 6 and data.test is None
    assert data.classes[3] == "class3" and data.train.image(0).shape == (32, 32, 3)
    raw = pickle.load(open(root / "cifar-10-batches-py" / "data_batch_1", "rb"))
    assert np.array_equal(data.train.image(1), raw["data"][1].reshape(3, 32, 32).transpose(1, 2, 0))
    assert data.train.labels[:4] == raw["labels"]


def test_cifar100_pickles(tmp_path):
    rng = np.random.default_rng(1)
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    _pickle(folder / "train", _cifar_batch(10, 100, "fine_labels", rng))
    _pickle(folder / "test", _cifar_batch(5, 100, "fine_labels", rng))
    _pickle(folder / "meta", {"fine_label_names": [f"c{i}" for i in range(100)]})
    data = bm.prepare_data("cifar100", tmp_path, 32, 0)
    assert len(data.classes) == 100 and len(data.train) == 10 and len(data.val) == 5


class Boom:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_cifar_pickle_with_code_is_refused(tmp_path):
    make_cifar10(tmp_path, np.random.default_rng(0))
    _pickle(tmp_path / "cifar-10-batches-py" / "data_batch_2", {"data": Boom()})
    with pytest.raises(DatasetError, match="refusing to load"):
        bm.prepare_data("cifar10", tmp_path, 32, 0)
    assert not (tmp_path / "pwned").exists() and not os.path.exists("pwned")


def test_image_folder_any_size(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 3), ("val", 2)):
        for c in ("cat", "dog"):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(n):
                size = (int(rng.integers(20, 90)), int(rng.integers(20, 90)))
                Image.new("RGB", size, (200, 10, 10) if c == "cat" else (10, 10, 200)).save(
                    tmp_path / split / c / f"{i}.png"
                )
    (tmp_path / "test").mkdir()
    Image.new("RGB", (50, 30)).save(tmp_path / "test" / "x.jpg")
    data = bm.prepare_data("folder", tmp_path, 48, 0)
    assert data.classes == ["cat", "dog"] and len(data.train) == 6 and len(data.val) == 4 and data.test.ids == ["x.jpg"]
    assert data.train.image(0).shape == (48, 48, 3) and data.train.image(0)[..., 0].mean() > 150
    (tmp_path / "val" / "bird").mkdir()
    with pytest.raises(DatasetError, match="bird"):
        bm.prepare_data("folder", tmp_path, 48, 0)


def _npy(root, **arrays):
    root.mkdir(parents=True, exist_ok=True)
    for name, a in arrays.items():
        np.save(root / f"{name}.npy", a)
    return root


def test_npy_arrays(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (12, 64, 64, 3), dtype=np.uint8)
    root = _npy(
        tmp_path / "ok", x_train=x, y_train=np.arange(12) % 3, x_val=x[:6], y_val=np.arange(6) % 3, x_test=x[:2]
    )
    data = bm.prepare_data("npy", root, 64, 0)
    assert data.classes == ["0", "1", "2"] and len(data.test) == 2 and np.array_equal(data.train.image(5), x[5])


@pytest.mark.parametrize(
    "arrays, fragment",
    [
        ({"x_train": np.zeros((4, 3, 8, 8), np.uint8)}, "expected images as uint8 (N, H, W, 3)"),
        ({"x_train": np.zeros((4, 8, 8, 3), np.float32)}, "float32"),
        ({"y_train": np.zeros((4,), np.float32)}, "expected integer labels"),
        ({"y_train": np.zeros((5,), np.int64)}, "4 images but y_train.npy 5 labels"),
    ],
)
def test_npy_wrong_shapes_or_dtypes_are_named(tmp_path, arrays, fragment):
    base = {
        "x_train": np.zeros((4, 8, 8, 3), np.uint8),
        "y_train": np.zeros(4, np.int64),
        "x_val": np.zeros((2, 8, 8, 3), np.uint8),
        "y_val": np.zeros(2, np.int64),
    }
    root = _npy(tmp_path / "bad", **{**base, **arrays})
    with pytest.raises(DatasetError) as err:
        bm.prepare_data("npy", root, 8, 0)
    assert fragment in str(err.value) and str(root) in str(err.value)


def test_val_split_is_stratified_and_seeded(tiny_data):
    data = read_tiny_imagenet(tiny_data)
    a, b, c = (hold_out_val(data, 0.25, seed) for seed in (1, 1, 2))
    assert a.val.ids == b.val.ids and a.val.ids != c.val.ids
    assert sorted(np.bincount(a.val.labels).tolist()) == [4, 4, 4, 4]  # 25 % of 16 per class
    assert not set(a.val.ids) & set(a.train.ids) and len(a.train) + len(a.val) == len(data.train)


def test_trainval_run_has_no_val_metrics_but_writes_predictions(tiny_data, tmp_path):
    run = main.main(
        [
            *FAST_RUN,
            "--data_dir",
            str(tiny_data),
            "--output_dir",
            str(tmp_path),
            *"--epochs 2 --trainval --wandb disabled".split(),
        ]
    )
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert len(rows) == 2 and "val_top1" not in rows[0] and float(rows[0]["train_loss"]) > 0  # no empty columns
    assert json.loads((run / "best_results.json").read_text())["best_epoch"] == 2
    assert len(list(csv.DictReader(open(run / "best_test_preds.csv")))) == 9


def test_cifar_run_end_to_end_without_test_split(tmp_path):
    root = make_cifar10(tmp_path / "c10", np.random.default_rng(0))
    run = main.main(
        [
            *"--dataset cifar10 --data_dir".split(),
            str(root),
            *"--arch resnet18 --img_size 32 --batch_size 4 --workers 0 --epochs 1 --output_dir".split(),
            str(tmp_path / "o"),
            *"--wandb disabled --no_analysis".split(),
        ]
    )
    assert (run / "best.pth.tar").is_file() and not (run / "best_test_preds.csv").exists()
    assert "no unlabelled test split" in (run / "log.txt").read_text()
