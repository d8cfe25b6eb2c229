"""The bench/ scripts run end to end and print their tables (on tiny inputs: the figures themselves
come from real runs, see README: Speed; nothing here times anything)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import torch

from conftest import FAST_RUN, ROOT, bench_module
from tin import hardware

ENV = {**os.environ, "OMP_NUM_THREADS": "2", "TQDM_DISABLE": "1"}


def _bench(script, *args, timeout=300):
    proc = subprocess.run(
        [sys.executable, "-m", f"bench.{script.removesuffix('.py')}", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=ENV,
        timeout=timeout,
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


def test_step_bench_with_a_teacher_compares_the_step_with_and_without_it(trained_run, tiny_data, tmp_path):
    out = tmp_path / "step.json"
    args = ["--data_dir", str(tiny_data), *"--arch resnet9_slim --img_size 32 --batch_size 8 --workers 0".split()]
    args += ["--teacher", str(trained_run), "--kd_views", "0", *"--steps 2 --reps 2 --warmup 1 --out".split(), str(out)]
    text = _bench("step.py", *args)
    assert "| trainer img/s without the teacher | with it | with ÷ without" in text
    r = json.loads(out.read_text())
    assert r["untaught_ips"] > 0 and len(r["taught_ratios"]) == 2 and r["teachers"][0]["arch"] == "resnet18"


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


BLOCKER = """import sys


class _Missing:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("albumentations", "wandb"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)


