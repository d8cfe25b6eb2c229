"""Train a classifier on Tiny-ImageNet-200: the CLI entry and the epoch loop.

    python main.py --arch resnet18 --batch_size 128 --lr_base 1e-3 --epochs 100
    python main.py --config configs/demo.yaml --epochs 3

Writes checkpoints/<YYYY-MM-DD_HH-MM-SS>_<arch>/ with config.yaml, log.txt, metrics.csv,
last.pth.tar, best.pth.tar, best_results.json and best_test_preds.csv (see README).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler

import arch
import batch_manager
import transforms
from config import Config, parse_config
from train import train_one_epoch
from utils import (
    CsvSink,
    UserError,
    WandbSink,
    amp_dtype,
    atomic_save,
    count_params,
    make_run_dir,
    resolve_device,
    seed_everything,
    setup_logging,
)
from val import evaluate, predict, write_predictions

log = logging.getLogger("tin")

METRIC_COLUMNS = [
    "epoch", "lr", "aug_strength", "train_loss", "train_top1", "val_loss", "val_top1", "val_top5",
    "epoch_seconds", "images_per_second",
]  # fmt: skip


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: Config, steps_per_epoch: int) -> CosineLRScheduler:
    """Cosine decay from lr_base to min_lr over all steps, after an optional linear warm-up."""
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    return CosineLRScheduler(
        optimizer,
        t_initial=max(cfg.epochs * steps_per_epoch - warmup, 1),
        lr_min=cfg.min_lr,
        warmup_t=warmup,
        warmup_lr_init=cfg.lr_base * 1e-3,
        warmup_prefix=True,
        t_in_epochs=False,
    )


def main(argv: list[str] | None = None) -> Path:
    """Parse argv, train, and return the run folder."""
    setup_logging()
    cfg = parse_config(argv)
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    data = batch_manager.prepare_data(**cfg.data_kwargs())
    loaders = batch_manager.build_loaders(
        data, cfg.img_size, cfg.batch_size, cfg.workers, cfg.seed, pin_memory=device.type == "cuda"
    )
    classes = loaders.data.classes
    model = arch.build_model(
        cfg.arch, len(classes), cfg.img_size, cfg.drop_rate, cfg.attn_drop_rate, cfg.drop_path_rate
    ).to(device)
    # The run folder is created only once data and model are known to be good: no empty folders.
    run_dir = make_run_dir(cfg.output_dir, cfg.arch)
    setup_logging(run_dir)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    sinks = [CsvSink(run_dir / "metrics.csv", METRIC_COLUMNS)]
    try:
        if cfg.wandb != "disabled":
            sinks.append(WandbSink(run_dir, cfg.wandb, cfg.wandb_project, cfg.to_dict()))
        _fit(cfg, model, loaders, device, run_dir, sinks)
    finally:
        for sink in sinks:
            sink.close()
    return run_dir


@dataclass
class Parts:
    """What one epoch needs, built once by _fit."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: CosineLRScheduler
    mixer: transforms.StrengthMixer | None
    normalize: transforms.Normalize
    loaders: batch_manager.Loaders
    device: torch.device
    amp_dtype: torch.dtype | None


def _fit(cfg: Config, model, loaders, device, run_dir: Path, sinks) -> None:
    classes, params = loaders.data.classes, count_params(model)
    log.info(
        "run folder %s | %s, %.2fM params, %d classes | train %d, val %d, test %d images | device %s%s",
        run_dir, cfg.arch, params / 1e6, len(classes), len(loaders.data.train), len(loaders.data.val or []),
        len(loaders.data.test or []), device, " (bf16 autocast)" if cfg.amp else "",
    )  # fmt: skip
    optimizer = create_optimizer_v2(model, "adamw", lr=cfg.lr_base, weight_decay=cfg.weight_decay)
    parts = Parts(
        model=model,
        optimizer=optimizer,
        scheduler=build_scheduler(optimizer, cfg, len(loaders.train)),
        mixer=transforms.build_mixer(
            cfg.mixup_alpha, cfg.cutmix_alpha, cfg.mix_prob, cfg.label_smoothing, len(classes)
        ),
        normalize=transforms.Normalize().to(device),
        loaders=loaders,
        device=device,
        amp_dtype=amp_dtype(device, cfg.amp),
    )
    if loaders.test is None:
        log.info("this dataset has no unlabelled test split: no best_test_preds.csv will be written")
    best: dict = {"val_top1": float("-inf")}
    step, start = 0, time.perf_counter()
    for epoch in range(cfg.epochs):
        row, step = _one_epoch(cfg, parts, epoch, step)
        # Without val (--trainval) the latest epoch is the one kept as best.
        is_best = "val_top1" not in row or row["val_top1"] > best["val_top1"]
        _save_epoch(cfg, parts, run_dir, row, step, is_best)
        if is_best:
            best = {"best_epoch": epoch + 1, **{k: row.get(k) for k in ("val_top1", "val_top5", "val_loss")}}
        _write_best_results(run_dir, cfg, params, best, time.perf_counter() - start, epoch + 1)
        for sink in sinks:
            sink.log(row)  # metrics.csv keeps METRIC_COLUMNS; wandb gets every figure
        log.info(
            "epoch %d/%d  %s%s",
            epoch + 1,
            cfg.epochs,
            _summary(row),
            "  *best*" if is_best and "val_top1" in row else "",
        )
    if best["val_top1"] is None:
        final = "trained on train + val (no val metrics)"
    else:
        final = f"best val top-1 {best['val_top1']:.2f}% (top-5 {best['val_top5']:.2f}%) at epoch {best['best_epoch']}"
    out = f"submit {run_dir / 'best_test_preds.csv'}" if loaders.test is not None else f"weights in {run_dir}"
    log.info("done: %s in %.0fs | %s", final, time.perf_counter() - start, out)


