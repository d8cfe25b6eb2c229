"""When the run stops: a signal (Ctrl-C, SIGTERM) or the deadline between updates, the same answer on
every process under torchrun; and the re-planning at each epoch's start (``Timekeeper``)."""

from __future__ import annotations

import dataclasses
import logging
import os
import signal

import torch

from tin.config.schema import Config
from tin.engine.state import TrainState
from tin.plan import budget
from tin.plan.budget import Plan, costs_from_dict, replan, size_schedule
from tin.runtime import distributed

log = logging.getLogger("tin")


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
        self.end = budget.clock() - elapsed_s + plan.budget_s
        reserve = ("epoch_end_s", "eval_s", "test_s", "final_s")
        self.base_reserve = sum(c.get(k, 0.0) for k in reserve) if self.enabled else 0.0
        self.reserve = self.base_reserve * max(plan.slowness, 1.0)
        self.last, self.interval = None, 0.0  # the previous check, and the time between the last two

    def epoch_start(self) -> None:
        """Training resumes after an evaluation: the next interval is measured from here."""
        self.last = budget.clock()

    def slower(self, slowness: float) -> None:
        """The machine runs `slowness` times the measured time: so will the last evaluation."""
        self.reserve = self.base_reserve * max(slowness, 1.0)

    def passed(self) -> bool:
        """Asked between updates: True once the next stretch of training (as long as the last one
        between two checks) would eat into the reserve."""
        now = budget.clock()
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

    def __init__(
        self,
        plan: Plan,
        cfg: Config,
        state: TrainState,
        started: float,
        ctx: distributed.Context,
        device: torch.device,
        sync_every: int,
    ) -> None:
        self.plan, self.ctx, self.device, self.sync_every = plan, ctx, device, sync_every
        self.origin = started - state.elapsed_s  # the run's time 0, across resumes
        self.deadline = Deadline(plan, budget.clock() - self.origin)
        self.size_at = size_schedule(cfg.img_size, cfg.min_img_size, cfg.resize_until)
        self.test_every_epoch, self.eval_every = cfg.test_preds == "best", cfg.eval_every
        self.save_every_s = 60.0 * cfg.save_every_min
        self.signals = StopRequest()
        self.signal, self.deadline_hit = 0, False
        self.observed: dict[int, tuple[float, int]] = {}  # size -> (seconds, updates) trained in this process
        self.wanted_more = False  # the last re-plan would have lengthened the plan
        self.epoch_started = budget.clock()

    def elapsed(self) -> float:
        return budget.clock() - self.origin

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
        self.epoch_started = budget.clock()

    def epoch_trained(self, size: int, updates: int) -> None:
        """Record the epoch's training time at `size` (from epoch_start, less the loader's start as
        measured) for the next re-plan."""
        seconds = (
            budget.clock() - self.epoch_started - costs_from_dict(self.plan.costs).epoch_start_s
            if self.plan.costs
            else 0.0
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
