"""What a run writes and says: its folder, the log (console and log.txt), and the metric sinks
(metrics.csv, wandb)."""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

from utils import UserError

log = logging.getLogger("tin")

DEFAULT_WANDB_PROJECT = "tiny-imagenet-200"


# metrics.csv lists these first, then every other key the rows carry (in order of appearance)
METRIC_ORDER = [
    "epoch",
    "lr",
    "aug_strength",
    "train_size",
    "train_loss",
    "train_top1",
    "train_top5",
    "val_loss",
    "val_top1",
    "val_top5",
    "ema_val_loss",
    "ema_val_top1",
    "ema_val_top5",
    "epoch_seconds",
    "update_seconds",
    "eval_seconds",
    "save_seconds",
    "train_seconds",
    "images_per_second",
    "data_wait_fraction",
    "wall_seconds",
]


# --------------------------------------------------------------------------- the run's console story
def announce(run) -> None:
    """The run's first line after set-up: its folder, model, data and device."""
    data, p = run.parts.loaders.data, run.parts
    log.info(
        "run folder %s | %s, %.2fM params, %d classes | train %d, val %d, test %d images | %s, %s",
        run.run_dir,
        run.cfg.arch,
        run.params / 1e6,
        len(data.classes),
        len(data.train),
        len(data.val or []),
        len(data.test or []),
        p.device,
        p.runtime.reason,
    )
    if p.loaders.test is None:
        log.info("this dataset has no unlabelled test split: no best_test_preds.csv will be written")
    if run.state.finished:
        log.info("this run has already finished (%d epochs); nothing left to train", run.state.epoch)


def log_epoch(run, row: dict, improved: bool) -> None:
    """One metrics row to every sink, one line to the log, and why training ends, if it does."""
    for sink in run.sinks:
        sink.log(row)
    plan = run.clock.plan
    log.info("epoch %d/%s  %s%s", row["epoch"], epochs_text(plan), summary(row), "  *best*" if improved else "")
    if run.clock.deadline_hit:
        log.warning(
            "--time_budget: training stopped at update %d of the %d planned, to finish on time (the last epoch "
            "ran slower than planned)",
            run.state.step,
            plan.updates,
        )
    elif run.state.finished and row["epoch"] < plan.n_epochs:
        log.info(
            "early stop: no better val top-1 for %d evaluations (--patience %d)", run.state.bad_epochs, run.cfg.patience
        )


def epochs_text(plan) -> str:
    return f"{plan.n_epochs}" if plan.updates % plan.updates_per_epoch == 0 else f"{plan.epochs:.2f}"


_SHOWN = {  # the log line's figures, in this order; any other key of the row follows as "key value"
    "lr": "lr {:.2e} at its start,",  # the epoch's first update's (metrics.csv's lr)
    "aug_strength": "augmentation {:.2f}",  # the strength s in [0, 1] (README: Augmentation recipe)
    "train_size": "{}px |",
    "train_loss": "train loss {:.3f}",
    "train_top1": "top-1 {:.2f}% |",
    "val_loss": "val loss {:.3f}",
    "val_top1": "top-1 {:.2f}%",
    "val_top5": "top-5 {:.2f}% |",
    "ema_val_top1": "EMA top-1 {:.2f}% |",
    "epoch_seconds": "{:.0f}s,",
    "images_per_second": "{:.0f} img/s,",
}
_QUIET = {
    "epoch",
    "train_top5",
    "ema_val_loss",
    "ema_val_top5",
    "train_seconds",
    "wall_seconds",
    "data_wait_fraction",
    "update_seconds",
    "eval_seconds",
    "save_seconds",
}


def summary(row: dict) -> str:
    """The epoch's log line: the usual figures, then every other figure the row carries."""
    parts = [fmt.format(row[k]) for k, fmt in _SHOWN.items() if k in row]
    parts.append(f"data wait {100 * row.get('data_wait_fraction', 0.0):.1f}%")
    extra = [k for k in row if k not in _SHOWN and k not in _QUIET]
    parts += [f"{k} {row[k]:.4g}" if isinstance(row[k], float) else f"{k} {row[k]}" for k in extra]
    return " ".join(parts)


def update_seconds(history: list[dict]) -> float:
    """Seconds the run spent in training updates (metrics.csv's update_seconds, over every epoch)."""
    return sum(row.get("update_seconds", 0.0) for row in history)


def dataset_identity(kind: str, data) -> dict:
    """What a run trained and was evaluated on, whatever its path: the format, the class list's and
    split sizes' digest, the counts (report.py compares runs by it: the same path may hold another
    dataset, another path the same one)."""
    sizes = {
        name: len(getattr(data, name)) if getattr(data, name) is not None else 0 for name in ("train", "val", "test")
    }
    digest = hashlib.sha256(json.dumps([kind, list(data.classes), sizes]).encode()).hexdigest()[:12]
    return {"kind": kind, "classes": len(data.classes), **sizes, "digest": digest}


def write_results(run, wall_s: float, final: dict | None = None) -> None:
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


