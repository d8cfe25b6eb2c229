"""What sweep.py's runs share: each run a main.py process of its own, where a run stands (new,
interrupted, finished) read from its folder, the sweep folder's manifest and lock, GPU slots, and
the lines a sweep prints as runs start and end.

A sweep folder resumes: the same command again skips finished runs (their figures are read back),
continues interrupted ones with `main.py --resume RUN` and starts the rest. A run is finished when
its last.pth.tar says so (`finished`) and best_results.json exists.

Runs are processes (not main() in this process): a trial's memory, threads, logging and signal
handlers stay its own, a GPU is given by CUDA_VISIBLE_DEVICES, and stopping one early is the
Ctrl-C every run already handles (SIGINT: save, exit 130), so a stopped run can be resumed.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tin.runtime import hardware
from utils import UserError

MAIN = Path(__file__).resolve().parents[2] / "main.py"  # tin/sweep/ -> the repository root
INTERRUPTED = (130, 143, -signal.SIGINT, -signal.SIGTERM, -signal.SIGKILL)  # stopped, resumable; not broken
POLL_S = 1.0  # how often a running run's metrics.csv is read


@dataclass
class Job:
    """One run of a sweep: its merged configuration (a YAML preset of its own) and its place."""

    name: str  # the run's --name: its folders are OUT/<timestamp>_<name>
    group: str  # its configuration: the seeds of one configuration share it (mean ± std over them)
    values: dict[str, Any]  # preset, --set, grid values, seed, name, output_dir: what the YAML holds
    config: Path  # that YAML, run with main.py --config
    seed: int
    params: dict[str, Any] = field(default_factory=dict)  # what this configuration varies

    @property
    def out(self) -> Path:
        return Path(self.values["output_dir"])

    def write(self) -> None:
        """Write the job's YAML; a different one already there, with runs made from it, is refused:
        resuming them would continue other settings than the command now asks for."""
        text = yaml.safe_dump(self.values, sort_keys=False)
        if self.config.is_file() and run_folders(self.out) and yaml.safe_load(self.config.read_text()) != self.values:
            raise UserError(
                f"{self.config} holds other settings than this command gives run {self.name}, and runs were made "
                "from it: to resume this sweep give the same command; for other settings pass another --sweep_dir"
            )
        self.config.parent.mkdir(parents=True, exist_ok=True)
        self.config.write_text(text)


# --------------------------------------------------------------------------- where a run stands
def run_folders(out: Path) -> list[Path]:
    """The run folders under `out`, oldest first (their names start with the time they began)."""
    return sorted(p.parent for p in out.glob("*/config.yaml")) if out.is_dir() else []


def is_finished(run: Path) -> bool:
    """best_results.json written and last.pth.tar marked finished (the plan, early stopping or the
    time budget ended the run, not a signal)."""
    last = run / "last.pth.tar"
    if not (run / "best_results.json").is_file() or not last.is_file():
        return False
    import torch

    try:  # mmap: the flag without reading the weights
        return bool(torch.load(last, map_location="cpu", weights_only=True, mmap=True).get("finished"))
    except Exception:  # noqa: BLE001 - an unreadable checkpoint is not a finished run
        return False


def stage(out: Path) -> tuple[str, Path | None]:
    """("done", run), ("resume", run) or ("new", None) for the newest run folder under `out`; a run
    that died before its first checkpoint starts again in a new folder."""
    runs = run_folders(out)
    if not runs:
        return "new", None
    if is_finished(runs[-1]):
        return "done", runs[-1]
    return ("resume", runs[-1]) if (runs[-1] / "last.pth.tar").is_file() else ("new", None)


def results(run: Path | None) -> dict[str, Any]:
    """A run's best_results.json ({} when there is none yet)."""
    path = run / "best_results.json" if run is not None else None
    return json.loads(path.read_text()) if path is not None and path.is_file() else {}


def last_error(log: Path) -> str:
    """What a failed run said last: its `error: ...` line (main.py's one-line errors), else its last line."""
    try:
        lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    said = [ln for ln in lines if ln.startswith("error:")]
    return (said or lines or [""])[-1][:300]


def metric_rows(run: Path | None) -> list[dict[str, str]]:
    """metrics.csv's rows so far (a row being written is skipped until it is complete)."""
    import csv

    path = run / "metrics.csv" if run is not None else None
    if path is None or not path.is_file():
        return []
    text = path.read_text()
    lines = text.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines = lines[:-1]
    return list(csv.DictReader(lines))


