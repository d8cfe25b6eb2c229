"""The epoch loop: build the training parts, run epochs (from any resumed position), evaluate,
keep the best, checkpoint, stop cleanly on signals or early stopping. main.py sets up and calls fit().

Per epoch: s = strength_at(epoch) -> workers and CutMix/MixUp; train_one_epoch; evaluate (and the
EMA); best.pth.tar + test predictions on a new best; last.pth.tar; metrics to the sinks.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from timm.utils import ModelEmaV3

import batch_manager
import distributed
import run_state
import train
import transforms
from config import Config, milestones
from run_state import StopRequest, TrainState
from utils import amp_dtype, load_checkpoint
from val import evaluate, predict, write_predictions

log = logging.getLogger("tin")

METRIC_COLUMNS = [
    "epoch", "lr", "aug_strength", "train_size", "train_loss", "train_top1", "val_loss", "val_top1", "val_top5",
    "epoch_seconds", "images_per_second", "data_wait_fraction",
]  # fmt: skip
EMA_COLUMNS = ["ema_val_loss", "ema_val_top1", "ema_val_top5"]


@dataclass
class Parts:
    """What the epochs need, built once."""

    model: torch.nn.Module  # the module whose weights are saved
    net: torch.nn.Module  # what is called: `model`, or its torch.compile wrapper
    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: torch.amp.GradScaler
    ema: ModelEmaV3 | None
    mixer: transforms.StrengthMixer | None
    normalize: transforms.Normalize
    loaders: batch_manager.Loaders
    device: torch.device
    amp_dtype: torch.dtype | None
    ctx: distributed.Context = distributed.Context()
    params: int = 0
    gflops: float = 0.0


def build_parts(cfg: Config, model, loaders, device, ctx: distributed.Context) -> Parts:
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    net = model
    if ctx.enabled:
        if cfg.sync_bn:
            model = net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    # linear scaling rule on the global batch: per-process batch x accumulation x processes
    global_batch = cfg.batch_size * cfg.accum_steps * ctx.world
    lr = cfg.lr_base * (global_batch / cfg.lr_scale_batch if cfg.lr_scale_batch else 1.0)
    optimizer = train.build_optimizer(model, cfg.opt, lr, cfg.weight_decay, cfg.momentum, cfg.nesterov)
    batches = _batches_per_epoch(cfg, loaders)
    scheduler = train.build_scheduler(optimizer, cfg.sched, cfg.epochs, train.updates_per_epoch(batches, cfg.accum_steps),
                                      cfg.warmup_epochs, cfg.min_lr, cfg.step_size, cfg.gamma, milestones(cfg))  # fmt: skip
    dtype = amp_dtype(device, cfg.amp, cfg.amp_dtype)
    n_classes = len(loaders.data.classes)
    return Parts(
        model=model,
        net=torch.compile(net) if cfg.compile else net,
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=torch.amp.GradScaler(device.type, enabled=dtype == torch.float16),
        ema=ModelEmaV3(model, decay=cfg.ema_decay, use_warmup=True)
        if cfg.ema
        else None,  # decay ramps up: short runs too
        mixer=transforms.build_mixer(cfg.mixup_alpha, cfg.cutmix_alpha, cfg.mix_prob, cfg.label_smoothing, n_classes),
        normalize=transforms.Normalize().to(device),
        loaders=loaders,
        device=device,
        amp_dtype=dtype,
        ctx=ctx,
    )


def _batches_per_epoch(cfg: Config, loaders) -> int:
    full = loaders.train.sampler.num_samples // cfg.batch_size  # this process's share
    return min(full, cfg.steps_per_epoch) if cfg.steps_per_epoch else full


def fit(cfg: Config, p: Parts, state: TrainState, run_dir: Path, sinks, stop: StopRequest) -> None:
    data = p.loaders.data
    log.info(
        "run folder %s | %s, %.2fM params, %d classes | train %d, val %d, test %d images | device %s%s",
        run_dir, cfg.arch, p.params / 1e6, len(data.classes), len(data.train), len(data.val or []),
        len(data.test or []), p.device, f" ({str(p.amp_dtype).removeprefix('torch.')} autocast)" if p.amp_dtype else "",
    )  # fmt: skip
    if p.loaders.test is None:
        log.info("this dataset has no unlabelled test split: no best_test_preds.csv will be written")
    p.scheduler.step_update(num_updates=state.step)
    start = time.perf_counter() - (state.history[-1]["wall_seconds"] if state.history else 0.0)
    for epoch in range(state.epoch, cfg.epochs):
        row = _one_epoch(cfg, p, state, epoch, stop)
        if row is None:  # interrupted mid-epoch: saved, tell how to go on
            _exit_interrupted(p, cfg, state, run_dir, stop)
        row["wall_seconds"] = time.perf_counter() - start
        improved = _end_epoch(cfg, p, state, run_dir, row)
        for sink in sinks:
            sink.log(row)
        log.info("epoch %d/%d  %s%s", epoch + 1, cfg.epochs, _summary(row), "  *best*" if improved else "")
        if cfg.patience and state.bad_epochs >= cfg.patience:
            log.info("early stop: no better val top-1 for %d epochs (--patience %d)", state.bad_epochs, cfg.patience)
            break
        if distributed.any_flag(bool(stop.signum), p.device):
            _exit_interrupted(p, cfg, state, run_dir, stop)
    _final_test_preds(cfg, p, run_dir)
    _log_done(state, run_dir, p.loaders.test is not None, time.perf_counter() - start)
    if not cfg.no_analysis and p.loaders.val is not None and p.ctx.is_main:
        _analyze(run_dir, cfg.workers)


def _analyze(run_dir: Path, workers: int) -> None:
    """End-of-run plots and confusions; a failure here must not turn a finished run into an error."""
    import analyze

    try:
        analyze.analyze_run(run_dir, workers=workers)
    except Exception as exc:  # noqa: BLE001 - reported, and the trained run stays complete
        log.warning("analysis failed (%s: %s); retry with: python analyze.py run %s", type(exc).__name__, exc, run_dir)


def train_epoch(cfg: Config, p: Parts, state: TrainState, epoch: int, stop: StopRequest | None = None) -> dict:
    """Train epoch `epoch` from state.batch (the trainer proper, no evaluation): set the epoch's
    augmentation strength and resolution, run train.train_one_epoch, advance `state`. Returns
    train.train_one_epoch's dict plus aug_strength and train_size. bench/step.py times this."""
    strength = transforms.strength_at(epoch, cfg.epochs, cfg.aug_schedule, cfg.aug_strength)
    size = transforms.train_size_at(epoch, cfg.epochs, cfg.img_size, cfg.min_img_size, cfg.resize_until)
    p.loaders.set_epoch(epoch, strength, start_batch=state.batch, size=size)  # reaches the persistent workers
    if p.mixer is not None:
        p.mixer.set_strength(strength)  # and CutMix/MixUp
    meters = train.EpochMeters(state.meters)
    meters.state.setdefault("lr", p.optimizer.param_groups[0]["lr"])  # the epoch's starting lr, kept across resumes
    tr = train.train_one_epoch(
        p.net, p.loaders.train, p.optimizer, p.scheduler, p.normalize, p.mixer, len(p.loaders.data.classes),
        cfg.label_smoothing, p.device, p.amp_dtype, state.step, scaler=p.scaler, accum_steps=cfg.accum_steps,
        grad_clip=cfg.grad_clip, ema=p.ema, channels_last=cfg.channels_last, start_batch=state.batch,
        end_batch=_batches_per_epoch(cfg, p.loaders), meters=meters, augment=p.loaders.augment,
        should_stop=lambda: distributed.any_flag(bool(stop and stop.signum), p.device), desc=f"epoch {epoch + 1}/{cfg.epochs}",
    )  # fmt: skip
    state.step, state.batch, state.meters = tr["steps"], tr["batch"], tr["meters"]
    return {**tr, "aug_strength": strength, "train_size": size, "lr": meters.state["lr"]}


