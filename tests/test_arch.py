"""The arch/ registry: every entry builds, has the right output shape, trains and honours its
knobs; budgets, pretrained weights from a file, timm:NAME and the catalogue listing."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import timm
import torch
import yaml
from safetensors.torch import save_file

import arch
import main
from conftest import FAST_RUN, ROOT
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


def _drop_values(model):
    path = {round(float(m.drop_prob), 6) for m in model.modules() if hasattr(m, "drop_prob")}
    dropout = {round(float(m.p), 6) for m in model.modules() if isinstance(m, torch.nn.Dropout)}
    dropout |= {round(float(model.drop_rate), 6)} if isinstance(getattr(model, "drop_rate", None), float) else set()
    return path, dropout


@pytest.mark.parametrize("name", arch.list_archs())
def test_drop_knobs_reach_every_model_that_has_them(name):
    spec = arch.REGISTRY[name]
    model = arch.build_model(name, 5, 64, drop_rate=0.25, attn_drop_rate=0.15, drop_path_rate=0.3)
    path, dropout = _drop_values(model)
    assert 0.25 in dropout
    if "drop_path_rate" in spec.knobs:
        assert 0.2 < max(path) <= 0.3 + 1e-6  # stochastic depth grows with depth up to (about) the given rate
    if "attn_drop_rate" in spec.knobs:
        assert 0.15 in dropout


@pytest.mark.parametrize("name", [n for n in arch.list_archs() if not n.endswith("_cifar")])
def test_models_also_run_at_224(name):  # the _cifar stems at 224 cost 100+ GFLOPs: covered at 64
    model = arch.build_model(name, num_classes=3, img_size=224).eval()
    with torch.inference_mode():
        assert model(torch.randn(1, 3, 224, 224)).shape == (1, 3)


def test_transformers_at_64_use_small_patches_not_upscaling():
    vit = arch.build_model("vit_small", num_classes=3, img_size=64)
    assert vit.patch_embed.patch_size == (8, 8) and vit.patch_embed.grid_size == (8, 8)


def test_small_image_stems_keep_resolution_and_cost_what_they_say():
    standard, cifar, s2 = (arch.build_model(n, 10, 64) for n in ("resnet18", "resnet18_cifar", "resnet18_s2"))
    assert cifar.conv1.stride == (1, 1) and isinstance(cifar.maxpool, torch.nn.Identity)
    assert s2.conv1.stride == (2, 2) and isinstance(s2.maxpool, torch.nn.Identity)
    flops = [arch.model_stats(m, 64)[1] for m in (standard, s2, cifar)]
    assert flops[0] < flops[1] < flops[2] and flops[2] / flops[0] > 10  # the stem decides the cost


def test_budget_model_is_under_one_million_and_the_budget_is_enforced(tiny_data, tmp_path):
    assert arch.model_stats(arch.build_model("budget_cnn", 200), 64)[0] < 1_000_000
    with pytest.raises(UserError, match="over --max_params 1,000,000"):
        main.main(
            [
                *FAST_RUN,
                "--arch",
                "resnet18",
                "--data_dir",
                str(tiny_data),
                "--output_dir",
                str(tmp_path),
                "--max_params",
                "1000000",
            ]
        )
    assert not any(tmp_path.iterdir())  # refused before a run folder exists
    run = main.main(
        [
            *FAST_RUN,
            *"--arch budget_cnn --data_dir".split(),
            str(tiny_data),
            "--output_dir",
            str(tmp_path),
            *"--max_params 1000000 --epochs 1 --wandb disabled".split(),
        ]
    )
    import json

    results = json.loads((run / "best_results.json").read_text())
    assert results["params"] < 1_000_000 and results["gflops"] > 0


def test_fit_params_trains_the_widest_of_a_family_that_fits_and_evaluate_py_reads_it_back(tiny_data, tmp_path):
    import json

    import evaluate

    assert arch.fit_width("resnet9", 1_000_000, 200) == ("resnet9_w24", 963_320)  # resnet9_w28: 1,303,264
    assert arch.fit_width("budget_cnn", 1_000_000, 200)[0] == "budget_cnn_w96"  # budget_cnn itself
    assert arch.count_params("budget_cnn_w96", 200) == arch.count_params("budget_cnn", 200) == 951_176
    args = [*FAST_RUN, "--data_dir", str(tiny_data), "--output_dir", str(tmp_path), "--wandb", "disabled"]
    run = main.main([*args, *"--arch resnet9 --fit_params 200000 --epochs 1 --steps_per_epoch 2".split()])
    results = json.loads((run / "best_results.json").read_text())
    assert (results["arch"], results["params"]) == ("resnet9_w8", 103_444)  # 4 classes; resnet9_w12: 232,060
    assert yaml.safe_load((run / "config.yaml").read_text())["arch"] == "resnet9_w8"
    assert evaluate.run(["--checkpoint", str(run), "--output_dir", str(tmp_path / "eval")])["val_top1"] >= 0
    with pytest.raises(UserError, match="--fit_params sizes a family by its width.*--arch resnet18 does not"):
        main.main([*args, "--arch", "resnet18", "--fit_params", "50000"])
    with pytest.raises(UserError, match="even resnet9_w4 has"):
        main.main([*args, "--arch", "resnet9", "--fit_params", "1000"])


def test_pretrained_file_loads_the_body_and_reinitialises_the_head(tmp_path):
    torch.manual_seed(1)
    source = timm.create_model("resnet18", num_classes=1000)  # stands in for ImageNet weights
    path = tmp_path / "resnet18.safetensors"
    save_file(source.state_dict(), str(path))
    model = arch.build_model("resnet18", 7, 64, pretrained_path=str(path))
    assert torch.equal(model.conv1.weight, source.conv1.weight)
    assert torch.equal(model.layer4[1].conv2.weight, source.layer4[1].conv2.weight)
    assert model.fc.weight.shape == (7, 512)
    fresh = arch.build_model("resnet18", 7, 64)
    assert not torch.equal(fresh.conv1.weight, source.conv1.weight)


def test_pretrained_vit_file_adapts_to_64_pixels(tmp_path):
    source = timm.create_model("vit_tiny_patch16_224", num_classes=1000)
    path = tmp_path / "vit.pth"
    torch.save(source.state_dict(), path)
    model = arch.build_model("vit_tiny", 10, 64, pretrained_path=str(path))
    assert model.pos_embed.shape == (1, 65, 192) and model.patch_embed.proj.weight.shape == (192, 3, 8, 8)
    assert torch.equal(model.blocks[3].mlp.fc1.weight, source.blocks[3].mlp.fc1.weight)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 10)


def test_budget_model_from_file(tmp_path):
    source = arch.build_model("budget_cnn", 10)
    path = tmp_path / "time_budget.pth"
    torch.save({"state_dict": source.state_dict()}, path)
    model = arch.build_model("budget_cnn", 200, pretrained_path=str(path))
    assert torch.equal(model.stem[0][0].weight, source.stem[0][0].weight) and model.head[-1].out_features == 200


def test_offline_pretrained_is_a_quick_clear_error():
    start = time.monotonic()
    with pytest.raises(UserError, match="--pretrained_path"):
        arch.build_model("resnet18", 10, pretrained=True)
    assert time.monotonic() - start < 10
    with pytest.raises(UserError, match="does not exist"):
        arch.build_model("resnet18", 10, pretrained_path="/nowhere/w.safetensors")


def test_any_timm_model_by_name_and_unknown_names():
    model = arch.build_model("timm:resnet10t", 6, 64, drop_rate=0.1, attn_drop_rate=0.1)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 6)
    with pytest.raises(UserError, match="timm has no model 'resnet19x'"):
        arch.build_model("timm:resnet19x", 6)
    with pytest.raises(UserError) as err:
        arch.build_model("resnet19", 10)
    assert "did you mean resnet9 or resnet18?" in str(err.value)  # the near misses, not all 25 names
    assert "--list_archs" in str(err.value) and "timm:NAME" in str(err.value)


def test_list_archs_csv_for_scripts():
    proc = subprocess.run(
        [sys.executable, "main.py", "--list_archs", "--format", "csv", "--img_size", "32"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = proc.stdout.strip().splitlines()
    assert proc.returncode == 0 and lines[0] == "name,family,params,gflops,drop_path"
    rows = {ln.split(",")[0]: ln.split(",") for ln in lines[1:]}
    assert set(rows) == set(arch.list_archs())
    assert int(rows["budget_cnn"][2]) < 1_000_000 and float(rows["resnet18_cifar"][3]) > float(rows["resnet18"][3])
    assert rows["vgg19"][4] == "false" and rows["swin_tiny"][4] == "true"
