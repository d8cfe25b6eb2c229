"""Augmentation: the train recipe as a function of (image size, strength s) in two backends,
the strength and resolution schedules, on-device normalisation, and the CutMix/MixUp mixer.

Strength s in [0, 1] scales every probability and magnitude: s = 0 is (near) identity,
s = 1 is the full recipe. Two backends of the same recipe:

- ``albumentations`` (``train_pipeline``): per image in the loader workers, uint8 HWC in,
  uint8 CHW out;
- ``torch`` (``BatchAugment``): on whole uint8 batches on the device, after the copy: one
  affine warp for crop/flip/rotate/shear, colour jitter as per-image 3x3 colour matrices. No
  worker time at all, which matters on a 2-core CPU and keeps a GPU fed.

The float conversion and normalisation happen on the device, batched (see ``Normalize``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import albumentations as A
import numpy as np
import torch
import torch.nn.functional as F
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


def train_size_at(epoch: int, epochs: int, img_size: int, min_size: int = 0, until: float = 0.75) -> int:
    """Training resolution for 0-based `epoch` (progressive resizing): grows linearly from
    `min_size` at the first epoch to `img_size` at fraction `until` of the run, then holds;
    a multiple of 8. min_size 0 (or >= img_size) = always img_size. Evaluation stays at img_size."""
    if not min_size or min_size >= img_size:
        return img_size
    last = max(until * (epochs - 1), 1e-9)
    size = min_size + (img_size - min_size) * min(epoch / last, 1.0)
    return min(img_size, int(round(size / 8.0)) * 8)


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


# luma weights (ITU-R 601, as cv2/albumentations use for grey) and the YIQ basis for hue rotation
_GRAY = torch.tensor([0.299, 0.587, 0.114])
_RGB2YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ2RGB = torch.linalg.inv(_RGB2YIQ)


class BatchAugment:
    """``train_pipeline``'s recipe on a whole uint8 batch (B, 3, H, W) on its device, in torch.

    RandomResizedCrop, flip, rotate and shear compose into one affine map per image, applied by
    a single ``grid_sample`` straight to the output size; brightness, saturation and hue compose
    into one 3x3 colour matrix per image, contrast blends towards the image's mean grey; then
    grey and one erased rectangle. Same parameter ranges and probabilities as the albumentations
    pipeline (the sampling differs in detail, e.g. bilinear resampling for the crop).

    Random parameters come from a generator seeded by (seed, epoch, batch index, rank), so a
    batch is augmented identically however the run was interrupted and resumed. Returns float
    images in [0, 255] (``Normalize`` accepts both).
    """

    def __init__(self, seed: int = 0, rank: int = 0) -> None:
        self.seed, self.rank = seed, rank
        self.epoch, self.strength, self.size = 0, 0.0, 64

    def set_epoch(self, epoch: int, strength: float, size: int) -> None:
        self.epoch, self.strength, self.size = int(epoch), float(strength), int(size)

    def __call__(self, images: torch.Tensor, batch_index: int) -> torch.Tensor:
        seed = int(np.random.SeedSequence([self.seed, self.epoch, batch_index, self.rank]).generate_state(1)[0])
        g = torch.Generator().manual_seed(seed)
        s, n, dev = self.strength, images.shape[0], images.device

        def u(lo: float, hi: float) -> torch.Tensor:  # n uniform draws in [lo, hi), on the device
            return (lo + (hi - lo) * torch.rand(n, generator=g, dtype=torch.float64)).float().to(dev)

        def coin(p: float) -> torch.Tensor:
            return (torch.rand(n, generator=g) < p).to(dev)

        x = self._warp(images.float(), s, u, coin)
        return self._colour(x, s, u, coin).clamp_(0, 255)

    def _warp(self, x: torch.Tensor, s: float, u, coin) -> torch.Tensor:
        n = x.shape[0]
        # crop: area fraction and log aspect ratio as in RandomResizedCrop, in [-1, 1] coordinates
        area, log_r = u(1.0 - 0.65 * s, 1.0), u(math.log(1 - 0.25 * s), math.log(1 + 0.33 * s))
        w = (area * log_r.exp()).sqrt().clamp(max=1.0)
        h = (area / log_r.exp()).sqrt().clamp(max=1.0)
        cx, cy = u(-1.0, 1.0) * (1 - w), u(-1.0, 1.0) * (1 - h)
        flip = torch.where(coin(0.5 * s), -1.0, 1.0)
        on = coin(0.5 * s)  # rotate + shear together, as one Affine
        rot = torch.where(on, u(-15 * s, 15 * s), 0.0) * (math.pi / 180)
        shear = torch.where(on, u(-8 * s, 8 * s), 0.0) * (math.pi / 180)
        # output (x, y) -> input: crop scale/offset . flip . rotation . shear
        a, b = torch.cos(rot), torch.sin(rot)
        t = torch.tan(shear)
        m = torch.stack([torch.stack([a, a * t - b]), torch.stack([b, b * t + a])]).permute(2, 0, 1)  # (n, 2, 2)
        m = m * torch.stack([w * flip, h], 1).unsqueeze(2)
        theta = torch.cat([m, torch.stack([cx, cy], 1).unsqueeze(2)], 2)
        if s == 0 and x.shape[-1] == self.size and x.shape[-2] == self.size:
            return x  # the identity map: skip the resampling
        grid = F.affine_grid(theta, [n, 3, self.size, self.size], align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    def _colour(self, x: torch.Tensor, s: float, u, coin) -> torch.Tensor:
        if s == 0:
            return x
        n, dev = x.shape[0], x.device
        gray_w = _GRAY.to(dev)
        jitter = coin(0.8 * s)
        bright = torch.where(jitter, u(1 - 0.4 * s, 1 + 0.4 * s), 1.0)
        contrast = torch.where(jitter, u(1 - 0.4 * s, 1 + 0.4 * s), 1.0)
        sat = torch.where(jitter, u(1 - 0.4 * s, 1 + 0.4 * s), 1.0)
        hue = torch.where(jitter, u(-min(0.1 * s, 0.5), min(0.1 * s, 0.5)), 0.0) * (2 * math.pi)
        # saturation: blend with grey, M = sat * I + (1 - sat) * 1 g^T; hue: rotate the IQ plane
        eye = torch.eye(3, device=dev).expand(n, 3, 3)
        m_sat = sat.view(n, 1, 1) * eye + (1 - sat).view(n, 1, 1) * gray_w.view(1, 1, 3).expand(n, 3, 3)
        rot = torch.zeros(n, 3, 3, device=dev)
        rot[:, 0, 0] = 1
        rot[:, 1, 1], rot[:, 1, 2] = hue.cos(), -hue.sin()
        rot[:, 2, 1], rot[:, 2, 2] = hue.sin(), hue.cos()
        m_hue = _YIQ2RGB.to(dev) @ rot @ _RGB2YIQ.to(dev)
        to_gray = coin(0.1 * s).view(n, 1, 1)
        m_gray = gray_w.view(1, 1, 3).expand(n, 3, 3)
        m = torch.where(to_gray, m_gray @ m_hue @ m_sat, m_hue @ m_sat) * bright.view(n, 1, 1)
        x = torch.einsum("nij,njhw->nihw", m, x)
        mean = torch.einsum("c,nchw->n", gray_w, x).view(n, 1, 1, 1) / (x.shape[-1] * x.shape[-2])
        x = (x - mean) * contrast.view(n, 1, 1, 1) + mean
        # one erased rectangle (CoarseDropout), sides 10-40 % of the image at s = 1
        size = x.shape[-1]
        erase = coin(0.5 * s).view(n, 1, 1)
        eh, ew = u(0.1, 0.1 + 0.3 * s) * size, u(0.1, 0.1 + 0.3 * s) * size
        y0, x0 = u(0.0, 1.0) * (size - eh), u(0.0, 1.0) * (size - ew)
        pos = torch.arange(size, device=dev, dtype=torch.float32)
        rows = (pos.view(1, -1) >= y0.view(-1, 1)) & (pos.view(1, -1) < (y0 + eh).view(-1, 1))
        cols = (pos.view(1, -1) >= x0.view(-1, 1)) & (pos.view(1, -1) < (x0 + ew).view(-1, 1))
        hole = erase & rows.unsqueeze(2) & cols.unsqueeze(1)
        return x.masked_fill(hole.unsqueeze(1), 0.0)


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
