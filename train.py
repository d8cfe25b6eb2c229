"""Training: optimizer and schedule factories (timm's), and ``train_one_epoch(...) -> dict``.

One code path whether AMP is on or off (a disabled autocast and grad scaler are no-ops);
exactly one optimizer step per update (``accum_steps`` batches); the LR schedule advances per
update. An epoch can stop early at an update boundary (Ctrl-C) and later resume at that batch.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch
from timm.loss import SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler, MultiStepLRScheduler, PolyLRScheduler, StepLRScheduler
from tqdm import tqdm

from transforms import BatchAugment, Normalize, StrengthMixer, soft_targets
from utils import topk_correct


def build_optimizer(model: torch.nn.Module, opt: str, lr: float, weight_decay: float, momentum: float = 0.9,
                    nesterov: bool = False) -> torch.optim.Optimizer:  # fmt: skip
    """timm's factory: weight decay is not applied to norm layers and biases."""
    if opt == "sgd":  # timm: 'momentum' = SGD with momentum, 'nesterov' = with Nesterov momentum
        return create_optimizer_v2(model, "nesterov" if nesterov else "momentum", lr=lr, weight_decay=weight_decay,
                                   momentum=momentum)  # fmt: skip
    return create_optimizer_v2(model, opt, lr=lr, weight_decay=weight_decay)


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    sched: str,
    epochs: int,
    updates_per_epoch: int,
    warmup_epochs: float = 0.0,
    min_lr: float = 0.0,
    step_size: float = 30.0,
    gamma: float = 0.1,
    milestones: list[float] | None = None,
):
    """timm scheduler counted in optimizer updates (call ``step_update(n)``); the warm-up is linear
    from lr/1000 and comes before the schedule proper."""
    warmup = int(round(warmup_epochs * updates_per_epoch))
    lr = optimizer.param_groups[0]["lr"]
    common = {"warmup_t": warmup, "warmup_lr_init": lr * 1e-3, "warmup_prefix": True, "t_in_epochs": False}
    if sched == "cosine":
        return CosineLRScheduler(
            optimizer, t_initial=max(epochs * updates_per_epoch - warmup, 1), lr_min=min_lr, **common
        )
    if sched == "step":
        return StepLRScheduler(optimizer, decay_t=step_size * updates_per_epoch, decay_rate=gamma, **common)
    if sched == "multistep":
        # timm decays once t + 1 reaches a milestone; +1 makes the decay start exactly at epoch m
        steps = [int(round(m * updates_per_epoch)) - warmup + 1 for m in milestones or []]
        return MultiStepLRScheduler(optimizer, decay_t=steps, decay_rate=gamma, **common)
    if sched == "linear":  # to min_lr in a straight line (timm's poly schedule, power 1)
        return PolyLRScheduler(
            optimizer, t_initial=max(epochs * updates_per_epoch - warmup, 1), power=1.0, lr_min=min_lr, **common
        )
    if sched == "none":
        return StepLRScheduler(optimizer, decay_t=float("inf"), decay_rate=1.0, **common)
    raise ValueError(f"unknown schedule {sched!r}")


class EpochMeters:
    """Running sums of one epoch; saved in mid-epoch checkpoints so a resumed epoch reports the
    same numbers as an uninterrupted one."""

    def __init__(self, state: dict | None = None) -> None:
        self.state = dict(state or {"loss": 0.0, "top1": 0.0, "top5": 0.0, "n": 0})

    def update(self, loss: float, top1: int, top5: int, n: int) -> None:
        s = self.state
        s["loss"] += loss * n
        s["top1"] += top1
        s["top5"] += top5
        s["n"] += n

    def averages(self) -> dict[str, float]:
        n = max(self.state["n"], 1)
        s = self.state
        return {"train_loss": s["loss"] / n, "train_top1": 100.0 * s["top1"] / n, "train_top5": 100.0 * s["top5"] / n}


