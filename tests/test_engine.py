"""Recipe flags do what they say: schedules, optimizers, EMA, accumulation, clipping, early stopping,
checkpoint retention, and the failure paths (bad checkpoints, incompatible resumes, divergence)."""

from __future__ import annotations

import csv
import json
import os
import pickle
import re
import subprocess
import sys

import pytest
import torch
from torch import nn

import main
from conftest import FAST_ARCH, FAST_RUN, ROOT, TinyNet, loaders_for, make_layout, tiny_parts, train_epoch
from tin import optim
from tin.checkpoint import load_checkpoint
from utils import UserError


def _lrs(sched, steps, **kw):
    model = nn.Linear(2, 2)
    opt = optim.build_optimizer(model, "sgd", 1.0, 0.0)
    s = optim.build_scheduler(opt, sched, total_updates=100, updates_per_epoch=10, **kw)
    out = {}
    for t in steps:
        s.step_update(num_updates=t)
        out[t] = opt.param_groups[0]["lr"]
    return out


def test_schedules_give_the_lr_they_promise():
    step = _lrs("step", [0, 29, 30, 59, 60], step_size=3, gamma=0.1)
    assert step == pytest.approx({0: 1.0, 29: 1.0, 30: 0.1, 59: 0.1, 60: 0.01})
    multi = _lrs("multistep", [0, 19, 20, 49, 50], milestones=[2.0, 5.0], gamma=0.5)
    assert multi == pytest.approx({0: 1.0, 19: 1.0, 20: 0.5, 49: 0.5, 50: 0.25})
    cos = _lrs("cosine", [0, 50, 100], min_lr=0.1)
    assert cos[0] == pytest.approx(1.0) and cos[50] == pytest.approx(0.55) and cos[100] == pytest.approx(0.1)
    warm = _lrs("cosine", [0, 10, 20], warmup_epochs=2)
    assert (
        warm[0] == pytest.approx(1e-3) and warm[10] == pytest.approx(0.5, rel=0.01) and warm[20] == pytest.approx(1.0)
    )
    assert set(_lrs("none", [0, 55, 99]).values()) == {1.0}
    lin = _lrs("linear", [0, 25, 50, 100], min_lr=0.1)
    assert lin == pytest.approx({0: 1.0, 25: 0.775, 50: 0.55, 100: 0.1})


def test_optimizers_and_no_decay_on_norms_and_biases():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))
    model(torch.zeros(1, 3, 8, 8))
    sgd = optim.build_optimizer(model, "sgd", 0.1, 5e-4, momentum=0.8, nesterov=True)
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["nesterov"] and sgd.defaults["momentum"] == 0.8
    for group in sgd.param_groups:
        assert all(p.ndim <= 1 for p in group["params"]) == (group["weight_decay"] == 0.0)
    assert isinstance(optim.build_optimizer(model, "adam", 1e-3, 0.0), torch.optim.Adam)
    assert isinstance(optim.build_optimizer(model, "adamw", 1e-3, 0.05), torch.optim.AdamW)


def _train_tiny(tiny_data, batch, accum, clip=0.0):
    torch.manual_seed(0)
    model = TinyNet()
    loaders = loaders_for(tiny_data, batch_size=batch, seed=3)
    _, state = train_epoch(tiny_parts(model, loaders, accum_steps=accum, grad_clip=clip), len(loaders.train))
    return model, state


def test_accumulating_k_batches_equals_one_k_times_larger_batch(tiny_data):
    small, state_small = _train_tiny(tiny_data, batch=4, accum=4)
    big, state_big = _train_tiny(tiny_data, batch=16, accum=1)
    plain, _ = _train_tiny(tiny_data, batch=4, accum=1)  # 16 small updates: clearly different
    assert state_small.step == state_big.step == 4

    def gap(m):
        return max((a - b).abs().max().item() for a, b in zip(m.parameters(), big.parameters(), strict=True))

    assert gap(small) < 1e-5 < 100 * 1e-5 < gap(plain)