# --------------------------------------------------------------------------- the sweep folder
class Manifest:
    """SWEEP/manifest.json: every run of the sweep (its configuration, seed, what varies, its run
    folder, status and figures), rewritten atomically as runs start and end."""

    def __init__(self, path: Path, kind: str) -> None:
        self.path, self.lock = path, threading.Lock()
        self.data = json.loads(path.read_text()) if path.is_file() else {"kind": kind, "runs": {}}

    def update(self, name: str, **fields: Any) -> None:
        with self.lock:
            self.data["runs"].setdefault(name, {}).update({k: _plain(v) for k, v in fields.items()})
            tmp = self.path.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(self.data, indent=2) + "\n")
            tmp.replace(self.path)


def _plain(value: Any) -> Any:
    return str(value) if isinstance(value, Path) else value


@contextmanager
def holding(sweep_dir: Path):
    """One sweep.py at a time in a folder: two would run (and resume) the same runs twice."""
    lock = sweep_dir / ".sweep.lock"
    try:
        pid = int(lock.read_text().strip() or 0)
    except (OSError, ValueError):
        pid = 0
    if pid and pid != os.getpid() and _alive(pid):
        raise UserError(
            f"another sweep.py (pid {pid}) is working in {sweep_dir}; wait for it, or pass another --sweep_dir"
        )
    lock.write_text(str(os.getpid()))
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# --------------------------------------------------------------------------- running
def gpu_slots(parallel: int, gpus: str | None = None) -> list[str]:
    """One GPU id per parallel run slot, round-robin over the GPUs (--gpus, else CUDA_VISIBLE_DEVICES,
    else every visible one); empty without GPUs."""
    if gpus is None:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible is not None:
            gpus = visible
        else:
            import torch

            gpus = ",".join(str(i) for i in range(torch.cuda.device_count()))
    ids = [g.strip() for g in gpus.split(",") if g.strip() and g.strip() != "-1"]
    return [ids[k % len(ids)] for k in range(max(1, parallel))] if ids else []


@dataclass
class Outcome:
    code: int  # main.py's exit status
    run: Path | None  # its run folder
    stopped: bool  # stopped by the watcher (pruned), not by the user or a failure
    seconds: float

    @property
    def status(self) -> str:
        if self.code == 0:
            return "ok"
        if self.stopped:
            return "pruned"
        return "interrupted" if self.code in INTERRUPTED else f"failed (exit {self.code})"


class Runner:
    """Runs jobs as main.py processes, `parallel` at a time: GPUs taken round-robin (one per run,
    CUDA_VISIBLE_DEVICES), the CPU's cores shared out (OMP_NUM_THREADS). Each run gets a process
    session of its own, so a Ctrl-C reaches the sweep alone, which then stops every run exactly
    once (SIGINT: each saves and exits 130)."""

    def __init__(self, sweep_dir: Path, parallel: int, gpus: str | None = None) -> None:
        self.sweep_dir, self.parallel = sweep_dir, max(1, parallel)
        self.threads = max(1, hardware.usable_cpus() // self.parallel)  # more threads than cores slows every run
        slots = gpu_slots(self.parallel, gpus)
        self.gpus: queue.Queue | None = None
        if slots:
            self.gpus = queue.Queue()
            for gpu in slots:
                self.gpus.put(gpu)
            print(f"runs take GPUs {', '.join(slots)} in turn (CUDA_VISIBLE_DEVICES per run)", flush=True)
        self.live: set[subprocess.Popen] = set()
        self.lock = threading.Lock()
        self.stopping = threading.Event()

    def run(
        self,
        job: Job,
        log: Path,
        resume: Path | None = None,
        watch: Callable[[Path | None], bool] | None = None,
        on_start: Callable[[str | None], None] | None = None,
    ) -> Outcome:
        """Run `job` (or resume its run `resume`) to its end. `watch(run folder)` is asked every
        POLL_S seconds and once after the end; True stops the run (SIGINT: it saves and exits)."""
        gpu = self.gpus.get() if self.gpus is not None else None
        start, before = time.monotonic(), set(run_folders(job.out))
        command = [sys.executable, str(MAIN)] + (["--resume", str(resume)] if resume else ["--config", str(job.config)])
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(self.threads))}
        if gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = gpu
        stopped, proc = False, None
        try:
            if on_start is not None:
                on_start(gpu)
            with open(log, "a") as fh:
                proc = subprocess.Popen(command, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
            with self.lock:
                self.live.add(proc)
            if self.stopping.is_set():  # Ctrl-C came while it started
                proc.send_signal(signal.SIGINT)
            run = resume
            while proc.poll() is None:
                run = run or next((r for r in run_folders(job.out) if r not in before), None)
                if watch is not None and not stopped and watch(run):
                    proc.send_signal(signal.SIGINT)
                    stopped = True
                time.sleep(POLL_S)
            run = run or next((r for r in run_folders(job.out) if r not in before), None)
            if watch is not None and not stopped and proc.returncode == 0:
                watch(run)  # the rows written after the last look
        finally:
            if gpu is not None:
                self.gpus.put(gpu)
            with self.lock:
                self.live.discard(proc)
        return Outcome(proc.returncode, run, stopped and proc.returncode != 0, time.monotonic() - start)

    def stop(self) -> None:
        """Ctrl-C: every running run saves and exits (one SIGINT each); no new run starts."""
        self.stopping.set()
        with self.lock:
            for proc in self.live:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGINT)

    def each(self, work: Callable[[Any], Any], items: list) -> list:
        """work(item) for each item, `parallel` at a time, in order of the results' items. Ctrl-C (or
        SIGTERM): the runs are stopped cleanly, then KeyboardInterrupt is raised."""
        old = signal.signal(signal.SIGTERM, _raise_interrupt)
        # Ctrl-C as KeyboardInterrupt even where the sweep was started with SIGINT ignored (a background
        # job of a script), as main.py's own handler does: else its runs would go on unstoppable
        old_int = signal.signal(signal.SIGINT, signal.default_int_handler)
        pool = ThreadPoolExecutor(max_workers=self.parallel)
        futures = [pool.submit(work, item) for item in items]
        try:
            pending = set(futures)
            while pending:
                _, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
        except KeyboardInterrupt:
            print("\nstopping: every running run saves its state (run the same command again to resume)", flush=True)
            self.stop()
            for f in futures:
                f.cancel()
            pool.shutdown(wait=True)
            raise
        finally:
            signal.signal(signal.SIGTERM, old)
            signal.signal(signal.SIGINT, old_int)
        pool.shutdown(wait=True)
        return [f.result() for f in futures]


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


