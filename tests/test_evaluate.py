"""evaluate.py: evaluating a saved checkpoint reproduces the run's numbers and writes predictions."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

import evaluate
from conftest import ROOT
from utils import UserError


def test_checkpoint_evaluation_matches_training_run(trained_run, tmp_path):
    metrics = evaluate.run(["--checkpoint", str(trained_run / "best.pth.tar"), "--output_dir", str(tmp_path)])
    best = json.loads((trained_run / "best_results.json").read_text())
    assert metrics["val_top1"] == pytest.approx(best["val_top1"])
    assert metrics["val_loss"] == pytest.approx(best["val_loss"], rel=1e-5)
    assert (tmp_path / "test_preds.csv").read_text() == (trained_run / "best_test_preds.csv").read_text()
    assert json.loads((tmp_path / "val_metrics.json").read_text())["val_top5"] == pytest.approx(best["val_top5"])


def test_evaluate_takes_the_run_first_as_predict_and_export_do(trained_run, tmp_path):
    """`evaluate.py RUN --out DIR` (the grammar of predict.py and export.py) gives what `--checkpoint RUN
    --output_dir DIR` gives; neither form given is one line naming the usage. val.py, the evaluation
    loop, run as a script says where evaluation is."""
    metrics = evaluate.run([str(trained_run), "--out", str(tmp_path / "a")])
    assert metrics == evaluate.run(["--checkpoint", str(trained_run), "--output_dir", str(tmp_path / "b")])
    assert (tmp_path / "a" / "test_preds.csv").read_text() == (trained_run / "best_test_preds.csv").read_text()
    proc = subprocess.run([sys.executable, "evaluate.py"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "python evaluate.py RUN [RUN ...]" in proc.stderr and "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, "val.py", str(trained_run)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 1 and "python evaluate.py RUN" in proc.stderr and "Traceback" not in proc.stderr


def test_checkpoint_for_other_classes_is_refused(trained_run, tmp_path):
    from conftest import make_layout

    other = make_layout(tmp_path / "other")
    (other / "wnids.txt").write_text("n01000001\nn02000003\nn03000004\n")
    shutil.rmtree(other / "train" / "n04000002")
    lines = (other / "val/val_annotations.txt").read_text().splitlines()
    (other / "val/val_annotations.txt").write_text("".join(ln + "\n" for ln in lines if "n04000002" not in ln))
    with pytest.raises(UserError, match="other classes"):
        evaluate.run(["--checkpoint", str(trained_run / "best.pth.tar"), "--data_dir", str(other)])


def test_truncated_checkpoint_is_a_clear_error(trained_run, tmp_path):
    broken = tmp_path / "best.pth.tar"
    broken.write_bytes((trained_run / "best.pth.tar").read_bytes()[:1000])
    with pytest.raises(UserError, match="could not be read"):
        evaluate.run(["--checkpoint", str(broken)])
    with pytest.raises(UserError, match="does not exist"):
        evaluate.run(["--checkpoint", str(tmp_path / "missing.pth.tar")])
