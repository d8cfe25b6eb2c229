"""The run's plan: how many optimizer updates it makes, and --time_budget, which sizes that
number to minutes of wall clock on this machine.

Without a budget the plan is `--epochs` whole epochs. With `--time_budget M`, the run first
measures itself on this machine (``measure_costs``): seconds per update through the real
trainer at each training size of the progressive-resizing schedule, seconds per evaluation
(val, EMA, TTA), per checkpoint and per test prediction. ``plan_updates`` then simulates the
whole timeline and takes the most updates whose predicted finish, final predictions included,
fits the minutes left. The LR schedule, the augmentation strength and the training size all
follow the plan (its epoch count may be fractional: the last epoch is cut short). The plan is
stored in every checkpoint, so a resumed run follows it exactly; a ``Deadline`` stops training
early, at an update boundary, if the machine turns out slower than measured, leaving time for
the final evaluation and predictions.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

import train
import transforms
import val
from tin import checkpoint

log = logging.getLogger("tin")

clock: Callable[[], float] = time.perf_counter  # tests replace it with a controlled clock
MARGIN = 0.015  # of the budget, kept free for what the measurements miss (logging, jitter)
REPLAN_THRESHOLD = 0.02  # a re-plan changes the plan's length by more than this, or the plan stays


@dataclass(frozen=True)
class Plan:
    """The run's length in optimizer updates; epochs are `updates_per_epoch` updates each (the
    last may be shorter). budget_s = 0: not budgeted."""

    updates: int
    updates_per_epoch: int
    batches_per_epoch: int
    accum_steps: int = 1
    budget_s: float = 0.0
    predicted_s: float = 0.0
    costs: dict = field(default_factory=dict)
    schedule_updates: int = 0  # the LR schedule's own length (the first plan's); re-plans stretch it
    max_updates: int = 0  # --epochs' worth: re-plans never go beyond
    slowness: float = 1.0  # the machine's time per update against the start's measurement (re-plans)

    def __post_init__(self) -> None:
        object.__setattr__(self, "schedule_updates", self.schedule_updates or self.updates)
        object.__setattr__(self, "max_updates", self.max_updates or self.updates)

    @property
    def epochs(self) -> float:
        """The run's length in epochs (fractional when budgeted): what the schedules use."""
        return self.updates / self.updates_per_epoch

    @property
    def n_epochs(self) -> int:
        return math.ceil(self.updates / self.updates_per_epoch)

    def end_batch(self, epoch: int) -> int:
        """Batches trained in `epoch` (0-based): all but in the last, cut-short epoch."""
        left = self.updates - epoch * self.updates_per_epoch
        return min(self.batches_per_epoch, max(left, 0) * self.accum_steps)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Plan:
        return cls(**d)


@dataclass(frozen=True)
class Costs:
    """Seconds, measured on this machine: per update at each training size, per epoch end
    (checkpoints), per evaluation (val, EMA val), per test prediction, per epoch start (loader)."""

    update_s: dict[int, float]
    epoch_end_s: float
    test_s: float
    epoch_start_s: float = 0.0
    eval_s: float = 0.0


def evaluated(epoch: int, epochs: float, eval_every: int) -> bool:
    """Whether 0-based `epoch` ends with an evaluation: every `eval_every` epochs and the last
    (eval_every 0: only the last)."""
    last = epoch + 1 >= math.ceil(epochs - 1e-9)
    return last or (eval_every > 0 and (epoch + 1) % eval_every == 0)


def epochs_plan(epochs: int, updates_per_epoch: int, batches_per_epoch: int, accum_steps: int) -> Plan:
    return Plan(epochs * updates_per_epoch, updates_per_epoch, batches_per_epoch, accum_steps)


def predicted_seconds(
    updates: int,
    upe: int,
    costs: Costs,
    size_at: Callable[[int, float], int],
    test_every_epoch: bool,
    eval_every: int = 1,
    from_epoch: int = 0,
) -> float:
    """Training + evaluation + predictions for a plan of `updates` (size_at(epoch, epochs)), from
    epoch `from_epoch` (0-based) to the end."""
    epochs = updates / upe
    total = 0.0 if test_every_epoch else costs.test_s
    for e in range(from_epoch, math.ceil(epochs)):
        total += _epoch_seconds(e, updates, upe, costs, size_at, test_every_epoch, eval_every)
    return total


