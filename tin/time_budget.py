"""The run's plan and when it stops: how many optimizer updates it makes, --time_budget (which sizes
that number to minutes of wall clock on this machine), and the stop decisions the loop asks for.

Without a budget the plan is `--epochs` whole epochs. With `--time_budget M`, the run first
measures itself on this machine (``measure_costs``): seconds per update through the real step at
each training size of the progressive-resizing schedule, seconds per evaluation (val, EMA, TTA),
per checkpoint (a share of them per epoch under --save_every_min), per test prediction and for the
end's flip-TTA pass of --tta final. ``plan_updates`` then simulates the whole timeline and takes
the most updates whose predicted finish, final predictions included, fits the minutes left. The LR
schedule, the augmentation strength and the training size all follow the plan (its epoch count may
be fractional: the last epoch is cut short). The plan is stored in every checkpoint, so a resumed
run follows it exactly.

The loop asks one object, ``Timekeeper``: at each epoch's start it re-plans when the machine trains
at another speed than measured (each training size's time per update as observed here; sizes not
seen yet scaled by the drift seen so far); between updates ``should_stop`` says whether a signal
(Ctrl-C, SIGTERM) or the deadline ends the epoch — under torchrun, the same answer on every process.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import os
import signal
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
from tin.engine.state import TrainState
from tin.runtime import distributed
from utils import UserError

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
    (checkpoints), per evaluation (val, EMA val), per test prediction, per epoch start (loader), and
    the end's pass of --tta final (best.pth.tar on val and the test split, flipped; 0 otherwise)."""

    update_s: dict[int, float]
    epoch_end_s: float
    test_s: float
    epoch_start_s: float = 0.0
    eval_s: float = 0.0
    final_s: float = 0.0


def evaluated(epoch: int, epochs: float, eval_every: int) -> bool:
    """Whether 0-based `epoch` ends with an evaluation: every `eval_every` epochs and the last
    (eval_every 0: only the last)."""
    last = epoch + 1 >= math.ceil(epochs - 1e-9)
    return last or (eval_every > 0 and (epoch + 1) % eval_every == 0)


def epochs_plan(epochs: int, batches: int, accum_steps: int) -> Plan:
    """--epochs whole epochs of `batches` batches (the plan without a budget)."""
    upe = math.ceil(batches / accum_steps)
    return Plan(epochs * upe, upe, batches, accum_steps)


def predicted_seconds(
    updates: int,
    upe: int,
    costs: Costs,
    size_at: Callable[[int, float], int],
    test_every_epoch: bool,
    eval_every: int = 1,
    from_epoch: int = 0,
    save_every_s: float = 0.0,
) -> float:
    """Training + evaluation + checkpoints + predictions for a plan of `updates` (size_at(epoch,
    epochs)), from epoch `from_epoch` (0-based) to the end; checkpoints every `save_every_s` seconds
    (0: every epoch) and after the last epoch."""
    epochs = updates / upe
    n = math.ceil(epochs)
    total = after_training_seconds(costs, test_every_epoch)
    for e in range(from_epoch, n):
        epoch_s = _training_seconds(e, updates, upe, costs, size_at)
        if evaluated(e, epochs, eval_every):
            epoch_s += costs.eval_s + (costs.test_s if test_every_epoch else 0.0)
        # under a cadence an epoch end writes when save_every_s have passed: on average its share of them
        saved = 1.0 if e + 1 == n or not save_every_s else min(1.0, epoch_s / save_every_s)
        total += epoch_s + saved * costs.epoch_end_s
    return total


def after_training_seconds(costs: Costs, test_every_epoch: bool) -> float:
    """After the last epoch: --tta final's flipped pass (val and the test predictions), else the one
    test prediction of --test_preds end (none when each new best predicted already)."""
    if costs.final_s:
        return costs.final_s
    return 0.0 if test_every_epoch else costs.test_s


def _training_seconds(e: int, updates: int, upe: int, costs: Costs, size_at) -> float:
    """Epoch e's training alone (its start and its updates at its size) in a plan of `updates`."""
    k = min(upe, updates - e * upe)
    return costs.epoch_start_s + k * costs.update_s[size_at(e, updates / upe)]


