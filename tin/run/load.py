"""Saved runs, loaded: a checkpoint's model built as its run built it, for evaluation, prediction and
export (``load_model(s)``), and as a distillation teacher (``load_teachers``: runs of this toolkit, or
timm models with their weights)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

import arch
import transforms
from tin import checkpoint
from tin.config.schema import Config, from_saved
from tin.data.readers import DataSplits
from tin.distill import Teacher, digest, soft_labels
from tin.runtime import hardware
from utils import UserError

log = logging.getLogger("tin")


@dataclass
class Loaded:
    """A checkpoint ready to evaluate: its model in eval mode on the device, in the memory format and
    with the autocast dtype the run decided for that device, and what the checkpoint says about it."""

    path: Path
    model: torch.nn.Module
    cfg: Config  # overrides applied
    saved: dict  # the config as the run saved it
    classes: list[str]  # index = the model's output
    names: dict[str, str] | None  # wnid -> human name; None in checkpoints written before they held names
    amp_dtype: torch.dtype | None
    best: dict  # the run's best so far: val_top1, best_epoch, ...
    epoch: int


def load_model(path: str | Path, device: torch.device, like: Loaded | None = None, **overrides) -> Loaded:
    """One checkpoint, built as the run built it (`overrides`: config fields to replace, e.g.
    data_dir). With `like`, a checkpoint for other classes is refused before anything is built: in an
    ensemble the same output index must mean the same class."""

    path = checkpoint_file(path)  # a run folder stands for its best.pth.tar
    ckpt = checkpoint.load_checkpoint(path)
    classes = list(ckpt["classes"])
    if like is not None and classes != like.classes:
        raise UserError(
            f"{path} was trained on other classes ({len(classes)}) than {like.path} ({len(like.classes)}); "
            "cannot ensemble them: pass checkpoints of runs on the same dataset"
        )
    cfg = from_saved(ckpt["config"], **overrides, trainval=False, resume="")
    model = arch.build_model(cfg.arch, len(classes), cfg.img_size).to(device)
    model.load_state_dict(ckpt["state_dict"])
    # as the run evaluated: its precision and memory format decided for this device
    runtime = hardware.decide_runtime(device, cfg.amp, cfg.amp_dtype, cfg.channels_last)
    if runtime.channels_last:
        model = model.to(memory_format=torch.channels_last)
    best, epoch = ckpt.get("best") or {}, ckpt.get("epoch", 0)
    return Loaded(
        Path(path), model.eval(), cfg, ckpt["config"], classes, ckpt.get("names"), runtime.amp_dtype, best, epoch
    )


def load_models(paths: list[str | Path], device: torch.device, **overrides) -> list[Loaded]:
    """load_model for each of an ensemble's checkpoints (all for the same classes)."""
    models: list[Loaded] = []
    for path in paths:
        models.append(load_model(path, device, models[0] if models else None, **overrides))
    return models


def checkpoint_file(path: str | Path) -> Path:
    """A run folder stands for its best.pth.tar; a file is itself."""
    p = Path(path)
    if p.is_dir():
        if not (p / "best.pth.tar").is_file():
            raise UserError(f"{p} holds no best.pth.tar; pass a run folder of main.py or a .pth.tar file")
        return p / "best.pth.tar"
    return p


def load_teachers(cfg: Config, data: DataSplits, runtime: hardware.Runtime) -> Teacher | None:
    """--teacher's models on the run's device, checked against the classes of `data` (the prepared
    splits), and with --kd_views their cached soft labels, made now if not found (None without)."""
    if not cfg.teacher:
        return None
    teacher = _teachers(cfg, data.classes, runtime)
    if cfg.kd_views:
        cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else Path(data.root) / ".cache"
        recipe = transforms.at_strength(cfg.recipe(), cfg.aug_strength)
        teacher.cache = soft_labels(
            teacher, data.train, len(data.classes), recipe, cfg.kd_views, cfg.seed, runtime, cache_dir
        )
    return teacher


