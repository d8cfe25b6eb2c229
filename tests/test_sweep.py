"""Experiments (issue 24): named runs, grids over values and seeds that resume, and a search that
chooses on a held-out part of train and never reads val."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import main
import report
import sweep
from conftest import FAST_RUN, ROOT, make_layout
from tin.config.cli import parse_config
from tin.data.readers import read_dataset
from tin.sweep import experiments, search
from utils import UserError

TINY = {  # a run of a few seconds: most of a trial's time is the process starting
    "arch": "budget_cnn",
    "img_size": 32,
    "batch_size": 8,
    "lr_base": 3.0e-3,
    "warmup_epochs": 0,
    "workers": 0,
    "wandb": "disabled",
    "no_analysis": True,
    "amp": "off",
    "channels_last": "off",
    "drop_rate": 0.0,
    "drop_path_rate": 0.0,
    "attn_drop_rate": 0.0,
    "mix_prob": 0.0,
    "steps_per_epoch": 4,
    "test_preds": "end",
}


def _preset(tmp_path: Path, data: Path, **values) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump({**TINY, "data_dir": str(data), **values}))
    return path


# --------------------------------------------------------------------------- names and tags
def test_a_named_tagged_run_says_so_in_its_folder_results_config_and_wandb(tiny_data, tmp_path, monkeypatch):
    import types

    import wandb

    seen = {}
    fake = types.SimpleNamespace(id="x", define_metric=lambda *a, **k: None, log=lambda row: None, finish=lambda: None)
    monkeypatch.setattr(wandb, "init", lambda **kw: seen.update(kw) or fake)
    run = main.main(
        [*FAST_RUN, "--data_dir", str(tiny_data), "--output_dir", str(tmp_path), "--epochs", "1"]
        + ["--steps_per_epoch", "2", "--name", "lr-probe", "--tags", "baseline, week2", "--wandb", "offline"]
    )
    assert run.name.endswith("_lr-probe") and run.parent == tmp_path
    best = json.loads((run / "best_results.json").read_text())
    assert (best["name"], best["tags"]) == ("lr-probe", ["baseline", "week2"])
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert (saved["name"], saved["tags"]) == ("lr-probe", "baseline, week2")
    assert seen["tags"] == ["baseline", "week2"] and seen["config"]["name"] == "lr-probe"
    with pytest.raises(UserError, match="--name 'a/b': a run name is a folder name"):
        parse_config(["--name", "a/b"])


# --------------------------------------------------------------------------- grids and seeds
def test_a_grid_is_the_cross_product_of_its_values_times_the_seeds(tmp_path):
    first, second = tmp_path / "a.yaml", tmp_path / "b.yaml"
    first.write_text("arch: resnet18\nseed: 7\n")
    second.write_text("arch: budget_cnn\n")
    grid = sweep.parse_grid(["lr_base=1e-3,2e-3", "weight_decay=0.05,0.1,0.2"])
    jobs = sweep.expand([str(first), str(second)], {"epochs": 3}, grid, 2, tmp_path / "sw")
    assert len(jobs) == 2 * 2 * 3 * 2
    assert len({j.name for j in jobs}) == len(jobs) and len({j.group for j in jobs}) == 12
    a = [j for j in jobs if j.group == "a_lr_base-1e-3_weight_decay-0.1"]
    assert [j.seed for j in a] == [7, 8]  # the preset's seed and the next
    assert a[0].values["lr_base"] == 0.001 and a[0].values["weight_decay"] == 0.1 and a[0].values["epochs"] == 3
    assert a[1].name == "a_lr_base-1e-3_weight_decay-0.1_s8" and a[1].out == tmp_path / "sw" / a[1].name
    assert {j.seed for j in jobs if j.values["arch"] == "budget_cnn"} == {42, 43}  # the default seed
    with pytest.raises(UserError, match="--grid wd=1: .*unknown key wd"):
        sweep.expand([str(first)], {}, sweep.parse_grid(["wd=1"]), 1, tmp_path / "sw")
    with pytest.raises(UserError, match="expected KEY=V1,V2"):
        sweep.parse_grid(["lr_base=1e-3,"])


def test_a_sweep_folder_refuses_other_settings_for_runs_it_has(tmp_path):
    (job,) = sweep.expand([str(_preset(tmp_path, tmp_path))], {}, {}, 1, tmp_path / "sw")
    job.write()
    (job.out / "2026-01-01_00-00-00_tiny").mkdir(parents=True)
    (job.out / "2026-01-01_00-00-00_tiny" / "config.yaml").write_text("arch: budget_cnn\n")
    job.write()  # the same settings: resumable
    (changed,) = sweep.expand([str(_preset(tmp_path, tmp_path))], {"epochs": 9}, {}, 1, tmp_path / "sw")
    with pytest.raises(UserError, match="holds other settings .* pass another --sweep_dir"):
        changed.write()


def test_the_summary_gives_mean_and_std_over_seeds():
    rows = [
        {"name": f"a_s{s}", "group": "a", "seed": s, "status": "ok", "val_top1": v, "val_top5": 90.0}
        for s, v in ((1, 40.0), (2, 42.0), (3, 44.0))
    ]
    rows.append({"name": "b", "group": "b", "seed": 1, "status": "failed (exit 1)", "val_top1": None})
    groups = experiments.group_rows(rows)
    assert groups[0]["configuration"] == "a" and groups[0]["val_top1"] == "42.00 ± 2.00"
    assert groups[0]["runs"] == "3/3" and groups[1]["runs"] == "0/1"


def _rows(run: Path) -> list[dict]:
    return list(csv.DictReader(open(run / "metrics.csv")))


# Loaded by every Python process started with its folder on PYTHONPATH: the sweep's second run, after
# its first epoch (the first update of epoch 2), sends the sweep a SIGINT (a user's Ctrl-C), then waits
# for the sweep to pass it on, so the moment does not depend on the machine's speed (a poll from the
# test was too late on a fast, idle machine: the run had finished).
CTRL_C_IN_THE_SECOND_RUN = """
import os, signal, sys, time
if "tiny_s43" in " ".join(sys.argv):
    from torch.optim.optimizer import register_optimizer_step_post_hook
    steps = []
    def _hook(optimizer, args, kwargs):
        steps.append(1)
        if len(steps) == int(os.environ["TIN_TEST_CTRL_C_AT"]):
            os.kill(os.getppid(), signal.SIGINT)
            time.sleep(3)  # the sweep's SIGINT to this run arrives meanwhile; it stops at the next update
    register_optimizer_step_post_hook(_hook)
