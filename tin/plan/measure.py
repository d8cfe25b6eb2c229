"""The run measured on this machine for --time_budget: seconds per update through the real step at
each training size, per evaluation, per checkpoint and per test prediction, every piece of state put
back afterwards; and a new run's plan from those figures (``plan_run``)."""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import tempfile
from pathlib import Path

import torch

import train
import val
from tin import checkpoint
from tin.config.schema import Config
from tin.engine.state import TrainState
from tin.plan import budget
from tin.plan.budget import MARGIN, Costs, Plan, costs_dict, epochs_plan, plan_updates, size_schedule
from utils import UserError

log = logging.getLogger("tin")


# --------------------------------------------------------------------------- measuring the run on this machine
def measure_costs(
    parts: train.Parts,
    sizes: list[int],
    *,
    ema: bool,
    tta: bool,
    test_images: int,
    final_tta: bool = False,
    warmup: int = 3,
    timed: int = 5,
    deadline: float | None = None,
) -> Costs:
    """Time the real step at each size (warm-up, then `timed` updates, timed from the first batch's
    arrival: the loader's start is an epoch's, not an update's), an evaluation (flipped with `tta`;
    `final_tta`: a flipped one too, for the end's pass of --tta final) and a checkpoint, then put
    every piece of state back: the run afterwards is exactly the run it would have been without the
    measurement. Past `deadline` (budget.clock()'s time) it stops between pieces: OutOfTime."""
    saved = _snapshot(parts)
    started = budget.clock()
    try:
        update_s, starts = {}, []
        for i, size in enumerate(sorted(set(sizes))):
            _train(parts, warmup, size)
            stats = _train(parts, timed, size)
            starts.append(stats["first_batch_seconds"])
            update_s[size] = (stats["train_seconds"] - stats["first_batch_seconds"]) / timed
            if deadline is not None and budget.clock() > deadline:
                raise OutOfTime(budget.clock() - started, (i + 1) / (len(set(sizes)) + 1), update_s)
        per_image = _inference_seconds_per_image(parts, tta)
        flipped = _inference_seconds_per_image(parts, True) if final_tta else 0.0
        n_val = len(parts.loaders.data.val) if parts.loaders.val is not None else 0
        checkpoint_s = _checkpoint_seconds(parts)
    finally:
        _restore(parts, saved)
    return Costs(
        update_s,
        eval_s=n_val * per_image * (2 if ema else 1),
        epoch_end_s=2 * checkpoint_s,
        test_s=test_images * per_image,
        epoch_start_s=sorted(starts)[len(starts) // 2] if starts else 0.0,
        final_s=(n_val + test_images) * flipped,
    )


class OutOfTime(Exception):
    """Measuring ran past the budget: `seconds` spent on it, the `share` of it done, the seconds per
    update measured so far."""

    def __init__(self, seconds: float, share: float, update_s: dict[int, float]) -> None:
        super().__init__(f"measuring ran out of time after {seconds:.0f} s")
        self.seconds, self.share, self.update_s = seconds, share, update_s


def _train(parts: train.Parts, updates: int, size: int) -> dict:
    """`updates` updates at `size` and full strength (the dearest augmentation), no schedule."""
    return train.train_one_epoch(
        parts,
        None,
        TrainState(),
        epoch=0,
        end_batch=updates * parts.accum_steps,
        strength=1.0,
        size=size,
        desc="measuring",
    )


def _inference_seconds_per_image(parts: train.Parts, tta: bool, batches: int = 4) -> float:
    loader = parts.loaders.val if parts.loaders.val is not None else parts.loaders.test
    if loader is None:
        return 0.0
    seen, start = 0, None
    amp = parts.runtime.amp_dtype
    for i, (_, labels, _) in enumerate(val.forward(parts.model, loader, parts.normalize, parts.device, amp, tta)):
        if i == 0:  # the first batch warms up; time the rest
            _sync(parts.device)
            start = budget.clock()
            continue
        seen += labels.shape[0]
        if i == batches:
            break
    _sync(parts.device)
    return (budget.clock() - start) / seen if seen else 0.0


def _checkpoint_seconds(parts: train.Parts) -> float:
    start = budget.clock()
    ckpt = {"state_dict": parts.model.state_dict(), "optimizer": parts.optimizer.state_dict()}
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint.write_checkpoint(ckpt, Path(tmp) / "probe.pth.tar")
    return budget.clock() - start


def _snapshot(parts: train.Parts) -> dict:
    return {
        "model": copy.deepcopy(parts.model.state_dict()),
        "optimizer": copy.deepcopy(parts.optimizer.state_dict()),
        "scaler": parts.scaler.state_dict(),
        "ema": copy.deepcopy(parts.ema.state_dict()) if parts.ema is not None else None,
        "rng": checkpoint.rng_state(),
    }


def _restore(parts: train.Parts, s: dict) -> None:
    parts.model.load_state_dict(s["model"])
    parts.optimizer.load_state_dict(s["optimizer"])
    parts.scaler.load_state_dict(s["scaler"])
    if parts.ema is not None:
        parts.ema.load_state_dict(s["ema"])
    checkpoint.set_rng_state(s["rng"])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def plan_run(cfg: Config, parts: train.Parts, elapsed_s: float) -> Plan:
    """A new run's plan: --epochs whole epochs of this process's share of the data, or, with
    --time_budget, the most of them that fit the minutes left here (measured on `parts`, which are
    left as they were)."""
    full = parts.loaders.train.sampler.num_samples // cfg.batch_size
    base = epochs_plan(cfg.epochs, min(full, cfg.steps_per_epoch) if cfg.steps_per_epoch else full, cfg.accum_steps)
    if not cfg.time_budget:
        return base
    size_at = size_schedule(cfg.img_size, cfg.min_img_size, cfg.resize_until)
    budget_s, start = cfg.time_budget * 60.0, budget.clock()
    sizes = sorted({size_at(e, base.epochs) for e in range(base.n_epochs)})
    test_images = len(parts.loaders.data.test) if parts.loaders.test is not None else 0
    final_tta = cfg.tta_end and not cfg.tta_each  # --tta final
    deadline = start + budget_s * (1 - MARGIN) - elapsed_s
    try:
        costs = measure_costs(
            parts, sizes, ema=cfg.ema, tta=cfg.tta_each, test_images=test_images, final_tta=final_tta, deadline=deadline
        )
    except OutOfTime as out:
        spent = elapsed_s + budget.clock() - start
        needed = elapsed_s + out.seconds / out.share + 8 * max(out.update_s.values())  # measuring, then a few updates
        raise UserError(
            f"--time_budget {cfg.time_budget:g} min is spent before training could start: {spent:.0f} s went on "
            f"start-up and measuring this run here, and measuring it takes about {out.seconds / out.share:.0f} s on "
            f"this machine; give at least --time_budget {_minutes(needed / (1 - MARGIN))}"
        ) from None
    left = budget_s * (1 - MARGIN) - elapsed_s - (budget.clock() - start)
    test_every_epoch = cfg.test_preds == "best"
    updates, predicted = plan_updates(
        left,
        base.updates_per_epoch,
        base.updates,
        costs,
        size_at,
        test_every_epoch,
        cfg.eval_every,
        save_every_s=60.0 * cfg.save_every_min,
    )
    if updates < 1:
        one = min(costs.update_s.values()) + costs.epoch_end_s + costs.eval_s + costs.test_s + costs.final_s
        spent = elapsed_s + budget.clock() - start
        raise UserError(
            f"--time_budget {cfg.time_budget:g} min leaves no time to train: {spent:.0f} s went on start-up and "
            f"measuring, and one update with its evaluation takes {one:.0f} s here; give at least --time_budget "
            f"{_minutes((spent + one) / (1 - MARGIN))}"
        )
    plan = dataclasses.replace(
        base,
        updates=updates,
        budget_s=budget_s,
        predicted_s=round(predicted, 2),
        costs=costs_dict(costs),
        schedule_updates=updates,
        max_updates=base.updates,
    )
    per_update = ", ".join(f"{s}px {1000 * t:.0f} ms" for s, t in costs.update_s.items())
    log.info(
        "--time_budget %.4g min: measured %s per update, %.1f s per evaluation, %.1f s of checkpoints per %s, "
        "%.1f s per test prediction%s; plan: %d updates = %.2f epochs%s, predicted %.0f s of training and "
        "evaluation + %.0f s spent so far",
        cfg.time_budget,
        per_update,
        costs.eval_s,
        costs.epoch_end_s,
        f"write (every {cfg.save_every_min:g} min)" if cfg.save_every_min else "epoch",
        costs.test_s,
        f", {costs.final_s:.1f} s for the end's flip-TTA pass" if costs.final_s else "",
        updates,
        plan.epochs,
        " (--epochs caps it)" if updates == base.updates else "",
        predicted,
        elapsed_s + budget.clock() - start,
    )
    return plan


def _minutes(seconds: float) -> str:
    """A budget to suggest: `seconds` rounded up to a tenth of a minute."""
    return f"{math.ceil(seconds / 6) / 10:g}"
