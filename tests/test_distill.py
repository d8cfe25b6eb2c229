"""Knowledge distillation (--teacher): a student learns from a teacher what its wrong labels cannot
teach it; teachers trained on other classes are refused; a run with a teacher resumes exactly, and
only with the same teacher; the time budget measures the teacher inside the step; the run records
its teachers; ensembles average probabilities; a batch is resized to the teacher's resolution."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import main
import transforms
from conftest import NAMES, PINNED, ROOT, WNIDS, same_weights, toy_image
from tin import distill
from tin.config.cli import parse_config
from tin.data.readers import write_tiny_imagenet_layout
from tin.plan import budget, measure
from tin.run.build import build_parts
from tin.runtime import distributed
from utils import UserError

# a small fast model: it learns the toy patterns in two epochs
SMALL = [
    *"--arch resnet9_w8 --img_size 32 --batch_size 8 --workers 0 --no_analysis --lr_base 2e-3 --warmup_epochs 0 --drop_rate 0 --aug_schedule constant --aug_strength 0.3 --wandb disabled".split(),
    *PINNED,
]


def _run(data: Path, out: Path, *extra: str) -> Path:
    return main.main([*SMALL, "--data_dir", str(data), "--output_dir", str(out), *extra])


def _best(run: Path) -> dict:
    return json.loads((run / "best_results.json").read_text())


@pytest.fixture(scope="module")
def teacher(tiny_data, tmp_path_factory) -> Path:
    """A run trained on the right labels of the toy problem: it knows every val image."""
    run = _run(tiny_data, tmp_path_factory.mktemp("teacher"), "--epochs", "4")
    assert _best(run)["val_top1"] == 100.0
    return run


@pytest.fixture(scope="module")
def wrong_labels(tmp_path_factory) -> Path:
    """The toy problem with three in four training images filed under the next class (the classes,
    val and test as in tiny_data): from its labels alone a model learns the wrong class."""
    rng = np.random.default_rng(1)
    order = sorted(WNIDS)
    train = {w: [] for w in WNIDS}
    for k, w in enumerate(order):
        for j in range(16):
            train[order[(k + 1) % 4] if j % 4 else w].append(toy_image(k, rng))
    val = [(toy_image(order.index(w), rng), w) for _ in range(5) for w in WNIDS]
    test = [toy_image(int(rng.integers(4)), rng) for _ in range(9)]
    root = tmp_path_factory.mktemp("wrong") / "tiny-imagenet-200"
    return write_tiny_imagenet_layout(root, dict(zip(WNIDS, NAMES, strict=True)), train, val, test)


LIVE_OR_CACHED = pytest.mark.parametrize("views", ["0", "2"], ids=["a live teacher", "cached soft labels"])


@LIVE_OR_CACHED
def test_a_student_learns_from_its_teacher_what_its_wrong_labels_cannot_teach(teacher, wrong_labels, tmp_path, views):
    alone = _run(wrong_labels, tmp_path / "alone", "--epochs", "4")
    taught = _run(
        wrong_labels,
        tmp_path / "taught",
        "--epochs",
        "4",
        "--teacher",
        str(teacher),
        "--kd_alpha",
        "0.9",
        "--kd_views",
        views,
    )
    assert _best(alone)["val_top1"] <= 40.0  # the labels teach the wrong class (chance: 25 %)
    assert _best(taught)["val_top1"] >= 90.0
    recorded = _best(taught)["teachers"]  # what taught it, and how good that was
    assert recorded == [{"source": str(teacher), "arch": "resnet9_w8", "params": 103444, "val_top1": 100.0}]
    saved = yaml.safe_load((taught / "config.yaml").read_text())
    assert saved["teacher"] == [str(teacher)] and saved["resolved"]["teachers"][0]["val_top1"] == 100.0


def _other_classes(run: Path, out: Path) -> Path:
    ckpt = torch.load(run / "best.pth.tar", weights_only=True)
    ckpt["classes"] = [*ckpt["classes"][:3], "n09999999"]
    torch.save(ckpt, out)
    return out


def test_a_teacher_of_other_classes_is_refused_before_training(teacher, tiny_data, tmp_path):
    other = _other_classes(teacher, tmp_path / "other.pth.tar")
    with pytest.raises(UserError, match=r"--teacher .*other.pth.tar was trained on other classes .*n09999999"):
        _run(tiny_data, tmp_path / "out", "--epochs", "1", "--teacher", str(other))
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_a_timm_teacher_needs_weights_for_the_datas_classes(tiny_data, tmp_path):
    import timm
    from safetensors.torch import save_file

    for classes in (10, 4):
        save_file(
            timm.create_model("resnet10t", num_classes=classes).state_dict(), tmp_path / f"t{classes}.safetensors"
        )
    args = ["--epochs", "1", "--steps_per_epoch", "1", "--teacher", "timm:resnet10t", "--teacher_pretrained_path"]
    with pytest.raises(UserError, match=r"does not fit resnet10t with the data's 4 classes .*size mismatch"):
        _run(tiny_data, tmp_path / "out", *args, str(tmp_path / "t10.safetensors"))
    run = _run(tiny_data, tmp_path / "out", *args, str(tmp_path / "t4.safetensors"))
    assert _best(run)["teachers"][0]["arch"] == "timm:resnet10t"
    with pytest.raises(UserError, match="needs --teacher_pretrained_path"):
        parse_config(["--teacher", "timm:resnet10t"])


@LIVE_OR_CACHED
def test_a_run_with_a_teacher_resumes_exactly_and_only_with_that_teacher(teacher, tiny_data, tmp_path, views):
    """A real process stopped with SIGINT mid-epoch, resumed: the weights of an uninterrupted run.
    Then the teacher's file is replaced by other weights: resuming with it is refused."""
    own = tmp_path / "teacher.pth.tar"
    shutil.copyfile(teacher / "best.pth.tar", own)
    args = ["--data_dir", str(tiny_data), "--epochs", "3", "--teacher", str(own), "--mixup_alpha", "0.8"]
    args += ["--cache_dir", str(tmp_path / "cache"), "--kd_views", views]
    reference = _run(tiny_data, tmp_path / "reference", *args)
    out = tmp_path / "interrupted"
    stopped = subprocess.run(
        [sys.executable, "-m", "bench.interrupt_at", "13", "main.py", *SMALL, *args, "--output_dir", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert stopped.returncode == 130, stopped.stdout[-2000:]
    (run,) = out.iterdir()
    assert torch.load(run / "last.pth.tar", weights_only=True)["step"] == 13  # mid-epoch 2 (8 updates per epoch)
    main.main(["--resume", str(run)])
    assert same_weights(run / "last.pth.tar", reference / "last.pth.tar")
    ckpt = torch.load(own, weights_only=True)
    ckpt["state_dict"] = {k: v + 1 if v.is_floating_point() else v for k, v in ckpt["state_dict"].items()}
    torch.save(ckpt, own)  # the teacher's file now holds other weights
    with pytest.raises(UserError, match="are not the ones it started with"):
        main.main(["--resume", str(run)])


def test_the_time_budget_measures_the_teacher_inside_the_step(teacher, tiny_data, tmp_path):
    """--time_budget plans from the real step: a teacher that takes 0.2 s makes each update take 0.2 s more."""
    args = [*SMALL, "--data_dir", str(tiny_data), "--teacher", str(teacher), "--cache_dir", str(tmp_path)]
    _, parts, *_ = build_parts(parse_config([*args, "--kd_views", "0"]), distributed.Context())
    parts.teacher.models[0].register_forward_pre_hook(lambda *a: time.sleep(0.2))
    costs = measure.measure_costs(parts, [32], ema=False, tta=False, test_images=0, warmup=1, timed=3)
    assert costs.update_s[32] >= 0.2


def test_an_ensemble_averages_the_teachers_probabilities_at_the_temperature():
    torch.manual_seed(0)
    a, b = torch.nn.Linear(12, 3), torch.nn.Linear(12, 3)
    flat = torch.nn.Flatten()
    models = [torch.nn.Sequential(flat, m).eval() for m in (a, b)]
    teacher = distill.Teacher(models, [2, 2], alpha=1.0, temperature=4.0)
    x = torch.randn(5, 3, 2, 2)
    expected = ((a(x.flatten(1)) / 4).softmax(1) + (b(x.flatten(1)) / 4).softmax(1)) / 2
    assert torch.allclose(teacher.probs(x), expected, atol=1e-6)
    logits = torch.randn(5, 3, requires_grad=True)
    loss = teacher.loss(torch.tensor(7.0), logits, x)  # alpha 1: the labels' loss does not count
    kl = (expected * (expected.log() - (logits / 4).log_softmax(1))).sum(1).mean() * 16
    assert torch.allclose(loss, kl, atol=1e-5)
    loss.backward()
    assert logits.grad is not None and a.weight.grad is None  # the teacher learns nothing


def test_the_teacher_sees_the_batch_at_the_resolution_it_was_trained_at():
    seen = []
    model = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(3, 4)).eval()
    model.register_forward_hook(lambda m, inputs, out: seen.append(tuple(inputs[0].shape[-2:])))
    teacher = distill.Teacher([model], [64], channels_last=True)
    for size in (32, 64, 72):
        teacher.probs(torch.randn(2, 3, size, size))
    assert seen == [(64, 64)] * 3
    assert teacher.resized(torch.randn(2, 3, 32, 32), 64).is_contiguous(memory_format=torch.channels_last)


def test_cached_soft_labels_were_computed_on_the_crops_the_student_is_shown(teacher, tiny_data, tmp_path):
    """In epoch e every image shows its view e mod K: the student's augmented batch is the stored
    crop and flip of exactly those images, and the stored soft label is the teacher's on that view."""
    only_views = "affine.p=0,jitter.p=0,gray.p=0,erase.p=0"  # the student's own ops off: nothing but the view
    args = [*SMALL, "--data_dir", str(tiny_data), "--teacher", str(teacher), "--kd_views", "2"]
    args += ["--cache_dir", str(tmp_path), "--aug_ops", only_views, "--mixup_alpha", "0", "--cutmix_alpha", "0"]
    _, parts, *_ = build_parts(parse_config(args), distributed.Context())
    cache, loaders = parts.teacher.cache, parts.loaders
    assert cache.views.shape == (2, 64, 5) and cache.views[:, :, 4].std() > 0  # flipped and not
    for epoch in (0, 3):
        loaders.set_epoch(epoch, strength=1.0, size=32)
        images, _ = next(iter(loaders.train))
        replay = parts.teacher.replay(loaders, 0)
        shown = loaders.augment(images, 0, views=replay.views)
        index = loaders.batch_indices(0)
        g = torch.from_numpy(cache.views[epoch % 2][index])
        crop = {"w": g[:, 0], "h": g[:, 1], "cx": g[:, 2], "cy": g[:, 3]}
        theta = transforms.OPS["crop"].matrix(crop) @ transforms.OPS["flip"].matrix({"on": g[:, 4] > 0.5})
        stored = torch.from_numpy(loaders.data.train.array[index]).permute(0, 3, 1, 2).float()
        assert torch.equal(shown, transforms.warp(stored, theta[:, :2], 32).clamp_(0, 255))
        seen = parts.teacher.probs_of_views(stored, theta[:, :2], parts.normalize).log()
        top = torch.from_numpy(cache.logp[epoch % 2][index])
        assert torch.allclose(seen.gather(1, torch.from_numpy(cache.classes[epoch % 2][index]).long()), top, atol=1e-5)


def test_the_run_that_makes_the_cache_plans_with_the_minutes_left(teacher, tiny_data, tmp_path, monkeypatch):
    """Making the cached soft labels happens inside the run's --time_budget (a controlled clock: the
    teachers' pass takes 120 s, an update 2 s): that run plans fewer updates than the next one,
    which finds them made."""
    now = [0.0]
    monkeypatch.setattr(budget, "clock", lambda: now[0])
    monkeypatch.setattr(measure, "measure_costs", lambda *a, **k: budget.Costs({32: 2.0}, 0.0, 0.0))
    teach = distill._teach

    def slow_teach(*args, **kwargs):
        now[0] += 120.0
        return teach(*args, **kwargs)

    monkeypatch.setattr(distill, "_teach", slow_teach)
    args = ["--epochs", "40", "--time_budget", "3", "--teacher", str(teacher), "--cache_dir", str(tmp_path / "c")]
    first = _run(tiny_data, tmp_path / "first", *args, "--kd_views", "2")
    second = _run(tiny_data, tmp_path / "second", *args, "--kd_views", "2")
    planned = [_best(run)["planned_updates"] for run in (first, second)]
    assert planned == [int((180 * (1 - budget.MARGIN) - 120) / 2), int(180 * (1 - budget.MARGIN) / 2)]


def test_cached_soft_labels_need_the_batch_augmentation_and_the_decode_cache():
    for flags in (["--aug_backend", "albumentations"], ["--no_cache"]):
        with pytest.raises(UserError, match=r"^--kd_views 4 .* or pass --kd_views 0|, or --kd_views 0"):
            parse_config(["--teacher", "RUN", *flags])
        assert parse_config(["--teacher", "RUN", *flags, "--kd_views", "0"]).kd_views == 0  # a live teacher


def test_cached_views_are_warped_in_fp32_under_the_runs_autocast():
    """The soft labels are made under the run's autocast; the views the teacher sees must still be
    the student's (transforms.warp in fp32, outside autocast): under bf16, affine_grid's batched
    product would shift them by up to 0.15 px (tens of grey levels at an edge)."""
    seen = []
    model = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(3, 4)).eval()
    model.register_forward_hook(lambda m, inputs, out: seen.append((inputs[0], out.dtype)))
    teacher = distill.Teacher([model], [24])
    normalize = transforms.Normalize()
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (6, 3, 32, 32), generator=g).float()
    u = torch.rand(6, 5, generator=g)
    crop = {"w": 0.5 + 0.5 * u[:, 0], "h": 0.5 + 0.5 * u[:, 1], "cx": u[:, 2] - 0.5, "cy": u[:, 3] - 0.5}
    theta = transforms.OPS["crop"].matrix(crop) @ transforms.OPS["flip"].matrix({"on": u[:, 4] > 0.5})
    with torch.autocast("cpu", dtype=torch.bfloat16):
        teacher.probs_of_views(x, theta[:, :2], normalize)
    (view, out_dtype), std = seen[0], normalize.std
    shown = transforms.warp(x, theta[:, :2], 24).clamp_(0, 255)  # fp32: no autocast here
    assert out_dtype == torch.bfloat16  # the teacher itself runs in the run's precision
    assert view.dtype == torch.float32 and ((view * std + normalize.mean) - shown).abs().max() < 1e-4  # grey levels