"""


def test_an_interrupted_sweep_run_again_finishes_without_repeating_work(tmp_path):
    data = make_layout(tmp_path / "data")
    preset = _preset(tmp_path, data, epochs=4)
    command = [sys.executable, "sweep.py", str(preset), "--seeds", "2", "--sweep_dir", str(tmp_path / "sw")]
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(CTRL_C_IN_THE_SECOND_RUN)
    per_epoch = len(read_dataset("tiny-imagenet", data).train) // TINY["batch_size"]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(hooks), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    }
    env["TIN_TEST_CTRL_C_AT"] = str(per_epoch + 2)  # inside epoch 2
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    second = tmp_path / "sw" / "tiny_s43"
    out = proc.communicate(timeout=400)[0]
    assert proc.returncode == 130, out
    first = experiments.run_folders(tmp_path / "sw" / "tiny_s42")
    assert len(first) == 1 and experiments.is_finished(first[0])
    (interrupted,) = experiments.run_folders(second)
    assert not experiments.is_finished(interrupted) and len(_rows(interrupted)) < 4
    finished_before = (first[0] / "metrics.csv").stat().st_mtime_ns

    again = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "tiny_s42: finished before" in again.stdout and f"tiny_s43: resumed ({interrupted.name})" in again.stdout
    assert (first[0] / "metrics.csv").stat().st_mtime_ns == finished_before  # not run again
    assert experiments.run_folders(second) == [interrupted]  # continued in its own folder
    assert [int(r["epoch"]) for r in _rows(interrupted)] == [1, 2, 3, 4]  # each epoch once
    manifest = json.loads((tmp_path / "sw" / "manifest.json").read_text())["runs"]
    assert {k: v["status"] for k, v in manifest.items()} == {"tiny_s42": "ok", "tiny_s43": "ok"}
    assert "| tiny | 2/2 | 42,43 |" in (tmp_path / "sw" / "summary.md").read_text()


def test_report_groups_the_seeds_of_one_configuration(tmp_path):
    runs = [
        {"name": f"lr1_s{s}", "seed": s, "_config": "A", "val_top1": v, "val_top5": 80.0, "wall_time_s": 10.0}
        for s, v in ((1, 50.0), (2, 52.0))
    ]
    runs.append({"name": "other", "seed": 1, "_config": "B", "val_top1": 30.0, "val_top5": 60.0, "wall_time_s": 9.0})
    (group,) = report.seed_groups(runs)
    assert group["configuration"] == "lr1" and group["val_top1"] == "51.00 ± 1.41"
    assert report.configuration({"seed": 1, "lr_base": 0.1, "name": "x", "workers": 2}) == report.configuration(
        {"seed": 2, "lr_base": 0.1, "name": "y", "workers": 8}
    )


# --------------------------------------------------------------------------- search
def test_the_search_refuses_to_choose_on_val(tmp_path):
    preset = _preset(tmp_path, tmp_path, trainval=True)
    assert sweep.main([str(preset), "--search", "2", "--sweep_dir", str(tmp_path / "sw")]) == 2
    preset = _preset(tmp_path, tmp_path)
    args = sweep.build_parser().parse_args([str(preset), "--search", "2", "--val_split", "0"])
    with pytest.raises(UserError, match="trials need a held-out part of train"):
        search.prepare(str(preset), {}, args, tmp_path / "sw")
    assert not (tmp_path / "sw").exists()


def test_search_spaces_are_checked_and_the_default_centres_on_the_preset(tmp_path):
    space = search.parse_space(
        {"lr_base": {"low": "1e-4", "high": 1e-2, "log": True}, "opt": ["adamw", "sgd"], "epochs": 3}, "s.yaml"
    )
    assert space["lr_base"] == search.Dim(1e-4, 1e-2, log=True) and space["opt"].choices == ("adamw", "sgd")
    assert space["epochs"] == 3  # fixed
    for bad, message in (
        ({"lr_bse": {"low": 1, "high": 2}}, "did you mean lr_base"),
        ({"val_split": [0.1, 0.2]}, "not a hyperparameter a search may choose"),
        ({"opt": {"low": 1, "high": 2}}, "not a number"),
        ({"lr_base": {"low": 0, "high": 1, "log": True}}, "low > 0 with log"),
    ):
        with pytest.raises(UserError, match=message):
            search.parse_space(bad, "s.yaml")
    default = search.default_space(parse_config(["--arch", "resnet18", "--lr_base", "2e-3"]))
    assert default["lr_base"] == search.Dim(5e-4, 8e-3, log=True)
    assert {"weight_decay", "label_smoothing", "aug_strength", "mix_prob", "drop_path_rate"} <= set(default)
    assert yaml.safe_load((ROOT / "configs" / "spaces" / "example.yaml").read_text())  # the documented example
    search.parse_space(yaml.safe_load((ROOT / "configs" / "spaces" / "example.yaml").read_text()), "example")


def test_bench_subset_makes_a_smaller_dataset_in_the_same_layout(tiny_data, tmp_path):
    from bench.subset import make_subset

    data = read_dataset("tiny-imagenet", make_subset(tiny_data, 2, tmp_path / "sub", test_images=3))
    assert (len(data.classes), len(data.train), len(data.val), len(data.test)) == (2, 32, 10, 3)


def test_a_held_out_run_never_lists_val(tmp_path):
    data = make_layout(tmp_path / "data", n_train=4, n_val=1, n_test=1)
    shutil.rmtree(data / "val")
    assert read_dataset("tiny-imagenet", data, val=False).val is None


def test_a_search_prunes_resumes_from_its_study_and_never_reads_val(tmp_path, monkeypatch, capsys):
    import optuna

    monkeypatch.setattr(experiments, "POLL_S", 0.1)
    data = make_layout(tmp_path / "data")
    preset = _preset(tmp_path, data, epochs=4)
    space = tmp_path / "space.yaml"
    space.write_text("lr_base: [3.0e-3, 1.0e-8]\nlabel_smoothing: 0.0\n")
    sw = tmp_path / "sw"
    sw.mkdir()
    storage = f"sqlite:///{sw / 'study.db'}"
    study = optuna.create_study(study_name="search", storage=storage, direction="maximize")
    for lr in (3e-3, 1e-8):  # a good trial first, then a hopeless one: the pruner's case, whatever TPE draws
        study.enqueue_trial({"lr_base": lr})
    args = [str(preset), "--search", "2", "--space", str(space), "--val_split", "0.25", "--sweep_dir", str(sw)]

    (data / "val").rename(data / "val.hidden")  # any read of val during the search fails its trial
    assert sweep.main([*args, "--seeds", "0"]) == 0
    states = [t.state.name for t in optuna.load_study(study_name="search", storage=storage).trials]
    assert states == ["COMPLETE", "PRUNED"], states
    assert "search only (--seeds 0)" in capsys.readouterr().out
    for name in ("search.md", "trials.csv", "search.png", "best.yaml"):
        assert (sw / name).is_file()
    pruned = next(t for t in optuna.load_study(study_name="search", storage=storage).trials if t.state.name == "PRUNED")
    run = Path(pruned.user_attrs["run_dir"])
    assert (run / "last.pth.tar").is_file() and not experiments.is_finished(run)  # stopped cleanly, saved

    optuna.load_study(study_name="search", storage=storage).ask()  # a trial a killed sweep left RUNNING
    assert sweep.main([*args, "--search", "3", "--seeds", "0"]) == 0  # the same study, one more trial
    trials = optuna.load_study(study_name="search", storage=storage).trials
    assert [t.state.name for t in trials[:2]] == states  # kept, not run again
    assert trials[2].state.name == "FAIL" and trials[2].user_attrs["interrupted"]
    assert trials[3].state.name in ("COMPLETE", "PRUNED") and trials[3].user_attrs["resumes"] == 2
    assert len(list((sw / "trials").glob("trial_*.yaml"))) == 3  # one run per counted trial

    (data / "val.hidden").rename(data / "val")
    assert sweep.main([*args, "--search", "3", "--baseline"]) == 0  # no new trial: the retrain, on val
    out = capsys.readouterr().out
    assert "trial 4" not in out and "retraining on all of train" in out
    best = optuna.load_study(study_name="search", storage=storage).best_trial
    final = experiments.run_folders(sw / "final" / f"best-trial{best.number}")[0]
    saved = yaml.safe_load((final / "config.yaml").read_text())
    assert (saved["val_split"], saved["eval_every"], saved["lr_base"]) == (0.0, 0, best.params["lr_base"])
    assert [r["val_top1"] for r in _rows(final)][:-1] == [""] * 3  # val evaluated once, after the last epoch
    text = (sw / "search.md").read_text()
    assert "Retrained on all of train, reported once on val" in text and "| baseline | 1/1 |" in text
    importances = text.split("## Parameter importances", 1)[1]
    assert "Not computed" in importances or "a rough hint, not a finding" in importances  # 3 trials: no finding
    runs = [c.parent for c in sw.rglob("config.yaml") if (c.parent / "log.txt").is_file()]
    trials = [p for p in runs if yaml.safe_load((p / "config.yaml").read_text())["val_split"]]
    done = [line for p in trials for line in (p / "log.txt").read_text().splitlines() if " done: " in line][-1]
    assert "held-out top-1 (on 0.25 of train, not the val split)" in done and "submit" not in done


def _fake_run(folder: Path, seed: int, top1: float, dataset: dict | None, data_dir: str = "data/x") -> Path:
    """A finished run's three files, as main.py writes them (best_results.json with or without the
    dataset's identity: runs written before it had none)."""
    folder.mkdir(parents=True)
    cfg = {"arch": "resnet18", "lr_base": 0.1, "seed": seed, "data_dir": data_dir, "name": "r18", "workers": 2}
    (folder / "config.yaml").write_text(yaml.safe_dump(cfg))
    best = {"name": "r18", "arch": "resnet18", "val_top1": top1, "val_top5": 80.0, "wall_time_seconds": 10.0}
    (folder / "best_results.json").write_text(json.dumps({**best, **({"dataset": dataset} if dataset else {})}))
    (folder / "metrics.csv").write_text(f"epoch,val_top1,val_loss,images_per_second\n1,{top1},1.0,100\n")
    return folder


