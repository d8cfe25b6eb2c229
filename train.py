"""The training step: ``train_one_epoch`` runs the updates of one epoch, top to bottom.

Per batch: to the device (non-blocking), augmented on the device (BatchAugment) or already in the
loader, normalised, channels-last, mixed (CutMix/MixUp) with soft targets, forward under autocast,
loss (with ``--teacher``: mixed with the distillation term, the teacher seeing this very batch;
tin/distill.py), backward; every ``accum_steps`` batches one optimizer update: unscale, clip, step, schedule,
EMA. One code path whether AMP is on or off (a disabled autocast and grad scaler are no-ops);
exactly one optimizer step per update. The host reads the device only every ``sync_every``
updates (progress bar, finiteness of the loss, the stop decision under torchrun), so on a GPU the
host queues the next batches while the current one computes. An epoch can stop at an update
boundary (Ctrl-C, the time budget) and later resume at that batch.

What an update needs is built once, complete, by tin.run.build (``Parts``); the learning-rate schedule
comes separately (the time budget measures the step before the schedule exists).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from timm.loss import SoftTargetCrossEntropy
from timm.utils import ModelEmaV3
from tqdm import tqdm

from batch_manager import Loaders
from tin.augment.mixing import StrengthMixer, soft_targets
from tin.engine.state import EpochMeters, TrainState
from tin.optim import Stretchable
from tin.runtime import distributed, hardware
from transforms import Normalize

log = logging.getLogger("tin")


class Teacher(Protocol):
    """What the step asks of distillation (tin/distill.py's Teacher, a loss object the step just calls,
    as DeiT's DistillationLoss): the batch's cached soft labels, if any, and the loss with its term."""

    def replay(self, loaders: Loaders, b: int) -> Replay | None: ...

    def loss(
        self, label_loss: torch.Tensor, logits: torch.Tensor, inputs: torch.Tensor, cached: torch.Tensor | None = None
    ) -> torch.Tensor: ...


class Replay(Protocol):
    def probs(self, device: torch.device, num_classes: int, lam: float) -> torch.Tensor: ...


@dataclass
class Parts:
    """What the updates need: built complete by tin.run.build, nothing filled in later."""

    model: torch.nn.Module  # the module whose weights are saved
    net: torch.nn.Module  # what is called: `model`, its DDP wrapper, or torch.compile of that
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler  # enabled for fp16 only
    ema: ModelEmaV3 | None
    mixer: StrengthMixer | None
    normalize: Normalize
    loaders: Loaders
    runtime: hardware.Runtime  # device, autocast dtype, memory format
    ctx: distributed.Context = field(default_factory=distributed.Context)
    teacher: Teacher | None = None  # tin/distill.py's (--teacher), or None
    num_classes: int = 0
    label_smoothing: float = 0.0
    accum_steps: int = 1
    grad_clip: float = 0.0
    sync_every: int = 25  # updates between host reads of the device
    progress_every: float = 30.0  # seconds between progress lines where there is no bar (0: none)

    @property
    def device(self) -> torch.device:
        return self.runtime.device

    def autocast(self):
        return hardware.autocast(self.device, self.runtime.amp_dtype)


def train_one_epoch(
    parts: Parts,
    scheduler: Stretchable,
    state: TrainState,
    *,
    epoch: int,
    end_batch: int,
    strength: float,
    size: int,
    should_stop: Callable[[int], bool] | None = None,
    desc: str = "train",
) -> dict[str, Any]:
    """Train epoch `epoch` from batch state.batch to `end_batch` at augmentation strength `strength`
    and training size `size`; advances `state` (update count, position, running sums). The
    scheduler (None while the time budget measures) is counted in updates. `should_stop(step)` is
    asked after every update; True ends the epoch there (stats["interrupted"]). Returns the
    epoch's figures: train loss and top-1/top-5 against the unmixed labels (%), lr, strength, size,
    seconds, images/s, the fraction spent waiting for batches and the wait for the first one."""
    start_batch, step = state.batch, state.step
    parts.loaders.set_epoch(epoch, strength, start_batch=start_batch, size=size)  # reaches persistent workers
    if parts.mixer is not None:
        parts.mixer.set_strength(strength)
    lr = state.epoch_lr if start_batch else parts.optimizer.param_groups[0]["lr"]  # the epoch's starting lr
    meters, loss_fn = EpochMeters(state.meters, parts.device), SoftTargetCrossEntropy()
    bar = tqdm(total=end_batch - start_batch, desc=desc, leave=False, dynamic_ncols=True, disable=None)
    progress = Progress(parts, bar, desc, end_batch - start_batch)
    parts.net.train()
    parts.optimizer.zero_grad(set_to_none=True)
    start = ready = time.perf_counter()
    waited, first_batch_s, b, interrupted = 0.0, None, start_batch, False
    for b, (images, labels) in enumerate(parts.loaders.train, start=start_batch):
        waited += time.perf_counter() - ready  # blocked on the loader
        first_batch_s = time.perf_counter() - start if first_batch_s is None else first_batch_s
        if b >= end_batch:
            b -= 1
            break
        inputs, targets, labels, taught = device_batch(parts, images, labels, b)
        group = b - b % parts.accum_steps  # the first batch of this update; the epoch's last group may be short
        group_size = min(parts.accum_steps, end_batch - group)
        updates = b + 1 - group == group_size
        with parts.autocast(), _no_sync(parts.net, not updates):
            logits = parts.net(inputs)
            loss = loss_fn(logits.float(), targets)
            if parts.teacher is not None:  # its forward pass (or replay) is in the step: the time budget measures it
                loss = parts.teacher.loss(loss, logits, inputs, cached=taught)
        parts.scaler.scale(loss / group_size).backward()
        meters.add(loss, logits, labels, step)
        if updates:  # the optimizer update
            optimizer_step(parts)
            step += 1
            if scheduler is not None:
                scheduler.step_update(num_updates=step)
            if parts.ema is not None:
                parts.ema.update(parts.model, step=step)
            if step % parts.sync_every == 0:
                _host_sync(meters, parts.optimizer, bar, b + 1 - start_batch, start)
                progress.maybe(meters, parts.optimizer, b + 1 - start_batch, start)
            if b + 1 < end_batch and should_stop is not None and should_stop(step):
                interrupted = True
                break
        ready = time.perf_counter()
    _host_sync(meters, parts.optimizer, bar, b + 1 - start_batch, start)  # nothing non-finite is returned as trained
    bar.close()
    seconds = time.perf_counter() - start
    state.step, state.batch, state.meters, state.epoch_lr = step, b + 1, meters.state, lr
    return {
        **meters.averages(),
        "lr": lr,
        "aug_strength": strength,
        "train_size": size,
        "images_per_second": (b + 1 - start_batch) * parts.loaders.train.batch_size / max(seconds, 1e-9),
        "train_seconds": seconds,
        "data_wait_fraction": waited / max(seconds, 1e-9),
        "first_batch_seconds": first_batch_s or 0.0,
        "interrupted": interrupted,
    }


def optimizer_step(parts: Parts) -> None:
    """One optimizer update from the accumulated gradients: clipped (unscaled first) when asked,
    through the grad scaler (a no-op unless fp16), gradients cleared."""
    if parts.grad_clip > 0:
        parts.scaler.unscale_(parts.optimizer)
        torch.nn.utils.clip_grad_norm_(parts.model.parameters(), parts.grad_clip)
    parts.scaler.step(parts.optimizer)
    parts.scaler.update()
    parts.optimizer.zero_grad(set_to_none=True)


def device_batch(parts: Parts, images: torch.Tensor, labels: torch.Tensor, b: int):
    """uint8 batch `b` -> (inputs: augmented, normalised, channels-last, mixed, on the device; soft
    targets (B, num_classes); the unmixed labels; the cached teacher's probabilities, mixed as the
    images were, or None). With cached soft labels the batch shows the crops and flips they were
    computed on."""
    images = images.to(parts.device, non_blocking=True)
    labels = labels.to(parts.device, non_blocking=True)
    replay = parts.teacher.replay(parts.loaders, b) if parts.teacher is not None else None
    augment = parts.loaders.augment
    if augment is not None:
        images = augment(images, b, views=replay.views if replay is not None else None)
    images = parts.normalize(images)
    if parts.runtime.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    inputs, targets = soft_targets(images, labels, parts.mixer, parts.num_classes, parts.label_smoothing)
    lam = parts.mixer.lam if parts.mixer is not None else 1.0
    taught = replay.probs(parts.device, parts.num_classes, lam) if replay is not None else None
    return inputs, targets, labels, taught


def _no_sync(net: torch.nn.Module, skip: bool):
    """DDP: don't all-reduce gradients on the micro-batches before the last of an update."""
    inner = getattr(net, "_orig_mod", net)  # torch.compile wrapper
    if skip and isinstance(inner, torch.nn.parallel.DistributedDataParallel):
        return inner.no_sync()
    return contextlib.nullcontext()


class Progress:
    """Where no bar shows (a log file, nohup, `docker logs`, CI: tqdm hides itself off a terminal),
    on the console and in log.txt, one line every `parts.progress_every` seconds, at the sync points only (the
    figures are read there anyway): batches done, images/s, loss and top-1 so far, and when the
    epoch ends at this pace. Main process only."""

    def __init__(self, parts: Parts, bar, desc: str, total: int) -> None:
        self.every, self.desc, self.total = parts.progress_every, desc, total
        self.on = bool(self.every) and parts.ctx.is_main and bool(bar.disable)
        self.images_per_batch = parts.loaders.train.batch_size
        self.last = time.perf_counter()

    def maybe(self, meters: EpochMeters, optimizer, done: int, start: float) -> None:
        now = time.perf_counter()
        if not self.on or now - self.last < self.every:
            return
        self.last = now
        avg, elapsed = meters.averages(), max(now - start, 1e-9)
        left = (self.total - done) * elapsed / max(done, 1)
        log.info(
            "%s: %d/%d batches, %.0f img/s, loss %.3f, top-1 %.1f%%, lr %.2e, the epoch ends in ~%s",
            self.desc,
            done,
            self.total,
            done * self.images_per_batch / elapsed,
            avg["train_loss"],
            avg["train_top1"],
            optimizer.param_groups[0]["lr"],
            f"{left / 60:.1f} min" if left >= 90 else f"{left:.0f} s",
        )


def _host_sync(meters: EpochMeters, optimizer, bar, done: int, start: float) -> None:
    """The only place the step waits for the device: finiteness, then the progress bar (`done`
    batches since `start`)."""
    meters.check_finite(optimizer)
    if not bar.disable:  # no formatting work when the bar is hidden (logs, CI, torchrun ranks > 0)
        avg = meters.averages()
        bar.update(done - bar.n)
        bar.set_postfix(
            loss=f"{avg['train_loss']:.3f}",
            top1=f"{avg['train_top1']:.1f}",
            lr=f"{optimizer.param_groups[0]['lr']:.2e}",
            batches_per_s=f"{done / max(time.perf_counter() - start, 1e-9):.1f}",
        )
