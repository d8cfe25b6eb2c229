"""A short visit to a GPU machine: prove the GPU path and run a short GPU speed-run in one sequence
of calls that each carry the repository and one part of the dataset (docs/GPU_VISIT.md).

    python -m bench.gpu_visit split                          # here, once: the parts re-cut to <= 56 MiB
    python -m bench.gpu_visit plan                           # here: the calls to make, and their time
    python -m bench.gpu_visit start --out $OUT               # call 1 (part 0 + SHA256SUMS): gpu_check starts
    python -m bench.gpu_visit status --out $OUT              # each middle call (the next part)
    python -m bench.gpu_visit finish --out $OUT --call_s S   # the last call (the last part): data, speed-run

`start` leaves bench/gpu_check.py running in its own process session, so it goes on while the
other parts arrive; every call copies what exists so far into its --out (gpu_check writes each row
the moment its check ends), so a machine lost between calls still returned the rows done. `finish`
checks the parts and installs and decodes the dataset while gpu_check finishes, then runs
configs/gpu_speedrun.yaml with the minutes the call has left (--call_s: the call's limit, as the
device granted it). Everything goes into --out as it is produced (the speed-run's console streamed,
its files copied every few seconds), and whatever ends the call — its own deadline, SIGTERM, an
error — leaves a visit.md that says where it stopped. 8 files at most come back: gpu_check.md,
gpu_check.json, gpu_check.log, visit.md and the speed-run's console, metrics.csv, log.txt and
best_results.json, each named with its budget (speedrun_4.2min_metrics.csv): the visit's
speed-run is shorter than the preset's 9.5 minutes, and its figures are not the preset's.

`--dry-run` runs the same sequence on this machine's CPU: gpu_check --device cpu, the data
installed for real, and a small CPU run in place of the speed-run. CI runs it on a tiny archive.

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
CALL_S = 600  # one call's limit on the device (less when little device time is left: --call_s)
START_S = 120  # a fresh machine's start
# bench/gpu_check.py on one H100 or H200, estimated (no GPU has run it yet): check 1's three demo
# runs ~90 s, 2a-2c ~90 s, 3 and 4a ~15 s, the cold compiles of 4b and 5 ~120 s
GPU_CHECK_S = 330
TRANSFER_S = 30  # a middle call: the part's transfer and Python's start
MARGIN_S = 45  # collecting the files, Python's start-up, what the estimates miss
RUN_MIN_S = 180  # gpu_check is waited for while a speed-run of at least this still fits
RUN_MAX_MIN = 6.0  # the speed-run's budget when the call leaves room for it
POLL_S = 3.0  # how often the files are copied into --out while something runs
IMPORT_S = 25  # main.py's imports and exit on a fresh machine: outside its --time_budget's clock
TMP = ".partial"  # the one temporary name in --out


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


def plan(visit: Path, call_s: float = CALL_S) -> str:
    """The calls to make and their time, as Markdown (with the schedule `finish` budgets with)."""
    parts = sorted(visit.glob(f"{ARCHIVE}.part*"))
    n = len(parts) or 3
    waited = max(0.0, GPU_CHECK_S - TRANSFER_S * (n - 1))  # gpu_check's time left when the last call starts
    run_min = speedrun_minutes(call_s - waited - MARGIN_S - IMPORT_S)
    rel = visit.relative_to(ROOT) if visit.is_relative_to(ROOT) else visit
    lines = [
        f"GPU visit: {n} calls back to back (each carries the repository and one part; a pause over 30 s loses the machine)",
        "",
        "| call | carry | command | what runs |",
        "|---|---|---|---|",
        f"| 1 | `{rel}/SHA256SUMS`, `{rel}/{ARCHIVE}.part0` | `python3 -m bench.gpu_visit start --out $OUT` | gpu_check "
        f"starts in the background (~{GPU_CHECK_S / 60:.1f} min) |",
    ]
    for k in range(1, n - 1):
        lines.append(
            f"| {k + 1} | `{rel}/{ARCHIVE}.part{k}` | `python3 -m bench.gpu_visit status --out $OUT` | the part "
            "arrives; gpu_check's rows so far come back |"
        )
    lines.append(
        f"| {n} | `{rel}/{ARCHIVE}.part{n - 1}` | `python3 -m bench.gpu_visit finish --out $OUT --call_s {call_s:.0f}` "
        f"| the data installed while gpu_check finishes (~{waited:.0f} s), then a speed-run of {run_min:.1f} min "
        "(not the 9.5-minute preset), 8 files back |"
    )
    total = START_S + TRANSFER_S * (n - 1) + call_s
    lines += [
        "",
        f"device time: about {total / 60:.1f} min of the 15 (a start ~{START_S // 60} min included); give each call "
        f"timeout_s {call_s:.0f} and the last one --call_s equal to the limit the device grants it",
    ]
    return "\n".join(lines)


def speedrun_minutes(left_s: float) -> float:
    """The speed-run's --time_budget for `left_s` seconds left before the call's deadline (its
    margin already taken off): at most RUN_MAX_MIN, in tenths of a minute; 0 when under a minute."""
    minutes = min(RUN_MAX_MIN, math.floor(left_s / 6) / 10)
    return minutes if minutes >= 1.0 else 0.0


# --------------------------------------------------------------------------- on the GPU machine
class Stopped(BaseException):
    """SIGTERM reached the visit (the call's limit, as `timeout` enforces it)."""


class Visit:
    """One call's record: its stage, notes and deadline; `report()` (re)writes visit.md and copies
    what exists into the call's --out, and is called whenever something changes."""

    def __init__(self, visit: Path, out_dir: Path, call_s: float, margin_s: float, dry_run: bool, step: str) -> None:
        self.visit, self.out_dir, self.dry_run, self.step = visit, out_dir, dry_run, step
        self.t0 = time.time()
        self.call_s, self.deadline = call_s, self.t0 + call_s - margin_s
        self.stage, self.notes, self.budget, self.run_dir = "starting", [], None, None
        self.cut: list[str] = []  # the stages the call's deadline cut short
        self.children: list[subprocess.Popen] = []  # stopped (SIGTERM: a run saves) if the visit is
        self.card = "none (--dry-run, on the CPU)" if dry_run else _card()
        out_dir.mkdir(parents=True, exist_ok=True)
        (visit / "out").mkdir(parents=True, exist_ok=True)

    def left(self) -> float:
        return self.deadline - time.time()

    def note(self, text: str) -> None:
        self.notes.append(f"{time.time() - self.t0:.0f} s: {text}")
        print(f"gpu_visit: {text}", flush=True)
        self.report()

    def at(self, stage: str) -> None:
        self.stage = stage
        self.report()

    def speedrun_name(self, what: str) -> str:
        return f"speedrun_{self.budget:g}min_{what}" if what != "log" else f"speedrun_{self.budget:g}min.log"

    def report(self, final: str = "") -> None:
        """Never raises: a report that fails (a half-written metrics row, a full disk) says so on
        the console, and the visit goes on; the next report tries again."""
        try:
            self._report(final)
        except Exception as exc:  # noqa: BLE001 - the record must not end the visit it records
            print(f"gpu_visit: the report could not be written this time ({type(exc).__name__}: {exc})", flush=True)

    def _report(self, final: str) -> None:
        for name in ("gpu_check.md", "gpu_check.json", "gpu_check.log"):
            _copy(self.visit / "out" / name, self.out_dir / name)
        if self.run_dir is not None:
            for name in ("metrics.csv", "log.txt", "best_results.json"):
                _copy(self.run_dir / name, self.out_dir / self.speedrun_name(name))
        lines = [f"# GPU visit: {self.step}", "", f"card: {self.card}"]
        lines += [f"call: {time.time() - self.t0:.0f} s of {self.call_s:.0f} s", f"stage: {final or self.stage}"]
        lines += ["", *[f"- {n}" for n in self.notes]]
        if self.run_dir is not None and (self.run_dir / "metrics.csv").is_file():
            lines += ["", _curve(self.run_dir, self.budget)]
        tmp = self.out_dir / TMP
        tmp.write_text("\n".join(lines) + "\n")
        os.replace(tmp, self.out_dir / "visit.md")


def _copy(src: Path, dst: Path) -> None:
    """src over dst when it exists, atomically (a kill mid-copy leaves the previous copy, and at most
    one temporary file, TMP, which the 8 files back cannot be crowded out by more of)."""
    if src.is_file():
        tmp = dst.with_name(TMP)
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)


