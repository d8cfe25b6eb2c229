"""torchrun with 2 CPU processes (gloo): one run folder, the same numbers as one process with the
same global batch, and an exact resume after the whole job is killed."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, TIMING

# ViT-Tiny has no batch norm, and with mixing, augmentation and dropout off, 2 processes x 4 images
# average the gradients of 1 process x 8 images: only the order of the float sums differs. The
# error model: each gradient differs by a few float32 roundings (~1e-7 relative), and plain SGD
# passes that on linearly — each update moves the weights by lr x gradient — so after 16 updates at
# lr 0.02 the losses agree to the 6 digits metrics.csv keeps (measured on an AMD EPYC Zen 4; at lr
# 0.05, where the run is on the edge of diverging, they drift to 3e-5): 1e-4 is the bound. AdamW is
# not used here: it divides by the root of the squared gradients, so the rounding of near-zero
# gradients becomes whole update steps (1.3e-3 apart after 16 updates on a Zen 4, under 1e-3 on a
# Xeon: machine-dependent). fp32 (--no-amp): no bf16 rounding.
RECIPE = "--arch vit_tiny --img_size 32 --epochs 2 --workers 0 --opt sgd --lr_base 0.02 --mix_prob 0 --aug_schedule constant --aug_strength 0 --drop_rate 0 --attn_drop_rate 0 --drop_path_rate 0 --wandb disabled --no_analysis --no-amp".split()
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _rows(run):
    with open(run / "metrics.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def _only_run(out):
    runs = [p for p in out.iterdir() if p.is_dir()]
    assert len(runs) == 1, runs
    return runs[0]


@pytest.fixture(scope="module")
def ddp_run(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    proc = subprocess.run(
        [*TORCHRUN, "main.py", *RECIPE, "--batch_size", "4", "--data_dir", str(tiny_data), "--output_dir", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=ENV,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return _only_run(out), proc.stdout


def test_two_processes_write_one_run_folder(ddp_run, tiny_data):
    run, stdout = ddp_run
    assert len(_rows(run)) == 2 and (run / "best.pth.tar").is_file()
    preds = list(csv.DictReader(open(run / "best_test_preds.csv")))
    assert [p["image"] for p in preds] == sorted(p.name for p in (tiny_data / "test" / "images").iterdir())
    assert stdout.count("epoch 1/2") == 1  # only the main process logs


def test_matches_one_process_with_the_same_global_batch(ddp_run, tiny_data, tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "main.py",
            *RECIPE,
            *"--batch_size 8 --data_dir".split(),
            str(tiny_data),
            "--output_dir",
            str(tmp_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=ENV,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    single, multi = _rows(_only_run(tmp_path)), _rows(ddp_run[0])
    for a, b in zip(single, multi, strict=True):
        for key in ("train_loss", "val_loss"):  # the error model above
            assert float(a[key]) == pytest.approx(float(b[key]), rel=1e-4)
        assert abs(float(a["val_top1"]) - float(b["val_top1"])) <= 5.0  # at most one of 20 val images flips


def test_killed_two_process_run_resumes_exactly(ddp_run, tiny_data, tmp_path):
    cmd = [
        *TORCHRUN,
        "main.py",
        *RECIPE,
        *"--batch_size 4 --data_dir".split(),
        str(tiny_data),
        "--output_dir",
        str(tmp_path),
    ]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        runs = [p for p in tmp_path.iterdir() if p.is_dir()]
        if runs and (runs[0] / "metrics.csv").exists() and len(_rows(runs[0])) >= 1:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both workers, at once
    proc.wait(60)
    run = _only_run(tmp_path)
    resumed = subprocess.run(
        [*TORCHRUN, "main.py", "--resume", str(run)], cwd=ROOT, capture_output=True, text=True, env=ENV, timeout=600
    )
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    drop = TIMING
    clean = [{k: v for k, v in r.items() if k not in drop} for r in _rows(ddp_run[0])]
    assert [{k: v for k, v in r.items() if k not in drop} for r in _rows(run)] == clean
    a = torch.load(run / "last.pth.tar", weights_only=True)["state_dict"]
    b = torch.load(ddp_run[0] / "last.pth.tar", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
