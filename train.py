"""Training: the parts of a run and ``train_one_epoch(parts, spec, ...) -> dict`` (optimizers,
schedules and the learning-rate recipes: optim.py).

One code path whether AMP is on or off (a disabled autocast and grad scaler are no-ops);
exactly one optimizer step per update (``accum_steps`` batches); the LR schedule advances per
update. The host reads from the device only every ``spec.sync_every`` updates (progress bar,
finiteness of the loss, the stop flag under torchrun), so on a GPU the next batch is loaded and
augmented while the current one computes. An epoch can stop at an update boundary (Ctrl-C, the
time budget) and later resume at that batch.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from timm.loss import SoftTargetCrossEntropy
from tqdm import tqdm

from tin import distributed, hardware
from transforms import Normalize, StrengthMixer, soft_targets
from utils import topk_correct


# --------------------------------------------------------------------------- the parts of a run
@dataclass
class Parts:
    """What the epochs need, built once by engine.build_parts."""

    model: torch.nn.Module  # the module whose weights are saved
    net: torch.nn.Module  # what is called: `model`, its DDP wrapper, or torch.compile of that
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    ema: Any  # timm ModelEmaV3 or None
    mixer: StrengthMixer | None
    normalize: Normalize
    loaders: Any  # batch_manager.Loaders
    runtime: Any  # hardware.Runtime: device, autocast dtype, memory format
    ctx: distributed.Context = field(default_factory=distributed.Context)
    params: int = 0
    gflops: float = 0.0

    @property
    def device(self) -> torch.device:
        return self.runtime.device

    @property
    def amp_dtype(self) -> torch.dtype | None:
        return self.runtime.amp_dtype

    def autocast(self):
        return hardware.autocast(self.device, self.amp_dtype)


@dataclass(frozen=True)
class StepSpec:
    """How an update is made, beyond the parts."""

    num_classes: int
    label_smoothing: float = 0.0
    accum_steps: int = 1
    grad_clip: float = 0.0
    sync_every: int = 25  # updates between host reads of the device (bar, finiteness, torchrun stop flag)


class EpochMeters:
    """Running sums of one epoch, kept on the device (summing never waits for the GPU). `state` reads
    them (a host sync) for checkpoints, so a resumed epoch reports what an uninterrupted one does."""

    def __init__(self, state: dict | None = None, device: torch.device | str = "cpu") -> None:
        s = state or {"loss": 0.0, "top1": 0.0, "top5": 0.0, "n": 0}
        self.sums = torch.zeros(3, dtype=torch.float64, device=device)  # made on the device: no host copy
        for i, key in enumerate(("loss", "top1", "top5")):
            if s[key]:  # a resumed epoch's sums: written as scalars, no host copy either
                self.sums[i] = s[key]
        self.n = int(s["n"])
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)  # first update with a non-finite loss

    def add(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, update: int) -> None:
        n = labels.shape[0]
        self.sums += torch.cat([(loss.detach().double() * n).view(1), topk_correct(logits.detach(), labels).double()])
        self.n += n
        bad = ~torch.isfinite(loss.detach()) & (self.first_bad < 0)
        self.first_bad = torch.where(bad, update, self.first_bad)

    @property
    def state(self) -> dict:
        loss, top1, top5 = self.sums.tolist()
        return {"loss": loss, "top1": top1, "top5": top5, "n": self.n}

    def averages(self) -> dict[str, float]:
        s, n = self.state, max(self.n, 1)
        return {"train_loss": s["loss"] / n, "train_top1": 100.0 * s["top1"] / n, "train_top5": 100.0 * s["top5"] / n}

    def check_finite(self, optimizer: torch.optim.Optimizer) -> None:
        """Raise at the first non-finite loss of the epoch so far (a host sync)."""
        bad = int(self.first_bad)
        if bad >= 0:
            raise FloatingPointError(
                f"the training loss became non-finite at update {bad} (lr {optimizer.param_groups[0]['lr']:.3g}); the "
                "last checkpoint is intact. Lower --lr_base, or add --grad_clip 1.0 or --warmup_epochs 2"
            )


# --------------------------------------------------------------------------- the epoch
def train_one_epoch(
    p: Parts,
    spec: StepSpec,
    *,
    step: int,
    start_batch: int,
    end_batch: int,
    meters: EpochMeters | None = None,
    should_stop: Callable[[int], bool] | None = None,
    desc: str = "train",
) -> dict[str, Any]:
    """Train on batches [start_batch, end_batch) of p.loaders.train (whose sampler already skips
    the first start_batch). `step` counts optimizer updates so far (the schedule's clock).
    `should_stop(step)` is asked after every update; True ends the epoch there (interrupted).

    Returns train loss and top-1/top-5 (against the unmixed labels, in %), images/s, seconds, the
    fraction of the time spent waiting for the next batch (data_wait_fraction), the update count
    `steps`, the batch reached `batch`, the running sums `meters` and `interrupted`."""
    p.net.train()
    loss_fn = SoftTargetCrossEntropy()
    meters = meters or EpochMeters(device=p.device)
    bar = tqdm(total=end_batch - start_batch, desc=desc, leave=False, dynamic_ncols=True, disable=None)
    start = ready = time.perf_counter()
    waited, b, interrupted = 0.0, start_batch, False
    p.optimizer.zero_grad(set_to_none=True)
    for b, (images, labels) in enumerate(p.loaders.train, start=start_batch):
        waited += time.perf_counter() - ready  # time blocked on the loader
        if b >= end_batch:
            b -= 1
            break
        inputs, targets, labels = _device_batch(p, spec, images, labels, b)
        group = b - b % spec.accum_steps  # first batch of this update's group; the epoch's last may be short
        group_size = min(spec.accum_steps, end_batch - group)
        updates = b + 1 - group == group_size
        with p.autocast(), _no_sync(p.net, not updates):
            logits = p.net(inputs)
            loss = loss_fn(logits.float(), targets)
        p.scaler.scale(loss / group_size).backward()
        meters.add(loss, logits, labels, step)
        if updates:
            step = _update(p, spec, step)
            if step % spec.sync_every == 0:
                _host_sync(meters, p.optimizer, bar, b + 1 - start_batch, start)
            if b + 1 < end_batch and should_stop is not None and should_stop(step):
                interrupted = True
                break
        ready = time.perf_counter()
    _host_sync(meters, p.optimizer, bar, b + 1 - start_batch, start)  # nothing non-finite is returned as trained
    bar.close()
    seconds, seen = time.perf_counter() - start, (b + 1 - start_batch) * p.loaders.train.batch_size
    return {
        **meters.averages(),
        "images_per_second": seen / max(seconds, 1e-9),
        "train_seconds": seconds,
        "data_wait_fraction": waited / max(seconds, 1e-9),
        "steps": step,
        "batch": b + 1,
        "meters": meters.state,
        "interrupted": interrupted,
    }


def _device_batch(p: Parts, spec: StepSpec, images, labels, b: int):
    """uint8 batch -> augmented (batch backend), normalised, channels-last, mixed inputs on the
    device, their soft targets (B, num_classes), and the unmixed labels."""
    images = images.to(p.device, non_blocking=True)
    labels = labels.to(p.device, non_blocking=True)
    augment = p.loaders.augment
    images = p.normalize(augment(images, b) if augment is not None else images)
    if p.runtime.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    inputs, targets = soft_targets(images, labels, p.mixer, spec.num_classes, spec.label_smoothing)
    return inputs, targets, labels


def _update(p: Parts, spec: StepSpec, step: int) -> int:
    """One optimizer update: unscale, clip, step, schedule, EMA. Returns the new update count."""
    if spec.grad_clip > 0:
        p.scaler.unscale_(p.optimizer)
        torch.nn.utils.clip_grad_norm_(p.model.parameters(), spec.grad_clip)
    p.scaler.step(p.optimizer)
    p.scaler.update()
    p.optimizer.zero_grad(set_to_none=True)
    step += 1
    p.scheduler.step_update(num_updates=step)
    if p.ema is not None:
        p.ema.update(p.model, step=step)
    return step


def _no_sync(net: torch.nn.Module, skip: bool):
    """DDP: don't all-reduce gradients on the micro-batches before the last of an update."""
    inner = getattr(net, "_orig_mod", net)  # torch.compile wrapper
    if skip and isinstance(inner, torch.nn.parallel.DistributedDataParallel):
        return inner.no_sync()
    return contextlib.nullcontext()


def _host_sync(meters: EpochMeters, optimizer, bar, done: int, start: float) -> None:
    """The only place the loop waits for the device: finiteness, then the progress bar (`done`
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