def _python() -> str:
    return sys.executable


def _on_sigterm(signum, frame) -> None:
    raise Stopped(signum)


def start(v: Visit, only: str) -> int:
    (v.visit / "started").write_text(f"{time.time()}\n")
    (v.visit / "only").write_text(only)
    _launch_gpu_check(v, carry_on=False)
    v.at("call 1 done: gpu_check runs on; its rows so far come back with every call")
    return 0


def _launch_gpu_check(v: Visit, carry_on: bool) -> None:
    """gpu_check in its own process session, so that it outlives the call; with `carry_on`, its
    --continue: the rows already in its report kept, the checks it lacks run."""
    only = (v.visit / "only").read_text() if (v.visit / "only").is_file() else ""
    command = [_python(), "-m", "bench.gpu_check", "--work_dir", str(v.visit / "work"), "--out", str(v.visit / "out")]
    command += ["--device", "cpu"] if v.dry_run else []
    command += ["--only", only] if only else []
    command += ["--continue"] if carry_on else []
    with open(v.visit / "out" / "gpu_check.log", "a" if carry_on else "w") as log:
        proc = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    (v.visit / "gpu_check.pid").write_text(f"{proc.pid}\n")
    v.note(f"gpu_check started (pid {proc.pid}{', on the CPU' if v.dry_run else ''}): {' '.join(command[1:])}")