def train_one_epoch(
    model: torch.nn.Module,
    loader: torch.utils.data.DataLoader,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    normalize: Normalize,
    mixer: StrengthMixer | None,
    num_classes: int,
    label_smoothing: float,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    step: int = 0,
    *,
    scaler: torch.amp.GradScaler | None = None,
    accum_steps: int = 1,
    grad_clip: float = 0.0,
    ema: torch.nn.Module | None = None,
    channels_last: bool = False,
    start_batch: int = 0,
    end_batch: int | None = None,
    meters: EpochMeters | None = None,
    augment: BatchAugment | None = None,
    should_stop: Callable[[], bool] = lambda: False,
    desc: str = "train",
) -> dict[str, Any]:
    """Train on batches [start_batch, end_batch) of `loader` (whose sampler already skips the
    first start_batch batches). `step` counts optimizer updates so far (for the schedule).
    `augment` (--aug_backend torch) augments each uint8 batch on the device, keyed by batch index.

    Returns train loss and top-1/top-5 (against the unmixed labels, in %), images/s, seconds, the
    fraction of the time spent waiting for the next batch (data_wait_fraction),
    the update count `steps`, the batch reached `batch`, `meters` and `interrupted` (stopped
    early by `should_stop`, checked after each update)."""
    model.train()
    loss_fn = SoftTargetCrossEntropy()
    scaler = scaler or torch.amp.GradScaler(device.type, enabled=False)
    meters = meters or EpochMeters()
    end_batch = end_batch if end_batch is not None else start_batch + len(loader)
    seen, start, b, interrupted = 0, time.perf_counter(), start_batch, False
    waited, ready = 0.0, time.perf_counter()  # time blocked on the loader: the data-wait fraction
    bar = tqdm(total=end_batch - start_batch, desc=desc, leave=False, dynamic_ncols=True, disable=None)
    optimizer.zero_grad(set_to_none=True)
    for b, (images, labels) in enumerate(loader, start=start_batch):
        waited += time.perf_counter() - ready
        if b >= end_batch:
            b -= 1
            break
        images = images.to(device, non_blocking=True)
        images = normalize(augment(images, b) if augment is not None else images)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        labels = labels.to(device, non_blocking=True)
        inputs, targets = soft_targets(images, labels, mixer, num_classes, label_smoothing)
        group_start = b - b % accum_steps
        group_size = min(accum_steps, end_batch - group_start)  # the epoch's last group may be short
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            logits = model(inputs)
            loss = loss_fn(logits.float(), targets)
        if not torch.isfinite(loss):
            lr = optimizer.param_groups[0]["lr"]
            raise FloatingPointError(
                f"the training loss became {loss.item()} at update {step} (lr {lr:.3g}); the last checkpoint is "
                "intact. Lower --lr_base, or add --grad_clip 1.0 or --warmup_epochs 2"
            )
        scaler.scale(loss / group_size).backward()
        if b + 1 - group_start == group_size:
            step = _update(model, optimizer, scheduler, scaler, grad_clip, ema, step)
        n = labels.shape[0]
        seen += n
        top1, top5 = topk_correct(logits.detach(), labels, (1, 5))
        meters.update(loss.item(), top1, top5, n)
        bar.update(1)
        if not bar.disable:  # no formatting work per step when the bar is hidden (logs, CI, torchrun)
            avg = meters.averages()
            bar.set_postfix(loss=f"{avg['train_loss']:.3f}", top1=f"{avg['train_top1']:.1f}",
                            lr=f"{optimizer.param_groups[0]['lr']:.2e}", ips=f"{seen / (time.perf_counter() - start):.0f}")  # fmt: skip
        if b + 1 - group_start == group_size and b + 1 < end_batch and should_stop():
            interrupted = True
            break
        ready = time.perf_counter()
    bar.close()
    seconds = time.perf_counter() - start
    return {**meters.averages(), "images_per_second": seen / max(seconds, 1e-9), "train_seconds": seconds,
            "data_wait_fraction": waited / max(seconds, 1e-9),
            "steps": step, "batch": b + 1, "meters": meters.state, "interrupted": interrupted}  # fmt: skip


def _update(model, optimizer, scheduler, scaler, grad_clip: float, ema, step: int) -> int:
    """One optimizer update: unscale, clip, step, schedule, EMA. Returns the new update count."""
    if grad_clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    step += 1
    scheduler.step_update(num_updates=step)
    if ema is not None:
        ema.update(model, step=step)
    return step


def updates_per_epoch(batches: int, accum_steps: int) -> int:
    return math.ceil(batches / accum_steps)
