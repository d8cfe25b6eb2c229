"""Augmentation: albumentations pipelines as pure functions of (image size, strength s),
the strength schedule, on-device normalisation, and the CutMix/MixUp batch mixer.

Strength s in [0, 1] scales every probability and magnitude: s = 0 is (near) identity,
s = 1 is the full recipe. Pipelines work on uint8 HWC arrays and return uint8 CHW tensors;
the float conversion and normalisation happen on the device, batched (see ``Normalize``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import albumentations as A
import numpy as np
import torch
from timm.data import Mixup
from timm.data.mixup import mixup_target

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Pipeline = Callable[[np.ndarray], np.ndarray]


def strength_at(epoch: int, epochs: int, schedule: str = "cosine", ceiling: float = 1.0) -> float:
    """Augmentation strength for 0-based `epoch` of `epochs`.

    cosine (the seed's): s = 1 - cos(pi/2 * epoch/epochs), slow start, 0 -> ~1;
    linear: s = epoch/epochs; constant: s = ceiling. Scaled by `ceiling` in every case.
    """
    progress = min(max(epoch / max(epochs, 1), 0.0), 1.0)
    if schedule == "cosine":
        s = 1.0 - math.cos(math.pi / 2 * progress)
    elif schedule == "linear":
        s = progress
    elif schedule == "constant":
        s = 1.0
    else:
        raise ValueError(f"unknown aug schedule {schedule!r}; use cosine, linear or constant")
    return float(min(max(s * ceiling, 0.0), 1.0))


def train_pipeline(img_size: int, strength: float) -> A.Compose:
    """Random crop/flip/affine/colour/erasing, each scaled by strength s."""
    s = float(strength)
    return A.Compose(
        [
            # s = 0: scale (1, 1) and ratio (1, 1) -> the whole image, only resized.
            A.RandomResizedCrop(
                size=(img_size, img_size), scale=(1.0 - 0.65 * s, 1.0), ratio=(1 - 0.25 * s, 1 + 0.33 * s), p=1.0
            ),
            A.HorizontalFlip(p=0.5 * s),
            A.Affine(rotate=(-15 * s, 15 * s), shear=(-8 * s, 8 * s), border_mode=0, p=0.5 * s),
            A.ColorJitter(brightness=0.4 * s, contrast=0.4 * s, saturation=0.4 * s, hue=min(0.1 * s, 0.5), p=0.8 * s),
            A.ToGray(p=0.1 * s),
            A.CoarseDropout(
                num_holes_range=(1, 1),
                hole_height_range=(0.1, 0.1 + 0.3 * s),
                hole_width_range=(0.1, 0.1 + 0.3 * s),
                fill=0,
                p=0.5 * s,
            ),
        ]
    )


def eval_pipeline(img_size: int) -> A.Compose:
    """Deterministic: resize to the model's resolution (a no-op at the native size)."""
    return A.Compose([A.Resize(img_size, img_size)])


class Normalize(torch.nn.Module):
    """uint8 (B, 3, H, W) on the device -> float (B, 3, H, W), ImageNet mean/std.
    Batches travel from the loader as uint8: 4x less to copy than float32."""

    def __init__(self, mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1) * 255.0, persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1) * 255.0, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() - self.mean) / self.std


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

    def set_strength(self, s: float) -> None:
        self.strength = float(s)
        self.mixup.mixup_alpha = self.base["mixup_alpha"] * s
        self.mixup.cutmix_alpha = self.base["cutmix_alpha"] * s
        self.mixup.mix_prob = self.base["mix_prob"] * s if s > 0 else 0.0

    def __call__(self, x: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.mixup(x, target)


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
