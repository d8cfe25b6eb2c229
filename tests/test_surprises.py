"""What a newcomer trips on, each refused or said at once, with where the bad value came from and
the fix; outputs never overwritten; the submission checked before it is called one."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

import arch
import evaluate
import main
from conftest import FAST_ARCH, FAST_RUN, ROOT, make_layout
from tin.config.cli import parse_config
from tin.data.readers import short_name
from tin.run import analysis, submission
from utils import UserError


def _run(data, out, *extra):
    return main.main([*FAST_RUN, "--data_dir", str(data), "--output_dir", str(out), "--wandb", "disabled", *extra])


# --------------------------------------------------------------------------- silent or destructive
def test_an_empty_test_folder_is_said_at_once_and_no_empty_submission_is_written(tmp_path):
    data = make_layout(tmp_path / "tin", n_test=0)
    run = _run(data, tmp_path / "runs", "--epochs", "1", "--steps_per_epoch", "2")
    log = (run / "log.txt").read_text()
    early = log.split("run folder")[0]  # said before the run starts
    assert "test/images holds no images: this run will write no best_test_preds.csv" in early
    assert not (run / "best_test_preds.csv").exists()
    assert log.strip().splitlines()[-1].endswith(f"weights in {run}")  # the last line promises no submission


def test_the_last_line_says_the_submission_was_checked(trained_run):
    # the run's last line (other tests append refused resumes of this shared run to its log)
    last = [line for line in (trained_run / "log.txt").read_text().splitlines() if " INFO done: " in line][-1]
    assert last.endswith(f"submit {trained_run / 'best_test_preds.csv'} (9 rows, checked)")


def test_a_header_only_or_foreign_submission_is_refused(tmp_path):
    path = tmp_path / "preds.csv"
    path.write_text("image,label\n")
    with pytest.raises(UserError, match="0 rows for 2 test images"):
        submission.check_predictions(path, ["a.JPEG", "b.JPEG"], ["n1"])
    path.write_text("image,label\na.JPEG,n1\nb.JPEG,n9\n")
    with pytest.raises(UserError, match="labels that are no class"):
        submission.check_predictions(path, ["a.JPEG", "b.JPEG"], ["n1"])
    path.write_text("image,label\na.JPEG,n1\nb.JPEG,n1\n")
    assert submission.check_predictions(path, ["b.JPEG", "a.JPEG"], ["n1"]) == 2


def test_evaluate_py_never_overwrites_and_takes_a_run_folder(trained_run, tmp_path):
    trained_run = Path(shutil.copytree(trained_run, tmp_path / trained_run.name, ignore=shutil.ignore_patterns("eval")))
    before = (trained_run / "best_test_preds.csv").read_text()
    evaluate.run(["--checkpoint", str(trained_run)])  # a run folder, as --resume takes one
    evaluate.run(["--checkpoint", str(trained_run), "--tta"])  # --tta alone means flip, as in main.py
    evaluate.run(["--checkpoint", str(trained_run)])
    folders = sorted(p.name for p in (trained_run / "eval").iterdir())
    assert folders == ["best", "best_2", "best_tta"]  # each evaluation its own folder
    assert all((trained_run / "eval" / f / "test_preds.csv").is_file() for f in folders)
    assert (trained_run / "best_test_preds.csv").read_text() == before  # the run's own files untouched
    with pytest.raises(UserError, match="already holds an evaluation"):
        evaluate.run(["--checkpoint", str(trained_run), "--output_dir", str(trained_run / "eval" / "best")])
    with pytest.raises(UserError, match="holds no best.pth.tar"):
        evaluate.run(["--checkpoint", str(tmp_path)])


def test_report_writes_into_reports_and_finds_the_runs_inside_a_sweep(trained_run, tmp_path):
    sweep = tmp_path / "sweep_x" / "demo"
    sweep.mkdir(parents=True)
    subprocess.run(["cp", "-r", str(trained_run), str(sweep)], check=True)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "report.py"), str(tmp_path / "sweep_x")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**__import__("os").environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 0, proc.stderr
    assert trained_run.name in proc.stdout  # found two levels down
    assert list((tmp_path / "reports").glob("*/report.md")) and not (tmp_path / "report.md").exists()


# --------------------------------------------------------------------------- late or unclear
def test_errors_name_the_preset_a_bad_value_came_from(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("epochs: 3\nwarmup_epochs: 5\n")
    with pytest.raises(UserError, match=rf"--warmup_epochs 5.0 comes from {preset}"):
        parse_config(["--config", str(preset)])
    with pytest.raises(UserError, match="must lie in") as info:
        parse_config(["--config", str(preset), "--warmup_epochs", "7"])  # said on the command line: no note
    assert "comes from" not in str(info.value).split("(got 7.0)")[1].split("--epochs")[0]


def test_a_sweep_refuses_a_preset_and_set_that_clash_before_any_run(tmp_path):
    proc = subprocess.run(
        [sys.executable, "sweep.py", "configs/seed002_budget.yaml", "--set", "epochs=1", "--sweep_dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    message = proc.stderr.strip()
    assert message.startswith("error: configs/seed002_budget.yaml with --set epochs=1: --warmup_epochs")
    assert "comes from configs/seed002_budget.yaml" in message and "--set KEY=VALUE" in message
    assert not [p for p in tmp_path.iterdir() if p.is_dir()]  # no run started


def test_a_resumed_runs_config_yaml_is_a_preset_again(trained_run, tmp_path):
    main.main(["--resume", str(trained_run)])  # finished: resumes to nothing, rewrites config.yaml
    saved = yaml.safe_load((trained_run / "config.yaml").read_text())
    assert saved["resume"] == ""
    assert parse_config(["--config", str(trained_run / "config.yaml")]).arch == FAST_ARCH


def test_the_scripts_agree_on_tta_and_run_folders():
    assert parse_config(["--tta"]).tta and parse_config(["--tta", "flip"]).tta
    assert not parse_config(["--tta", "none"]).tta
    assert evaluate.parse_args(["--checkpoint", "RUN", "--tta"]).tta == "flip"


def test_near_misses_get_a_did_you_mean(tmp_path):
    with pytest.raises(UserError, match=r"unknown option\(s\) --epoch \(did you mean --epochs\?\)"):
        parse_config(["--epoch", "3"])
    with pytest.raises(UserError, match="did you mean resnet18"):
        parse_config(["--arch", "resnet81"])
    preset = tmp_path / "p.yaml"
    preset.write_text("batchsize: 64\n")
    with pytest.raises(UserError, match=r"batchsize \(did you mean batch_size\?\)"):
        parse_config(["--config", str(preset)])


def test_the_folder_holding_the_dataset_is_pointed_to(tmp_path):
    make_layout(tmp_path / "data" / "tiny-imagenet-200")
    with pytest.raises(UserError, match=rf"pass --data_dir {tmp_path / 'data' / 'tiny-imagenet-200'}"):
        _run(tmp_path / "data", tmp_path / "runs")
    # beside a demo dataset, which sorts first: the full dataset is named first, every one with its classes
    full, demo = tmp_path / "data" / "tiny-imagenet-200", tmp_path / "data" / "demo-digits"
    (demo).mkdir()
    (demo / "wnids.txt").write_text("n01\nn02\n")
    with pytest.raises(
        UserError, match=rf"these do: {full} \(4 classes\), {demo} \(2 classes\).*--data_dir {full} for"
    ):
        _run(tmp_path / "data", tmp_path / "runs")


def test_max_params_is_checked_before_the_data_is_decoded_and_suggests_a_model_that_fits(tiny_data, tmp_path):
    cache = tmp_path / "cache"
    with pytest.raises(UserError, match=r"over --max_params 1,000,000; --arch budget_cnn \(\d{3},\d{3}\) fits"):
        _run(tiny_data, tmp_path / "runs", "--arch", "resnet18", "--max_params", "1000000", "--cache_dir", str(cache))
    assert not cache.exists()  # refused before any decoding


def test_the_catalogue_counts_without_building_real_models():
    for name in ("resnet18", "budget_cnn", "vit_tiny"):
        real = sum(p.numel() for p in arch.build_model(name, 200, 64).parameters())
        assert arch.count_params(name, 200, 64) == real
    rows = {r["name"]: r for r in arch.catalogue(64)}
    assert rows["budget_cnn"]["params"] == 951_176 and rows["resnet18"]["gflops"] == pytest.approx(0.296, abs=0.01)


# --------------------------------------------------------------------------- noise
def test_class_names_are_never_cut_mid_word():
    assert short_name("goldfish, Carassius auratus") == "goldfish"
    assert short_name("black widow, Latrodectus mactans") == "black widow"
    assert short_name("teapot") == "teapot"


def test_a_cnn_run_says_nothing_of_transformer_knobs_it_was_not_given(tiny_data, tmp_path):
    flags = FAST_RUN  # --attn_drop_rate at its default, 0.1: not the user's doing
    args = ["--data_dir", str(tiny_data), "--output_dir", str(tmp_path / "a"), "--epochs", "1", "--wandb", "disabled"]
    quiet = main.main([*flags, *args])
    assert "attn_drop_rate" not in (quiet / "log.txt").read_text()
    told = _run(tiny_data, tmp_path / "b", "--epochs", "1", "--steps_per_epoch", "1", "--attn_drop_rate", "0.3")
    assert f"{FAST_ARCH} has no --attn_drop_rate; ignored" in (told / "log.txt").read_text()  # the user set it


def test_a_200_class_confusion_names_its_most_confused_classes_legibly(tmp_path):
    rng = np.random.default_rng(0)
    cm = np.diag(rng.integers(20, 50, 60)) + rng.integers(0, 2, (60, 60))
    cm[3, 7] = cm[7, 3] = 30  # one pair confused a lot
    hard = analysis.most_confused(cm, k=10)
    assert 3 in hard and 7 in hard
    names = [f"class {i}, a longer second name" for i in range(60)]
    analysis.plot_confusion(cm, names, tmp_path / "all.png")
    analysis.plot_confusion(cm[np.ix_(hard, hard)], [names[i] for i in hard], tmp_path / "top.png", "top")
    assert (tmp_path / "all.png").stat().st_size > 0 and (tmp_path / "top.png").stat().st_size > 0


def test_tsne_has_a_legend_of_the_best_represented_classes(tmp_path, monkeypatch):
    import torch

    figures = []
    monkeypatch.setattr(analysis.plt, "close", figures.append)
    labels = torch.cat([torch.full((40,), 2), torch.arange(200) % 15])  # class 2: the most images
    names = [f"class{i}, a second name" for i in range(15)]
    analysis.plot_tsne(torch.randn(len(labels), 8), labels, tmp_path / "tsne.png", names=names, highlight=5)
    legend = [t.get_text() for t in figures[-1].axes[0].get_legend().get_texts()]
    assert len(legend) == 6 and legend[1] == "class2" and legend[0].startswith("other classes")
