"""ResNet-9 for 64x64 inputs: the small fast CNN of the CPU speed-run (configs/cpu_speedrun.yaml).

The layout of Myrtle.ai's ResNet-9 (D. Page, "How to train your ResNet", 2018; the DAWNBench
CIFAR-10 winner): conv-BN-ReLU blocks, max-pool downsampling, two residual pairs, eight 3x3 convs
in all. For 64x64 inputs a 2x2 stride-2 patch stem halves the resolution first, so the rest runs
at CIFAR sizes (32 -> 16 -> 8 -> 4): a quarter of the compute of the same net at full resolution.
"""

from __future__ import annotations

import torch
from torch import nn


def _cbr(cin: int, cout: int, k: int = 3, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride, padding=1 if k == 3 else 0, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class _Residual(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.body = nn.Sequential(_cbr(width, width), _cbr(width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class ResNet9(nn.Module):
    """(B, 3, H, W) -> (B, num_classes); any H, W divisible by 16 (global pooling at the end)."""

    def __init__(self, num_classes: int = 200, width: int = 64, drop_rate: float = 0.0) -> None:
        super().__init__()
        w = [width, 2 * width, 4 * width, 8 * width]
        self.features = nn.Sequential(
            _cbr(3, w[0], k=2, stride=2),  # 64 -> 32: a 2x2 patch stem
            _cbr(w[0], w[1]),
            nn.MaxPool2d(2),
            _Residual(w[1]),  # 16
            _cbr(w[1], w[2]),
            nn.MaxPool2d(2),  # 8
            _cbr(w[2], w[3]),
            nn.MaxPool2d(2),
            _Residual(w[3]),  # 4
        )
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(drop_rate), nn.Linear(w[3], num_classes)
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
