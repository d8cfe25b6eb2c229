"""The bench/ scripts run end to end and print their tables (on tiny inputs: the figures themselves
come from real runs, see README: Speed; nothing here times anything)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

import hardware
from conftest import ROOT

ENV = {**os.environ, "OMP_NUM_THREADS": "2", "TQDM_DISABLE": "1"}


def _bench(script, *args, timeout=300):
    proc = subprocess.run(
        [sys.executable, f"bench/{script}", *args], cwd=ROOT, capture_output=True, text=True, env=ENV, timeout=timeout
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_step_bench_compares_the_trainer_with_a_bare_loop(tiny_data, tmp_path):
    out = tmp_path / "step.json"
    text = _bench(
        "step.py",
        "--data_dir",
        str(tiny_data),
        "--arch",
        "resnet9_slim",
        "--img_size",
        "32",
        "--batch_size",
        "8",
        "--workers",
        "0",
        "--aug_backend",
        "torch",
        "--steps",
        "2",
        "--reps",
        "2",
        "--warmup",
        "1",
        "--out",
        str(out),
    )
    assert "| bare img/s | trainer img/s | trainer / bare" in text
    r = json.loads(out.read_text())
    assert r["bare_ips"] > 0 and r["trainer_ips"] > 0 and len(r["ratios"]) == 2 and 0 <= r["data_wait_median"] < 1
    default = hardware.decide_runtime(torch.device("cpu"))  # main.py's defaults on this machine, full strength
    assert (r["amp"], r["channels_last"], r["strength"]) == (default.precision, default.channels_last, 1.0)


def test_precision_bench_prints_one_row_per_arch(tmp_path):
    out = tmp_path / "precision.json"
    text = _bench(
        "precision.py",
        "--archs",
        "budget_cnn,resnet9_slim",
        "--variants",
        "fp32,bf16_cl",
        "--batch_size",
        "4",
        "--img_size",
        "32",
        "--steps",
        "1",
        "--reps",
        "1",
        "--warmup",
        "1",
        "--out",
        str(out),
    )
    assert "| arch | fp32 | bf16_cl | default" in text and "| budget_cnn |" in text and "| resnet9_slim |" in text
    result = json.loads(out.read_text())
    assert len(result["rows"]) == 4 and result["default"]["variant"] in ("fp32", "bf16_cl", "fp32_cl", "bf16")


def test_pipeline_bench_compares_three_paths(tiny_data, tmp_path):
    out = tmp_path / "pipeline.json"
    text = _bench(
        "pipeline.py",
        "--data_dir",
        str(tiny_data),
        "--images",
        "32",
        "--batch_size",
        "8",
        "--workers",
        "1",
        "--reps",
        "1",
        "--out",
        str(out),
    )
    assert "seed-style img/s" in text and "torch img/s" in text
    rows = json.loads(out.read_text())["rows"]
    assert [r["workers"] for r in rows] == [0, 1] and all(r["torch_ips"] > 0 for r in rows)


def test_gpu_check_runs_on_a_cpu_and_skips_the_cuda_rows_with_a_reason(tmp_path):
    out = tmp_path / "gpu_check.json"
    text = _bench("gpu_check.py", "--device", "cpu", "--work_dir", str(tmp_path / "work"), "--out", str(out))
    assert "| check | result | verdict | s |" in text and "**FAIL**" not in text
    rows = json.loads(out.read_text())["rows"]
    assert {r["check"][:2] for r in rows} >= {"1.", "2a", "2b", "2c", "3.", "4a", "4b", "5."}
    assert all(r["ok"] is True for r in rows if r["check"][:2] in ("1.", "4a", "5."))
    assert all(r["result"] for r in rows if r["ok"] is None)  # every skipped row says why


def _parts(folder, corrupt: bool = False):
    import hashlib

    folder.mkdir()
    sums = []
    for i in range(4):
        part = folder / f"tiny-imagenet-200.tar.gz.part{i}"
        part.write_bytes(bytes([i]) * 1000)
        sums.append(f"{hashlib.sha256(part.read_bytes()).hexdigest()}  {part.name}")
    (folder / "SHA256SUMS").write_text("\n".join(sums) + "\n")
    if corrupt:
        (folder / "tiny-imagenet-200.tar.gz.part2").write_bytes(b"cut short")
    return folder


def test_gpu_speedrun_script_checks_the_parts_then_stages_the_preset(tmp_path):
    parts = _parts(tmp_path / "parts")
    proc = subprocess.run(
        ["bash", "bench/gpu_speedrun.sh", "--parts", str(parts), "--dry-run", "--", "--epochs", "3"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "the four parts match SHA256SUMS" in proc.stdout
    assert "data/download.py --archive" in proc.stdout and "part3" in proc.stdout
    assert "main.py --config configs/gpu_speedrun.yaml --epochs 3" in proc.stdout
    bad = _parts(tmp_path / "bad", corrupt=True)
    proc = subprocess.run(
        ["bash", "bench/gpu_speedrun.sh", "--parts", str(bad), "--dry-run"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1 and "does not match SHA256SUMS" in proc.stderr and "would run" not in proc.stdout
