"""The Tiny-ImageNet-200 layout: parsing, class order, grayscale, and one-line errors."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from conftest import NAMES, WNIDS, loaders_for, make_layout
from tin.data import readers as bm


def test_layout_parsing_and_sorted_class_order(tiny_data):
    data = bm.read_tiny_imagenet(tiny_data)
    assert data.classes == sorted(WNIDS)  # index = position in the sorted wnids, not wnids.txt order
    assert data.names == dict(zip(WNIDS, NAMES, strict=True))
    assert len(data.train.paths) == 4 * 16 and len(data.val.paths) == 4 * 5 and len(data.test.paths) == 9
    assert data.test.labels is None
    for path, label in zip(data.train.paths, data.train.labels, strict=True):
        assert path.parent.parent.name == data.classes[label]
    ann = {
        ln.split("\t")[0]: ln.split("\t")[1] for ln in (tiny_data / "val/val_annotations.txt").read_text().splitlines()
    }
    for path, label in zip(data.val.paths, data.val.labels, strict=True):
        assert ann[path.name] == data.classes[label]


def test_grayscale_jpegs_become_rgb(tiny_data):
    from PIL import Image

    data = bm.read_tiny_imagenet(tiny_data)
    gray = [p for p in data.train.paths if Image.open(p).mode == "L"]
    assert gray, "fixture should contain grayscale JPEGs"
    assert bm.load_rgb(gray[0]).shape == (64, 64, 3)
    loaders = loaders_for(tiny_data, batch_size=8)
    x, y = next(iter(loaders.train))
    assert x.shape == (8, 3, 64, 64) and x.dtype == torch.uint8 and y.dtype == torch.int64


def _fresh(tmp_path):
    return make_layout(tmp_path / "tin", n_train=2, n_val=1, n_test=1)


def _missing_root(root):
    shutil.rmtree(root)
    return root


def _missing_wnids(root):
    (root / "wnids.txt").unlink()
    return root / "wnids.txt"


def _empty_class(root):
    for p in (root / "train" / WNIDS[0] / "images").iterdir():
        p.unlink()
    return root / "train" / WNIDS[0] / "images"


def _missing_class_folder(root):
    shutil.rmtree(root / "train" / WNIDS[1])
    return root / "train" / WNIDS[1] / "images"


def _unknown_wnid(root):
    (root / "val/val_annotations.txt").write_text("val_0.JPEG\tn99999999\t0\t0\t1\t1\n")
    return root / "val/val_annotations.txt"


def _missing_test(root):
    shutil.rmtree(root / "test")
    return root / "test"


DAMAGES = {
    "missing dataset folder": (_missing_root, "does not exist"),
    "missing wnids.txt": (_missing_wnids, "is missing"),
    "empty class": (_empty_class, "holds no images"),
    "missing class folder": (_missing_class_folder, "is missing"),
    "unknown wnid in annotations": (_unknown_wnid, "n99999999"),
    "missing test folder": (_missing_test, "is missing"),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_bad_layouts_give_one_line_errors_naming_the_path(tmp_path, damage):
    root = _fresh(tmp_path)
    fn, fragment = DAMAGES[damage]
    named = fn(root)
    with pytest.raises(bm.DatasetError) as err:
        bm.read_tiny_imagenet(root)
    message = str(err.value)
    assert "\n" not in message and fragment in message and str(named) in message


def test_undecodable_image_names_the_file(tmp_path):
    root = _fresh(tmp_path)
    victim = sorted((root / "train" / WNIDS[0] / "images").iterdir())[0]
    victim.write_bytes(b"not a jpeg")
    with pytest.raises(bm.DatasetError, match=victim.name):
        bm.load_rgb(victim)


def test_batch_larger_than_train_set_is_refused(tiny_data):
    with pytest.raises(bm.DatasetError, match="--batch_size"):
        loaders_for(tiny_data, batch_size=1000)


def test_layout_writer_never_overwrites(tiny_data):
    with pytest.raises(bm.UserError, match="already exists"):
        bm.write_tiny_imagenet_layout(tiny_data, {}, {}, [], [])
    assert (tiny_data / "wnids.txt").is_file()


def test_demo_dataset_is_real_digits_in_the_layout(tmp_path):
    from demo_data import make_demo_dataset

    data = bm.read_tiny_imagenet(make_demo_dataset(tmp_path / "demo"))
    assert len(data.classes) == 10 and data.names[data.classes[3]] == "digit three"
    assert len(data.train.paths) + len(data.val.paths) + len(data.test.paths) == 1797  # sklearn's digits
    image = bm.load_rgb(data.val.paths[0])
    assert image.shape == (64, 64, 3) and np.ptp(image) > 100