def _training_seconds(e: int, updates: int, upe: int, costs: Costs, size_at) -> float:
    """Epoch e's training alone (its start and its updates at its size) in a plan of `updates`."""
    k = min(upe, updates - e * upe)
    return costs.epoch_start_s + k * costs.update_s[size_at(e, updates / upe)]


def _epoch_seconds(
    e: int, updates: int, upe: int, costs: Costs, size_at, test_every_epoch: bool, eval_every: int
) -> float:
    epochs = updates / upe
    seconds = _training_seconds(e, updates, upe, costs, size_at) + costs.epoch_end_s
    if evaluated(e, epochs, eval_every):
        seconds += costs.eval_s + (costs.test_s if test_every_epoch else 0.0)
    return seconds


def plan_updates(
    seconds_left: float,
    upe: int,
    max_updates: int,
    costs: Costs,
    size_at: Callable[[int, float], int],
    test_every_epoch: bool,
    eval_every: int = 1,
    done: int = 0,
) -> tuple[int, float]:
    """The most updates (<= max_updates) predicted to fit `seconds_left`, and the prediction;
    `done` updates (whole epochs) are already behind, so only the epochs after them count, and
    the answer is `done` when not even one more update fits. Bisection: the predicted time grows
    with the number of updates (near enough: with eval_every > 1 a new last epoch adds an
    evaluation; the answer always fits)."""
    first = done // upe

    def cost(u: int) -> float:
        return predicted_seconds(u, upe, costs, size_at, test_every_epoch, eval_every, from_epoch=first)

    if cost(max_updates) <= seconds_left:
        return max_updates, cost(max_updates)
    lo, hi = done, max_updates  # cost(lo) fits (or lo = done), cost(hi) does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if cost(mid) <= seconds_left else (lo, mid)
    return lo, cost(lo) if lo > done else 0.0


# --------------------------------------------------------------------------- measuring the run on this machine
def measure_costs(
    p: train.Parts,
    spec: train.StepSpec,
    sizes: list[int],
    *,
    ema: bool,
    tta: bool,
    test_images: int,
    warmup: int = 3,
    timed: int = 5,
) -> Costs:
    """Time the real trainer at each size (warm-up, then `timed` updates), an evaluation and a
    checkpoint, then put every piece of state back: the run afterwards is exactly the run
    it would have been without the measurement."""
    saved = _snapshot(p)
    try:
        update_s, starts = {}, []
        for size in sorted(set(sizes)):
            p.loaders.set_epoch(0, 1.0, start_batch=0, size=size)  # full strength: the dearest augmentation
            if p.mixer is not None:
                p.mixer.set_strength(1.0)
            first = _train(p, spec, warmup)
            starts.append(first["data_wait_fraction"] * first["train_seconds"])
            update_s[size] = _train(p, spec, timed)["train_seconds"] / timed
        per_image = _inference_seconds_per_image(p, tta)
        n_val = len(p.loaders.data.val) if p.loaders.val is not None else 0
        checkpoint_s = _checkpoint_seconds(p)
    finally:
        _restore(p, saved)
    evals = n_val * per_image * (2 if ema else 1)
    return Costs(
        update_s,
        eval_s=evals,
        epoch_end_s=2 * checkpoint_s,
        test_s=test_images * per_image,
        epoch_start_s=min(starts) if starts else 0.0,
    )


def _train(p: train.Parts, spec: train.StepSpec, updates: int) -> dict:
    return train.train_one_epoch(p, spec, step=0, start_batch=0, end_batch=updates * spec.accum_steps, desc="measuring")


def _inference_seconds_per_image(p: train.Parts, tta: bool, batches: int = 4) -> float:
    loader = p.loaders.val if p.loaders.val is not None else p.loaders.test
    if loader is None:
        return 0.0
    seen, start = 0, None
    evaluated = val.batches(p.model, loader, p.normalize, p.device, p.amp_dtype, "measuring", tta)
    for i, (_, labels) in enumerate(evaluated):
        if i == 0:  # the first batch warms up; time the rest
            _sync(p.device)
            start = clock()
            continue
        seen += labels.shape[0]
        if i == batches:
            break
    _sync(p.device)
    return (clock() - start) / seen if seen else 0.0