def plan_updates(
    seconds_left: float,
    upe: int,
    max_updates: int,
    costs: Costs,
    size_at: Callable[[int, float], int],
    test_every_epoch: bool,
    eval_every: int = 1,
    done: int = 0,
    save_every_s: float = 0.0,
) -> tuple[int, float]:
    """The most updates (<= max_updates) predicted to fit `seconds_left`, and the prediction;
    `done` updates (whole epochs) are already behind, so only the epochs after them count, and
    the answer is `done` when not even one more update fits. Bisection: the predicted time grows
    with the number of updates (near enough: with eval_every > 1 a new last epoch adds an
    evaluation; the answer always fits)."""
    first = done // upe

    def cost(u: int) -> float:
        return predicted_seconds(u, upe, costs, size_at, test_every_epoch, eval_every, first, save_every_s)

    if cost(max_updates) <= seconds_left:
        return max_updates, cost(max_updates)
    lo, hi = done, max_updates  # cost(lo) fits (or lo = done), cost(hi) does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if cost(mid) <= seconds_left else (lo, mid)
    return lo, cost(lo) if lo > done else 0.0


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
) -> Costs:
    """Time the real step at each size (warm-up, then `timed` updates, timed from the first batch's
    arrival: the loader's start is an epoch's, not an update's), an evaluation (flipped with `tta`;
    `final_tta`: a flipped one too, for the end's pass of --tta final) and a checkpoint, then put
    every piece of state back: the run afterwards is exactly the run it would have been without the
    measurement."""
    saved = _snapshot(parts)
    try:
        update_s, starts = {}, []
        for size in sorted(set(sizes)):
            _train(parts, warmup, size)
            stats = _train(parts, timed, size)
            starts.append(stats["first_batch_seconds"])
            update_s[size] = (stats["train_seconds"] - stats["first_batch_seconds"]) / timed
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
            start = clock()
            continue
        seen += labels.shape[0]
        if i == batches:
            break
    _sync(parts.device)
    return (clock() - start) / seen if seen else 0.0


def _checkpoint_seconds(parts: train.Parts) -> float:
    start = clock()
    ckpt = {"state_dict": parts.model.state_dict(), "optimizer": parts.optimizer.state_dict()}
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint.write_checkpoint(ckpt, Path(tmp) / "probe.pth.tar")
    return clock() - start


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


# --------------------------------------------------------------------------- planning
def size_schedule(img_size: int, min_size: int, until: float) -> Callable[[int, float], int]:
    def size_at(epoch: int, epochs: float) -> int:
        return transforms.train_size_at(epoch, epochs, img_size, min_size, until)

    return size_at


def plan_run(cfg, parts: train.Parts, elapsed_s: float) -> Plan:
    """A new run's plan: --epochs whole epochs of this process's share of the data, or, with
    --time_budget, the most of them that fit the minutes left here (measured on `parts`, which are
    left as they were)."""
    full = parts.loaders.train.sampler.num_samples // cfg.batch_size
    base = epochs_plan(cfg.epochs, min(full, cfg.steps_per_epoch) if cfg.steps_per_epoch else full, cfg.accum_steps)
    if not cfg.time_budget:
        return base
    size_at = size_schedule(cfg.img_size, cfg.min_img_size, cfg.resize_until)
    budget, start = cfg.time_budget * 60.0, clock()
    sizes = sorted({size_at(e, base.epochs) for e in range(base.n_epochs)})
    test_images = len(parts.loaders.data.test) if parts.loaders.test is not None else 0
    final_tta = cfg.tta_end and not cfg.tta_each  # --tta final
    costs = measure_costs(parts, sizes, ema=cfg.ema, tta=cfg.tta_each, test_images=test_images, final_tta=final_tta)
    left = budget * (1 - MARGIN) - elapsed_s - (clock() - start)
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
        raise UserError(
            f"--time_budget {cfg.time_budget:g} min leaves no time to train: {elapsed_s + clock() - start:.0f} s went "
            f"on start-up and measuring, and one update with its evaluation takes {one:.0f} s here; give more minutes"
        )
    plan = dataclasses.replace(
        base,
        updates=updates,
        budget_s=budget,
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
        elapsed_s + clock() - start,
    )
    return plan