def log_done(run, final: dict | None = None) -> None:
    """The run's last line: the best figures (and --tta final's flipped ones), the time and the share
    of it in updates, and the submission, checked."""
    b, plan, final = run.state.best, run.clock.plan, final or {}
    best = "trained on train + val (no val metrics)"
    if b.get("val_top1") is not None:
        best = f"best val top-1 {b['val_top1']:.2f}% (top-5 {b['val_top5']:.2f}%) at epoch {b['best_epoch']}"
    if "val_top1_tta" in final:
        best += f", with flip TTA {final['val_top1_tta']:.2f}% (top-5 {final['val_top5_tta']:.2f}%)"
    data, preds = run.parts.loaders.data, run.run_dir / "best_test_preds.csv"
    out = f"weights in {run.run_dir}"
    if data.test is not None and run.parts.ctx.is_main:  # the submission, checked before it is called one
        import val

        rows = val.check_predictions(preds, data.test.ids, data.classes)
        out = f"submit {preds} ({rows:,} rows, checked)"
    within = f" (--time_budget {plan.budget_s:.0f}s)" if plan.budget_s else ""
    wall = run.clock.elapsed()
    share = update_seconds(run.state.history) / wall if wall > 0 else 0.0
    log.info("done: %s in %.0fs%s, %.0f%% of it in updates | %s", best, wall, within, 100 * share, out)


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


# --------------------------------------------------------------------------- metric sinks
class CsvSink:
    """metrics.csv: one row per epoch; every key any row has is a column (those in `order` first, in
    that order, then the rest as they appear; a new key rewrites the file with the new header);
    flushed every row. Created from `rows` (a resumed run's history), so rows of an epoch that was
    being written when the run died are never duplicated, and an older run's rows fit the header."""

    def __init__(self, path: Path, order: list[str] | None = None, rows: list[dict] | None = None) -> None:
        self.path, self.order, self.rows = path, list(order or []), [dict(r) for r in rows or []]
        self.columns: list[str] = []
        self._seen: list[str] = []
        for row in self.rows:
            self._note_keys(row)
        self._rewrite()

    def _note_keys(self, row: dict) -> bool:
        """Record `row`'s keys; True when the header changes."""
        self._seen += [k for k in row if k not in self._seen]
        rank = {k: (self.order.index(k) if k in self.order else len(self.order) + i) for i, k in enumerate(self._seen)}
        columns = sorted(self._seen, key=rank.__getitem__)
        changed, self.columns = columns != self.columns, columns
        return changed

    def _rewrite(self) -> None:
        tmp = self.path.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(self.columns)
            writer.writerows([_fmt(row.get(c, "")) for c in self.columns] for row in self.rows)
        tmp.replace(self.path)

    def log(self, row: dict[str, float]) -> None:
        self.rows.append(dict(row))
        if self._note_keys(row):
            self._rewrite()
            return
        with open(self.path, "a", newline="") as fh:
            csv.writer(fh).writerow([_fmt(row.get(c, "")) for c in self.columns])

    def close(self) -> None:
        pass


def _fmt(value: Any) -> Any:
    return f"{value:.6g}" if isinstance(value, float) else value


class WandbSink:
    """wandb run whose files live inside the run folder; metrics plotted against `epoch`. `mode`:
    online or offline (resolve_wandb_mode)."""

    def __init__(
        self,
        run_dir: Path,
        mode: str,
        project: str,
        config: dict[str, Any],
        run_id: str | None = None,
        tags: list[str] | None = None,
    ) -> None:
        import wandb

        self._wandb = wandb
        self.run = wandb.init(
            project=project or os.environ.get("WANDB_PROJECT") or DEFAULT_WANDB_PROJECT,  # WANDB_ENTITY: read by wandb
            name=run_dir.name,
            dir=str(run_dir),
            mode=mode,
            config=config,
            tags=tags or None,
            id=run_id,  # a resumed run continues its wandb run
            resume="allow" if run_id else None,
            settings=wandb.Settings(silent=True, console="off"),
        )
        self.run.define_metric("epoch")
        self.run.define_metric("*", step_metric="epoch")

    def log(self, row: dict[str, float]) -> None:
        self.run.log(dict(row))

    def close(self) -> None:
        self.run.finish()


def _logged_in(wandb) -> bool:
    """An API key is known (WANDB_API_KEY, or `wandb login`'s netrc entry); nothing is asked or sent."""
    try:
        return bool(os.environ.get("WANDB_API_KEY")) or bool(wandb.login(prompt=False, verify=False))
    except Exception:  # noqa: BLE001 - an unreadable netrc or settings file: no key to use
        return False


def resolve_wandb_mode(mode: str) -> str:
    """--wandb auto|online|offline|disabled -> online, offline or disabled. auto: WANDB_MODE if set,
    online when an API key is known, else offline (with a notice); disabled, with one line, when
    wandb is not installed (wandb is optional: metrics.csv and log.txt hold every figure). An
    explicit online/offline without wandb is an error naming the install."""
    if mode == "disabled":
        return mode
    try:
        import wandb
    except ImportError:
        if mode == "auto":
            log.info("wandb: not installed, so not used (metrics.csv and log.txt have every figure; pip install wandb)")
            return "disabled"
        raise UserError(
            f"--wandb {mode} needs the wandb package, which is not installed: pip install wandb==0.31.0 (as in "
            "requirements.txt), or pass --wandb disabled"
        ) from None
    if mode == "online" and not _logged_in(wandb):  # refused before anything starts, not mid-build
        raise UserError(
            "--wandb online: wandb has no API key here (no WANDB_API_KEY, no `wandb login`): run `wandb login` "
            "first, or pass --wandb offline (sync later with `wandb sync`) or --wandb auto (offline when not logged in)"
        )
    if mode != "auto":
        return mode
    env = os.environ.get("WANDB_MODE")
    if env in ("online", "offline", "disabled"):
        return env
    if env == "dryrun":
        return "offline"
    logged_in = _logged_in(wandb)
    if not logged_in:
        log.info("wandb: not logged in, logging offline into the run folder (sync later with `wandb sync`)")
    return "online" if logged_in else "offline"
