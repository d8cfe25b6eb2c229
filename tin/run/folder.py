"""A run's folder: made once data and model are known good, its log.txt beside the console, and
best_results.json (the best epoch's figures, the run's length and time, where and on what it ran)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
from datetime import datetime
from pathlib import Path

from tin.data.readers import DataSplits
from tin.run.run import Run
from utils import UserError

log = logging.getLogger("tin")


def update_seconds(history: list[dict]) -> float:
    """Seconds the run spent in training updates (metrics.csv's update_seconds, over every epoch)."""
    return sum(row.get("update_seconds", 0.0) for row in history)


def dataset_identity(kind: str, data: DataSplits) -> dict:
    """What a run trained and was evaluated on, whatever its path: the format, the class list's and
    split sizes' digest, the counts (report.py compares runs by it: the same path may hold another
    dataset, another path the same one)."""
    sizes = {
        name: len(getattr(data, name)) if getattr(data, name) is not None else 0 for name in ("train", "val", "test")
    }
    digest = hashlib.sha256(json.dumps([kind, list(data.classes), sizes]).encode()).hexdigest()[:12]
    return {"kind": kind, "classes": len(data.classes), **sizes, "digest": digest}


def write_results(run: Run, wall_s: float, final: dict | None = None) -> None:
    """best_results.json: the best epoch's figures (and `final`: --tta final's flipped figures of
    best.pth.tar), the run's length, its time `wall_s` and the share of it spent in updates, where it ran."""
    plan, state = run.clock.plan, run.state
    updates_s = update_seconds(state.history)
    results = {
        "name": run.cfg.name or run.cfg.arch,
        "tags": run.cfg.tag_list(),
        "arch": run.cfg.arch,
        "params": run.params,
        "gflops": round(run.gflops, 4),
        **state.best,
        **(final or {}),
        "epochs_run": state.epoch,
        "updates": state.step,
        "wall_time_seconds": round(wall_s, 2),
        "update_seconds": round(updates_s, 2),
        "update_fraction": round(updates_s / wall_s, 4) if wall_s > 0 else 0.0,
        **(
            {
                "time_budget_seconds": plan.budget_s,
                "planned_updates": plan.updates,
                "planned_epochs": round(plan.epochs, 3),
                "first_planned_updates": plan.schedule_updates,
                "slowness": plan.slowness,
            }
            if plan.budget_s
            else {}
        ),
        "runtime": run.parts.runtime.to_dict(),
        "dataset": dataset_identity(run.cfg.dataset, run.parts.loaders.data),
    }
    if run.parts.teacher is not None:
        results["teachers"] = [
            {k: t[k] for k in ("source", "arch", "params", "val_top1")} for t in run.parts.teacher.info
        ]
    tmp = run.run_dir / "best_results.json.tmp"
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    tmp.replace(run.run_dir / "best_results.json")


# --------------------------------------------------------------------------- run folder and logging
def make_run_dir(output_dir: str | Path, name: str) -> Path:
    """checkpoints/<YYYY-MM-DD_HH-MM-SS>_<name>/ (the run's --name, else its arch); a second run in the
    same second gets a suffix."""
    root = Path(output_dir)
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".write-test-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        raise UserError(
            f"cannot write run folders in {root} ({exc.strerror or exc}); pass a writable --output_dir"
        ) from None
    stamp = datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    safe_name = "".join(c if c.isalnum() or c in "-_." else "-" for c in name)
    for n in range(1000):
        run = root / (f"{stamp}_{safe_name}" + (f"_{n}" if n else ""))
        try:
            run.mkdir()  # atomic: two processes never get the same folder
            return run
        except FileExistsError:
            continue
    raise UserError(f"could not create a new run folder in {root}")


class _LinesBeforeTheRunFolder(logging.Handler):
    """Keeps the lines logged before the run folder exists (device, data, model, plan), so that
    log.txt starts with them too."""

    def __init__(self, capacity: int = 2000) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []
        self.capacity = capacity

    def emit(self, record: logging.LogRecord) -> None:
        if len(self.records) < self.capacity:
            self.records.append(record)


def setup_logging(run_dir: Path | None = None, level: int = logging.INFO) -> list[logging.Handler]:
    """Console (stdout) and, once given, run_dir/log.txt get the same lines; the lines logged
    before run_dir was given are written into log.txt first."""
    log.setLevel(level)
    log.propagate = False
    early = next((h for h in log.handlers if isinstance(h, _LinesBeforeTheRunFolder)), None)
    for h in list(log.handlers):
        log.removeHandler(h)
        h.close()
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    if run_dir is None:
        handlers.append(_LinesBeforeTheRunFolder())
    else:
        handlers.append(logging.FileHandler(run_dir / "log.txt"))
        for record in early.records if early is not None else []:
            handlers[-1].setFormatter(fmt)
            handlers[-1].handle(record)
    for h in handlers:
        h.setFormatter(fmt)
        log.addHandler(h)
    return handlers
