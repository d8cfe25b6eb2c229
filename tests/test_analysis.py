"""Evaluation CLI (ensembles, TTA, per-class accuracy), the analysis outputs, and run reports."""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys

import pytest
import torch
from PIL import Image

import evaluate
import main
import val
from conftest import FAST_ARCH, FAST_RUN, ROOT, make_layout, render
from utils import UserError


def _rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def analysed_run(tiny_data, tmp_path_factory):
    """A real run with the end-of-run analysis on (FAST_RUN turns it off)."""
    args = [a for a in FAST_RUN if a != "--no_analysis"]
    return main.main(
        [
            *args,
            "--data_dir",
            str(tiny_data),
            "--output_dir",
            str(tmp_path_factory.mktemp("ana")),
            *"--epochs 2 --wandb disabled".split(),
        ]
    )


def _png(path, min_side=300):
    with Image.open(path) as im:
        im.load()
        assert min(im.size) >= min_side, f"{path.name} is only {im.size}"


def test_end_of_run_analysis_writes_every_output(analysed_run):
    for name in ("curves.png", "confusion_matrix.png", "tsne.png"):
        _png(analysed_run / name)
    _png(analysed_run / "misclassified.png", min_side=250)
    per_class = _rows(analysed_run / "per_class_accuracy.csv")
    assert len(per_class) == 4 and list(per_class[0]) == ["wnid", "name", "accuracy", "count"]
    assert sum(int(r["count"]) for r in per_class) == 20 and {r["name"] for r in per_class} >= {"goldfish", "teapot"}
    confusions = _rows(analysed_run / "top_confusions.csv")
    assert all(r["true"] != r["predicted"] and int(r["count"]) > 0 for r in confusions)
    logits, labels, feats = (
        torch.load(analysed_run / "features" / f"{k}.pt") for k in ("logits", "labels", "features")
    )
    assert logits.shape == (20, 4) and labels.shape == (20,) and feats.shape == (20, 128)  # resnet9_w16's width
    assert "worst classes:" in (analysed_run / "log.txt").read_text()