def test_grad_clip_bounds_each_update(tiny_data):
    torch.manual_seed(0)
    before = [p.detach().clone() for p in TinyNet().parameters()]
    clipped, _ = _train_tiny(tiny_data, batch=16, accum=1, clip=1e-4)
    moved = torch.sqrt(sum(((a - b) ** 2).sum() for a, b in zip(clipped.parameters(), before, strict=True)))
    assert 0 < moved <= 4 * 0.5 * 1e-4 * (1 + 0.9 + 0.9**2 + 0.9**3) + 1e-7  # 4 updates, lr 0.5, momentum 0.9


def _run(tiny_data, tmp_path, *extra):
    return main.main(
        [*FAST_RUN, "--data_dir", str(tiny_data), "--output_dir", str(tmp_path), "--wandb", "disabled", *extra]
    )


def test_progressive_resizing_with_augmentation_on_the_device(tiny_data, tmp_path):
    run = _run(
        tiny_data,
        tmp_path,
        "--epochs",
        "3",
        "--arch",
        "resnet9_slim",
        "--aug_backend",
        "torch",
        "--min_img_size",
        "16",
        "--resize_until",
        "0.5",
        "--sched",
        "linear",
        "--steps_per_epoch",
        "3",
    )
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert [int(r["train_size"]) for r in rows] == [16, 32, 32]  # evaluation stays at --img_size 32
    assert all(float(r["val_top1"]) >= 0 for r in rows) and (run / "best_test_preds.csv").exists()


def test_test_preds_at_the_end_equal_those_written_at_each_best(tiny_data, tmp_path):
    each = _run(tiny_data, tmp_path / "each", "--epochs", "2", "--steps_per_epoch", "3", "--tta")
    end = _run(tiny_data, tmp_path / "end", "--epochs", "2", "--steps_per_epoch", "3", "--tta", "--test_preds", "end")
    assert (end / "best_test_preds.csv").read_text() == (each / "best_test_preds.csv").read_text()
    assert len((end / "best_test_preds.csv").read_text().splitlines()) == 1 + 9  # header + the fixture's test images


def test_ema_weights_are_evaluated_saved_and_load_back(tiny_data, tmp_path):
    import evaluate

    run = _run(tiny_data, tmp_path, "--epochs", "2", "--ema", "--ema_decay", "0.5", "--best_on", "ema")
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert all(r["ema_val_top1"] != "" for r in rows)
    last, best = (torch.load(run / n, weights_only=True) for n in ("last.pth.tar", "best.pth.tar"))
    ema_sd = {k.removeprefix("module."): v for k, v in last["ema"].items()}
    key = next(k for k, v in last["state_dict"].items() if v.dtype.is_floating_point and v.dim() == 4)  # the first conv
    assert not torch.equal(ema_sd[key], last["state_dict"][key])  # EMA differs from the model
    best_epoch = json.loads((run / "best_results.json").read_text())["best_epoch"]
    metrics = evaluate.run(["--checkpoint", str(run / "best.pth.tar"), "--output_dir", str(tmp_path / "v")])
    assert metrics["val_top1"] == pytest.approx(float(rows[best_epoch - 1]["ema_val_top1"]))
    assert best["best"]["weights"] == "ema"


