"""ResNets for small images (64x64 Tiny-ImageNet, 32x32 CIFAR).

The ImageNet stem (7x7 stride-2 conv + stride-2 max-pool) shrinks a 64x64 image to 16x16 before
the first block, and a 64x64 ResNet ends on a 2x2 map. Two replacements:

- ``cifar``: 3x3 stride-1 conv, no max-pool (seed 004's "CIFAR stem"): the blocks see the full
  resolution. Best accuracy, 16x the compute of the ImageNet stem at the same input size.
- ``s2``: 3x3 stride-2 conv, no max-pool: one downsampling, 4x the ImageNet stem's compute.
  The middle ground when the cifar stem is too slow (see the README's catalogue table).

Built from timm's ResNet, so drop_rate and drop_path_rate work as for the standard ones.
"""

from __future__ import annotations

import timm
from torch import nn

STEMS = {"cifar": 1, "s2": 2}  # stem conv stride


def small_image_resnet(timm_name: str, stem: str, num_classes: int, **kwargs) -> nn.Module:
    model = timm.create_model(timm_name, pretrained=False, num_classes=num_classes, **kwargs)
    width = model.conv1.out_channels
    model.conv1 = nn.Conv2d(3, width, kernel_size=3, stride=STEMS[stem], padding=1, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    model.maxpool = nn.Identity()
    return model
