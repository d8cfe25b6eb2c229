"""Decode once: the memory-mapped cache is built, reused, rebuilt when data or file change, and
unreadable or unusual image files are handled before training starts."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import batch_manager as bm
from conftest import WNIDS, loaders_for, make_layout
from tin.data import decode_cache
from tin.data.readers import DatasetError, read_tiny_imagenet


@pytest.fixture
def fresh(tmp_path):
    return make_layout(tmp_path / "tin", n_train=4, n_val=2, n_test=3)


def _caches(root):
    return sorted((root / ".cache").glob("*.npy"))


def test_cache_holds_exactly_the_decoded_images_and_is_reused(fresh):
    data = bm.prepare_data("tiny-imagenet", fresh, 64, 0)
    files = read_tiny_imagenet(fresh)
    assert isinstance(data.train.array, np.memmap) and data.train.array.shape == (16, 64, 64, 3)
    for i in (0, 7, 15):
        assert np.array_equal(data.train.image(i), np.asarray(Image.open(files.train.paths[i]).convert("RGB")))
    assert len(_caches(fresh)) == 3  # train, val, test
    mtimes = [p.stat().st_mtime_ns for p in _caches(fresh)]
    again = bm.prepare_data("tiny-imagenet", fresh, 64, 0)
    assert [p.stat().st_mtime_ns for p in _caches(fresh)] == mtimes  # reused, not rebuilt
    assert again.train.ids == data.train.ids


def test_cached_and_uncached_paths_give_identical_batches(fresh):
    def batches(**kw):
        loaders = loaders_for(fresh, batch_size=8, seed=5, **kw)
        loaders.set_epoch(2, 0.8)
        return torch.cat([x for x, _ in loaders.train]), torch.cat([x for x, _ in loaders.val])

    cached, plain = batches(use_cache=True), batches(use_cache=False)
    assert torch.equal(cached[0], plain[0]) and torch.equal(cached[1], plain[1])


def test_changed_data_rebuilds_the_cache(fresh):
    bm.prepare_data("tiny-imagenet", fresh, 64, 0)
    victim = sorted((fresh / "train" / WNIDS[0] / "images").iterdir())[0]
    Image.new("RGB", (64, 64), (255, 0, 0)).save(victim)
    os.utime(victim, ns=(1, 1))
    data = bm.prepare_data("tiny-imagenet", fresh, 64, 0)
    row = [i for i, p in enumerate(read_tiny_imagenet(fresh).train.paths) if p == victim][0]
    assert abs(int(data.train.image(row)[..., 0].mean()) - 254) <= 2
    assert len([p for p in _caches(fresh) if p.name.startswith("train_")]) == 2  # old key kept, new key used


@pytest.mark.parametrize("damage", ["truncate", "flip bytes", "no sidecar"])
def test_corrupt_or_truncated_cache_is_detected_and_rebuilt(fresh, damage):
    good = bm.prepare_data("tiny-imagenet", fresh, 64, 0).train.all_images().copy()
    npy = [p for p in _caches(fresh) if p.name.startswith("train_")][0]
    if damage == "truncate":
        npy.write_bytes(npy.read_bytes()[:5000])
    elif damage == "flip bytes":
        raw = bytearray(npy.read_bytes())
        raw[-100:] = bytes(255 - b for b in raw[-100:])
        npy.write_bytes(bytes(raw))
    else:
        npy.with_suffix(".json").unlink()
    assert np.array_equal(bm.prepare_data("tiny-imagenet", fresh, 64, 0).train.all_images(), good)


def test_unwritable_cache_dir_is_a_clear_error(fresh, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(DatasetError, match="--cache_dir"):
        bm.prepare_data("tiny-imagenet", fresh, 64, 0, cache_dir=blocker / "cache")


def _write_odd_files(root):
    folder = root / "train" / sorted(WNIDS)[1] / "images"
    Image.new("CMYK", (64, 64), (0, 255, 255, 0)).save(folder / "cmyk.JPEG")
    Image.fromarray(np.full((64, 64), 40000, np.uint16)).save(folder / "deep.png")
    Image.new("RGB", (100, 37), (0, 0, 255)).save(folder / "odd_size.JPEG")
    Image.new("L", (64, 64), 77).save(folder / "gray.JPEG")
    return folder


@pytest.mark.parametrize("use_cache", [True, False])
def test_unusual_images_are_converted(fresh, use_cache):
    folder = _write_odd_files(fresh)
    data = bm.prepare_data("tiny-imagenet", fresh, 64, 0, use_cache=use_cache)
    images = {
        data.train.ids[i]: data.train.image(i)
        for i in range(len(data.train))
        if data.train.ids[i] in ("cmyk.JPEG", "deep.png", "odd_size.JPEG", "gray.JPEG")
    }
    assert len(images) == 4 and folder.is_dir()
    cmyk = images["cmyk.JPEG"].reshape(-1, 3).mean(0)
    assert cmyk[0] > 200 and cmyk[1] < 60  # cyan-free, magenta+yellow -> red
    assert images["deep.png"].min() == 255  # 16-bit scaled, not clipped to garbage
    assert images["gray.JPEG"].shape == (64, 64, 3) and abs(int(images["gray.JPEG"].mean()) - 77) <= 2
    if use_cache:  # odd sizes are stored at the native 64x64
        assert images["odd_size.JPEG"].shape == (64, 64, 3) and images["odd_size.JPEG"][..., 2].mean() > 200
    loaders = loaders_for(fresh, batch_size=4, use_cache=use_cache)
    assert all(x.shape[1:] == (3, 64, 64) for x, _ in loaders.train)


@pytest.mark.parametrize("use_cache", [True, False])
def test_unreadable_files_are_listed_before_training(fresh, use_cache):
    folder = fresh / "train" / sorted(WNIDS)[2] / "images"
    (folder / "empty.JPEG").write_bytes(b"")
    (folder / "text.JPEG").write_text("this is not an image")
    good = sorted(folder.iterdir())[0]
    (folder / "truncated.JPEG").write_bytes(good.read_bytes()[:200])
    with pytest.raises(DatasetError) as err:
        bm.prepare_data("tiny-imagenet", fresh, 64, 0, use_cache=use_cache)
    message = str(err.value)
    assert message.startswith("3 unreadable image(s) in the train split") and "--skip_bad_images" in message
    assert all(name in message for name in ("empty.JPEG", "text.JPEG", "truncated.JPEG"))
    data = bm.prepare_data("tiny-imagenet", fresh, 64, 0, use_cache=use_cache, skip_bad=True)
    assert len(data.train) == 16 and not {"empty.JPEG", "text.JPEG", "truncated.JPEG"} & set(data.train.ids)


def test_skip_bad_images_reports_the_count(fresh, caplog):
    (fresh / "test" / "images" / "broken.JPEG").write_bytes(b"\xff\xd8\xff")
    with caplog.at_level("WARNING", logger="tin"):
        data = bm.prepare_data("tiny-imagenet", fresh, 64, 0, skip_bad=True)
    assert len(data.test) == 3 and "skipping 1 unreadable test image(s)" in caplog.text


def test_cache_sidecar_records_what_it_holds(fresh):
    bm.prepare_data("tiny-imagenet", fresh, 64, 0)
    meta = json.loads(sorted((fresh / ".cache").glob("train_*.json"))[0].read_text())
    assert meta["shape"] == [16, 64, 64, 3] and meta["version"] == decode_cache.CACHE_VERSION and meta["bad"] == []