def _teachers(cfg: Config, classes: list[str], runtime: hardware.Runtime) -> Teacher:
    models, sizes, info = [], [], []
    for source in cfg.teacher:
        if source.startswith("timm:"):
            model, facts = _timm_teacher(source, cfg.teacher_pretrained_path, len(classes), cfg.img_size)
        else:
            model, facts = _run_teacher(source, classes)
        model = model.to(runtime.device).eval()
        if runtime.channels_last:
            model = model.to(memory_format=torch.channels_last)
        for p in model.parameters():
            p.requires_grad_(False)
        models.append(model)
        sizes.append(facts["img_size"])
        info.append(facts)
        top1 = f"val top-1 {facts['val_top1']:.2f} % ({facts['evaluated']})" if facts["val_top1"] is not None else ""
        log.info(
            "teacher %s: %s, %s parameters%s; it sees the student's batch at %d px",
            source,
            facts["arch"],
            f"{facts['params']:,}",
            f", {top1}" if top1 else "",
            facts["img_size"],
        )
    log.info(
        "distillation: loss = %.2f x label loss + %.2f x T^2 KL(teacher || student), T = %g%s; %s",
        1 - cfg.kd_alpha,
        cfg.kd_alpha,
        cfg.kd_temperature,
        f"; the ensemble's mean probabilities ({len(models)} teachers)" if len(models) > 1 else "",
        f"cached soft labels, {cfg.kd_views} views per image (--kd_views)"
        if cfg.kd_views
        else "the teacher runs in every step, on the student's batch (--kd_views 0)",
    )
    return Teacher(models, sizes, cfg.kd_alpha, cfg.kd_temperature, runtime.channels_last, info)


def _run_teacher(source: str, classes: list[str]) -> tuple[torch.nn.Module, dict]:
    """A run of this toolkit: its folder (best.pth.tar) or a checkpoint file."""
    path = Path(source)
    if path.is_dir():
        path = path / "best.pth.tar"
    try:
        ckpt = checkpoint.load_checkpoint(path)
    except UserError as exc:
        raise UserError(f"--teacher {source}: {exc}") from None
    taught = list(ckpt["classes"])
    if taught != list(classes):
        differ = next((f"{a} where the data has {b}" for a, b in zip(taught, classes, strict=False) if a != b), "")
        raise UserError(
            f"--teacher {source} was trained on other classes than the data's ({len(taught)} against "
            f"{len(classes)}{'; ' + differ if differ else ''}); a teacher must predict the data's classes: pass a run "
            "trained on this dataset"
        )
    cfg = from_saved(ckpt["config"])
    model = arch.build_model(cfg.arch, len(taught), cfg.img_size)
    model.load_state_dict(ckpt["state_dict"])
    best = ckpt.get("best") or {}
    top1 = best.get("val_top1", ckpt.get("top1"))
    evaluated = (
        f"{cfg.eval_px} px{', flip TTA' if cfg.tta_each else ''}{', EMA' if best.get('weights') == 'ema' else ''}"
    )
    return model, {
        "source": str(source),
        "file": str(path),
        "arch": cfg.arch,
        "params": sum(p.numel() for p in model.parameters()),
        "img_size": cfg.img_size,
        "val_top1": top1,
        "evaluated": evaluated,
        "digest": digest(ckpt["state_dict"]),
    }


def _timm_teacher(source: str, weights: str, num_classes: int, img_size: int) -> tuple[torch.nn.Module, dict]:
    """timm:NAME with every tensor from `weights` (a head of another size is refused: it would be
    a random teacher). The class order cannot be checked: it must be the sorted-wnid order."""
    from timm.models import load_checkpoint

    if not Path(weights).is_file():
        raise UserError(f"--teacher_pretrained_path {weights} does not exist")
    model = arch.build_model(source, num_classes, img_size)
    try:
        load_checkpoint(model, weights, strict=True)
    except (RuntimeError, KeyError) as exc:
        sizes = [line.strip() for line in str(exc).splitlines() if "size mismatch" in line][:1]
        raise UserError(
            f"--teacher {source}: {weights} does not fit {source.removeprefix('timm:')} with the data's "
            f"{num_classes} classes ({sizes[0] if sizes else type(exc).__name__}); a teacher must be trained on "
            "these classes"
        ) from None
    return model, {
        "source": source,
        "file": str(weights),
        "arch": source,
        "params": sum(p.numel() for p in model.parameters()),
        "img_size": img_size,
        "val_top1": None,
        "evaluated": "",
        "digest": digest(model.state_dict()),
    }
