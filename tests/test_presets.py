"""Every YAML preset runs (one short epoch on the fixture data), and sweep.py runs several at once."""

from __future__ import annotations

import csv
import re
import subprocess
import sys

import pytest
import yaml

import main
from conftest import CHROMIUM, ROOT, render
from tin.config.cli import load_yaml_defaults

PRESETS = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("preset", PRESETS, ids=[p.stem for p in PRESETS])
def test_every_preset_runs_a_few_steps(preset, tiny_data, tmp_path):
    """The recipe as written; only the data (the fixture), the length and the batch are shrunk. A
    preset that makes its run page (the recommended ones: a cheaper page, never none) makes it here."""
    recipe = load_yaml_defaults(str(preset))
    page = recipe.get("analysis") == "page"
    run = main.main(
        [
            "--config",
            str(preset),
            *"--dataset tiny-imagenet --data_dir".split(),
            str(tiny_data),
            "--output_dir",
            str(tmp_path),
            *"--epochs 1 --warmup_epochs 0 --steps_per_epoch 2 --batch_size 4 --workers 0 --wandb disabled --patience 0".split(),
            *([] if page else ["--no_analysis"]),
        ]
    )
    if page:
        assert (run / "curves.png").is_file() and (run / "per_class_accuracy.csv").is_file()
        assert not (run / "tsne.png").exists() and not (run / "features").exists()  # what "page" leaves out
        if CHROMIUM:  # opened as a user opens it (CI installs Chromium)
            dom = render(run / "index.html", tmp_path)
            images = int(re.search(r'data-images="(\d+)"', dom).group(1))
            assert "Per-class accuracy" in dom and images >= 2
            assert int(re.search(r'data-loaded="(\d+)"', dom).group(1)) == images  # every picture embedded, loaded
        else:
            assert "Per-class accuracy" in (run / "index.html").read_text()
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert (run / "best.pth.tar").is_file()
    shrunk = {"dataset", "data_dir", "epochs", "warmup_epochs", "batch_size", "workers", "patience"}
    if recipe.get("fit_params"):  # --arch names a family; the run records the member that fits
        shrunk.add("arch")
        assert saved["arch"].startswith(f"{recipe['arch']}_w")
    assert {k: v for k, v in recipe.items() if k not in shrunk} == {k: saved[k] for k in recipe if k not in shrunk}


def test_sweep_runs_in_parallel_with_overrides_and_tabulates(tiny_data, tmp_path):
    first = tmp_path / "first.yaml"
    first.write_text("arch: resnet18\nimg_size: 32\nbatch_size: 8\nlr_base: 2.0e-3\nepochs: 9\n")
    second = tmp_path / "second.yaml"
    second.write_text("arch: budget_cnn\nimg_size: 32\nbatch_size: 8\nlr_base: 2.0e-3\n")
    proc = subprocess.run(
        [
            sys.executable,
            "sweep.py",
            str(first),
            str(second),
            *"--parallel 2 --sweep_dir".split(),
            str(tmp_path / "sw"),
            *"--set epochs=2 --set workers=0 --set wandb=disabled --set".split(),
            f"data_dir={tiny_data}",
            "--set",
            "no_analysis=true",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = list(csv.DictReader(open(tmp_path / "sw" / "summary.csv")))
    assert {r["name"]: r["arch"] for r in rows} == {"first": "resnet18", "second": "budget_cnn"}
    assert all(r["status"] == "ok" and r["epochs_run"] == "2" for r in rows)  # --set epochs won over the file
    assert float(rows[0]["val_top1"]) >= float(rows[1]["val_top1"])  # sorted by accuracy
    assert int(next(r for r in rows if r["arch"] == "budget_cnn")["params"]) < 1_000_000
    assert "| name | group | seed | status |" in (tmp_path / "sw" / "summary.md").read_text()


def test_sweep_reports_failures(tiny_data, tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text(f"arch: resnet18\nimg_size: 32\nbatch_size: 8\nepochs: 1\nworkers: 0\ndata_dir: {tiny_data}\n")
    bad = tmp_path / "broken.yaml"
    bad.write_text("arch: resnet18\ndata_dir: /nonexistent/dataset\nepochs: 1\n")
    proc = subprocess.run(
        [
            sys.executable,
            "sweep.py",
            str(bad),
            str(good),
            "--sweep_dir",
            str(tmp_path / "sw"),
            *"--set wandb=disabled --set no_analysis=true".split(),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    rows = {r["name"]: r for r in csv.DictReader(open(tmp_path / "sw" / "summary.csv"))}
    assert proc.returncode == 1
    assert rows["broken"]["status"].startswith("failed") and rows["good"]["status"] == "ok"
    assert "does not exist" in (tmp_path / "sw" / "broken.log").read_text()


def _sweep_demo(tmp_path, *set_args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "sweep.py", str(ROOT / "configs" / "demo.yaml"), "--set", *set_args]
    return subprocess.run([*command, "--sweep_dir", str(tmp_path / "sw")], cwd=ROOT, capture_output=True, text=True)


def test_sweep_rejects_bad_overrides_before_running(tmp_path):
    proc = _sweep_demo(tmp_path, "epochz=3")
    assert proc.returncode == 2 and "epochz" in proc.stderr and not list((tmp_path / "sw").glob("*.log"))


def test_sweep_set_needs_key_equals_value(tmp_path):
    proc = _sweep_demo(tmp_path, "epochs")
    assert proc.returncode == 2 and "expected key=value" in proc.stderr


def test_the_gpu_preset_spends_its_minutes_training():
    """One flipped evaluation at the end (not every epoch), checkpoints on a cadence whose worst-case
    loss its comment states, loader workers from the machine's cores, and the figure still unmeasured."""
    path = ROOT / "configs" / "gpu_speedrun.yaml"
    recipe, text = load_yaml_defaults(str(path)), path.read_text()
    assert (recipe["tta"], recipe["test_preds"], recipe.get("eval_every", 1)) == ("final", "end", 1)
    minutes = recipe["save_every_min"]
    assert minutes > 0 and f"loses at most {minutes:g} minutes of training plus one epoch" in text
    assert "workers" not in recipe and "NOT MEASURED" in text


def test_the_recommended_presets_end_with_their_page():
    for name in ("cpu_speedrun", "gpu_speedrun", "budget_1m"):
        recipe = load_yaml_defaults(str(ROOT / "configs" / f"{name}.yaml"))
        assert not recipe.get("no_analysis") and recipe.get("analysis") == "page", name
