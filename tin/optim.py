"""Optimizers and learning-rate schedules (timm's factories), and the learning-rate recipe table
that `--lr_base auto` and `--warmup_epochs auto` read.

Schedules are counted in optimizer updates (``step_update(n)``) over a run of a given number of
updates (tin.plan.budget.Plan), so a run planned to a fractional number of epochs decays exactly to its end.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

# timm is imported in the functions that use it: config takes its choice lists from here, and what only
# reads configs (report.py) need not load timm
OPTIMIZERS = ("adamw", "adam", "sgd")


def build_optimizer(
    model: torch.nn.Module, opt: str, lr: float, weight_decay: float, momentum: float = 0.9, nesterov: bool = False
) -> torch.optim.Optimizer:
    """timm's factory: weight decay is not applied to norm layers and biases."""
    from timm.optim import create_optimizer_v2

    if opt == "sgd":  # timm: 'momentum' = SGD with momentum, 'nesterov' = with Nesterov momentum
        name = "nesterov" if nesterov else "momentum"
        return create_optimizer_v2(model, name, lr=lr, weight_decay=weight_decay, momentum=momentum)
    return create_optimizer_v2(model, opt, lr=lr, weight_decay=weight_decay)


# --------------------------------------------------------------------------- LR schedules, per update
# Each takes (optimizer, total updates after warm-up, updates per epoch, the timm common kwargs,
# options); step and multistep count epochs, the others the whole run.
def _cosine(opt, total: int, per_epoch: int, common: dict, o: dict):
    from timm.scheduler import CosineLRScheduler

    return CosineLRScheduler(opt, t_initial=max(total, 1), lr_min=o["min_lr"], **common)


def _linear(opt, total: int, per_epoch: int, common: dict, o: dict):  # timm's poly schedule with power 1
    from timm.scheduler import PolyLRScheduler

    return PolyLRScheduler(opt, t_initial=max(total, 1), power=1.0, lr_min=o["min_lr"], **common)


def _step(opt, total: int, per_epoch: int, common: dict, o: dict):
    from timm.scheduler import StepLRScheduler

    return StepLRScheduler(opt, decay_t=o["step_size"] * per_epoch, decay_rate=o["gamma"], **common)


def _multistep(opt, total: int, per_epoch: int, common: dict, o: dict):
    # timm decays once t + 1 reaches a milestone; +1 makes the decay start exactly at epoch m
    from timm.scheduler import MultiStepLRScheduler

    steps = [int(round(m * per_epoch)) - common["warmup_t"] + 1 for m in o["milestones"]]
    return MultiStepLRScheduler(opt, decay_t=steps, decay_rate=o["gamma"], **common)


def _constant(opt, total: int, per_epoch: int, common: dict, o: dict):
    from timm.scheduler import StepLRScheduler

    return StepLRScheduler(opt, decay_t=float("inf"), decay_rate=1.0, **common)


SCHEDULES: dict[str, Callable] = {
    "cosine": _cosine,
    "linear": _linear,
    "step": _step,
    "multistep": _multistep,
    "none": _constant,
}


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    sched: str,
    total_updates: int,
    updates_per_epoch: int,
    *,
    warmup_epochs: float = 0.0,
    min_lr: float = 0.0,
    step_size: float = 30.0,
    gamma: float = 0.1,
    milestones: list[float] | None = None,
):
    """timm scheduler counted in optimizer updates (call ``step_update(n)``) over a run of
    `total_updates`; the warm-up is linear from lr/1000 and comes before the schedule proper."""
    warmup = int(round(warmup_epochs * updates_per_epoch))
    lr = optimizer.param_groups[0]["lr"]
    common = {"warmup_t": warmup, "warmup_lr_init": lr * 1e-3, "warmup_prefix": True, "t_in_epochs": False}
    options = {"min_lr": min_lr, "step_size": step_size, "gamma": gamma, "milestones": milestones or []}
    base = SCHEDULES[sched](optimizer, total_updates - warmup, updates_per_epoch, common, options)
    return Stretchable(base, total_updates)