sys.meta_path.insert(0, _Missing())
"""


def _without_optional_packages(tmp_path) -> dict:
    """An environment in which albumentations and wandb cannot be imported, as on a GPU machine's own
    Python (sitecustomize runs in every process, the ones gpu_check starts too)."""
    folder = tmp_path / "site"
    folder.mkdir()
    (folder / "sitecustomize.py").write_text(BLOCKER)
    return {**ENV, "PYTHONPATH": str(folder)}


def test_gpu_check_runs_on_a_cpu_without_albumentations_or_wandb(tmp_path):
    env = _without_optional_packages(tmp_path)
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.gpu_check",
            "--device",
            "cpu",
            "--work_dir",
            str(tmp_path / "work"),
            "--out",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| check | result | verdict | s |" in proc.stdout and "**FAIL**" not in proc.stdout
    rows = json.loads(out.read_text())["rows"]
    assert {r["check"][:2] for r in rows} >= {"1.", "2a", "2b", "2c", "3.", "4a", "4b", "5."}
    assert all(r["ok"] is True for r in rows if r["check"][:2] in ("1.", "4a", "5."))
    assert all(r["result"] for r in rows if r["ok"] is None)  # every skipped row says why
    assert "stopped with 130 at update" in next(r["result"] for r in rows if r["check"].startswith("1."))


def test_main_trains_without_albumentations_or_wandb_and_says_what_is_missing(tmp_path, tiny_data):
    env = _without_optional_packages(tmp_path)
    args = [sys.executable, "main.py", *FAST_RUN, "--data_dir", str(tiny_data), "--output_dir", str(tmp_path / "runs")]
    args += ["--epochs", "1", "--steps_per_epoch", "2"]
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "wandb: not installed, so not used" in proc.stdout  # --wandb auto: off, with one line
    assert len(list((tmp_path / "runs").glob("*/best_test_preds.csv"))) == 1
    for flag, fix in (
        ("--aug_backend albumentations", "pip install albumentations"),
        ("--wandb online", "pip install wandb"),
    ):
        proc = subprocess.run([*args, *flag.split()], cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
        assert proc.returncode == 1 and fix in proc.stderr and "Traceback" not in proc.stderr
    assert len(list((tmp_path / "runs").iterdir())) == 1  # refused before a run folder was made


def _archive_parts(tmp_path, tiny_data, parts: int = 3):
    """The tiny dataset as tiny-imagenet-200.tar.gz, cut into `parts` parts with SHA256SUMS, as the
    real dataset's copy is."""
    import hashlib
    import tarfile

    folder = tmp_path / "shared"
    folder.mkdir()
    archive = tmp_path / "tiny-imagenet-200.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tiny_data, arcname="tiny-imagenet-200")
    blob = archive.read_bytes()
    step = -(-len(blob) // parts)
    sums = []
    for k in range(parts):
        part = folder / f"tiny-imagenet-200.tar.gz.part{k}"
        part.write_bytes(blob[k * step : (k + 1) * step])
        sums.append(f"{hashlib.sha256(part.read_bytes()).hexdigest()}  {part.name}")
    sums.append(f"{hashlib.sha256(blob).hexdigest()}  tiny-imagenet-200.tar.gz")
    (folder / "SHA256SUMS").write_text("\n".join(sums) + "\n")
    return folder, len(blob)


def _visit(*args):
    proc = subprocess.run(
        [sys.executable, "-m", "bench.gpu_visit", *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    return proc


def test_gpu_visit_dry_run_stages_assembles_and_budgets_the_calls(tmp_path, tiny_data):
    shared, size = _archive_parts(tmp_path, tiny_data, parts=4)
    visit = tmp_path / "visit"
    part_mib = size / 3 / 2**20 + 1e-4  # re-cut into three parts
    proc = _visit("split", "--from", str(shared), "--visit", str(visit), "--size", f"{part_mib}")
    assert proc.returncode == 0, proc.stderr
    parts = sorted(visit.glob("tiny-imagenet-200.tar.gz.part*"))
    assert len(parts) == 3 and all(p.stat().st_size <= part_mib * 2**20 for p in parts)
    assert "| 3 |" in proc.stdout and "finish --out $OUT" in proc.stdout  # the plan: three calls
    minutes = float(proc.stdout.split("device time: about ")[1].split(" min")[0])
    assert minutes <= 15 - 1  # the sequence fits the 15 minutes with a minute to spare
    assert _visit("start", "--dry-run", "--visit", str(visit)).returncode == 0
    out = tmp_path / "out"
    proc = _visit("finish", "--dry-run", "--visit", str(visit), "--out", str(out), "--expect", "4,16,20,9")
    assert proc.returncode == 0, proc.stderr
    assert (visit / "data" / "tiny-imagenet-200" / "wnids.txt").is_file()  # the parts, assembled and installed
    assert "--config configs/gpu_speedrun.yaml --time_budget 6 " in proc.stdout
    assert "parts checked and the dataset installed" in (out / "visit.md").read_text()
    (visit / "tiny-imagenet-200.tar.gz.part1").write_bytes(b"cut short")  # a transfer that broke off
    proc = _visit("finish", "--dry-run", "--visit", str(visit), "--out", str(out), "--expect", "4,16,20,9")
    assert proc.returncode != 0 and "part1 do(es) not match SHA256SUMS" in proc.stderr


def test_gpu_visit_budgets_the_speed_run_from_the_time_left_in_the_call():
    gpu_visit = bench_module("gpu_visit")

    assert gpu_visit.speedrun_minutes(0, gpu_visit.INSTALL_S) == 6.0  # a full call: the preset's six minutes
    assert gpu_visit.speedrun_minutes(300, 0) == 4.2  # 600 - 300 - 45 s of margin: 255 s
    assert gpu_visit.speedrun_minutes(590, 0) == 1.0  # never below a minute


def test_gpu_visit_brings_back_at_most_eight_files_with_the_curve(trained_run, tmp_path):
    gpu_visit = bench_module("gpu_visit")

    visit = tmp_path / "visit"
    (visit / "out").mkdir(parents=True)
    for name in ("gpu_check.md", "gpu_check.json", "gpu_check.log", "speedrun.log"):
        (visit / "out" / name).write_text("x\n")
    (visit / "runs").mkdir()
    shutil.copytree(trained_run, visit / "runs" / trained_run.name)
    gpu_visit.collect(visit, tmp_path / "back", ["a note"], t0=0.0)
    back = sorted(p.name for p in (tmp_path / "back").iterdir())
    assert len(back) == 8 and {"metrics.csv", "log.txt", "best_results.json", "visit.md"} <= set(back)
    assert "| epoch | train px |" in (tmp_path / "back" / "visit.md").read_text()


def test_the_repository_and_one_part_fit_one_device_call():
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True).stdout.split("\0")
    size = sum((ROOT / f).stat().st_size for f in tracked if f and (ROOT / f).is_file())
    gpu_visit = bench_module("gpu_visit")

    assert size + gpu_visit.PART_MIB * 2**20 < 64 * 2**20, f"the repository takes {size / 2**20:.1f} MiB"
