"""Where training stands: the run's position and record (``TrainState``, saved in every checkpoint)
and the running sums of the unfinished epoch (``EpochMeters``)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from utils import topk_correct


@dataclass
class TrainState:
    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer updates done
    batch: int = 0  # batches done in the current (unfinished) epoch
    meters: dict | None = None  # running sums of the unfinished epoch
    best: dict = field(default_factory=lambda: {"val_top1": None, "best_epoch": 0})
    bad_epochs: int = 0  # epochs since the best (early stopping)
    history: list[dict] = field(default_factory=list)  # one metrics row per finished epoch
    wandb_id: str | None = None
    elapsed_s: float = 0.0  # the run's wall-clock seconds so far, across resumes (the time budget's clock)
    finished: bool = False  # the plan ran out, or early stopping / the time budget ended it
    epoch_lr: float | None = None  # the unfinished epoch's starting learning rate (its metrics row reports it)


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
