"""The arch/ registry: every entry builds, has the right output shape and trains."""

from __future__ import annotations

import pytest
import torch

import arch
from utils import UserError


@pytest.mark.parametrize("name", arch.list_archs())
def test_every_arch_gives_logits_and_gradients_at_64(name):
    torch.manual_seed(0)
    model = arch.build_model(name, num_classes=7, img_size=64, drop_rate=0.1, attn_drop_rate=0.1, drop_path_rate=0.1)
    model.train()
    logits = model(torch.randn(2, 3, 64, 64))
    assert logits.shape == (2, 7)
    logits.logsumexp(1).mean().backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"no gradient reached {missing[:5]}"


@pytest.mark.parametrize("name", ["vit_tiny", "swin_tiny"])
def test_transformers_also_run_at_224(name):
    model = arch.build_model(name, num_classes=3, img_size=224).eval()
    with torch.inference_mode():
        assert model(torch.randn(1, 3, 224, 224)).shape == (1, 3)


def test_transformers_at_64_use_small_patches_not_upscaling():
    vit = arch.build_model("vit_small", num_classes=3, img_size=64)
    assert vit.patch_embed.patch_size == (8, 8) and vit.patch_embed.grid_size == (8, 8)


def test_drop_knobs_reach_the_model():
    vit = arch.build_model("vit_tiny", 3, 64, drop_rate=0.3, attn_drop_rate=0.2, drop_path_rate=0.1)
    assert vit.head_drop.p == pytest.approx(0.3)
    assert vit.blocks[0].attn.attn_drop.p == pytest.approx(0.2)
    assert vit.blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)


def test_unknown_arch_lists_the_valid_names():
    with pytest.raises(UserError) as err:
        arch.build_model("resnet19", 10)
    assert "resnet19" in str(err.value) and "resnet18" in str(err.value) and "swin_tiny" in str(err.value)