def _checkpoint_seconds(p: train.Parts) -> float:
    start = clock()
    ckpt = {"state_dict": p.model.state_dict(), "optimizer": p.optimizer.state_dict()}
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint.write_checkpoint(ckpt, Path(tmp) / "probe.pth.tar")
    return clock() - start


def _snapshot(p: train.Parts) -> dict:
    return {
        "model": copy.deepcopy(p.model.state_dict()),
        "optimizer": copy.deepcopy(p.optimizer.state_dict()),
        "scheduler": p.scheduler.state_dict(),
        "scaler": p.scaler.state_dict(),
        "ema": copy.deepcopy(p.ema.state_dict()) if p.ema is not None else None,
        "rng": checkpoint.rng_state(),
    }


def _restore(p: train.Parts, s: dict) -> None:
    p.model.load_state_dict(s["model"])
    p.optimizer.load_state_dict(s["optimizer"])
    p.scheduler.load_state_dict(s["scheduler"])
    p.scheduler.step_update(num_updates=0)
    p.scaler.load_state_dict(s["scaler"])
    if p.ema is not None:
        p.ema.load_state_dict(s["ema"])
    checkpoint.set_rng_state(s["rng"])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------- the plan for a budgeted run
def make_plan(
    p: train.Parts,
    spec: train.StepSpec,
    base: Plan,
    *,
    minutes: float,
    elapsed_s: float,
    size_at: Callable[[int, float], int],
    ema: bool,
    tta: bool,
    test_every_epoch: bool,
    eval_every: int = 1,
) -> Plan:
    """Measure, then size `base` (the --epochs plan, an upper bound) to the minutes left."""
    budget = minutes * 60.0
    start = clock()
    sizes = sorted({size_at(e, base.epochs) for e in range(base.n_epochs)})
    test_images = len(p.loaders.data.test) if p.loaders.test is not None else 0
    costs = measure_costs(p, spec, sizes, ema=ema, tta=tta, test_images=test_images)
    left = budget * (1 - MARGIN) - elapsed_s - (clock() - start)
    updates, predicted = plan_updates(
        left, base.updates_per_epoch, base.updates, costs, size_at, test_every_epoch, eval_every
    )
    if updates < 1:
        raise_too_short(minutes, costs, elapsed_s + clock() - start)
    plan = Plan(
        updates,
        base.updates_per_epoch,
        base.batches_per_epoch,
        base.accum_steps,
        budget_s=budget,
        predicted_s=round(predicted, 2),
        costs=_costs_dict(costs),
        max_updates=base.updates,
    )
    per_update = ", ".join(f"{s}px {1000 * t:.0f} ms" for s, t in costs.update_s.items())
    log.info(
        "--time_budget %.4g min: measured %s per update, %.1f s per evaluation, %.1f s of checkpoints per epoch, "
        "%.1f s per test prediction; "
        "plan: %d updates = %.2f epochs%s, predicted %.0f s of training and evaluation + %.0f s spent so far",
        minutes,
        per_update,
        costs.eval_s,
        costs.epoch_end_s,
        costs.test_s,
        updates,
        plan.epochs,
        " (--epochs caps it)" if updates == base.updates else "",
        predicted,
        elapsed_s + clock() - start,
    )
    return plan


