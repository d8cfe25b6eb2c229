"""What a checkpoint holds, and resuming a run exactly from one.

A checkpoint is written at the end of every epoch, or with --save_every_min M at the first epoch
end M minutes after the last write and at the run's end (and at the last finished update when the
run is interrupted): weights, optimizer, scheduler, grad scaler, EMA, the epoch/update/batch
position, the epoch's running sums, the best result so far, every metrics row, the wandb run id
and every random state (python, numpy, torch). Shuffling and augmentation are functions of
(seed, epoch, index), so with these a resumed run repeats an uninterrupted one exactly on CPU.
Everything is plain data or tensors: ``torch.load(..., weights_only=True)`` reads it.
"""

from __future__ import annotations

import logging
import os
import pickletools
import random
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

import train
from tin import optim
from tin.engine.state import TrainState
from tin.runtime import distributed
from utils import UserError

log = logging.getLogger("tin")


# --------------------------------------------------------------------------- random states
def rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()  # this process's own device only: resumable on any GPU count
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, gauss_np = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss_np))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if isinstance(cuda, list):  # saved by an older version: one state per visible GPU; ours is the current one
            cuda = cuda[torch.cuda.current_device()] if torch.cuda.current_device() < len(cuda) else None
        if cuda is not None:
            torch.cuda.set_rng_state(cuda)


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


def make_checkpoint(
    parts: train.Parts, scheduler: optim.Stretchable, cfg_dict: dict, state: TrainState, plan: dict
) -> dict[str, Any]:
    """Everything to resume `parts` (train.Parts) exactly: weights, optimizer, `scheduler`, scaler,
    EMA, the position and history in `state`, `plan` (the plan's to_dict()), every random state."""
    last = state.history[-1] if state.history and state.batch == 0 else {}
    return {
        "state_dict": parts.model.state_dict(),
        "optimizer": parts.optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": parts.scaler.state_dict(),
        "ema": parts.ema.state_dict() if parts.ema is not None else None,
        "epoch": state.epoch,
        "step": state.step,
        "batch": state.batch,
        "meters": state.meters,
        "best": state.best,
        "bad_epochs": state.bad_epochs,
        "history": state.history,
        "wandb_id": state.wandb_id,
        "elapsed_s": state.elapsed_s,
        "finished": state.finished,
        "epoch_lr": state.epoch_lr,
        "plan": plan,
        "runtime": parts.runtime.to_dict(),
        "rng": rng_state(),
        "rng_all": distributed.gather(rng_state()),  # every process's, for an exact multi-process resume
        "top1": last.get("val_top1"),
        "top5": last.get("val_top5"),
        "config": cfg_dict,
        "classes": parts.loaders.data.classes,
        "names": parts.loaders.data.names,  # wnid -> human name: predict.py and export.py need no dataset
        "teachers": parts.teacher.summary() if parts.teacher is not None else [],  # a resume checks they are the same
    }


def restore(parts, scheduler, ckpt: dict[str, Any]) -> TrainState:
    """Load every piece of `ckpt` into `parts` and `scheduler`; the caller restores the RNG last
    (restore_rng)."""
    parts.model.load_state_dict(ckpt["state_dict"])
    parts.optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    restore_scaler(parts.scaler, ckpt["scaler"])
    if parts.ema is not None and ckpt.get("ema") is not None:
        parts.ema.load_state_dict(ckpt["ema"])
    history = list(ckpt["history"])
    meters = ckpt["meters"]
    return TrainState(
        epoch=ckpt["epoch"],
        step=ckpt["step"],
        batch=ckpt["batch"],
        meters=meters,
        best=ckpt["best"],
        bad_epochs=ckpt["bad_epochs"],
        history=history,
        wandb_id=ckpt["wandb_id"],
        # older checkpoints: the run's time was the last row's, the epoch's lr lived in its meters
        elapsed_s=ckpt.get("elapsed_s", history[-1]["wall_seconds"] if history else 0.0),
        finished=ckpt.get("finished", False),
        epoch_lr=ckpt.get("epoch_lr", (meters or {}).get("lr")),
    )


def restore_scaler(scaler: torch.amp.GradScaler, saved: dict) -> None:
    """The grad scaler's `saved` state into `scaler`, also when the precision changed on resume
    (--amp_dtype, another GPU: hardware.warn_if_changed promises the run goes on). A run without
    fp16 saved {} for its disabled scaler, which an enabled one refuses: it starts at its initial
    scale, as a new fp16 run does, and finds its level in the first updates. A disabled scaler
    (no fp16 now) has no use for a saved scale."""
    if not scaler.is_enabled():
        return
    if not saved:
        log.info(
            "grad scaler: the run was saved without fp16 and resumes with it; the scaler starts at its initial "
            "scale %g (it adjusts within the first updates)",
            scaler.get_scale(),
        )
        return
    scaler.load_state_dict(saved)


def restore_rng(ckpt: dict[str, Any], ctx: distributed.Context) -> None:
    """This process's random states from `ckpt` (its own when the process count is the same), last
    of all: nothing may draw after it."""
    rngs = ckpt.get("rng_all") or [ckpt["rng"]]
    set_rng_state(rngs[ctx.rank] if len(rngs) == ctx.world else ckpt["rng"])


def find_checkpoint(path: str | Path) -> Path:
    p = Path(path)
    if p.is_dir():
        p = p / "last.pth.tar"
    if not p.is_file():
        raise UserError(f"--resume {path}: {p} does not exist; pass a run folder holding last.pth.tar")
    return p


def save_epoch_copy(last: Path, run_dir: Path, epoch: int, keep: int) -> None:
    """--keep_last K: epoch_NNN.pth.tar copies of the last K epoch-end checkpoints."""
    if keep <= 0:
        return
    target = run_dir / f"epoch_{epoch:03d}.pth.tar"
    tmp = run_dir / f".{target.name}.tmp"
    shutil.copyfile(last, tmp)
    tmp.replace(target)
    for old in sorted(run_dir.glob("epoch_*.pth.tar"))[:-keep]:
        old.unlink()


def write_checkpoint(ckpt: dict[str, Any], path: Path) -> None:
    """atomic_save, turning a full disk into a clear error (the previous file stays intact)."""
    try:
        atomic_save(ckpt, path)
    except OSError as exc:
        raise UserError(
            f"could not write {path} ({exc.strerror or exc}); the previous {path.name} is intact. "
            "Free disk space, then resume with --resume " + str(path.parent)
        ) from None


def check_disk(run_dir: Path, model: torch.nn.Module, extra_copies: int = 0) -> None:
    """Refuse to start when the disk cannot hold the checkpoints (weights + 2 optimizer slots,
    written as last, best and a temporary copy)."""
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    need = params * 3 * (3 + extra_copies)
    free = shutil.disk_usage(run_dir).free
    if free < need:
        raise UserError(
            f"only {free / 1e6:.0f} MB free in {run_dir}, but this run's checkpoints need about {need / 1e6:.0f} MB; "
            "free space or pass another --output_dir"
        )