def test_analyze_cli_on_a_run_and_on_a_dataset(trained_run, tiny_data, tmp_path):
    proc = subprocess.run(
        [sys.executable, "analyze.py", "run", str(trained_run), "--output_dir", str(tmp_path / "a")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    _png(tmp_path / "a" / "confusion_matrix.png")
    proc = subprocess.run(
        [sys.executable, "analyze.py", "dataset", "--data_dir", str(tiny_data), "--output_dir", str(tmp_path / "d")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    for name in ("size_distribution_histograms.png", "split_image_counts.png", "class_balance.png", "sample_grid.png"):
        _png(tmp_path / "d" / name, min_side=250)
    summary = json.loads((tmp_path / "d" / "dataset_summary.json").read_text())
    assert summary["images"] == {"train": 64, "val": 20, "test": 9} and summary["grayscale"]["train"] > 0
    proc = subprocess.run(
        [sys.executable, "analyze.py", "dataset", "--data_dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1 and proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr


def test_ensemble_of_a_checkpoint_with_itself_equals_the_single_model(trained_run, tmp_path):
    best = str(trained_run / "best.pth.tar")
    single = evaluate.run(["--checkpoint", best, "--output_dir", str(tmp_path / "one")])
    for rule in ("mean", "max_conf"):
        pair = evaluate.run(["--checkpoint", best, best, "--ensemble", rule, "--output_dir", str(tmp_path / rule)])
        assert pair == pytest.approx(single)
        assert (tmp_path / rule / "test_preds.csv").read_text() == (tmp_path / "one" / "test_preds.csv").read_text()
    rows = _rows(tmp_path / "one" / "per_class_accuracy.csv")
    assert len(rows) == 4 and sum(int(r["count"]) for r in rows) == 20


def test_max_conf_takes_each_image_from_its_most_confident_model():
    a = torch.tensor([[0.9, 0.1], [0.4, 0.6]])
    b = torch.tensor([[0.3, 0.7], [0.05, 0.95]])
    assert torch.equal(val.combine([a, b], "max_conf"), torch.tensor([[0.9, 0.1], [0.05, 0.95]]))
    assert torch.allclose(val.combine([a, b], "mean"), (a + b) / 2)


def test_flip_tta_runs_and_ensembles_mix_archs_and_sizes(trained_run, tiny_data, tmp_path):
    other = main.main(
        [
            *"--arch budget_cnn --img_size 48 --batch_size 8 --workers 0 --epochs 1 --data_dir".split(),
            str(tiny_data),
            "--output_dir",
            str(tmp_path / "b"),
            *"--wandb disabled --no_analysis".split(),
        ]
    )
    tta = evaluate.run(
        ["--checkpoint", str(trained_run / "best.pth.tar"), "--tta", "flip", "--output_dir", str(tmp_path / "t")]
    )
    assert 0 <= tta["val_top1"] <= 100 and tta["val_loss"] > 0
    mixed = evaluate.run(
        [
            "--checkpoint",
            str(trained_run / "best.pth.tar"),
            str(other / "best.pth.tar"),
            "--output_dir",
            str(tmp_path / "m"),
        ]
    )
    assert 0 <= mixed["val_top1"] <= 100 and len(_rows(tmp_path / "m" / "test_preds.csv")) == 9
    members = json.loads((tmp_path / "m" / "val_metrics.json").read_text())["members"]  # each one alone, too
    assert [m["checkpoint"] for m in members] == [str(trained_run / "best.pth.tar"), str(other / "best.pth.tar")]
    assert members[0]["val_top1"] == pytest.approx(
        evaluate.run([str(trained_run), "--out", str(tmp_path / "a")])["val_top1"]
    )
    again = evaluate.run([str(other), str(trained_run)])  # the default folder (in other/eval) names both runs
    assert again == pytest.approx(mixed)
    names = [p.name for p in (other / "eval").iterdir() if p.name.startswith("ensemble2_mean_")]
    assert any(trained_run.name.split("_", 1)[1] in n and other.name.split("_", 1)[1] in n for n in names), names


def test_checkpoints_with_other_classes_are_not_ensembled(trained_run, tmp_path):
    other = make_layout(tmp_path / "other")
    (other / "wnids.txt").write_text("n01000001\nn02000003\nn03000004\nn09999999\n")
    (other / "train" / "n04000002").rename(other / "train" / "n09999999")
    ann = (other / "val" / "val_annotations.txt").read_text().replace("n04000002", "n09999999")
    (other / "val" / "val_annotations.txt").write_text(ann)
    run = main.main(
        [
            *FAST_RUN,
            "--data_dir",
            str(other),
            "--output_dir",
            str(tmp_path / "o"),
            *"--epochs 1 --wandb disabled".split(),
        ]
    )
    with pytest.raises(UserError, match="cannot ensemble"):
        evaluate.run(["--checkpoint", str(trained_run / "best.pth.tar"), str(run / "best.pth.tar")])


def test_report_compares_runs_and_skips_unfinished_folders(trained_run, analysed_run, tmp_path):
    (tmp_path / "half").mkdir()
    proc = subprocess.run(
        [
            sys.executable,
            "report.py",
            str(trained_run),
            str(analysed_run),
            str(tmp_path / "half"),
            "--output_dir",
            str(tmp_path / "r"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    report = (tmp_path / "r" / "report.md").read_text()
    lines = report.splitlines()
    header, rows = lines[2], [line for line in lines[4:] if line.startswith("| ")][:2]
    assert header.startswith("| run | name | seed | data | arch | params | gflops | epochs | val_top1")
    assert all(r.split(" | ")[4] == FAST_ARCH for r in rows) and lines[4 + len(rows)] == ""  # one row per run
    assert all(r.split(" | ")[3].startswith("tiny-imagenet, 4 classes") for r in rows)  # what each trained on
    assert "Skipped (not finished runs): half" in report
    _png(tmp_path / "r" / "report_val_top1.png")


def test_report_without_finished_runs_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = subprocess.run(
        [sys.executable, "report.py", str(tmp_path / "empty"), "--output_dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1 and proc.stderr.startswith("error: none of 1 folder(s) is a finished run")
    assert not (tmp_path / "report.md").exists()


def test_eval_size_evaluates_val_and_test_at_its_resolution(tiny_data, tmp_path):
    """--eval_size (FixRes): training at --img_size 32, val and test at 40; evaluate.py reproduces the
    run's figure from the checkpoint (at the same 40 px), and transformers are refused."""
    import batch_manager

    data = batch_manager.prepare_data("tiny-imagenet", tiny_data, 32, 0, seed=0, use_cache=False)
    loaders = batch_manager.build_loaders(data, 32, 8, 0, 0, eval_size=40)
    assert next(iter(loaders.val))[0].shape[-2:] == (40, 40) and next(iter(loaders.test))[0].shape[-2:] == (40, 40)
    common = ["--data_dir", str(tiny_data), "--output_dir", str(tmp_path), "--epochs", "1", "--wandb", "disabled"]
    run = main.main([*FAST_RUN, *common, "--eval_size", "40"])
    best = json.loads((run / "best_results.json").read_text())
    again = evaluate.run(["--checkpoint", str(run / "best.pth.tar"), "--output_dir", str(tmp_path / "v")])
    assert again["val_top1"] == pytest.approx(best["val_top1"])
    with pytest.raises(UserError, match="--eval_size 40: vit_tiny is built for 32x32"):
        main.main([*FAST_RUN, *common, "--arch", "vit_tiny", "--eval_size", "40"])


def test_the_run_page_opens_in_a_browser_with_every_image_and_table_row(analysed_run, tmp_path):
    dom = render(analysed_run / "index.html", tmp_path)
    images = int(re.search(r'data-images="(\d+)"', dom).group(1))
    loaded = int(re.search(r'data-loaded="(\d+)"', dom).group(1))
    assert images >= 3 and loaded == images  # the figures (and any mistakes shown), all embedded and loaded
    per_class = dom.split('id="per-class"')[1].split("</table>")[0]
    assert per_class.count("<tr>") == 1 + 4  # the header and the four classes
    assert "goldfish" in per_class and "Most confused pairs" in dom and "config.yaml" in dom
    assert "http" not in re.sub(r'xmlns="[^"]*"', "", dom.split("<body")[1])  # nothing fetched from anywhere


def test_the_report_page_shows_every_run(trained_run, analysed_run, tmp_path):
    import report

    assert report.main([str(trained_run), str(analysed_run), "--output_dir", str(tmp_path / "r")]) == 0
    dom = render(tmp_path / "r" / "index.html", tmp_path)
    runs = dom.split('id="runs"')[1].split("</table>")[0]
    assert runs.count("<tr>") == 1 + 2 and trained_run.name in runs
    assert int(re.search(r'data-loaded="(\d+)"', dom).group(1)) == 2  # both curves
