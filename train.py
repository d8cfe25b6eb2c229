"""One training epoch: ``train_one_epoch(...) -> dict of floats``.

One code path whether AMP is on or off (a disabled autocast and grad scaler are no-ops) and
exactly one optimizer step per batch; the LR schedule is advanced per step.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from timm.loss import SoftTargetCrossEntropy
from tqdm import tqdm

from transforms import Normalize, StrengthMixer, soft_targets
from utils import AverageMeter, topk_correct


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
    desc: str = "train",
) -> dict[str, float]:
    """Train for one pass over `loader`. `step` is the global step count at the start (for the
    per-step schedule). Returns loss, top-1/top-5 (against the unmixed labels, in %), images/s,
    seconds and the global step count at the end."""
    model.train()
    loss_fn = SoftTargetCrossEntropy()
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    loss_meter, top1_meter, top5_meter = AverageMeter(), AverageMeter(), AverageMeter()
    seen, start = 0, time.perf_counter()
    bar = tqdm(loader, desc=desc, leave=False, dynamic_ncols=True)
    for images, labels in bar:
        images = normalize(images.to(device, non_blocking=True))
        labels = labels.to(device, non_blocking=True)
        inputs, targets = soft_targets(images, labels, mixer, num_classes, label_smoothing)
        scheduler.step_update(num_updates=step)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            logits = model(inputs)
            loss = loss_fn(logits.float(), targets)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"training loss became {loss.item()} at step {step}; lower --lr_base")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        step += 1
        n = labels.shape[0]
        seen += n
        loss_meter.update(loss.item(), n)
        top1, top5 = topk_correct(logits.detach(), labels, (1, 5))
        top1_meter.update(100.0 * top1 / n, n)
        top5_meter.update(100.0 * top5 / n, n)
        bar.set_postfix(
            loss=f"{loss_meter.avg:.3f}",
            top1=f"{top1_meter.avg:.1f}",
            ips=f"{seen / (time.perf_counter() - start):.0f}",
        )
    seconds = time.perf_counter() - start
    return {
        "train_loss": loss_meter.avg,
        "train_top1": top1_meter.avg,
        "train_top5": top5_meter.avg,
        "images_per_second": seen / max(seconds, 1e-9),
        "train_seconds": seconds,
        "steps": step,
    }
