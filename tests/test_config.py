"""Config: the seed's flags and defaults, YAML < command line precedence, clear errors."""

from __future__ import annotations

import dataclasses

import pytest

from tin.config import schema
from tin.config.cli import parse_config
from tin.config.schema import Config
from utils import UserError


def test_seed_flags_and_defaults():
    cfg = parse_config([])
    assert (cfg.arch, cfg.lr_base, cfg.batch_size, cfg.epochs) == ("swin_tiny", None, 128, 100)  # lr: auto
    assert (cfg.amp, cfg.amp_dtype, cfg.channels_last, cfg.warmup_epochs) == ("auto", "auto", "auto", None)
    assert (cfg.drop_rate, cfg.attn_drop_rate, cfg.drop_path_rate) == (0.2, 0.1, 0.1)
    assert (cfg.data_dir, cfg.output_dir, cfg.img_size) == ("data/tiny-imagenet-200", "checkpoints", 64)
    assert (cfg.weight_decay, cfg.seed, cfg.device, cfg.aug_schedule) == (0.05, 42, "auto", "cosine")


def test_seed_command_line_parses():
    cfg = parse_config("--arch resnet18 --batch_size 128 --lr_base 1e-3 --epochs 100".split())
    assert (cfg.arch, cfg.batch_size, cfg.lr_base, cfg.epochs) == ("resnet18", 128, 1e-3, 100)
    assert [parse_config(a).amp for a in ([], ["--amp"], ["--no-amp"], ["--amp", "auto"])] == "auto on off auto".split()
    assert parse_config(["--no-channels_last"]).channels_last == "off"
    assert parse_config(["--lr_base", "auto", "--warmup_epochs", "auto"]).lr_base is None


def test_yaml_values_become_defaults_and_command_line_wins(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("arch: resnet34\nlr_base: 1e-3\nepochs: 7\namp: true\nchannels_last: false\n")
    cfg = parse_config(["--config", str(preset), "--epochs", "3"])
    assert (cfg.arch, cfg.lr_base, cfg.epochs, cfg.amp, cfg.channels_last) == ("resnet34", 1e-3, 3, "on", "off")
    assert isinstance(cfg.lr_base, float)
    preset.write_text("lr_base: auto\nwarmup_epochs: null\n")
    assert parse_config(["--config", str(preset)]).lr_base is None


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("archh: resnet18\n", "unknown key(s) archh"),
        ("epochs: many\n", "epochs must be int"),
        ("aug_schedule: wobbly\n", "aug_schedule must be one of"),
        ("- just\n- a list\n", "must be a mapping"),
        ("arch: [unclosed\n", "not valid YAML"),
    ],
)
def test_bad_yaml_is_a_one_line_error_naming_the_file(tmp_path, text, fragment):
    preset = tmp_path / "bad.yaml"
    preset.write_text(text)
    with pytest.raises(UserError) as err:
        parse_config(["--config", str(preset)])
    assert fragment in str(err.value) and str(preset) in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_yaml_file(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        parse_config(["--config", str(tmp_path / "nope.yaml")])


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--epochs", "0"], "--epochs must be >= 1"),
        (["--aug_strength", "1.5"], "--aug_strength must lie in [0, 1]"),
        (["--drop_path_rate", "1"], "--drop_path_rate must lie in [0, 1)"),
        (["--batch_size", "7"], "--batch_size must be even"),
        (["--warmup_epochs", "5", "--epochs", "5"], "--warmup_epochs"),
        (["--save_every_min", "-1"], "--save_every_min must be >= 0 minutes"),
    ],
)
def test_bad_values_name_the_flag(argv, fragment):
    with pytest.raises(UserError) as err:
        parse_config(argv)
    assert fragment in str(err.value)


def test_odd_batch_is_fine_without_mixing():
    assert parse_config(["--batch_size", "7", "--mix_prob", "0"]).batch_size == 7


def test_unparseable_value_exits_like_argparse(capsys):
    with pytest.raises(SystemExit) as exc:
        parse_config(["--epochs", "ten"])
    assert exc.value.code == 2 and "--epochs" in capsys.readouterr().err


def test_config_is_frozen_and_plain():
    cfg = parse_config([])
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.arch = "x"  # type: ignore[misc]
    cfg = parse_config(["--teacher", "a", "b"])
    plain = (int, float, str, bool)
    assert all(v is None or isinstance(v, plain) or {type(x) for x in v} <= {str} for v in cfg.to_dict().values())
    assert cfg.teacher == ("a", "b") and cfg.to_dict()["teacher"] == ["a", "b"]  # frozen, saved as a list
    assert Config(**cfg.to_dict()) == cfg


def test_a_run_saved_before_a_default_changed_resumes_with_its_old_behaviour():
    old = dataclasses.asdict(parse_config([]))
    del old["aug_backend"]  # saved before --aug_backend existed: it used albumentations
    old.update(amp=True, channels_last=True, amp_dtype="bf16", lr_base=2e-5)  # then: bools and a number
    resumed = parse_config([], base=old)
    assert (resumed.aug_backend, resumed.amp, resumed.channels_last, resumed.lr_base) == (
        "albumentations",
        "on",
        "on",
        2e-5,
    )
    assert parse_config([], base={**old, "aug_backend": "torch"}).aug_backend == "torch"
    assert parse_config([]).aug_backend == "torch"


def test_resume_may_change_is_declared_on_the_flags():
    from tin.config.schema import may_change_on_resume

    free = may_change_on_resume()
    assert {"workers", "device", "data_dir", "amp", "channels_last", "wandb"} <= free
    assert not {"arch", "lr_base", "epochs", "seed", "time_budget", "aug_backend"} & free


def test_tta_is_flip_none_or_final_on_the_command_line_and_in_yaml(tmp_path):
    argvs = ([], ["--tta"], ["--tta", "flip"], ["--tta", "none"], ["--tta", "final"])
    assert [parse_config(a).tta for a in argvs] == [False, True, True, False, "final"]
    final, flip = parse_config(["--tta", "final"]), parse_config(["--tta"])
    assert (final.tta_each, final.tta_end, flip.tta_each, flip.tta_end) == (False, True, True, True)
    preset = tmp_path / "p.yaml"
    for text, value in (("true", True), ("false", False), ("flip", True), ("none", False), ("final", "final")):
        preset.write_text(f"tta: {text}\n")  # older presets and run folders hold true/false
        assert parse_config(["--config", str(preset)]).tta == value
    preset.write_text("tta: sideways\n")
    with pytest.raises(UserError, match="p.yaml: tta must be true, false or one of flip, none, final, got 'sideways'"):
        parse_config(["--config", str(preset)])


def test_a_run_saved_with_tta_true_before_the_cadence_resumes_as_it_was(tmp_path):

    saved = parse_config(["--tta"]).to_dict()
    del saved["save_every_min"]  # saved before --save_every_min: a checkpoint every epoch
    path = tmp_path / "last.pth.tar"
    resumed = parse_config([], base=saved)
    assert (resumed.tta, resumed.save_every_min) == (True, 0.0)
    schema.check_compatible(saved, resumed.to_dict(), path)  # the same run
    schema.check_compatible(saved, parse_config(["--save_every_min", "2"], base=saved).to_dict(), path)
    with pytest.raises(UserError, match=r"--tta 'final' \(the run has True\)"):  # other evaluations: another run
        schema.check_compatible(saved, parse_config(["--tta", "final"], base=saved).to_dict(), path)