def _gpu_check_alive(v: Visit) -> None:
    """A gpu_check that ended unfinished between calls (a machine that ends every process of a call
    when the call ends) is started again with --continue: the rows it finished stay."""
    if (v.visit / "started").is_file() and _running(v.visit) is None and not _checks_done(v.visit):
        v.note("gpu_check is not running and not finished (the end of the last call stopped it?): again, --continue")
        _launch_gpu_check(v, carry_on=True)


def _running(visit: Path) -> int | None:
    pid_file = visit / "gpu_check.pid"
    if not pid_file.is_file():
        return None
    pid = int(pid_file.read_text())
    try:
        os.kill(pid, 0)
    except OSError:
        return None
    try:  # a zombie (exited, never reaped: a container without init) or the pid reused by another
        with open(f"/proc/{pid}/stat") as fh:
            if fh.read().rsplit(") ", 1)[1].startswith("Z"):
                return None
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return pid if b"bench.gpu_check" in fh.read() else None
    except OSError:
        return pid


def status(v: Visit) -> int:
    _gpu_check_alive(v)
    parts = sorted(p.name for p in v.visit.glob(f"{ARCHIVE}.part*"))
    pid = _running(v.visit)
    v.note(f"parts here: {', '.join(parts) or 'none'}; gpu_check {'running' if pid else 'not running'}")
    v.at("a middle call done")
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


def finish(v: Visit, minutes: float | None, expect: str = "") -> int:
    """The last call: the data installed and decoded while gpu_check finishes, then the speed-run
    with what the call has left; the record kept current in --out throughout."""
    v.at("checking the parts")
    parts = check_parts(v.visit)
    data = v.visit / "data" / "tiny-imagenet-200"
    install = _install(v, parts, data, expect)
    if v.left() > RUN_MIN_S:
        _gpu_check_alive(v)
    _wait_for_gpu_check(v, install)
    v.at("installing the data")
    code = _wait(v, install, until=v.deadline)
    if code != 0:
        raise SystemExit(f"error: the dataset could not be installed from the parts (see {v.visit / 'install.log'})")
    v.note(f"data installed and decoded ({time.time() - v.t0:.0f} s into the call)")
    v.budget = minutes or speedrun_minutes(v.left() - IMPORT_S)
    if not v.budget:
        v.note(f"no speed-run: {max(v.left(), 0):.0f} s left before the call's deadline, under a minute")
        return 0
    _speedrun(v, data)
    return 0