def _one_epoch(cfg: Config, p: Parts, state: TrainState, epoch: int, stop: StopRequest) -> dict | None:
    """Train (from state.batch), evaluate -> metrics row, or None when a stop was requested
    mid-epoch (state then holds the position)."""
    t0 = time.perf_counter()
    tr = train_epoch(cfg, p, state, epoch, stop)
    if tr["interrupted"]:
        return None
    row = {"epoch": epoch + 1, **{k: tr[k] for k in ("lr", "aug_strength", "train_size")}}
    row.update(
        {k: v for k, v in tr.items() if k.startswith("train_") or k in ("images_per_second", "data_wait_fraction")}
    )
    row.update(_global_train_metrics(train.EpochMeters(tr["meters"]), p.device) if p.ctx.enabled else {})
    if p.loaders.val is not None:  # the unwrapped model: each process evaluates its shard, sums are reduced
        row.update(evaluate(p.model, p.loaders.val, p.normalize, p.device, p.amp_dtype, cfg.tta))
        if p.ema is not None:
            ema = evaluate(p.ema.module, p.loaders.val, p.normalize, p.device, p.amp_dtype, cfg.tta)
            row.update({f"ema_{k}": v for k, v in ema.items()})
    row["epoch_seconds"] = time.perf_counter() - t0
    return row


def _global_train_metrics(meters: train.EpochMeters, device: torch.device) -> dict:
    """Train loss/accuracy over every process's images (images/s stays per process)."""
    m = meters.state
    sums = distributed.all_reduce_(torch.tensor([m["loss"], m["top1"], m["top5"], m["n"]], dtype=torch.float64,
                                                device=device))  # fmt: skip
    n = max(float(sums[3]), 1.0)
    return {
        "train_loss": float(sums[0]) / n,
        "train_top1": 100 * float(sums[1]) / n,
        "train_top5": 100 * float(sums[2]) / n,
    }