def _summary(row: dict) -> str:
    text = (
        f"lr {row['lr']:.2e}  s {row['aug_strength']:.2f} | train loss {row['train_loss']:.3f} "
        f"top-1 {row['train_top1']:.2f}%"
    )
    if "val_top1" in row:
        text += f" | val loss {row['val_loss']:.3f} top-1 {row['val_top1']:.2f}% top-5 {row['val_top5']:.2f}%"
    return text + f" | {row['epoch_seconds']:.0f}s, {row['images_per_second']:.0f} img/s"


def _one_epoch(cfg: Config, p: Parts, epoch: int, step: int) -> tuple[dict, int]:
    """Set this epoch's augmentation strength, train, evaluate: -> (metrics row, global step)."""
    t0 = time.perf_counter()
    strength = transforms.strength_at(epoch, cfg.epochs, cfg.aug_schedule, cfg.aug_strength)
    p.loaders.set_epoch(epoch, strength)  # reaches the persistent workers
    if p.mixer is not None:
        p.mixer.set_strength(strength)  # and CutMix/MixUp
    p.scheduler.step_update(num_updates=step)
    lr = p.optimizer.param_groups[0]["lr"]
    num_classes = len(p.loaders.data.classes)
    tr = train_one_epoch(p.model, p.loaders.train, p.optimizer, p.scheduler, p.normalize, p.mixer, num_classes,
                         cfg.label_smoothing, p.device, p.amp_dtype, step, desc=f"epoch {epoch + 1}/{cfg.epochs}")  # fmt: skip
    step = int(tr.pop("steps"))
    va = {} if p.loaders.val is None else evaluate(p.model, p.loaders.val, p.normalize, p.device, p.amp_dtype)
    row = {"epoch": epoch + 1, "lr": lr, "aug_strength": strength, **tr, **va,
           "epoch_seconds": time.perf_counter() - t0}  # fmt: skip
    return row, step


def _save_epoch(cfg: Config, p: Parts, run_dir: Path, row: dict, step: int, is_best: bool) -> None:
    """last.pth.tar every epoch; on a new best also best.pth.tar and the test predictions."""
    classes = p.loaders.data.classes
    ckpt = {
        "state_dict": p.model.state_dict(), "optimizer": p.optimizer.state_dict(),
        "scheduler": p.scheduler.state_dict(), "epoch": row["epoch"], "step": step,
        "top1": row.get("val_top1"), "top5": row.get("val_top5"), "config": cfg.to_dict(), "classes": classes,
    }  # fmt: skip
    atomic_save(ckpt, run_dir / "last.pth.tar")
    if is_best:
        atomic_save(ckpt, run_dir / "best.pth.tar")
        if p.loaders.test is not None:
            preds = predict(p.model, p.loaders.test, p.normalize, p.device, p.amp_dtype)
            write_predictions(p.loaders.data.test.ids, preds, classes, run_dir / "best_test_preds.csv")


def _write_best_results(run_dir: Path, cfg: Config, params: int, best: dict, wall: float, epochs_run: int) -> None:
    results = {
        "arch": cfg.arch,
        "params": params,
        **best,
        "epochs_run": epochs_run,
        "wall_time_seconds": round(wall, 2),
    }
    tmp = run_dir / "best_results.json.tmp"
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    tmp.replace(run_dir / "best_results.json")


def cli() -> None:
    """`python main.py`: bad input and a diverged run end with one line, not a traceback."""
    try:
        main()
    except (UserError, FloatingPointError) as exc:
        # A DataLoader worker re-raises with the worker's traceback in the message: keep its last line.
        lines = [ln for ln in str(exc).splitlines() if ln.strip()]
        sys.exit(f"error: {lines[-1].split('Error: ', 1)[-1] if len(lines) > 1 else exc}")


if __name__ == "__main__":
    cli()
