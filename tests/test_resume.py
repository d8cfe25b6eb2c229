"""Exact resume: real subprocesses killed with SIGKILL (and stopped with SIGINT) at several points,
then resumed, must end with exactly the metrics.csv and weights of an uninterrupted run."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import PINNED, ROOT, TIMING, same_weights
from tin.engine.state import TrainState

RUN = [
    *"--arch mobilenetv2_100 --img_size 32 --batch_size 8 --workers 0 --epochs 3 --lr_base 2e-3 --drop_rate 0.1 --drop_path_rate 0.1 --ema --ema_decay 0.9 --aug_schedule linear --wandb disabled --no_analysis".split(),
    *PINNED,
]


def _start(args, out, signal_at: tuple[str, int] | None = None):
    """main.py in a subprocess; signal_at (name, K): that signal arrives right after update K
    (bench/interrupt_at.py), a position in the run that does not depend on the machine's speed."""
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    wrapper = ["-m", "bench.interrupt_at", str(signal_at[1]), "--signal", signal_at[0]] if signal_at else []
    return subprocess.Popen(
        [sys.executable, *wrapper, "main.py", *args], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env
    )


def _run_dir(out_dir: Path) -> Path | None:
    runs = [p for p in out_dir.glob("*_mobilenetv2_100") if p.is_dir()]
    return runs[0] if runs else None


def _rows(run: Path) -> list[dict]:
    with open(run / "metrics.csv", newline="") as fh:
        return [{k: v for k, v in r.items() if k not in TIMING} for r in csv.DictReader(fh)]


def _reference(run, tiny_data, out):
    out.mkdir(exist_ok=True)
    with open(out / "log", "w") as log:
        assert _start([*run, "--data_dir", str(tiny_data), "--output_dir", str(out)], log).wait(300) == 0
    return _run_dir(out)


@pytest.fixture(scope="module")
def reference(tiny_data, tmp_path_factory):
    return _reference(RUN, tiny_data, tmp_path_factory.mktemp("reference"))


def _wait_until(predicate, proc, timeout=240.0, poll=0.001):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(poll)
    return False


def _n_rows(out: Path) -> int:
    run = _run_dir(out)
    if run is None or not (run / "metrics.csv").exists():
        return 0
    return max(len((run / "metrics.csv").read_text().splitlines()) - 1, 0)


def _saving_last(out: Path) -> bool:
    run = _run_dir(out)
    return run is not None and (run / "last.pth.tar").exists() and any(run.glob(".last.pth.tar.*.tmp"))


KILL_POINTS = {  # 8 updates per epoch
    # while a checkpoint after epoch 1 is being written: the previous files must survive intact
    "during a checkpoint write": lambda out: _saving_last(out) and _n_rows(out) >= 1,
    "mid epoch 2": 12,  # right after update 12
    "right after epoch 2": lambda out: _n_rows(out) >= 2,
}


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_sigkill_then_resume_matches_an_uninterrupted_run(reference, tiny_data, tmp_path, point):
    where = KILL_POINTS[point]
    with open(tmp_path / "log", "w") as log:
        args = [*RUN, "--data_dir", str(tiny_data), "--output_dir", str(tmp_path)]
        proc = _start(args, log, signal_at=("KILL", where) if isinstance(where, int) else None)
        reached = (
            proc.wait(300) == -signal.SIGKILL if isinstance(where, int) else _wait_until(lambda: where(tmp_path), proc)
        )
        proc.send_signal(signal.SIGKILL)
        proc.wait(60)
    assert reached, f"the run ended before the kill point: {(tmp_path / 'log').read_text()[-2000:]}"
    run = _run_dir(tmp_path)
    torch.load(run / "last.pth.tar", weights_only=True)  # never truncated
    with open(tmp_path / "resume.log", "w") as log:
        assert _start(["--resume", str(run)], log).wait(300) == 0, (tmp_path / "resume.log").read_text()[-3000:]
    assert _rows(run) == _rows(reference)
    assert same_weights(run / "last.pth.tar", reference / "last.pth.tar")
    assert same_weights(run / "best.pth.tar", reference / "best.pth.tar")
    assert (run / "best_test_preds.csv").read_text() == (reference / "best_test_preds.csv").read_text()
    assert not list(run.glob(".*.tmp"))  # a write the kill cut short leaves nothing behind once resumed


def test_sigint_saves_mid_epoch_and_resumes_exactly(reference, tiny_data, tmp_path):
    with open(tmp_path / "log", "w") as log:
        proc = _start([*RUN, "--data_dir", str(tiny_data), "--output_dir", str(tmp_path)], log, ("INT", 11))
        code = proc.wait(300)
    output = (tmp_path / "log").read_text()
    run = _run_dir(tmp_path)
    assert code == 130 and f"python main.py --resume {run}" in output and "Traceback" not in output
    ckpt = torch.load(run / "last.pth.tar", weights_only=True)
    assert ckpt["epoch"] == 1 and 0 < ckpt["batch"] < 8  # a mid-epoch position
    with open(tmp_path / "resume.log", "w") as log:
        assert _start(["--resume", str(run), "--workers", "2"], log).wait(300) == 0
    assert _rows(run) == _rows(reference)
    assert same_weights(run / "last.pth.tar", reference / "last.pth.tar")
    started, resumed = yaml.safe_load((run / "config.yaml").read_text())["resolved"]["sources"]  # both kept
    assert "--resume" not in started["command"] and resumed["command"].startswith(f"python main.py --resume {run}")