def _end_epoch(cfg: Config, p: Parts, state: TrainState, run_dir: Path, row: dict) -> bool:
    """Update the best, write best (+ predictions) first and last.pth.tar second: a kill between
    the two re-runs this epoch on resume, identically. Returns whether this epoch is the best."""
    key = "ema_val_top1" if cfg.best_on == "ema" else "val_top1"
    score, best = row.get(key), state.best.get("val_top1")
    improved = score is None or best is None or score > best  # without val, the latest epoch is kept
    state.epoch, state.batch, state.meters = state.epoch + 1, 0, None
    state.history.append(row)
    state.bad_epochs = 0 if improved else state.bad_epochs + 1
    if improved:
        state.best = {"best_epoch": row["epoch"], "val_top1": score, "val_top5": row.get(key.replace("top1", "top5")),
                      "val_loss": row.get(key.replace("top1", "loss")), "weights": cfg.best_on}  # fmt: skip
    ckpt = run_state.make_checkpoint(p, cfg.to_dict(), state)  # every process: gathers the RNG states
    if improved:
        weights = p.ema.module if cfg.best_on == "ema" else p.model
        preds = _test_preds(cfg, p, weights) if cfg.test_preds == "best" else None
        if p.ctx.is_main:
            run_state.write_checkpoint({**ckpt, "state_dict": weights.state_dict()}, run_dir / "best.pth.tar")
            if preds is not None:
                write_predictions(
                    p.loaders.data.test.ids, preds, p.loaders.data.classes, run_dir / "best_test_preds.csv"
                )
    if not p.ctx.is_main:
        return improved and score is not None
    run_state.write_checkpoint(ckpt, run_dir / "last.pth.tar")
    run_state.save_epoch_copy(run_dir / "last.pth.tar", run_dir, state.epoch, cfg.keep_last)
    results = {"arch": cfg.arch, "params": p.params, "gflops": round(p.gflops, 4), **state.best, "epochs_run": state.epoch,
               "wall_time_seconds": round(row["wall_seconds"], 2)}  # fmt: skip
    tmp = run_dir / "best_results.json.tmp"
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    tmp.replace(run_dir / "best_results.json")
    return improved and score is not None


def _test_preds(cfg: Config, p: Parts, weights: torch.nn.Module) -> list[int] | None:
    """Every test image's predicted class (None without a test split): each process predicts its
    shard, the shards are gathered in order."""
    if p.loaders.test is None:
        return None
    shard = predict(weights, p.loaders.test, p.normalize, p.device, p.amp_dtype, cfg.tta)
    return distributed.interleave(distributed.gather(shard))


def _final_test_preds(cfg: Config, p: Parts, run_dir: Path) -> None:
    """--test_preds end: predict the test split once, with the weights saved in best.pth.tar
    (the main process reads them; every process gets them by broadcast)."""
    if p.loaders.test is None or cfg.test_preds != "end":
        return
    state = load_checkpoint(run_dir / "best.pth.tar")["state_dict"] if p.ctx.is_main else None
    weights = copy.deepcopy(p.model)
    weights.load_state_dict(distributed.broadcast(state))
    preds = _test_preds(cfg, p, weights)
    if p.ctx.is_main:
        write_predictions(p.loaders.data.test.ids, preds, p.loaders.data.classes, run_dir / "best_test_preds.csv")


def _exit_interrupted(p: Parts, cfg: Config, state: TrainState, run_dir: Path, stop: StopRequest) -> None:
    if state.batch:  # mid-epoch: save the exact position (an epoch end has just been saved otherwise)
        ckpt = run_state.make_checkpoint(p, cfg.to_dict(), state)
        if p.ctx.is_main:
            run_state.write_checkpoint(ckpt, run_dir / "last.pth.tar")
    log.warning("interrupted; state saved in %s. Resume with:\n  python main.py --resume %s", run_dir / "last.pth.tar",
                run_dir)  # fmt: skip
    raise SystemExit(128 + stop.signum)


def _summary(row: dict) -> str:
    text = f"lr {row['lr']:.2e}  s {row['aug_strength']:.2f}  {row['train_size']}px | train loss {row['train_loss']:.3f} top-1 {row['train_top1']:.2f}%"
    if "val_top1" in row:
        text += f" | val loss {row['val_loss']:.3f} top-1 {row['val_top1']:.2f}% top-5 {row['val_top5']:.2f}%"
    if "ema_val_top1" in row:
        text += f" | EMA top-1 {row['ema_val_top1']:.2f}%"
    return text + (
        f" | {row['epoch_seconds']:.0f}s, {row['images_per_second']:.0f} img/s, "
        f"data wait {100 * row['data_wait_fraction']:.1f}%"
    )


def _log_done(state: TrainState, run_dir: Path, has_test: bool, seconds: float) -> None:
    b = state.best
    final = "trained on train + val (no val metrics)"
    if b.get("val_top1") is not None:
        final = f"best val top-1 {b['val_top1']:.2f}% (top-5 {b['val_top5']:.2f}%) at epoch {b['best_epoch']}"
    out = f"submit {run_dir / 'best_test_preds.csv'}" if has_test else f"weights in {run_dir}"
    log.info("done: %s in %.0fs | %s", final, seconds, out)
