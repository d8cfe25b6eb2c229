"""A CNN under 1,000,000 parameters for 64x64 inputs (seed 002's budget), with DropPath.

Bottleneck residual blocks (1x1 reduce, 3x3, 1x1 expand; He et al. 2016,
https://arxiv.org/abs/1512.03385) over four stages at 32, 16, 8 and 4 pixels: the stem's single
stride-2 3x3 conv keeps most of the 64x64 detail, unlike ImageNet stems that drop to 16x16 at once.
Stochastic depth (Huang et al. 2016) grows linearly with block depth up to ``drop_path_rate``.
"""

from __future__ import annotations

import torch
from timm.layers import DropPath
from torch import nn


def _conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, act: bool = True) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, nn.ReLU(inplace=True)) if act else nn.Sequential(*layers)


class Bottleneck(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, drop_path: float) -> None:
        super().__init__()
        mid = cout // 4
        self.body = nn.Sequential(
            _conv_bn(cin, mid, 1), _conv_bn(mid, mid, 3, stride), _conv_bn(mid, cout, 1, act=False)
        )
        nn.init.zeros_(self.body[-1][1].weight)  # each block starts as the identity
        self.shortcut = nn.Identity() if stride == 1 and cin == cout else _conv_bn(cin, cout, 1, stride, act=False)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.shortcut(x) + self.drop_path(self.body(x)))


class BudgetNet(nn.Module):
    """(B, 3, H, W) -> (B, num_classes); 951,176 parameters with 200 classes."""

    def __init__(
        self,
        num_classes: int = 200,
        widths: tuple[int, ...] = (96, 192, 288, 368),
        depths: tuple[int, ...] = (2, 3, 3, 2),
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(_conv_bn(3, 32, 3, 2), _conv_bn(32, 48, 3))
        rates = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()  # also when built on meta
        blocks, cin, k = [], 48, 0
        for stage, (width, depth) in enumerate(zip(widths, depths, strict=True)):
            for i in range(depth):
                stride = 2 if i == 0 and stage > 0 else 1
                blocks.append(Bottleneck(cin, width, stride, rates[k]))
                cin, k = width, k + 1
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(drop_rate), nn.Linear(cin, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))