def replan(
    plan: Plan,
    *,
    step: int,
    elapsed_s: float,
    observed: dict[int, tuple[float, int]],
    size_at: Callable[[int, float], int],
    test_every_epoch: bool,
    eval_every: int,
    save_every_s: float = 0.0,
) -> Plan:
    """At an epoch start of a budgeted run, from `observed` {size: (seconds, updates)} trained at each
    size in this process: each observed size's time per update is what it took here; a size not seen
    yet keeps its measurement, scaled by the drift seen so far (observed seconds / measured seconds
    of the same updates, the plan's `slowness`). Evaluations, checkpoints and test predictions are
    taken to have slowed as training did, never to have sped up. Returns the plan with the most
    updates that still fit the budget (never beyond --epochs, never fewer than those done: the
    deadline then ends the run), or the same plan when its length would change by no more than
    REPLAN_THRESHOLD — so a steady machine keeps its plan, and a resumed run repeats an
    uninterrupted one exactly. The caller stretches the LR schedule (optim.Stretchable)."""
    costs, upe = costs_from_dict(plan.costs), plan.updates_per_epoch
    seen = {s: o for s, o in observed.items() if o[1] > 0 and s in costs.update_s}
    expected = sum(n * costs.update_s[s] for s, (_, n) in seen.items())
    if expected <= 0:
        return plan
    slowness = sum(t for t, _ in seen.values()) / expected
    worse = max(slowness, 1.0)
    update_s = {s: (seen[s][0] / seen[s][1] if s in seen else t * slowness) for s, t in costs.update_s.items()}
    scaled = Costs(
        update_s,
        costs.epoch_end_s * worse,
        costs.test_s * worse,
        costs.epoch_start_s * worse,
        costs.eval_s * worse,
        costs.final_s * worse,
    )
    left = plan.budget_s * (1 - MARGIN) - elapsed_s
    updates, predicted = plan_updates(
        left, upe, plan.max_updates, scaled, size_at, test_every_epoch, eval_every, done=step, save_every_s=save_every_s
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
        d.get("final_s", 0.0),  # plans saved before --tta final had no end pass
    )


def costs_dict(c: Costs) -> dict:
    return {
        "update_s": {int(k): round(v, 5) for k, v in c.update_s.items()},
        "epoch_end_s": round(c.epoch_end_s, 3),
        "eval_s": round(c.eval_s, 3),
        "test_s": round(c.test_s, 3),
        "epoch_start_s": round(c.epoch_start_s, 3),
        "final_s": round(c.final_s, 3),
    }


# --------------------------------------------------------------------------- stopping
class StopRequest:
    """SIGINT/SIGTERM: finish the current update, save, exit. A second Ctrl-C stops at once."""

    def __init__(self) -> None:
        self.signum = 0
        self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}

    def _handle(self, signum, frame) -> None:
        self.signum = signum
        signal.signal(signal.SIGINT, signal.default_int_handler)
        # os.write, not logging: a handler may interrupt a logging call that holds its lock
        os.write(2, f"\n{signal.Signals(signum).name}: stopping after the current update (again to abort)\n".encode())

    def restore(self) -> None:
        for s, handler in self._old.items():
            signal.signal(s, handler)


class Deadline:
    """When the rest would not fit: `start + budget` minus what must still happen after training
    (an evaluation, checkpoints, the test prediction, the end's flip pass). `elapsed_s`: the run's
    time before this process (a resumed run)."""

    def __init__(self, plan: Plan, elapsed_s: float) -> None:
        c = plan.costs
        self.enabled = plan.budget_s > 0
        self.end = clock() - elapsed_s + plan.budget_s
        reserve = ("epoch_end_s", "eval_s", "test_s", "final_s")
        self.base_reserve = sum(c.get(k, 0.0) for k in reserve) if self.enabled else 0.0
        self.reserve = self.base_reserve * max(plan.slowness, 1.0)
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
        return self.enabled and now + self.interval > self.end - self.reserve