def _install(v: Visit, parts: list[Path], data: Path, expect: str) -> subprocess.Popen:
    """data/download.py from the parts, then every split decoded into the cache main.py reads (64 px,
    every core), in the background: CPU work that overlaps gpu_check's GPU work."""
    download = [_python(), "data/download.py", "--dest", str(data), "--archive", *map(str, parts)]
    download += ["--expect", expect] if expect else []
    # niced, and 4 cores left to gpu_check, whose rows 2b-3 time host work meanwhile
    workers = "max(1, os.cpu_count() - 4)"
    decode = f"import batch_manager, os; batch_manager.prepare_data('tiny-imagenet', {str(data)!r}, 64, {workers})"
    script = f"{_quote(download)} && nice -n 10 {_quote([_python(), '-c', decode])}"
    log = open(v.visit / "install.log", "w")
    v.note("parts checked against SHA256SUMS; installing and decoding the data in the background")
    proc = subprocess.Popen(["/bin/sh", "-c", script], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    v.children.append(proc)
    return proc


def _quote(command: list[str]) -> str:
    import shlex

    return " ".join(shlex.quote(c) for c in command)


def _wait_for_gpu_check(v: Visit, install: subprocess.Popen) -> None:
    """gpu_check is waited for while a speed-run of RUN_MIN_S still fits; beyond that it is stopped
    (SIGTERM: its rows so far stay in its table), saying so."""
    v.at("waiting for gpu_check")
    started = float((v.visit / "started").read_text()) if (v.visit / "started").is_file() else None
    waited = time.time()
    while (pid := _running(v.visit)) is not None and v.left() > RUN_MIN_S and not _checks_done(v.visit):
        time.sleep(POLL_S)
        v.report()
    stopped = pid is not None and not _checks_done(v.visit)
    if stopped:  # SIGTERM, once: its rows so far stay in its table
        _killpg(pid, signal.SIGTERM)
    for _ in range(20):  # its last lines (done), or its report of where it stopped
        if _running(v.visit) is None:
            break
        time.sleep(0.5)
    if (pid := _running(v.visit)) is not None:  # busy in C++ (a compile, NCCL): it must not share the GPU
        _killpg(pid, signal.SIGKILL)
        v.note("gpu_check did not end within 10 s of SIGTERM: killed (its table holds the rows before)")
    if not _checks_done(v.visit):
        v.cut.append("gpu_check")
        what = "stopped unfinished" if stopped else "ended unfinished (see gpu_check.log)"
        v.note(f"gpu_check {what} ({v.left():.0f} s left in the call): its finished rows are in gpu_check.md")
    since = f"started {v.t0 - started:.0f} s before this call; " if started is not None else ""
    v.note(f"gpu_check: {since}waited {time.time() - waited:.0f} s for it here")


def _killpg(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:  # it ended on its own meanwhile
        pass


def _checks_done(visit: Path) -> bool:
    """gpu_check wrote its last row (its report's status says so)."""
    try:
        return json.loads((visit / "out" / "gpu_check.json").read_text())["status"].startswith("finished")
    except (OSError, ValueError, KeyError):
        return False


def _wait(v: Visit, proc: subprocess.Popen, until: float) -> int | None:
    """proc's exit status, copying the files into --out every POLL_S seconds; at `until` it is
    sent SIGTERM (a training run then saves) and given 30 s; None if it had to be killed."""
    while proc.poll() is None and time.time() < until:
        time.sleep(POLL_S)
        v.report()
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            v.cut.append(v.stage)
            v.note(
                f"{v.stage}: did not end within 30 s of SIGTERM at the call's deadline: killed (its save may be missing)"
            )
            return None
        v.cut.append(v.stage)
        v.note(f"{v.stage}: stopped by the call's deadline (exit status {proc.returncode})")
    return proc.returncode


def _speedrun(v: Visit, data: Path) -> None:
    run = [_python(), "main.py", "--config", "configs/gpu_speedrun.yaml", "--time_budget", f"{v.budget:g}"]
    run += ["--data_dir", str(data), "--output_dir", str(v.visit / "runs"), "--wandb", "disabled"]
    if v.dry_run:  # the same path on the CPU, small
        run += "--device cpu --arch resnet9_slim --img_size 32 --min_img_size 16 --batch_size 16 --workers 1".split()
        run += ["--epochs", "1000"]  # the budget ends it, as on a GPU, not the preset's cap of 80 tiny epochs
    v.at(f"the speed-run of {v.budget:g} min (the visit's budget, not the 9.5-minute preset)")
    before = set((v.visit / "runs").iterdir()) if (v.visit / "runs").is_dir() else set()
    with open(v.out_dir / v.speedrun_name("log"), "w") as log:  # streamed straight into --out
        proc = subprocess.Popen(run, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        v.children.append(proc)
        while proc.poll() is None and v.run_dir is None and time.time() < v.deadline:
            v.run_dir = _new_run(v.visit / "runs", before)
            time.sleep(0.5)
        code = _wait(v, proc, until=v.deadline)
    v.run_dir = v.run_dir or _new_run(v.visit / "runs", before)
    v.note(f"speed-run ({v.budget:g} min) exit status {code}")


def _new_run(runs: Path, before: set[Path]) -> Path | None:
    """The run folder main.py made (not its hidden write probe, not an earlier run's)."""
    if not runs.is_dir():
        return None
    return next(
        (p for p in sorted(runs.iterdir()) if p.is_dir() and not p.name.startswith(".") and p not in before), None
    )


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


def _curve(run: Path, budget: float | None) -> str:
    """The speed-run's epochs as a table, every line naming its budget (it is not the preset's)."""
    tag = f"{budget:g}-min visit run"
    text = [
        f"## the speed-run: --time_budget {budget:g} (the visit's; the 9.5-minute preset is not measured by it)",
        "",
    ]
    if (run / "best_results.json").is_file():
        best = json.loads((run / "best_results.json").read_text())
        tta = f", with flip TTA {best['val_top1_tta']} %" if best.get("val_top1_tta") is not None else ""
        text += [
            f"{tag}: best val top-1 {best.get('val_top1')} % (top-5 {best.get('val_top5')} %){tta}, "
            f"{best.get('wall_time_seconds')} s, {best.get('update_fraction', '?')} of it in updates",
            "",
        ]
    text += [
        "| run | epoch | train px | s | lr | train loss | val top-1 | epoch s | img/s | wall s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    with open(run / "metrics.csv") as fh:
        for r in csv.DictReader(fh):
            cells = [r.get(k, "") for k in ("epoch", "train_size", "aug_strength", "lr", "train_loss", "val_top1")]
            cells += [r.get(k, "") for k in ("epoch_seconds", "images_per_second", "wall_seconds")]
            text.append(f"| {tag} | " + " | ".join(cells) + " |")
    return "\n".join(text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="step", required=True)
    s = sub.add_parser("split", help="here: re-cut the dataset's parts to fit a call")
    s.add_argument("--from", dest="source", default=str(ROOT.parent / "shared" / "data"))
    s.add_argument("--size", type=float, default=PART_MIB, help="MiB per part")
    pl = sub.add_parser("plan", help="here: the calls and their time")
    st = sub.add_parser("start", help="call 1: gpu_check in the background")
    st.add_argument("--only", default="", help="gpu_check --only: some checks only")
    su = sub.add_parser("status", help="a middle call: what has arrived, gpu_check's rows so far")
    f = sub.add_parser("finish", help="the last call: data, speed-run, files back")
    f.add_argument("--minutes", type=float, default=None, help="the speed-run's budget (default: what the call leaves)")
    f.add_argument("--expect", default="", help="data/download.py --expect, for a subset (tests)")
    for q in (s, pl, st, su, f):
        q.add_argument("--visit", default=str(VISIT), help="the folder the parts travel in")
    for q in (pl, st, su, f):
        q.add_argument("--call_s", type=float, default=CALL_S, help="this call's time limit in seconds")
    for q in (st, su, f):
        q.add_argument("--out", required=True, help="where the files to read back go ($OUT on the device)")
        q.add_argument("--margin_s", type=float, default=MARGIN_S, help="kept free before the call's limit")
        q.add_argument("--dry-run", action="store_true", help="the same sequence on this CPU, small")
    args = p.parse_args(argv)
    visit = Path(args.visit)
    if args.step == "split":
        parts = split(Path(args.source), visit, args.size)
        print("\n".join(f"{q} ({q.stat().st_size / MIB:.1f} MiB)" for q in parts))
        print(plan(visit))
        return 0
    if args.step == "plan":
        print(plan(visit, args.call_s))
        return 0
    visit.mkdir(parents=True, exist_ok=True)
    v = Visit(visit, Path(args.out), args.call_s, args.margin_s, args.dry_run, args.step)
    return run_step(v, args)


def run_step(v: Visit, args) -> int:
    """The step, its record in --out whatever ends it: done, an error, SIGTERM."""
    signal.signal(signal.SIGTERM, _on_sigterm)
    final = ""
    try:
        if args.step == "start":
            return start(v, args.only)
        if args.step == "status":
            return status(v)
        return finish(v, args.minutes, args.expect)
    except Stopped:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second one must not cut the record short
        final = f"stopped by SIGTERM during: {v.stage}"
        v.report(final)  # at once: a SIGKILL may follow soon
        _stop_children(v)  # the speed-run saves; then its files are copied below
        return 128 + signal.SIGTERM
    except SystemExit as exc:
        final = f"stopped during: {v.stage}: {exc}"
        _stop_children(v)
        raise
    except Exception as exc:
        final = f"stopped during: {v.stage}: {type(exc).__name__}: {exc}"
        _stop_children(v)
        raise
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if not final:
            final = f"done; the call's deadline cut short: {', '.join(v.cut)}" if v.cut else "done"
        v.report(final)
        print((v.out_dir / "visit.md").read_text())


def _stop_children(v: Visit) -> None:
    """SIGTERM to what the call started (the speed-run saves its position), 10 s to end."""
    for proc in v.children:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    end = time.time() + 10
    for proc in v.children:
        try:
            proc.wait(max(0.1, end - time.time()))
        except subprocess.TimeoutExpired:
            proc.kill()


if __name__ == "__main__":
    sys.exit(main())