class Stretchable:
    """A per-update schedule (timm's) whose remainder can be stretched or squeezed when a
    time-budgeted run re-plans its length: after a re-plan at update t0 to a new end, update t
    reads the base schedule at tau(t) = tau(t0) + (t - t0) * k, where k maps the new end onto the
    base schedule's end. The learning rate is continuous at t0 and reaches the base schedule's
    final value exactly at the new end (warm-up, cosine or linear decay alike). With no re-plan it
    is the base schedule. Its state (the base's and the re-plan points) goes into checkpoints."""

    def __init__(self, base, total: int) -> None:
        self.base, self.total = base, total  # the base schedule's length in updates
        self.knots: list[tuple[int, float, float]] = []  # (t0, tau(t0), k)

    def tau(self, t: float) -> float:
        for t0, tau0, k in reversed(self.knots):
            if t >= t0:
                return tau0 + (t - t0) * k
        return float(t)

    def step_update(self, num_updates: int, metric=None) -> None:
        self.base.step_update(num_updates=self.tau(num_updates))

    def replan(self, t0: int, new_total: int) -> None:
        """From update t0 on, the rest of the base schedule spreads over updates t0..new_total."""
        tau0 = self.tau(t0)
        self.knots.append((t0, tau0, max(self.total - tau0, 0.0) / max(new_total - t0, 1)))

    def state_dict(self) -> dict:
        return {"base": self.base.state_dict(), "total": self.total, "knots": [list(k) for k in self.knots]}

    def load_state_dict(self, state: dict) -> None:
        if "knots" not in state:  # a checkpoint from before re-planning existed: the base's state alone
            self.base.load_state_dict(state)
            return
        self.base.load_state_dict(state["base"])
        self.total, self.knots = state["total"], [tuple(k) for k in state["knots"]]


def updates_per_epoch(batches: int, accum_steps: int) -> int:
    return math.ceil(batches / accum_steps)


# --------------------------------------------------------------------------- learning-rate recipes
@dataclass(frozen=True)
class LrRecipe:
    lr_per_256: float  # peak rate for a global batch of 256 (linear scaling rule)
    warmup_epochs: float  # at most 10 % of the run
    why: str


# (group, pretrained, adaptive optimizer?) -> recipe; a model's group is its ArchSpec's lr_group
# (arch/__init__.py). From scratch, the rates are those the 2-epoch real-data comparison chose
# (bench/lr_recipes.py; README: Learning rates); pretrained keeps the original project's fine-tuning
# rate 2e-5 (AdamW, batch 128).
LR_RECIPES: dict[tuple[str, bool, bool], LrRecipe] = {
    ("cnn", False, True): LrRecipe(4e-3, 2, "CNN from scratch, AdamW"),
    ("mobile", False, True): LrRecipe(4e-3, 2, "mobile CNN from scratch, AdamW"),
    ("small", False, True): LrRecipe(4e-3, 2, "small CNN from scratch, AdamW"),
    ("vit", False, True): LrRecipe(1e-3, 5, "ViT/DeiT from scratch, AdamW"),
    ("swin", False, True): LrRecipe(5e-4, 5, "Swin from scratch, AdamW"),
    ("timm", False, True): LrRecipe(1e-3, 5, "other timm model from scratch, AdamW (not measured)"),
    ("*", True, True): LrRecipe(4e-5, 0, "pretrained weights, AdamW: the original project's 2e-5 at batch 128"),
    ("*", False, False): LrRecipe(0.1, 2, "from scratch, SGD: 0.1 per 256 images (Goyal et al., 2017)"),
    ("*", True, False): LrRecipe(0.01, 0, "pretrained weights, SGD: 0.01 per 256 images"),
}


def lr_recipe(group: str, pretrained: bool, opt: str) -> LrRecipe:
    adaptive = opt != "sgd"
    for key in ((group, pretrained, adaptive), ("*", pretrained, adaptive)):
        if key in LR_RECIPES:
            return LR_RECIPES[key]
    raise KeyError((group, pretrained, opt))
