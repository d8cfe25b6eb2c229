"""Small shared pieces: user errors, seeding, devices, meters, accuracy, atomic checkpoint I/O,
run folders, logging, and the metric sinks (console/log.txt, metrics.csv, wandb)."""

from __future__ import annotations

import csv
import logging
import os
import random
import sys
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger("tin")


class UserError(ValueError):
    """Bad input from the user: printed as one line naming the value and the fix, no traceback."""


# --------------------------------------------------------------------------- runtime
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.backends.cudnn.deterministic = True  # the seed project's reproducibility choice
        torch.backends.cudnn.benchmark = False


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu or auto")
    return torch.device(name)


def amp_dtype(device: torch.device, enabled: bool, name: str = "bf16") -> torch.dtype | None:
    """The autocast dtype (bf16, or fp16 with a grad scaler), or None for fp32."""
    if not enabled:
        return None
    if name == "fp16":
        if device.type != "cuda":
            log.warning("--amp_dtype fp16 needs a CUDA GPU; using bf16 on %s", device.type)
            return torch.bfloat16
        return torch.float16
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        log.warning("--amp: this GPU has no bf16; using fp16 with a gradient scaler")
        return torch.float16
    return torch.bfloat16


# --------------------------------------------------------------------------- metrics
class AverageMeter:
    """Weighted running mean (weights = batch sizes)."""

    def __init__(self) -> None:
        self.sum = 0.0
        self.count = 0

    def update(self, value: float, n: int = 1) -> None:
        self.sum += float(value) * n
        self.count += n

    @property
    def avg(self) -> float:
        return self.sum / max(self.count, 1)


def topk_correct(logits: torch.Tensor, target: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> list[int]:
    """Number of rows of logits (B, C) whose true class is among the k highest, for each k."""
    maxk = min(max(ks), logits.shape[1])
    top = logits.topk(maxk, dim=1).indices  # (B, maxk)
    hits = top.eq(target.view(-1, 1))
    return [int(hits[:, : min(k, maxk)].any(dim=1).sum()) for k in ks]


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
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint written by this project, with one-line errors for the usual mistakes."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"checkpoint {p} does not exist; pass a RUN_FOLDER/best.pth.tar file")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated file, pickle of foreign objects, not a torch file
        raise UserError(
            f"checkpoint {p} could not be read ({type(exc).__name__}); is it a complete .pth.tar?"
        ) from None
    missing = {"state_dict", "config", "classes"} - set(ckpt) if isinstance(ckpt, dict) else {"state_dict"}
    if missing:
        raise UserError(f"checkpoint {p} lacks {sorted(missing)}; it was not written by this toolkit's main.py")
    return ckpt


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


def setup_logging(run_dir: Path | None = None, level: int = logging.INFO) -> list[logging.Handler]:
    """Console (stdout) and, when given, run_dir/log.txt get the same lines."""
    log.setLevel(level)
    log.propagate = False
    for h in list(log.handlers):
        log.removeHandler(h)
        h.close()
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    if run_dir is not None:
        handlers.append(logging.FileHandler(run_dir / "log.txt"))
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    for h in handlers:
        h.setFormatter(fmt)
        log.addHandler(h)
    return handlers


# --------------------------------------------------------------------------- metric sinks
class CsvSink:
    """metrics.csv: one row per epoch, flushed every row. Created from `rows` (a resumed run's
    history), so rows of an epoch that was being written when the run died are never duplicated."""

    def __init__(self, path: Path, columns: list[str], rows: list[dict] | None = None) -> None:
        self.path, self.columns = path, columns
        tmp = path.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(columns)
            for row in rows or []:
                writer.writerow([_fmt(row.get(c, "")) for c in columns])
        tmp.replace(path)

    def log(self, row: dict[str, float]) -> None:
        with open(self.path, "a", newline="") as fh:
            csv.writer(fh).writerow([_fmt(row.get(c, "")) for c in self.columns])

    def close(self) -> None:
        pass


def _fmt(value: Any) -> Any:
    return f"{value:.6g}" if isinstance(value, float) else value


class WandbSink:
    """wandb run whose files live inside the run folder; metrics plotted against `epoch`."""

    def __init__(
        self, run_dir: Path, mode: str, project: str, config: dict[str, Any], run_id: str | None = None
    ) -> None:
        import wandb

        self._wandb = wandb
        mode = resolve_wandb_mode(mode)
        self.run = wandb.init(
            project=project,
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
    """auto: WANDB_MODE if set, online when an API key is known, else offline (with a notice)."""
    if mode != "auto":
        return mode
    env = os.environ.get("WANDB_MODE")
    if env in ("online", "offline", "disabled", "dryrun"):
        return env
    try:
        import wandb

        logged_in = bool(os.environ.get("WANDB_API_KEY") or wandb.api.api_key)
    except Exception:
        logged_in = False
    if not logged_in:
        log.info("wandb: not logged in, logging offline into the run folder (sync later with `wandb sync`)")
    return "online" if logged_in else "offline"