# the other augmentation backend (albumentations in the workers, seeded per image) and progressive
# resizing resume exactly too
ALBU_RUN = [*RUN, "--aug_backend", "albumentations", "--workers", "2", "--min_img_size", "16"]


def test_sigkill_mid_epoch_resumes_exactly_with_albumentations_workers(tiny_data, tmp_path):
    reference = _reference(ALBU_RUN, tiny_data, tmp_path / "reference")
    out = tmp_path / "killed"
    out.mkdir()
    with open(tmp_path / "log", "w") as log:
        proc = _start([*ALBU_RUN, "--data_dir", str(tiny_data), "--output_dir", str(out)], log, ("KILL", 12))
        assert proc.wait(300) == -signal.SIGKILL, (tmp_path / "log").read_text()[-2000:]
    run = _run_dir(out)
    with open(tmp_path / "resume.log", "w") as log:
        assert _start(["--resume", str(run)], log).wait(300) == 0, (tmp_path / "resume.log").read_text()[-3000:]
    assert _rows(run) == _rows(reference)
    assert same_weights(run / "last.pth.tar", reference / "last.pth.tar")


def test_sigkill_mid_epoch_with_data_on_the_device_resumes_to_the_loader_paths_run(reference, tiny_data, tmp_path):
    """--data_on_device gathers the loader path's batches itself: killed and resumed, it ends exactly
    where the uninterrupted DataLoader run (the module's reference) ends."""
    with open(tmp_path / "log", "w") as log:
        args = [*RUN, "--data_on_device", "on", "--data_dir", str(tiny_data), "--output_dir", str(tmp_path)]
        assert _start(args, log, ("KILL", 12)).wait(300) == -signal.SIGKILL, (tmp_path / "log").read_text()[-2000:]
    run = _run_dir(tmp_path)
    with open(tmp_path / "resume.log", "w") as log:
        assert _start(["--resume", str(run)], log).wait(300) == 0, (tmp_path / "resume.log").read_text()[-3000:]
    assert "data on the device: on" in (run / "log.txt").read_text()
    assert _rows(run) == _rows(reference)
    assert same_weights(run / "last.pth.tar", reference / "last.pth.tar")
    assert (run / "best_test_preds.csv").read_text() == (reference / "best_test_preds.csv").read_text()


def _scaled_parts(tiny_data, fp16: bool):
    """A CPU run's parts whose grad scaler is enabled as it is for fp16 (`fp16`) or disabled (bf16,
    fp32), with its learning-rate schedule."""
    from conftest import TinyNet, loaders_for, tiny_parts

    parts = tiny_parts(TinyNet(), loaders_for(tiny_data))
    parts.scaler = torch.amp.GradScaler("cpu", enabled=fp16)
    return parts, torch.optim.lr_scheduler.ConstantLR(parts.optimizer, factor=1.0)


def _saved(parts, scheduler, path: Path) -> dict:
    from tin import checkpoint
    from tin.plan import budget

    ckpt = checkpoint.make_checkpoint(parts, scheduler, {}, TrainState(), budget.Plan(3, 8, 8).to_dict())
    checkpoint.write_checkpoint(ckpt, path)
    return checkpoint.load_checkpoint(path)


def test_a_run_saved_without_fp16_resumes_where_fp16_is_chosen(tiny_data, tmp_path, tin_log):
    """A bf16 or fp32 run saves an empty state for its disabled grad scaler; resumed where fp16 is
    chosen (--amp_dtype fp16, a GPU without bf16) the run goes on, its scaler at its initial scale.
    The other way round, the saved scale is dropped; fp16 to fp16 keeps it."""
    from tin import checkpoint

    ckpt = _saved(*_scaled_parts(tiny_data, fp16=False), tmp_path / "fp32.pth.tar")
    assert ckpt["scaler"] == {}
    parts, scheduler = _scaled_parts(tiny_data, fp16=True)
    checkpoint.restore(parts, scheduler, ckpt)
    assert parts.scaler.is_enabled() and parts.scaler.get_scale() == torch.amp.GradScaler("cpu").get_scale()
    assert "saved without fp16 and resumes with it" in tin_log.text

    fp16, scheduler = _scaled_parts(tiny_data, fp16=True)
    fp16.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)  # as if the run had found that scale
    ckpt = _saved(fp16, scheduler, tmp_path / "fp16.pth.tar")
    parts, scheduler = _scaled_parts(tiny_data, fp16=False)
    checkpoint.restore(parts, scheduler, ckpt)
    assert not parts.scaler.is_enabled() and parts.scaler.state_dict() == {}
    parts, scheduler = _scaled_parts(tiny_data, fp16=True)
    checkpoint.restore(parts, scheduler, ckpt)
    assert parts.scaler.get_scale() == 1024.0
