"""predict.py: image files of any kind -> a CSV of the top classes with their names, from the
checkpoint alone; unreadable files listed and skipped; ensembles of other classes refused."""

from __future__ import annotations

import csv

import pytest
import torch

import predict
from conftest import NAMES, WNIDS, odd_images
from utils import UserError


def read_rows(path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_folder_of_mixed_images_gives_named_predictions(trained_run, tmp_path, capsys):
    images = odd_images(tmp_path / "photos")
    out = predict.run([str(trained_run), str(tmp_path / "photos"), "--out", str(tmp_path / "p.csv")])
    rows = read_rows(out)
    readable = {str(p) for name, p in images.items() if name != "corrupt.jpg"}
    assert {r["path"] for r in rows} == readable  # notes.txt is not an image; the corrupt one is skipped
    assert list(rows[0]) == ["path"] + [f"{c}_{k}" for k in range(1, 5) for c in ("wnid", "name", "prob")]  # 4 classes
    for r in rows:
        probs = [float(r[f"prob_{k}"]) for k in range(1, 5)]
        assert probs == sorted(probs, reverse=True) and sum(probs) == pytest.approx(1.0, abs=1e-5)
        assert dict(zip(WNIDS, NAMES, strict=True))[r["wnid_1"]] == r["name_1"]
    console = capsys.readouterr().out
    assert "skipped 1" in console and "corrupt.jpg: OSError" in console
    assert "gray.jpg" in console and f"{len(rows)} image(s)" in console


def test_predictions_match_the_runs_own_test_predictions(trained_run, tiny_data, tmp_path):
    ckpt, images = str(trained_run / "best.pth.tar"), str(tiny_data / "test" / "images")
    out = predict.run(["--checkpoint", ckpt, images, "--out", str(tmp_path / "p.csv")])  # as evaluate.py takes them
    with open(trained_run / "best_test_preds.csv", newline="") as fh:
        submitted = {r["image"]: r["label"] for r in csv.DictReader(fh)}
    predicted = {r["path"].rsplit("/", 1)[-1]: r["wnid_1"] for r in read_rows(out)}
    assert predicted == submitted


def test_globs_topk_and_an_ensemble_of_the_same_run(trained_run, tiny_data, tmp_path):
    pattern = str(tiny_data / "val" / "images" / "*.JPEG")
    args = [str(trained_run / "best.pth.tar"), str(trained_run / "last.pth.tar"), pattern, "--topk", "2"]
    rows = read_rows(predict.run([*args, "--tta", "flip", "--out", str(tmp_path / "p.csv")]))
    assert len(rows) == 20 and list(rows[0])[-1] == "prob_2"


def test_no_readable_image_is_a_clear_error(trained_run, tmp_path):
    images = odd_images(tmp_path / "photos")
    with pytest.raises(UserError, match="no readable image"):
        predict.run([str(trained_run), str(images["corrupt.jpg"]), str(tmp_path / "missing.png")])
    with pytest.raises(UserError, match="no images to predict"):
        predict.run([str(trained_run)])
    with pytest.raises(UserError, match="no checkpoint"):
        predict.run([str(images["gray.jpg"])])


def test_ensemble_of_checkpoints_for_other_classes_is_refused(trained_run, tmp_path):
    ckpt = torch.load(trained_run / "best.pth.tar", map_location="cpu", weights_only=True)
    other = tmp_path / "other.pth.tar"
    torch.save({**ckpt, "classes": ["n09999999", *ckpt["classes"][1:]]}, other)
    images = odd_images(tmp_path / "photos")
    with pytest.raises(UserError, match="other classes"):
        predict.run([str(trained_run), str(other), str(images["gray.jpg"])])


def test_checkpoint_without_names_shows_wnids(trained_run, tmp_path, capsys):
    ckpt = torch.load(trained_run / "best.pth.tar", map_location="cpu", weights_only=True)
    old = tmp_path / "old.pth.tar"
    torch.save({k: v for k, v in ckpt.items() if k != "names"}, old)
    images = odd_images(tmp_path / "photos")
    rows = read_rows(predict.run([str(old), str(images["gray.jpg"]), "--out", str(tmp_path / "p.csv")]))
    assert rows[0]["name_1"] == rows[0]["wnid_1"] and capsys.readouterr().out.count("holds no class names") == 1
