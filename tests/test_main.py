"""End to end: a real main() run writes a complete run folder; same seed, same numbers; it learns."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

import main
from conftest import FAST_ARCH, FAST_RUN, ROOT, TIMING, WNIDS
from tin.run import sinks
from tin.run.folder import make_run_dir
from utils import UserError

CHECKPOINT_KEYS = {"state_dict", "optimizer", "scheduler", "epoch", "step", "top1", "top5", "config", "classes"}


def _rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_run_folder_is_complete(trained_run, tiny_data):
    assert trained_run.name.endswith(f"_{FAST_ARCH}") and ":" not in trained_run.name
    cfg = yaml.safe_load((trained_run / "config.yaml").read_text())
    assert cfg["arch"] == FAST_ARCH and cfg["epochs"] == 2 and cfg["data_dir"] == str(tiny_data)

    metrics = _rows(trained_run / "metrics.csv")
    assert len(metrics) == 2 and [r["epoch"] for r in metrics] == ["1", "2"]
    expected = [c for c in sinks.METRIC_ORDER if not c.startswith("ema_")]  # every key of the rows, none dropped
    assert list(metrics[0]) == expected
    assert all(0 <= float(r["val_top1"]) <= float(r["val_top5"]) <= 100 for r in metrics)
    assert all(0 <= float(r["data_wait_fraction"]) <= 1 for r in metrics)
    assert float(metrics[0]["aug_strength"]) == 0.0 < float(metrics[1]["aug_strength"])

    for name in ("last.pth.tar", "best.pth.tar"):
        ckpt = torch.load(trained_run / name, map_location="cpu", weights_only=True)
        assert CHECKPOINT_KEYS <= set(ckpt)
        assert ckpt["classes"] == sorted(WNIDS) and ckpt["config"]["arch"] == FAST_ARCH
    assert torch.load(trained_run / "last.pth.tar", weights_only=True)["epoch"] == 2
    mask = os.umask(0o022)
    os.umask(mask)
    assert (trained_run / "best.pth.tar").stat().st_mode & 0o777 == 0o666 & ~mask  # as readable as any file

    best = json.loads((trained_run / "best_results.json").read_text())
    assert {"best_epoch", "val_top1", "val_top5", "params", "wall_time_seconds"} <= set(best)
    assert best["val_top1"] == max(float(r["val_top1"]) for r in metrics)

    preds = _rows(trained_run / "best_test_preds.csv")
    test_files = sorted(p.name for p in (tiny_data / "test" / "images").iterdir())
    assert [r["image"] for r in preds] == test_files  # one row per test image, sorted
    assert set(r["label"] for r in preds) <= set(WNIDS)
    assert (trained_run / "best_test_preds.csv").read_text().splitlines()[0] == "image,label"

    log_text = (trained_run / "log.txt").read_text()
    assert "epoch 2/2" in log_text and "best val top-1" in log_text
    assert list((trained_run / "wandb").glob("offline-run-*/run-*.wandb")), "wandb offline files in the run folder"


def test_tta_final_evaluates_the_epochs_plainly_and_best_once_flipped(tiny_data, tmp_path, monkeypatch):
    """--tta final: every epoch's evaluation (and the predictions at a new best) without TTA; at the end
    best.pth.tar once on val with it, as evaluate.py --tta flip scores it, recorded apart from the curve,
    and the submission made with it. metrics.csv splits each epoch's seconds into updates, evaluation
    and checkpoint writes; best_results.json and the last line give the share of the run in updates."""
    import evaluate
    import val

    flips = {"evaluate": [], "predict": []}
    real = {name: getattr(val, name) for name in flips}

    def spy(name):
        def call(*args, **kwargs):
            flips[name].append(args[5] if len(args) > 5 else kwargs.get("tta", False))
            return real[name](*args, **kwargs)

        return call

    for name in flips:
        monkeypatch.setattr(val, name, spy(name))
    args = [*FAST_RUN, "--data_dir", str(tiny_data), "--output_dir", str(tmp_path), "--epochs", "2"]
    run = main.main([*args, "--tta", "final", "--wandb", "disabled"])
    assert flips["evaluate"] == [False, False, True]
    assert flips["predict"][-1] is True and not any(flips["predict"][:-1]) and len(flips["predict"]) >= 2
    rows, best = _rows(run / "metrics.csv"), json.loads((run / "best_results.json").read_text())
    assert best["val_top1"] == max(float(r["val_top1"]) for r in rows)  # best chosen on the plain figures
    assert not [c for c in rows[0] if c.endswith("_tta")]
    monkeypatch.setattr(val, "evaluate", real["evaluate"])
    checked = evaluate.run(
        ["--checkpoint", str(run / "best.pth.tar"), "--tta", "flip", "--output_dir", str(tmp_path / "v")]
    )
    assert best["val_top1_tta"] == pytest.approx(checked["val_top1"]) and "val_top5_tta" in best
    done = [line for line in (run / "log.txt").read_text().splitlines() if " INFO done: " in line][-1]
    assert f"with flip TTA {best['val_top1_tta']:.2f}%" in done and "% of it in updates" in done
    for r in rows:
        parts = [float(r[k]) for k in ("update_seconds", "eval_seconds", "save_seconds")]
        assert min(parts) > 0 and sum(parts) <= float(r["epoch_seconds"]) * (1 + 1e-5)  # 6 digits in the csv
    assert best["update_seconds"] == pytest.approx(sum(float(r["update_seconds"]) for r in rows), abs=0.01)
    share = best["update_seconds"] / best["wall_time_seconds"]  # of figures rounded to 0.01 s
    rounding = 0.005 * (1 + share) / best["wall_time_seconds"]  # both figures to 0.01 s: a short run's share moves
    assert 0 < best["update_fraction"] == pytest.approx(share, abs=rounding + 1e-4)
    assert best["wall_time_seconds"] >= float(rows[-1]["wall_seconds"])  # to the end's pass, not the last epoch


def test_same_seed_same_metrics_whatever_the_worker_count(tiny_data, tmp_path):
    args = [*FAST_RUN, "--data_dir", str(tiny_data), "--epochs", "2", "--wandb", "disabled"]
    runs = [main.main([*args, "--output_dir", str(tmp_path / f"o{w}"), "--workers", str(w)]) for w in (0, 2)]
    drop = TIMING
    a, b = ([{k: v for k, v in r.items() if k not in drop} for r in _rows(run / "metrics.csv")] for run in runs)
    assert a == b
    wa, wb = (torch.load(run / "last.pth.tar", weights_only=True)["state_dict"] for run in runs)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_data_on_the_device_gives_the_loader_paths_numbers(tiny_data, tmp_path):
    args = [
        *FAST_RUN,
        "--data_dir",
        str(tiny_data),
        *"--epochs 2 --wandb disabled --aug_strength 1 --aug_schedule constant".split(),
    ]
    loader = main.main([*args, "--output_dir", str(tmp_path / "loader"), "--data_on_device", "off", "--workers", "2"])
    device = main.main([*args, "--output_dir", str(tmp_path / "device"), "--data_on_device", "on"])
    a, b = (
        [{k: v for k, v in r.items() if k not in TIMING} for r in _rows(run / "metrics.csv")]
        for run in (loader, device)
    )
    assert a == b
    wa, wb = (torch.load(run / "last.pth.tar", weights_only=True)["state_dict"] for run in (loader, device))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert (loader / "best_test_preds.csv").read_text() == (device / "best_test_preds.csv").read_text()
    saved = yaml.safe_load((device / "config.yaml").read_text())
    assert saved["resolved"]["runtime"]["data_on_device"] is True


def test_learns_a_learnable_toy_problem(tiny_data, tmp_path):
    run = main.main(
        [
            *FAST_RUN,
            "--data_dir",
            str(tiny_data),
            "--output_dir",
            str(tmp_path),
            *"--epochs 6 --aug_schedule constant --aug_strength 0.3 --wandb disabled".split(),
        ]
    )
    best = json.loads((run / "best_results.json").read_text())
    assert best["val_top1"] >= 70.0, best  # 4 classes: chance is 25 %


def test_run_folders_never_collide(tmp_path):
    first, second = make_run_dir(tmp_path, "resnet18"), make_run_dir(tmp_path, "resnet18")
    assert first != second and first.is_dir() and second.is_dir()


def test_missing_data_is_a_clear_error_and_leaves_no_run_folder(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        main.main(
            ["--data_dir", str(tmp_path / "nowhere"), "--output_dir", str(tmp_path / "ck"), "--wandb", "disabled"]
        )
    assert not (tmp_path / "ck").exists() or not any((tmp_path / "ck").iterdir())


def test_cli_prints_one_line_not_a_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "main.py", "--data_dir", str(tmp_path / "nowhere"), "--wandb", "disabled"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert f"error: dataset folder {tmp_path / 'nowhere'} does not exist" in proc.stderr


def test_a_log_shows_progress_within_an_epoch(tiny_data, tmp_path):
    """Off a terminal (tqdm's bar hidden: a log file, nohup, docker logs) a line every
    --progress_every seconds at the sync points, with the batches done, images/s, loss and the
    epoch's ETA; none with 0."""
    args = [*FAST_RUN, "--data_dir", str(tiny_data), "--epochs", "4", "--wandb", "disabled"]
    run = main.main([*args, "--output_dir", str(tmp_path / "a"), "--progress_every", "1e-6"])
    lines = [line for line in (run / "log.txt").read_text().splitlines() if " batches, " in line]
    assert lines and "epoch 4/4: 1/8 batches, " in lines[0] and "img/s, loss " in lines[0] and "ends in ~" in lines[0]
    run = main.main([*args, "--output_dir", str(tmp_path / "b"), "--progress_every", "0"])
    assert " batches, " not in (run / "log.txt").read_text()


def test_wandb_online_without_a_login_is_one_line_before_any_run_folder(tmp_path, tiny_data):
    """`--wandb online` where wandb has no API key: one line naming `wandb login` and the
    alternatives, no traceback, no half-made run folder for report.py to list as unfinished."""
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_API_KEY", "WANDB_MODE")}
    env["HOME"] = str(tmp_path / "home")  # no ~/.netrc: never logged in
    args = [sys.executable, "main.py", *FAST_RUN, "--data_dir", str(tiny_data), "--wandb", "online"]
    args += ["--output_dir", str(tmp_path / "runs"), "--epochs", "1"]
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "--wandb online: wandb has no API key here" in proc.stderr and "wandb login" in proc.stderr
    assert not (tmp_path / "runs").exists()


def test_undecodable_image_stops_before_training_with_one_line_naming_it(tmp_path):
    from conftest import make_layout

    root = make_layout(tmp_path / "tin", n_train=4, n_val=1, n_test=1)
    victim = sorted((root / "train" / WNIDS[2] / "images").iterdir())[1]
    victim.write_bytes(b"\xff\xd8 truncated jpeg")
    proc = subprocess.run(
        [
            sys.executable,
            "main.py",
            *FAST_RUN,
            "--data_dir",
            str(root),
            "--output_dir",
            str(tmp_path / "ck"),
            *"--workers 2 --epochs 1 --wandb disabled".split(),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: 1 unreadable image(s) in the train split: ") and str(victim) in last
    assert "--skip_bad_images" in last and not (tmp_path / "ck").exists()
