"""The metric sinks every epoch's row goes to: metrics.csv (always) and wandb (when installed and
chosen; offline without an account)."""

from __future__ import annotations

import csv
import logging
import os
from pathlib import Path
from typing import Any, Protocol

from utils import UserError

log = logging.getLogger("tin")


class Sink(Protocol):
    """Where an epoch's metrics row goes: ``log(row)`` per epoch, ``close()`` at the end."""

    def log(self, row: dict[str, float]) -> None: ...

    def close(self) -> None: ...


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
