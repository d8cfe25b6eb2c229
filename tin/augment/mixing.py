"""CutMix and MixUp at the progressive schedule's strength, and the soft targets every batch trains on
(one path whether a batch is mixed or not). Built on timm's Mixup settings and public helpers."""

from __future__ import annotations

import numpy as np
import torch
from timm.data import Mixup
from timm.data.mixup import cutmix_bbox_and_lam, mixup_target


class StrengthMixer:
    """timm's Mixup/CutMix whose application probability and Beta parameters follow strength s.

    At strength s: P(mix a batch) = s * mix_prob, MixUp alpha = s * mixup_alpha,
    CutMix alpha = s * cutmix_alpha. Small alphas put Beta(a, a) mass near 0 and 1, so a weak
    mix barely changes the batch. Returns soft targets (B, num_classes) that sum to one.
    """

    def __init__(
        self, mixup_alpha: float, cutmix_alpha: float, mix_prob: float, label_smoothing: float, num_classes: int
    ) -> None:
        self.base = {"mixup_alpha": mixup_alpha, "cutmix_alpha": cutmix_alpha, "mix_prob": mix_prob}
        # timm's Mixup holds the settings (public attributes); the batch is mixed in __call__ below
        self.mixup = Mixup(
            mixup_alpha=mixup_alpha,
            cutmix_alpha=cutmix_alpha,
            prob=mix_prob,
            switch_prob=0.5,
            mode="batch",
            label_smoothing=label_smoothing,
            num_classes=num_classes,
        )
        self.set_strength(0.0)
        self.lam = 1.0

    def set_strength(self, s: float) -> None:
        self.strength = float(s)
        self.mixup.mixup_alpha = self.base["mixup_alpha"] * s
        self.mixup.cutmix_alpha = self.base["cutmix_alpha"] * s
        self.mixup.mix_prob = self.base["mix_prob"] * s if s > 0 else 0.0

    def __call__(self, x: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """timm's Mixup in mode "batch": x mixed in place, image i with image B-1-i, weight `lam` for
        its own (1: not mixed); `lam` is kept, so cached soft labels can be mixed the same way.

        Written out from timm's public helpers instead of calling ``Mixup._mix_batch``: that one is
        private (the same from timm 0.2.1 of 2020 to 1.0.31 and timm's main, but free to change in
        any release, and the GPU images bring their own timm), and the public ``Mixup.__call__``
        returns no `lam` and asserts an even batch (a last batch may be odd). Same draws in the same
        order from numpy's global stream, same CutMix box and area-corrected `lam` as timm's."""
        m = self.mixup
        lam, cutmix = self._draw()
        if lam != 1.0 and cutmix:
            box, lam = cutmix_bbox_and_lam(x.shape, lam, ratio_minmax=m.cutmix_minmax, correct_lam=m.correct_lam)
            yl, yh, xl, xh = box
            x[:, :, yl:yh, xl:xh] = x.flip(0)[:, :, yl:yh, xl:xh]
        elif lam != 1.0:
            partner = x.flip(0).mul_(1.0 - lam)  # before x is scaled in place
            x.mul_(lam).add_(partner)
        self.lam = float(lam)
        return x, mixup_target(target, m.num_classes, self.lam, m.label_smoothing)

    def _draw(self) -> tuple[float, bool]:
        """(lam, CutMix?) for one batch, as timm's ``Mixup._params_per_batch`` draws them: mix with
        probability mix_prob; CutMix with probability switch_prob when both alphas are on; lam from
        Beta(alpha, alpha) of the one chosen."""
        m = self.mixup
        if not (m.mixup_enabled and np.random.rand() < m.mix_prob):
            return 1.0, False
        cutmix = m.cutmix_alpha > 0 and (m.mixup_alpha <= 0 or np.random.rand() < m.switch_prob)
        alpha = m.cutmix_alpha if cutmix else m.mixup_alpha
        return float(np.random.beta(alpha, alpha)), cutmix


def build_mixer(
    mixup_alpha: float, cutmix_alpha: float, mix_prob: float, label_smoothing: float, num_classes: int
) -> StrengthMixer | None:
    """None when mixing is off (both alphas or the probability zero)."""
    if mix_prob <= 0 or (mixup_alpha <= 0 and cutmix_alpha <= 0):
        return None
    return StrengthMixer(mixup_alpha, cutmix_alpha, mix_prob, label_smoothing, num_classes)


def soft_targets(
    x: torch.Tensor, target: torch.Tensor, mixer: StrengthMixer | None, num_classes: int, smoothing: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, labels) -> (maybe mixed images, soft targets (B, C)). One path with or without mixing."""
    if mixer is not None:
        return mixer(x, target)
    return x, mixup_target(target, num_classes, lam=1.0, smoothing=smoothing)