class Timekeeper:
    """The time side of the loop, behind one object: the plan (re-planned at epoch starts), the
    deadline, and `should_stop(step)` — a signal or the deadline. Under torchrun every process asks
    at the same updates (every sync_every) and all get the same answer and the same reason, so they
    stop together and call the same collectives afterwards. `signal` and `deadline_hit` hold the
    agreed reason."""

    def __init__(self, plan: Plan, cfg, state: TrainState, started: float, ctx, device, sync_every: int) -> None:
        self.plan, self.ctx, self.device, self.sync_every = plan, ctx, device, sync_every
        self.origin = started - state.elapsed_s  # the run's time 0, across resumes
        self.deadline = Deadline(plan, clock() - self.origin)
        self.size_at = size_schedule(cfg.img_size, cfg.min_img_size, cfg.resize_until)
        self.test_every_epoch, self.eval_every = cfg.test_preds == "best", cfg.eval_every
        self.save_every_s = 60.0 * cfg.save_every_min
        self.signals = StopRequest()
        self.signal, self.deadline_hit = 0, False
        self.observed: dict[int, tuple[float, int]] = {}  # size -> (seconds, updates) trained in this process
        self.wanted_more = False  # the last re-plan would have lengthened the plan
        self.epoch_started = clock()

    def elapsed(self) -> float:
        return clock() - self.origin

    def epoch_start(self, state: TrainState, scheduler) -> None:
        """--time_budget: re-plan from what this process has seen so far (rank 0 decides for all); the
        schedule stretches or squeezes to end with the new plan. Shorter at once, when the rest would
        not fit; longer only when two epoch starts in a row call for it (a start-up measurement a few
        per cent off at one size is no reason to stretch the schedule back and forth)."""
        if self.plan.budget_s and self.observed and state.batch == 0:
            new = distributed.broadcast(
                replan(
                    self.plan,
                    step=state.step,
                    elapsed_s=self.elapsed(),
                    observed=self.observed,
                    size_at=self.size_at,
                    test_every_epoch=self.test_every_epoch,
                    eval_every=self.eval_every,
                    save_every_s=self.save_every_s,
                )
            )
            wants_more = new.updates > self.plan.updates
            if wants_more and not self.wanted_more:  # longer only on a lasting drift: two epoch starts in a row
                new = dataclasses.replace(self.plan, slowness=new.slowness)
            self.wanted_more = wants_more and new.updates == self.plan.updates  # asked, not granted yet
            self.deadline.slower(new.slowness)
            if new.updates != self.plan.updates:
                scheduler.replan(state.step, new.updates)
                log.info(
                    "--time_budget: this machine trains at %.2fx the measured time per update; re-planned to %d "
                    "updates = %.2f epochs (was %d)",
                    new.slowness,
                    new.updates,
                    new.epochs,
                    self.plan.updates,
                )
            self.plan = new
        self.deadline.epoch_start()
        self.epoch_started = clock()

    def epoch_trained(self, size: int, updates: int) -> None:
        """Record the epoch's training time at `size` (from epoch_start, less the loader's start as
        measured) for the next re-plan."""
        seconds = (
            clock() - self.epoch_started - costs_from_dict(self.plan.costs).epoch_start_s if self.plan.costs else 0.0
        )
        if updates > 0 and seconds > 0:
            t, n = self.observed.get(size, (0.0, 0))
            self.observed[size] = (t + seconds, n + updates)

    def should_stop(self, step: int) -> bool:
        """Asked after every update: a signal or the deadline (under torchrun, agreed every
        sync_every updates and never in between)."""
        if self.ctx.enabled and step % self.sync_every:
            return False
        self.signal, hit = (
            int(v) for v in distributed.agree([self.signals.signum, self.deadline.passed()], self.device)
        )
        self.deadline_hit = self.deadline_hit or bool(hit)
        return bool(self.signal) or self.deadline_hit

    def signalled(self) -> int:
        """At an epoch's end: the signal any process received (agreed), or 0."""
        self.signal = int(distributed.agree([self.signals.signum], self.device)[0])
        return self.signal

    def close(self) -> None:
        self.signals.restore()