# --------------------------------------------------------------------------- what a sweep says
class Progress:
    """A line per run as it starts and as it ends, then the sweep's overall progress."""

    def __init__(self, total: int, parallel: int, label: str = "val top-1") -> None:
        self.total, self.parallel, self.label = total, max(1, parallel), label
        self.done, self.running, self.failed = 0, 0, 0
        self.durations: list[float] = []
        self.t0 = time.monotonic()
        self.lock = threading.Lock()

    def started(self, name: str, how: str, gpu: str | None) -> None:
        with self.lock:
            self.running += 1
        print(f"{time.strftime('%H:%M:%S')} {name}: {how}{f' on GPU {gpu}' if gpu is not None else ''}", flush=True)

    def skipped(self, name: str, top1: Any) -> None:
        with self.lock:
            self.done += 1
        print(f"{time.strftime('%H:%M:%S')} {name}: finished before{_top1(top1, self.label)}, skipped", flush=True)

    def ended(self, name: str, status: str, top1: Any, seconds: float, why: str = "") -> None:
        with self.lock:
            self.running -= 1
            self.done += 1
            self.failed += status.startswith("failed")
            if status in ("ok", "pruned"):
                self.durations.append(seconds)
            line = self._overall()
        why = f": {why}" if why else ""
        print(
            f"{time.strftime('%H:%M:%S')} {name}: {status}{_top1(top1, self.label)}, {seconds:.0f} s{why}", flush=True
        )
        print(line, flush=True)

    def _overall(self) -> str:
        elapsed = (time.monotonic() - self.t0) / 60
        left = self.total - self.done
        eta = ""
        if self.durations and left:
            eta = f", about {sum(self.durations) / len(self.durations) * left / self.parallel / 60:.0f} min left"
        failed = f", {self.failed} failed" if self.failed else ""
        return f"  [{self.done}/{self.total} done, {self.running} running{failed}; {elapsed:.1f} min so far{eta}]"


def _top1(value: Any, label: str) -> str:
    return f", {label} {value:.2f} %" if isinstance(value, (int, float)) else ""


def seed_list(first: int, n: int) -> list[int]:
    """--seeds N: the configuration's own seed and the N - 1 after it."""
    return [first + k for k in range(n)]


# --------------------------------------------------------------------------- a list of runs, resumable
COLUMNS = [
    "name",
    "group",
    "seed",
    "status",
    "arch",
    "params",
    "epochs_run",
    "best_epoch",
    "val_top1",
    "val_top5",
    "wall_time_seconds",
    "run_dir",
]


def run_jobs(jobs: list[Job], sweep_dir: Path, parallel: int, gpus: str | None = None) -> list[dict]:
    """Every job to its end, `parallel` at a time; finished ones skipped, interrupted ones resumed.
    One summary row per job."""
    manifest = Manifest(sweep_dir / "manifest.json", "runs")
    runner, progress = Runner(sweep_dir, parallel, gpus), Progress(len(jobs), parallel)
    return runner.each(lambda job: run_job(job, runner, manifest, progress), jobs)