def test_lr_scaling_rule(tiny_data, tmp_path):
    run = _run(tiny_data, tmp_path, "--epochs", "1", "--lr_base", "0.1", "--lr_scale_batch", "256", "--sched", "none")
    ckpt = load_checkpoint(run / "last.pth.tar")
    assert ckpt["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.1 * 8 / 256)


def test_patience_stops_cleanly(tiny_data, tmp_path):
    run = _run(tiny_data, tmp_path, "--epochs", "6", "--patience", "1", "--lr_base", "1e-12", "--sched", "none")
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert len(rows) == 2 and "early stop" in (run / "log.txt").read_text()
    assert (run / "best.pth.tar").is_file() and (run / "best_test_preds.csv").is_file()


def test_keep_last_keeps_the_newest_epoch_checkpoints(tiny_data, tmp_path):
    run = _run(tiny_data, tmp_path, "--epochs", "3", "--keep_last", "2", "--steps_per_epoch", "2")
    assert sorted(p.name for p in run.glob("epoch_*.pth.tar")) == ["epoch_002.pth.tar", "epoch_003.pth.tar"]
    assert torch.load(run / "epoch_002.pth.tar", weights_only=True)["epoch"] == 2


def test_pickle_with_code_is_refused_and_runs_nothing(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    bad = tmp_path / "last.pth.tar"
    with open(bad, "wb") as fh:
        pickle.dump({"state_dict": Evil(), "config": {}, "classes": []}, fh)
    with pytest.raises(UserError, match="objects other than tensors and plain data .* refused unloaded, for safety"):
        load_checkpoint(bad)
    with pytest.raises(UserError, match="refused unloaded, for safety"):
        main.main(["--resume", str(tmp_path), "--wandb", "disabled"])
    bad.write_bytes(b"\x80\x04 not a checkpoint")  # garbage: a different message, no false alarm
    with pytest.raises(UserError, match="could not be read"):
        load_checkpoint(bad)
    assert not (tmp_path / "pwned").exists()


def test_resume_refuses_other_settings_and_other_data(trained_run, tmp_path):
    with pytest.raises(UserError, match="--arch 'resnet34'"):
        main.main(["--resume", str(trained_run), "--arch", "resnet34"])
    other = make_layout(tmp_path / "other")
    (other / "wnids.txt").write_text("n01000001\nn02000003\nn03000004\nn09999999\n")
    (other / "train" / "n04000002").rename(other / "train" / "n09999999")
    ann = (other / "val" / "val_annotations.txt").read_text().replace("n04000002", "n09999999")
    (other / "val" / "val_annotations.txt").write_text(ann)
    with pytest.raises(UserError, match="other classes"):
        main.main(["--resume", str(trained_run), "--data_dir", str(other)])


def test_unwritable_output_dir_fails_before_training(tiny_data, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(UserError, match="--output_dir"):
        main.main(
            [*FAST_RUN, "--data_dir", str(tiny_data), "--output_dir", str(blocker / "runs"), "--wandb", "disabled"]
        )


def test_divergence_stops_with_one_line_and_no_broken_checkpoint(tiny_data, tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "main.py",
            *FAST_RUN,
            "--data_dir",
            str(tiny_data),
            "--output_dir",
            str(tmp_path),
            *"--lr_base 1e30 --opt sgd --momentum 0 --epochs 1 --sched none --wandb disabled".split(),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert last.startswith("error: the training loss became non-finite at update") and "lr 1e+30" in last
    assert not list(tmp_path.glob("*/last.pth.tar"))  # nothing half-trained was saved as good


def test_channels_last_matches_within_float_tolerance(tiny_data, tmp_path):
    a = _run(tiny_data, tmp_path / "a", "--epochs", "1", "--steps_per_epoch", "3")  # FAST_RUN pins plain NCHW
    b = _run(tiny_data, tmp_path / "b", "--epochs", "1", "--steps_per_epoch", "3", "--channels_last")
    ra, rb = (next(csv.DictReader(open(r / "metrics.csv"))) for r in (a, b))
    assert float(ra["val_loss"]) == pytest.approx(float(rb["val_loss"]), rel=1e-3)


@pytest.mark.slow
def test_compile_matches_eager_within_float_tolerance(tiny_data, tmp_path):
    a = _run(tiny_data, tmp_path / "a", "--epochs", "1", "--steps_per_epoch", "2")
    b = _run(tiny_data, tmp_path / "b", "--epochs", "1", "--steps_per_epoch", "2", "--compile")
    ra, rb = (next(csv.DictReader(open(r / "metrics.csv"))) for r in (a, b))
    assert float(ra["val_loss"]) == pytest.approx(float(rb["val_loss"]), rel=1e-3)


def test_resume_continues_the_same_wandb_run(tiny_data, tmp_path):
    run = main.main(
        [*FAST_RUN, "--data_dir", str(tiny_data), "--output_dir", str(tmp_path), "--epochs", "1", "--wandb", "offline"]
    )
    main.main(["--resume", str(run)])  # already finished: resumes, trains nothing, closes cleanly
    # offline-run-<time>-<id>, with -1, -2 appended when two processes start within one second
    ids = {
        re.match(r"offline-run-\d{8}_\d{6}-([a-z0-9]+)", p.name).group(1) for p in (run / "wandb").glob("offline-run-*")
    }
    assert len(list((run / "wandb").glob("offline-run-*"))) == 2 and len(ids) == 1
    assert ids == {torch.load(run / "last.pth.tar", weights_only=True)["wandb_id"]}


def test_resuming_a_finished_run_redoes_nothing_unless_its_end_is_missing(trained_run, tmp_path):
    import shutil as sh

    run = tmp_path / trained_run.name
    sh.copytree(trained_run, run)
    written = {f: (run / f).stat().st_mtime_ns for f in ("best_test_preds.csv", "best_results.json", "last.pth.tar")}
    main.main(["--resume", str(run), "--wandb", "disabled"])
    assert {f: (run / f).stat().st_mtime_ns for f in written} == written  # nothing rewritten, no analysis
    said = (run / "log.txt").read_text().splitlines()[-3:]  # a resumed run's lines go on in its log.txt
    assert any("already finished" in line for line in said) and "analyze.py run" in said[-1]
    (run / "best_results.json").unlink()  # as a kill between the last epoch and the end pass leaves it
    main.main(["--resume", str(run), "--wandb", "disabled"])
    assert json.loads((run / "best_results.json").read_text())["epochs_run"] == 2  # the end, done now


def test_not_enough_disk_is_refused_before_training(tiny_data, tmp_path, monkeypatch):
    import shutil as sh

    real = sh.disk_usage
    monkeypatch.setattr(sh, "disk_usage", lambda p: real(p)._replace(free=1_000_000))  # 1 MB left
    with pytest.raises(UserError, match="MB free"):
        _run(tiny_data, tmp_path / "out", "--epochs", "1")
    assert not any((tmp_path / "out").iterdir())


def test_a_new_run_can_start_from_a_finished_runs_weights_head_included(trained_run):
    import arch

    best = trained_run / "best.pth.tar"
    saved = torch.load(best, weights_only=True)["state_dict"]
    model = arch.build_model(FAST_ARCH, 4, img_size=32, pretrained_path=str(best))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())  # the classifier too
    with pytest.raises(UserError, match=f"holds a {FAST_ARCH} run's weights, not resnet34's; pass --arch {FAST_ARCH}"):
        arch.build_model("resnet34", 4, img_size=32, pretrained_path=str(best))


def test_eval_every_skips_evaluations_and_never_saves_an_unevaluated_best(tiny_data, tmp_path):
    run = _run(tiny_data, tmp_path, "--epochs", "5", "--eval_every", "2", "--steps_per_epoch", "2")
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert [bool(r["val_top1"]) for r in rows] == [False, True, False, True, True]  # 2, 4 and the last
    best = json.loads((run / "best_results.json").read_text())["best_epoch"]
    assert best in (2, 4, 5) and torch.load(run / "best.pth.tar", weights_only=True)["epoch"] == best
    only_last = _run(tiny_data, tmp_path / "o", "--epochs", "3", "--eval_every", "0", "--steps_per_epoch", "2")
    assert [bool(r["val_top1"]) for r in csv.DictReader(open(only_last / "metrics.csv"))] == [False, False, True]