def test_report_never_averages_runs_of_two_datasets_and_says_which_it_kept_apart(tmp_path):
    """Two 20-class runs and one 10-class run of one recipe, all from the same --data_dir path (the
    case a user met: `| resnet18 | 3/3 | 42,43,44 | 13.78 ± 3.25 |`): the 20-class seeds are grouped,
    the 10-class run is not, the table names each run's dataset, and the report says why."""
    twenty = {"kind": "tiny-imagenet", "classes": 20, "train": 10000, "val": 1000, "test": 0, "digest": "aaaa11112222"}
    ten = {"kind": "tiny-imagenet", "classes": 10, "train": 1074, "val": 355, "test": 368, "digest": "bbbb33334444"}
    runs = tmp_path / "runs"
    _fake_run(runs / "a", 42, 20.0, twenty)
    _fake_run(runs / "b", 43, 22.0, twenty)
    _fake_run(runs / "c", 44, 5.0, ten)
    out = tmp_path / "report"
    assert report.main([str(runs), "--output_dir", str(out)]) == 0
    text = (out / "report.md").read_text()
    assert "| r18 | 2/2 | 42,43 | 21.00 ± 1.41 |" in text  # the 20-class seeds only
    assert "3/3" not in text and "42,43,44" not in text
    assert "tiny-imagenet, 10 classes, 1,074 train (bbbb33)" in text and "tiny-imagenet, 20 classes" in text
    assert "the same recipe on other datasets, not grouped" in text and ": c" in text
    # runs written before the identity existed are told apart by path, and say so
    old = tmp_path / "old"
    _fake_run(old / "d", 42, 20.0, None, data_dir="data/tin20")
    _fake_run(old / "e", 43, 5.0, None, data_dir="data/demo-digits")
    assert report.main([str(old), "--output_dir", str(tmp_path / "report2")]) == 0
    text = (tmp_path / "report2" / "report.md").read_text()
    assert "data/tin20 (by path: an older run)" in text and "2/2" not in text


def test_a_runs_results_name_its_dataset(trained_run, tiny_data):
    data = json.loads((trained_run / "best_results.json").read_text())["dataset"]
    classes = (tiny_data / "wnids.txt").read_text().split()
    assert data["kind"] == "tiny-imagenet" and data["classes"] == len(classes) and len(data["digest"]) == 12
    assert data["train"] > 0 and data["val"] > 0
