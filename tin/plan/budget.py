"""The run's plan, as pure arithmetic: how many optimizer updates it makes, and for --time_budget
the most updates whose predicted finish fits the minutes (no measuring here: tin/plan/measure.py
times the real step; tin/plan/stop.py ends and re-plans the run).

Without a budget the plan is `--epochs` whole epochs. With `--time_budget M`, the run first
measures itself on this machine: seconds per update through the real step at each training size
of the progressive-resizing schedule, seconds per evaluation (val, EMA, TTA), per checkpoint (a
share of them per epoch under --save_every_min), per test prediction and for the end's flip-TTA
pass of --tta final. ``plan_updates`` then simulates the whole timeline and takes the most updates
whose predicted finish, final predictions included, fits the minutes left. The LR schedule, the
augmentation strength and the training size all follow the plan (its epoch count may be
fractional: the last epoch is cut short). The plan is stored in every checkpoint, so a resumed run
follows it exactly. ``replan`` re-sizes it at an epoch's start when the machine trains at another
speed than measured (each training size's time per update as observed; sizes not seen yet scaled
by the drift seen so far).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import transforms

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


# --------------------------------------------------------------------------- planning
def size_schedule(img_size: int, min_size: int, until: float) -> Callable[[int, float], int]:
    def size_at(epoch: int, epochs: float) -> int:
        return transforms.train_size_at(epoch, epochs, img_size, min_size, until)

    return size_at


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
