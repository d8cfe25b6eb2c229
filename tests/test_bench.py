"""The bench/ scripts run end to end and print their tables (on tiny inputs: the figures themselves
come from real runs, see README: Speed; nothing here times anything)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from conftest import FAST_ARCH, FAST_RUN, ROOT, bench_module
from tin.runtime import hardware

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
    assert "| bare img/s | trainer img/s | trainer / bare" in text and "host blocked fetching next batch" in text
    r = json.loads(out.read_text())
    assert r["bare_ips"] > 0 and r["trainer_ips"] > 0 and len(r["ratios"]) == 2 and 0 <= r["data_wait_median"] < 1
    step = bench_module("step")  # where the trainer's time goes: each part of its update, and their sum
    assert r["parts_ms"].keys() == step.PARTS.keys() and all(ms >= 0 for ms in r["parts_ms"].values())
    assert r["parts_ms"]["forward_backward"] > 0 and abs(r["parts_sum_ms"] - sum(r["parts_ms"].values())) < 1e-9
    assert all(what in text for what in step.PARTS.values()) and "| **sum of the parts** |" in text
    assert r["trainer_update_ms"] > 0 and "the trainer's own time per update" in text
    default = hardware.decide_runtime(torch.device("cpu"))  # main.py's defaults on this machine, full strength
    assert (r["amp"], r["channels_last"], r["strength"]) == (default.precision, default.channels_last, 1.0)


def test_step_bench_with_a_teacher_compares_the_step_with_and_without_it(trained_run, tiny_data, tmp_path):
    out = tmp_path / "step.json"
    args = ["--data_dir", str(tiny_data), *"--arch resnet9_slim --img_size 32 --batch_size 8 --workers 0".split()]
    args += ["--teacher", str(trained_run), "--kd_views", "0", *"--steps 2 --reps 2 --warmup 1 --out".split(), str(out)]
    text = _bench("step.py", *args)
    assert "| trainer img/s without the teacher | with it | with ÷ without" in text
    r = json.loads(out.read_text())
    assert r["untaught_ips"] > 0 and len(r["taught_ratios"]) == 2 and r["teachers"][0]["arch"] == FAST_ARCH


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
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable,
            "bench/gpu_check.py",
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
    report = json.loads((out / "gpu_check.json").read_text())
    rows = report["rows"]
    assert [r["check"][:2] for r in rows] == ["1.", "2a", "2b", "2c", "3.", "4a", "4b", "5."]  # compile checks last
    assert all(r["ok"] is True for r in rows if r["check"][:2] in ("1.", "4a", "5."))
    assert all(r["result"] for r in rows if r["ok"] is None)  # every skipped row says why
    first = rows[0]["result"]
    assert "stopped with 130 at update" in first and "identical to an uninterrupted run" in first
    assert report["status"].startswith("finished") and "timm " in report["versions"]  # the timm it ran with
    assert (out / "gpu_check.md").read_text().count("\n| ") == len(rows) + 1


def test_gpu_check_continue_reruns_a_check_its_process_died_in_once_then_fails_it(tmp_path):
    """--continue after a process that ended inside check 1 without a word: check 1 runs again;
    after a second such end it is a FAIL row, and the checks after it still run."""
    title = "1. training, interrupt, resume, evaluate.py"
    row = {"key": "2a", "check": "2a. host syncs per update", "result": "CUDA only", "ok": None, "seconds": 0.0}
    report = tmp_path / "gpu_check.json"
    for attempts, expect in ((1, {"2a"}), (2, {"2a", "1"})):
        gpu_check = bench_module("gpu_check")  # a fresh process's state
        report.write_text(json.dumps({"status": f"running {title}", "attempts": {"1": attempts}, "rows": [row]}))
        assert gpu_check.kept_rows(report) == expect
    (died,) = [r for r in gpu_check.ROWS if r["key"] == "1"]
    assert died["ok"] is False and "ended inside this check twice" in died["result"]


def _json_rows(path) -> int:
    try:
        return len(json.loads(path.read_text())["rows"])
    except (OSError, ValueError):
        return 0


def test_gpu_check_stopped_with_sigterm_keeps_the_rows_it_finished(tmp_path):
    """SIGTERM in the middle of check 1 (its reference run has started; check 2a's row is written):
    the table and JSON hold 2a's row and say where it stopped; check 1's runs are stopped too."""
    import time

    out, work = tmp_path / "out", tmp_path / "work"
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.gpu_check", "--device", "cpu", "--only", "2a,1", "--work_dir", str(work)]
        + ["--out", str(out)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=ENV,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not (_json_rows(out / "gpu_check.json") and (work / "reference.log").is_file()):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-2000:]
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err[-2000:]
    report = json.loads((out / "gpu_check.json").read_text())  # valid JSON, every row before the stop
    assert [r["check"][:2] for r in report["rows"]] == ["2a"]
    assert report["status"].startswith("stopped by SIGTERM during 1.")
    table = (out / "gpu_check.md").read_text()
    assert "stopped by SIGTERM during 1." in table and "| 2a. host syncs per update |" in table
    assert "Traceback" not in err
    ps, gone_by = ["?"], time.monotonic() + 30  # killed; its loader workers notice and follow within seconds
    while ps and time.monotonic() < gone_by:
        time.sleep(0.5)
        ps = subprocess.run(["pgrep", "-f", str(work)], capture_output=True, text=True).stdout.split()
    assert not ps, f"check 1's main.py still running 30 s after: {ps}"


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


def _visit(*args, check=True):
    proc = subprocess.run(
        [sys.executable, "-m", "bench.gpu_visit", *args], cwd=ROOT, capture_output=True, text=True, timeout=300, env=ENV
    )
    if check:
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc


def _wait_for(what, timeout=120):
    import time

    deadline = time.monotonic() + timeout
    while not what():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def _staged_visit(tmp_path, tiny_data, name="visit"):
    (tmp_path / name).mkdir()
    shared, size = _archive_parts(tmp_path / name, tiny_data, parts=4)
    visit = tmp_path / name / "visit"
    part_mib = size / 3 / 2**20 + 1e-4  # re-cut into three parts
    proc = _visit("split", "--from", str(shared), "--visit", str(visit), "--size", f"{part_mib}")
    parts = sorted(visit.glob("tiny-imagenet-200.tar.gz.part*"))
    assert len(parts) == 3 and all(p.stat().st_size <= part_mib * 2**20 for p in parts)
    assert "| 3 |" in proc.stdout and "finish --out $OUT --call_s 600" in proc.stdout  # the plan: three calls
    minutes = float(proc.stdout.split("device time: about ")[1].split(" min")[0])
    assert minutes <= 15 - 1  # the sequence fits the 15 minutes with a minute to spare
    return visit


def test_gpu_visit_whose_call_runs_out_during_gpu_check_keeps_its_rows(tmp_path, tiny_data):
    """The last call's limit is reached while gpu_check is in check 1: its finished rows come back
    (table and JSON), the logs, and a visit.md that says where it stopped; no speed-run is started."""
    visit = _staged_visit(tmp_path, tiny_data)
    out1 = tmp_path / "out1"
    _visit("start", "--dry-run", "--visit", str(visit), "--out", str(out1), "--only", "2a,1")
    assert "gpu_check started" in (out1 / "visit.md").read_text()
    reference = visit / "work" / "reference.log"
    _wait_for(lambda: _json_rows(visit / "out" / "gpu_check.json") and reference.is_file())
    # a machine that ends every process of a call with the call: the next call starts gpu_check
    # again with --continue, and the row it had finished stays
    os.killpg(int((visit / "gpu_check.pid").read_text()), signal.SIGKILL)
    _wait_for(lambda: subprocess.run(["pgrep", "-f", str(visit / "work")], capture_output=True).returncode)
    reference.unlink()
    out2 = tmp_path / "out2"
    _visit("status", "--dry-run", "--visit", str(visit), "--out", str(out2))
    assert "again, --continue" in (out2 / "visit.md").read_text()
    assert _json_rows(out2 / "gpu_check.json") == 1  # a middle call brings the rows so far back
    _wait_for(reference.is_file)  # check 1 runs again
    out = tmp_path / "out"
    args = ["finish", "--dry-run", "--visit", str(visit), "--out", str(out), "--expect", "4,16,20,9"]
    _visit(*args, "--call_s", "20", "--margin_s", "5")
    report = json.loads((out / "gpu_check.json").read_text())
    assert [r["key"] for r in report["rows"]] == ["2a"] and "stopped by SIGTERM during 1." in report["status"]
    assert {"gpu_check.md", "gpu_check.log", "visit.md"} <= {p.name for p in out.iterdir()}
    text = (out / "visit.md").read_text()
    assert "gpu_check stopped unfinished" in text and "no speed-run" in text
    assert "stage: done; the call's deadline cut short: gpu_check" in text


def test_gpu_visit_whose_call_runs_out_during_the_speed_run_streams_what_it_made(tmp_path, tiny_data):
    """gpu_check done, the data installed from the parts while it ran, a speed-run asked for more
    minutes than the call has: the deadline stops it (it saves), and the files made so far, each
    named with the run's budget, are in --out with a visit.md naming the stage it stopped in."""
    visit = _staged_visit(tmp_path, tiny_data)
    _visit("start", "--dry-run", "--visit", str(visit), "--out", str(tmp_path / "out1"), "--only", "2a")
    report = visit / "out" / "gpu_check.json"
    _wait_for(lambda: report.is_file() and json.loads(report.read_text())["status"].startswith("finished"))
    out = tmp_path / "out"
    args = ["finish", "--dry-run", "--visit", str(visit), "--out", str(out), "--expect", "4,16,20,9"]
    _visit(*args, "--minutes", "5", "--call_s", "45", "--margin_s", "5")
    assert (visit / "data" / "tiny-imagenet-200" / "wnids.txt").is_file()  # the parts, assembled and installed
    assert list((visit / "data" / "tiny-imagenet-200" / ".cache").glob("train_*.npy"))  # and decoded
    names = {p.name for p in out.iterdir() if not p.name.startswith(".")}
    assert len(names) <= 8 and {"gpu_check.md", "gpu_check.json", "visit.md", "speedrun_5min.log"} <= names
    text = (out / "visit.md").read_text()
    assert "stage: done; the call's deadline cut short: the speed-run of 5 min" in text
    assert "--time_budget 5" in (out / "speedrun_5min.log").read_text() or "5 min" in text
    assert "interrupted; state saved" in (out / "speedrun_5min.log").read_text()  # SIGTERM: the run saved
    (visit / "tiny-imagenet-200.tar.gz.part1").write_bytes(b"cut short")  # a transfer that broke off
    proc = _visit(*args, check=False)
    assert proc.returncode != 0 and "part1 do(es) not match SHA256SUMS" in proc.stderr
    assert "stage: stopped during: checking the parts" in (out / "visit.md").read_text()


def test_gpu_visit_budgets_the_speed_run_from_the_time_left_in_the_call():
    gpu_visit = bench_module("gpu_visit")

    assert gpu_visit.speedrun_minutes(600) == 6.0  # a long call: the visit's six minutes at most
    assert gpu_visit.speedrun_minutes(255) == 4.2  # 255 s left: 4.2 minutes
    assert gpu_visit.speedrun_minutes(50) == 0.0  # under a minute: no speed-run
    plan = gpu_visit.plan(ROOT / ".no-visit", call_s=600)
    run_min = float(plan.split("a speed-run of ")[1].split(" min")[0])
    assert 3.0 <= run_min < 9.5  # a full call leaves minutes after gpu_check, never the preset's 9.5


def test_gpu_visit_record_names_the_speed_runs_budget_on_every_curve_line(trained_run, tmp_path):
    gpu_visit = bench_module("gpu_visit")

    visit = tmp_path / "visit"
    (visit / "out").mkdir(parents=True)
    for name in ("gpu_check.md", "gpu_check.json", "gpu_check.log"):
        (visit / "out" / name).write_text("x\n")
    v = gpu_visit.Visit(visit, tmp_path / "back", call_s=600, margin_s=45, dry_run=True, step="finish")
    v.budget, v.run_dir = 4.2, trained_run
    v.report("done")
    back = sorted(p.name for p in (tmp_path / "back").iterdir() if not p.name.startswith("."))
    assert len(back) <= 8 and {"speedrun_4.2min_metrics.csv", "speedrun_4.2min_best_results.json", "visit.md"} <= set(
        back
    )
    text = (tmp_path / "back" / "visit.md").read_text()
    curve = [line for line in text.splitlines() if line.startswith("| ") and "epoch" not in line]
    assert len(curve) == 2 and all(line.startswith("| 4.2-min visit run |") for line in curve)
    assert "the 9.5-minute preset is not measured by it" in text


def test_the_repository_and_one_part_fit_one_device_call():
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True).stdout.split("\0")
    size = sum((ROOT / f).stat().st_size for f in tracked if f and (ROOT / f).is_file())
    gpu_visit = bench_module("gpu_visit")

    assert size + gpu_visit.PART_MIB * 2**20 < 64 * 2**20, f"the repository takes {size / 2**20:.1f} MiB"


# --------------------------------------------------------------------------- bench scripts run as files
SCRIPTS = sorted(p.name for p in (ROOT / "bench").glob("*.py") if 'if __name__ == "__main__":' in p.read_text())


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_bench_script_runs_as_a_file_from_any_folder(script, tmp_path):
    """python bench/NAME.py --help from another folder (as a user copying a path would run it), not
    only python -m bench.NAME from the repository root: no ModuleNotFoundError for the toolkit."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), "--help"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=ENV,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage" in proc.stdout.lower()
