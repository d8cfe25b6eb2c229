"""``Run``: a training run, complete — what tin/run/build.py makes and tin/run/loop.py trains; the
folder, the console and the sinks read it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import train
from tin import optim
from tin.config.schema import Config
from tin.engine.state import TrainState
from tin.plan.stop import Timekeeper
from tin.run.sinks import Sink


@dataclass
class Run:
    """A training run, complete: what loop.fit trains."""

    cfg: Config  # resolved: the numbers `auto` became
    parts: train.Parts  # what the updates need
    scheduler: optim.Stretchable  # the learning rate per update, over the plan
    clock: Timekeeper  # the plan, its re-planning, the deadline, signals
    state: TrainState  # where the run stands (a resumed run's position)
    run_dir: Path
    sinks: list[Sink] = field(default_factory=list)  # metrics.csv, wandb (the main process only)
    params: int = 0
    gflops: float = 0.0

    def close(self) -> None:
        self.clock.close()
        for sink in self.sinks:
            sink.close()