def replan(
    plan: Plan,
    *,
    step: int,
    elapsed_s: float,
    window: tuple[int, float],
    trained_s: float,
    size_at: Callable[[int, float], int],
    test_every_epoch: bool,
    eval_every: int,
) -> Plan:
    """At an epoch start of a budgeted run: how much slower (or faster) than measured at the start
    has the machine trained since `window` = (update, elapsed seconds) a whole number of epochs ago
    (`trained_s`: the seconds spent in those epochs' training, against the measured seconds per
    update)? With that speed for everything that is left, the most updates that still fit the
    budget (never beyond --epochs; never fewer than one more: then the deadline ends the run).
    Returns the plan, re-planned when its length changes by more than REPLAN_THRESHOLD; the caller
    stretches the LR schedule (optim.Stretchable)."""
    costs, upe = costs_from_dict(plan.costs), plan.updates_per_epoch
    expected = sum(
        _training_seconds(e, plan.updates, upe, costs, size_at) for e in range(window[0] // upe, step // upe)
    )
    if expected <= 0 or trained_s <= 0:
        return plan
    slowness = trained_s / expected
    # what was not measured again (evaluation, checkpoints, test predictions) is taken to have slowed
    # as training did, never to have sped up: a faster machine must not spend its last evaluation's time
    worse = max(slowness, 1.0)
    scaled = Costs(
        {k: v * slowness for k, v in costs.update_s.items()},
        costs.epoch_end_s * worse,
        costs.test_s * worse,
        costs.epoch_start_s * worse,
        costs.eval_s * worse,
    )
    left = plan.budget_s * (1 - MARGIN) - elapsed_s
    updates, predicted = plan_updates(
        left, upe, plan.max_updates, scaled, size_at, test_every_epoch, eval_every, done=step
    )
    if updates <= step or abs(updates - plan.updates) <= max(1, REPLAN_THRESHOLD * plan.updates):
        return dataclasses.replace(plan, slowness=round(slowness, 4))
    return dataclasses.replace(
        plan, updates=updates, slowness=round(slowness, 4), predicted_s=round(elapsed_s + predicted, 2)
    )


def costs_from_dict(d: dict) -> Costs:
    return Costs(
        {int(k): v for k, v in d["update_s"].items()},
        d["epoch_end_s"],
        d["test_s"],
        d.get("epoch_start_s", 0.0),
        d.get("eval_s", 0.0),
    )


def raise_too_short(minutes: float, costs: Costs, spent: float) -> None:
    from utils import UserError

    one = min(costs.update_s.values()) + costs.epoch_end_s + costs.eval_s + costs.test_s
    raise UserError(
        f"--time_budget {minutes:g} min leaves no time to train: {spent:.0f} s went on start-up and "
        f"measuring, and one update with its evaluation takes {one:.0f} s here; give more minutes"
    )


def _costs_dict(c: Costs) -> dict:
    return {
        "update_s": {int(k): round(v, 5) for k, v in c.update_s.items()},
        "epoch_end_s": round(c.epoch_end_s, 3),
        "eval_s": round(c.eval_s, 3),
        "test_s": round(c.test_s, 3),
        "epoch_start_s": round(c.epoch_start_s, 3),
    }


class Deadline:
    """Stops training when the rest would not fit: at `start + budget` minus what must still
    happen after training (an evaluation, checkpoints, the test prediction). `elapsed_s` is the
    run's time before this process (a resumed run)."""

    def __init__(self, plan: Plan, elapsed_s: float) -> None:
        c = plan.costs
        self.enabled = plan.budget_s > 0
        self.end = clock() - elapsed_s + plan.budget_s
        self.base_reserve = sum(c.get(k, 0.0) for k in ("epoch_end_s", "eval_s", "test_s")) if self.enabled else 0.0
        self.reserve = self.base_reserve * max(plan.slowness, 1.0)
        self.hit = False
        self.last, self.interval = None, 0.0  # the previous check, and the time between the last two

    def epoch_start(self) -> None:
        """Training resumes after an evaluation: the next interval is measured from here."""
        self.last = clock()

    def slower(self, slowness: float) -> None:
        """The machine runs `slowness` times the measured time: so will the last evaluation."""
        self.reserve = self.base_reserve * max(slowness, 1.0)

    def passed(self) -> bool:
        """Asked between updates: True once the next stretch of training (as long as the last one
        between two checks) would eat into the reserve."""
        now = clock()
        if self.last is not None:
            self.interval = now - self.last
        self.last = now
        if self.enabled and not self.hit and now + self.interval > self.end - self.reserve:
            self.hit = True
        return self.hit

    def left(self) -> float:
        return self.end - clock()


def size_schedule(img_size: int, min_size: int, until: float) -> Callable[[int, float], int]:
    def size_at(epoch: int, epochs: float) -> int:
        return transforms.train_size_at(epoch, epochs, img_size, min_size, until)

    return size_at
