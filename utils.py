"""Small shared pieces: user errors, seeding, devices, meters, accuracy, atomic checkpoint I/O,
run folders, logging, and the metric sinks (console/log.txt, metrics.csv, wandb)."""

from __future__ import annotations

import csv
import json
import logging
import os
import pickletools
import random
import sys
import tempfile
import zipfile
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger("tin")

WANDB_MODES = ("auto", "online", "offline", "disabled")
DEFAULT_WANDB_PROJECT = "tiny-imagenet-200"


class UserError(ValueError):
    """Bad input from the user: printed as one line naming the value and the fix, no traceback."""


# --------------------------------------------------------------------------- runtime
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def topk_correct(logits: torch.Tensor, target: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> torch.Tensor:
    """How many rows of logits (B, C) have their true class among the k highest, for each k: a
    (len(ks),) long tensor on the logits' device (no host synchronisation)."""
    maxk = min(max(ks), logits.shape[1])
    hits = logits.topk(maxk, dim=1).indices.eq(target.view(-1, 1))  # (B, maxk)
    return torch.stack([hits[:, : min(k, maxk)].any(dim=1).sum() for k in ks])


# --------------------------------------------------------------------------- checkpoints
def atomic_save(obj: Any, path: Path) -> None:
    """torch.save to a temporary file, fsync, then rename: a kill mid-write never leaves a
    truncated file under the final name."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; a checkpoint is as readable as any file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint written by this project, with one-line errors for the usual mistakes."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"checkpoint {p} does not exist; pass a RUN_FOLDER/best.pth.tar file")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickled objects refused by the weights-only loader, truncated file, not a torch file
        if _holds_code(p, exc):
            raise UserError(
                f"checkpoint {p} holds objects other than tensors and plain data (pickled code); it was refused "
                "unloaded, for safety. Load only checkpoints written by this toolkit or from a source you trust"
            ) from None
        raise UserError(
            f"checkpoint {p} could not be read ({type(exc).__name__}); is it a complete .pth.tar?"
        ) from None
    missing = {"state_dict", "config", "classes"} - set(ckpt) if isinstance(ckpt, dict) else {"state_dict"}
    if missing:
        raise UserError(f"checkpoint {p} lacks {sorted(missing)}; it was not written by this toolkit's main.py")
    return ckpt


_CODE_OPS = {"GLOBAL", "STACK_GLOBAL", "REDUCE", "INST", "OBJ", "NEWOBJ", "NEWOBJ_EX"}


def _holds_code(path: Path, exc: Exception) -> bool:
    """Did the weights-only loader refuse `path` because it names functions or classes to call?
    (a raw pickle is scanned opcode by opcode without running anything; a torch zip says so itself)"""
    if "Unsupported global" in str(exc):
        return True
    if zipfile.is_zipfile(path):
        return False
    try:
        with open(path, "rb") as fh:
            return any(op.name in _CODE_OPS for op, _, _ in pickletools.genops(fh))
    except Exception:  # noqa: BLE001 - not a pickle at all: garbage or truncated
        return False


def write_json(obj: Any, path: str | Path) -> Path:
    """Write `obj` as JSON at `path` (creating its folder), or, where that folder cannot be written
    (the image's bench/results belongs to root, the container runs as you), at the same name in the
    temporary folder, saying so. Returns where it went."""
    path = Path(path)
    text = json.dumps(obj, indent=2) + "\n"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return path
    except OSError as exc:
        fallback = Path(tempfile.gettempdir()) / path.name
        fallback.write_text(text)
        print(f"note: cannot write {path} ({exc.strerror or exc}); written to {fallback} instead", file=sys.stderr)
        return fallback


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