def run_job(job: Job, runner: Runner, manifest: Manifest, progress: Progress) -> dict:
    where, run = stage(job.out)
    manifest.update(job.name, group=job.group, seed=job.seed, params=job.params, config=job.config)
    if where == "done":
        row = summary_row(job, run, "ok")
        progress.skipped(job.name, row.get("val_top1"))
        manifest.update(job.name, run_dir=run, status="ok", val_top1=row.get("val_top1"))
        return row
    if runner.stopping.is_set():
        return summary_row(job, run, "not started")
    how = "started" if where == "new" else f"resumed ({run.name})"

    def started(gpu: str | None) -> None:
        manifest.update(job.name, status="running", run_dir=run)
        progress.started(job.name, how, gpu)

    log = job.config.with_suffix(".log")
    outcome = runner.run(job, log, resume=run if where == "resume" else None, on_start=started)
    status = outcome.status if not outcome.status.startswith("failed") else f"{outcome.status[:-1]}, see {log.name})"
    row = summary_row(job, outcome.run, status)
    why = last_error(log) if status.startswith("failed") else ""
    progress.ended(job.name, status, row.get("val_top1"), outcome.seconds, why)
    manifest.update(job.name, run_dir=outcome.run, status=status, val_top1=row.get("val_top1"))
    return row


def summary_row(job: Job, run: Path | None, status: str) -> dict:
    row = {"name": job.name, "group": job.group, "seed": job.seed, "status": status, **job.params}
    best = results(run)
    row.update({k: best[k] for k in COLUMNS if k in best})
    if run is not None:
        row["run_dir"] = str(run)
    return row


def mean_std(values: list[float]) -> str:
    """'41.20 ± 0.85' (the sample standard deviation over seeds); one value alone; '' for none."""
    import statistics

    values = [v for v in values if isinstance(v, (int, float))]
    if not values:
        return ""
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.fmean(values):.2f} ± {statistics.stdev(values):.2f}"


def group_rows(rows: list[dict]) -> list[dict]:
    """Per configuration (the seeds of one group): runs, mean ± std of val top-1 and top-5, mean
    time; best mean first."""
    import statistics

    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(row.get("group") or row["name"], []).append(row)
    out = []
    for group, members in groups.items():
        ok = [r for r in members if r["status"] == "ok" and isinstance(r.get("val_top1"), (int, float))]
        times = [r["wall_time_seconds"] for r in ok if isinstance(r.get("wall_time_seconds"), (int, float))]
        out.append(
            {
                "configuration": group,
                "runs": f"{len(ok)}/{len(members)}",
                "seeds": ",".join(str(seed) for seed in sorted(r.get("seed") for r in ok)),
                "val_top1": mean_std([r["val_top1"] for r in ok]),
                "val_top5": mean_std([r.get("val_top5") for r in ok]),
                "wall_time_seconds": round(statistics.fmean(times)) if times else "",
                "_mean": statistics.fmean(r["val_top1"] for r in ok) if ok else -1.0,
            }
        )
    return sorted(out, key=lambda g: -g["_mean"])


GROUP_COLUMNS = ["configuration", "runs", "seeds", "val_top1", "val_top5", "wall_time_seconds"]


def write_summary(rows: list[dict], sweep_dir: Path, title: str = "Sweep") -> None:
    """summary.csv (a row per run, best first), summary_groups.csv and summary.md (both tables)."""
    import csv

    rows = sorted(rows, key=lambda r: -(r.get("val_top1") if isinstance(r.get("val_top1"), (int, float)) else -1))
    varied = [k for r in rows for k in r if k not in COLUMNS and not k.startswith("_")]
    columns = COLUMNS[:3] + list(dict.fromkeys(varied)) + COLUMNS[3:]
    with open(sweep_dir / "summary.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    groups = group_rows(rows)
    with open(sweep_dir / "summary_groups.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=GROUP_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(groups)
    lines = [f"# {title}", "", "## Configurations (val top-1 and top-5: mean ± std over seeds)", ""]
    lines += markdown_table(groups, GROUP_COLUMNS) + ["", "## Runs", ""] + markdown_table(rows, columns)
    (sweep_dir / "summary.md").write_text("\n".join(lines) + "\n")


def markdown_table(rows: list[dict], columns: list[str]) -> list[str]:
    def cell(value: Any) -> str:
        return f"{value:.4g}" if isinstance(value, float) else ("" if value is None else str(value))

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return lines + ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
