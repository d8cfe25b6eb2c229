"""What a run writes and says: its folder, the log (console and log.txt), and the metric sinks
(metrics.csv, wandb)."""

from __future__ import annotations

import csv
import logging
import os
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

from utils import UserError

log = logging.getLogger("tin")

WANDB_MODES = ("auto", "online", "offline", "disabled")
DEFAULT_WANDB_PROJECT = "tiny-imagenet-200"


# --------------------------------------------------------------------------- run folder and logging
def make_run_dir(output_dir: str | Path, arch: str) -> Path:
    """checkpoints/<YYYY-MM-DD_HH-MM-SS>_<arch>/ ; a second run in the same second gets a suffix."""
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
    safe_arch = "".join(c if c.isalnum() or c in "-_." else "-" for c in arch)
    for n in range(1000):
        run = root / (f"{stamp}_{safe_arch}" + (f"_{n}" if n else ""))
        try:
            run.mkdir()  # atomic: two processes never get the same folder
            return run
        except FileExistsError:
            continue
    raise UserError(f"could not create a new run folder in {root}")


class _Early(logging.Handler):
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
    early = next((h for h in log.handlers if isinstance(h, _Early)), None)
    for h in list(log.handlers):
        log.removeHandler(h)
        h.close()
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    if run_dir is None:
        handlers.append(_Early())
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
        self, run_dir: Path, mode: str, project: str, config: dict[str, Any], run_id: str | None = None
    ) -> None:
        import wandb

        self._wandb = wandb
        self.run = wandb.init(
            project=project or os.environ.get("WANDB_PROJECT") or DEFAULT_WANDB_PROJECT,  # WANDB_ENTITY: read by wandb
            name=run_dir.name,
            dir=str(run_dir),
            mode=mode,
            config=config,
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
    if mode != "auto":
        return mode
    env = os.environ.get("WANDB_MODE")
    if env in ("online", "offline", "disabled"):
        return env
    if env == "dryrun":
        return "offline"
    try:
        logged_in = bool(os.environ.get("WANDB_API_KEY")) or wandb.login(prompt=False, verify=False)
    except Exception:  # noqa: BLE001 - an unreadable netrc or settings file: log offline
        logged_in = False
    if not logged_in:
        log.info("wandb: not logged in, logging offline into the run folder (sync later with `wandb sync`)")
    return "online" if logged_in else "offline"
