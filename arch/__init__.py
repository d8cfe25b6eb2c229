"""Model registry: short names -> timm models configured for the input resolution.

``build_model(name, num_classes, img_size, drop_rate=..., attn_drop_rate=..., drop_path_rate=...)``
returns an ``nn.Module`` mapping (B, 3, img_size, img_size) float images to (B, num_classes) logits.
Models know nothing about config, devices or data.

Transformers run at the requested resolution natively: at 64x64 ViT/DeiT use 8x8 patches
(an 8x8 token grid, like 224 with 16x16 patches has 14x14) and Swin uses 4x4 windows (a 7x7
window does not tile the 16x16 -> 2x2 stage grids of a 64x64 input). ``budget_cnn`` (arch/budget.py)
is a local CNN under 1 M parameters designed for 64x64.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import timm
import torch

from arch.budget import BudgetNet
from utils import UserError

log = logging.getLogger("tin")

DROP_KNOBS = ("drop_rate", "attn_drop_rate", "drop_path_rate")


@dataclass(frozen=True)
class ArchSpec:
    name: str
    timm_name: str  # "" for the local models below
    family: str
    knobs: tuple[str, ...]  # which of DROP_KNOBS the model accepts
    local: Callable[..., torch.nn.Module] | None = None

    def resolution_kwargs(self, img_size: int) -> dict:
        if self.family == "vit":
            # patch 16 at 224, 8 at 64, 4 at 32: keeps a token grid of about 8x8 or more
            patch = 16 if img_size >= 128 else max(2, img_size // 8)
            return {"img_size": img_size, "patch_size": patch}
        if self.family == "swin":
            window = 7 if img_size >= 224 else 4
            return {"img_size": img_size, "window_size": window}
        return {}


_CNN = ("drop_rate", "drop_path_rate")
_TRANSFORMER = DROP_KNOBS

REGISTRY: dict[str, ArchSpec] = {
    s.name: s
    for s in [
        ArchSpec("resnet18", "resnet18", "resnet", _CNN),
        ArchSpec("resnet34", "resnet34", "resnet", _CNN),
        ArchSpec("resnet50", "resnet50", "resnet", _CNN),
        ArchSpec("resnet101", "resnet101", "resnet", _CNN),
        ArchSpec("resnet152", "resnet152", "resnet", _CNN),
        ArchSpec("vit_small", "vit_small_patch16_224", "vit", _TRANSFORMER),
        ArchSpec("deit_small", "deit_small_patch16_224", "vit", _TRANSFORMER),
        ArchSpec("vit_tiny", "vit_tiny_patch16_224", "vit", _TRANSFORMER),
        ArchSpec("swin_tiny", "swin_tiny_patch4_window7_224", "swin", _TRANSFORMER),
        ArchSpec("efficientnet_b0", "efficientnet_b0", "efficientnet", _CNN),
        ArchSpec("mobilenetv2_100", "mobilenetv2_100", "mobilenet", _CNN),
        ArchSpec("budget_cnn", "", "budget", _CNN, local=BudgetNet),
    ]
}


def list_archs() -> list[str]:
    return list(REGISTRY)


def build_model(
    name: str,
    num_classes: int,
    img_size: int = 64,
    drop_rate: float = 0.0,
    attn_drop_rate: float = 0.0,
    drop_path_rate: float = 0.0,
) -> torch.nn.Module:
    """Build an untrained model. Drop knobs the model lacks are reported once, not silently dropped."""
    spec = REGISTRY.get(name)
    if spec is None:
        raise UserError(f"unknown --arch {name!r}; choose one of: {', '.join(REGISTRY)}")
    requested = {"drop_rate": drop_rate, "attn_drop_rate": attn_drop_rate, "drop_path_rate": drop_path_rate}
    unused = [k for k, v in requested.items() if v and k not in spec.knobs]
    if unused:
        log.info("%s has no %s; those flags are ignored for this model", name, " / ".join(f"--{k}" for k in unused))
    kwargs = {k: v for k, v in requested.items() if k in spec.knobs}
    if spec.local is not None:
        return spec.local(num_classes=num_classes, **kwargs)
    return timm.create_model(
        spec.timm_name, pretrained=False, num_classes=num_classes, **kwargs, **spec.resolution_kwargs(img_size)
    )
