"""A short visit to a GPU machine: prove the GPU path and run the GPU speed-run in one sequence of
calls that each carry the repository and one part of the dataset (docs/GPU_VISIT.md).

    python -m bench.gpu_visit split                 # here, once: the dataset's parts re-split to <= 56 MiB
    python -m bench.gpu_visit plan                  # here: the calls to make, and the time they take
    python -m bench.gpu_visit start                 # call 1 (carries part 0 and SHA256SUMS): gpu_check starts
    python -m bench.gpu_visit status                # each middle call (carries the next part)
    python -m bench.gpu_visit finish --out DIR      # the last call (carries the last part): data, speed-run

`start` leaves bench/gpu_check.py running in its own process session, so it goes on while the
other parts arrive; `finish` waits for it, checks and assembles the parts, installs the dataset,
runs configs/gpu_speedrun.yaml with the minutes left in the call, and copies what a person needs
to read back into DIR: 8 files at most (gpu_check.md, gpu_check.json, gpu_check.log, metrics.csv,
log.txt, best_results.json, speedrun.log, visit.md). `--dry-run` does everything but the GPU
work (the commands are printed instead): CI runs it on a CPU.

Only the standard library and this repository: it runs on the GPU machine's own Python.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VISIT = ROOT / ".visit"  # ignored by git; what the calls carry
ARCHIVE = "tiny-imagenet-200.tar.gz"
MIB = 1 << 20
PART_MIB = 56  # a call carries at most 64 MiB: the repository and one part
CALL_S = 600  # one call's limit on the device
START_S = 120  # a fresh machine's start
GPU_CHECK_S = 180  # bench/gpu_check.py on one H100 or H200 (its target)
INSTALL_S = 60  # checking and assembling the parts, extracting, decoding into the cache
MARGIN_S = 45  # collecting the files, Python's start-up, what the estimates miss
RUN_MAX_MIN = 6.0  # the speed-run's budget when the call leaves room for it


def sha256(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as fh:
            while chunk := fh.read(MIB):
                h.update(chunk)
    return h.hexdigest()


def read_sums(path: Path) -> dict[str, str]:
    sums = {}
    for line in path.read_text().splitlines():
        digest, _, name = line.strip().partition("  ")
        if name:
            sums[name.lstrip("*")] = digest
    return sums


# --------------------------------------------------------------------------- here, before the visit
def split(source: Path, into: Path, part_mib: float) -> list[Path]:
    """The archive's parts in `source` (ARCHIVE.part0, 1, ... and SHA256SUMS) re-cut into parts of at
    most `part_mib` MiB in `into`, with their own SHA256SUMS (and the whole archive's, checked)."""
    old = sorted(source.glob(f"{ARCHIVE}.part*"), key=lambda p: int(p.name.rsplit("part", 1)[1]))
    if not old:
        raise SystemExit(f"error: no {ARCHIVE}.part* in {source}")
    sums = read_sums(source / "SHA256SUMS") if (source / "SHA256SUMS").is_file() else {}
    into.mkdir(parents=True, exist_ok=True)
    for stale in into.glob(f"{ARCHIVE}.part*"):
        stale.unlink()
    whole, parts, out, written, size = hashlib.sha256(), [], None, 0, int(part_mib * MIB)
    for path in old:
        with open(path, "rb") as fh:
            while chunk := fh.read(MIB):
                whole.update(chunk)
                while chunk:
                    if out is None or written == size:
                        out = _next_part(out, into, parts)
                        written = 0
                    take = chunk[: size - written]
                    out.write(take)
                    written += len(take)
                    chunk = chunk[len(take) :]
    out.close()
    if ARCHIVE in sums and whole.hexdigest() != sums[ARCHIVE]:
        raise SystemExit(f"error: the parts in {source} do not make the archive SHA256SUMS names; copy them again")
    lines = [f"{sha256([p])}  {p.name}" for p in parts] + [f"{whole.hexdigest()}  {ARCHIVE}"]
    (into / "SHA256SUMS").write_text("\n".join(lines) + "\n")
    return parts


def _next_part(current, into: Path, parts: list[Path]):
    if current is not None:
        current.close()
    parts.append(into / f"{ARCHIVE}.part{len(parts)}")
    return open(parts[-1], "wb")


def plan(visit: Path) -> str:
    """The calls to make and their time, as Markdown (also the schedule `finish` budgets with)."""
    parts = sorted(visit.glob(f"{ARCHIVE}.part*"))
    n = len(parts) or 3
    run_min = speedrun_minutes(0.0, INSTALL_S)
    rel = visit.relative_to(ROOT) if visit.is_relative_to(ROOT) else visit
    lines = [
        f"GPU visit: {n} calls back to back (each carries the repository and one part; a pause over 30 s loses the machine)",
        "",
        "| call | carry | command | what runs |",
        "|---|---|---|---|",
        f"| 1 | `{rel}/SHA256SUMS`, `{rel}/{ARCHIVE}.part0` | `python3 -m bench.gpu_visit start` | gpu_check starts "
        f"in the background (~{GPU_CHECK_S // 60} min) |",
    ]
    for k in range(1, n - 1):
        lines.append(
            f"| {k + 1} | `{rel}/{ARCHIVE}.part{k}` | `python3 -m bench.gpu_visit status` | the part arrives |"
        )
    lines.append(
        f"| {n} | `{rel}/{ARCHIVE}.part{n - 1}` | `python3 -m bench.gpu_visit finish --out $OUT` | waits for gpu_check, "
        f"installs the data (~{INSTALL_S} s), speed-run of {run_min:.1f} min, 8 files back |"
    )
    total = START_S + 30 * (n - 1) + max(0, GPU_CHECK_S - 30 * (n - 1)) + INSTALL_S + 60 * run_min + MARGIN_S
    lines += ["", f"device time: about {total / 60:.1f} min of the 15 (a start ~{START_S // 60} min included)"]
    return "\n".join(lines)


def speedrun_minutes(elapsed_s: float, install_s: float) -> float:
    """The speed-run's --time_budget: what the call has left after `elapsed_s` and an install still
    to come (`install_s`), less the margin; at most RUN_MAX_MIN, never below one minute, in tenths."""
    left = CALL_S - elapsed_s - install_s - MARGIN_S
    return max(1.0, min(RUN_MAX_MIN, math.floor(left / 6) / 10))


# --------------------------------------------------------------------------- on the GPU machine
def _python() -> str:
    return sys.executable


def start(visit: Path, dry_run: bool) -> int:
    out = visit / "out"
    out.mkdir(parents=True, exist_ok=True)
    command = [
        _python(),
        "-m",
        "bench.gpu_check",
        "--work_dir",
        str(visit / "work"),
        "--out",
        str(out / "gpu_check.json"),
    ]
    (visit / "started").write_text(f"{time.time()}\n")
    if dry_run:
        print("would run in the background:", " ".join(command))
        return 0
    with open(out / "gpu_check.md", "w") as table, open(out / "gpu_check.log", "w") as log:
        proc = subprocess.Popen(command, cwd=ROOT, stdout=table, stderr=log, start_new_session=True)
    (visit / "gpu_check.pid").write_text(f"{proc.pid}\n")
    print(f"gpu_check running (pid {proc.pid}); its table goes to {out / 'gpu_check.md'}")
    return 0


def _running(visit: Path) -> int | None:
    pid_file = visit / "gpu_check.pid"
    if not pid_file.is_file():
        return None
    pid = int(pid_file.read_text())
    try:
        os.kill(pid, 0)
    except OSError:
        return None
    return pid


def status(visit: Path) -> int:
    parts = sorted(p.name for p in visit.glob(f"{ARCHIVE}.part*"))
    pid = _running(visit)
    log = visit / "out" / "gpu_check.log"
    last = log.read_text().strip().splitlines()[-1:] if log.is_file() else []
    print(f"parts here: {', '.join(parts) or 'none'}; gpu_check {'running' if pid else 'not running'}")
    for line in last:
        print(f"  gpu_check: {line[:160]}")
    return 0


def check_parts(visit: Path) -> list[Path]:
    """Every part SHA256SUMS lists is here and matches, and together they make the archive."""
    sums_file = visit / "SHA256SUMS"
    if not sums_file.is_file():
        raise SystemExit(f"error: {sums_file} is missing: call 1 carries it with part 0")
    sums = read_sums(sums_file)
    names = sorted((n for n in sums if n != ARCHIVE), key=lambda n: int(n.rsplit("part", 1)[1]))
    missing = [n for n in names if not (visit / n).is_file()]
    if missing:
        raise SystemExit(
            f"error: {', '.join(missing)} not here: the machine went back between calls, or a call "
            "carried the wrong path; start the sequence again"
        )
    bad = [n for n in names if sha256([visit / n]) != sums[n]]
    if bad:
        raise SystemExit(f"error: {', '.join(bad)} do(es) not match SHA256SUMS (cut short in transfer?)")
    parts = [visit / n for n in names]
    if ARCHIVE in sums and sha256(parts) != sums[ARCHIVE]:
        raise SystemExit("error: the parts do not make the archive SHA256SUMS names: were they split from it?")
    return parts


def finish(visit: Path, out_dir: Path, minutes: float | None, dry_run: bool, t0: float, expect: str = "") -> int:
    out, notes = visit / "out", []
    out.mkdir(parents=True, exist_ok=True)
    _wait_for_gpu_check(visit, t0, notes)
    parts = check_parts(visit)
    data = visit / "data" / "tiny-imagenet-200"
    install = [_python(), "data/download.py", "--dest", str(data), "--archive", *map(str, parts)]
    install += ["--expect", expect] if expect else []
    t_install = time.time()
    if subprocess.run(install, cwd=ROOT, stdout=subprocess.DEVNULL).returncode:
        raise SystemExit("error: the dataset could not be installed from the parts (data/download.py said why)")
    notes.append(f"parts checked and the dataset installed in {time.time() - t_install:.0f} s")
    budget = minutes or speedrun_minutes(time.time() - t0, 0.0)
    notes.append(f"speed-run budget: {budget:.1f} min ({time.time() - t0:.0f} s into the call)")
    run = [_python(), "main.py", "--config", "configs/gpu_speedrun.yaml", "--time_budget", f"{budget:g}"]
    run += ["--data_dir", str(data), "--output_dir", str(visit / "runs"), "--wandb", "disabled"]
    if dry_run:
        print("would run:", " ".join(run))
    else:
        with open(out / "speedrun.log", "w") as log:
            code = subprocess.call(run, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        notes.append(f"speed-run exit status {code}")
    collect(visit, out_dir, notes, t0)
    return 0


def _wait_for_gpu_check(visit: Path, t0: float, notes: list[str]) -> None:
    """Wait for the background gpu_check while the call can afford it (leaving a speed-run of at
    least 3 minutes); stop it beyond that, saying so."""
    start = time.time()
    pid = _running(visit)
    while pid is not None and speedrun_minutes(time.time() - t0, INSTALL_S) > 3.0:
        time.sleep(2)
        pid = _running(visit)
    if pid is not None:
        os.killpg(pid, signal.SIGTERM)
        notes.append("gpu_check was stopped unfinished, to leave the speed-run its time")
    waited = time.time() - start
    started = float((visit / "started").read_text()) if (visit / "started").is_file() else None
    if started is not None:
        notes.append(f"gpu_check: started {t0 - started:.0f} s before this call; waited {waited:.0f} s for it here")


def collect(visit: Path, out_dir: Path, notes: list[str], t0: float) -> None:
    """At most 8 files into out_dir: gpu_check's table, JSON and log, the run's metrics.csv, log.txt
    and best_results.json, the speed-run's console, and visit.md (timings, card, curve)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files = [visit / "out" / n for n in ("gpu_check.md", "gpu_check.json", "gpu_check.log", "speedrun.log")]
    runs = sorted((visit / "runs").glob("*/best_results.json"))
    run = runs[-1].parent if runs else None
    if run is not None:
        files += [run / "metrics.csv", run / "log.txt", run / "best_results.json"]
    for f in files:
        if f.is_file():
            shutil.copyfile(f, out_dir / f.name)
    lines = ["# GPU visit", "", f"card: {_card()}", f"call time: {time.time() - t0:.0f} s", ""]
    lines += [f"- {n}" for n in notes]
    if run is not None:
        lines += ["", _curve(run)]
    (out_dir / "visit.md").write_text("\n".join(lines) + "\n")
    print((out_dir / "visit.md").read_text())


def _card() -> str:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        return out.stdout.strip() or "no GPU (nvidia-smi printed nothing)"
    except (OSError, subprocess.TimeoutExpired):
        return "no GPU (no nvidia-smi)"


def _curve(run: Path) -> str:
    best = json.loads((run / "best_results.json").read_text())
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    text = [
        f"best val top-1 {best.get('val_top1')} % (top-5 {best.get('val_top5')} %), {best.get('wall_time_seconds')} s",
        "",
        "| epoch | train px | s | lr | train loss | val top-1 | epoch s | img/s | wall s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = [r.get(k, "") for k in ("epoch", "train_size", "aug_strength", "lr", "train_loss", "val_top1")]
        cells += [r.get(k, "") for k in ("epoch_seconds", "images_per_second", "wall_seconds")]
        text.append("| " + " | ".join(cells) + " |")
    return "\n".join(text)


def main(argv: list[str] | None = None) -> int:
    t0 = time.time()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="step", required=True)
    s = sub.add_parser("split", help="here: re-cut the dataset's parts to fit a call")
    s.add_argument("--from", dest="source", default=str(ROOT.parent / "shared" / "data"))
    s.add_argument("--size", type=float, default=PART_MIB, help="MiB per part")
    pl = sub.add_parser("plan", help="here: the calls and their time")
    st = sub.add_parser("start", help="call 1: gpu_check in the background")
    st.add_argument("--dry-run", action="store_true")
    su = sub.add_parser("status", help="a middle call: what has arrived")
    f = sub.add_parser("finish", help="the last call: data, speed-run, files back")
    f.add_argument("--out", required=True, help="where the files to read back go ($OUT on the device)")
    f.add_argument("--minutes", type=float, default=None, help="the speed-run's budget (default: what the call leaves)")
    f.add_argument("--dry-run", action="store_true")
    f.add_argument("--expect", default="", help="data/download.py --expect, for a subset (tests)")
    for q in (s, pl, st, su, f):
        q.add_argument("--visit", default=str(VISIT), help="the folder the parts travel in")
    args = p.parse_args(argv)
    visit = Path(args.visit)
    if args.step == "split":
        parts = split(Path(args.source), visit, args.size)
        print("\n".join(f"{q} ({q.stat().st_size / MIB:.1f} MiB)" for q in parts))
        print(plan(visit))
        return 0
    if args.step == "plan":
        print(plan(visit))
        return 0
    if args.step == "start":
        return start(visit, args.dry_run)
    if args.step == "status":
        return status(visit)
    return finish(visit, Path(args.out), args.minutes, args.dry_run, t0, args.expect)


if __name__ == "__main__":
    sys.exit(main())
