"""Checks of a whole configuration: each bad value, or combination of values, refused with a message
that names it and the fix, before anything is built."""

from __future__ import annotations

import re

import arch
import transforms
from tin.config.schema import Config
from utils import UserError


def validate(cfg: Config, origins: dict[str, str] | None = None) -> Config:
    """Reject values that would fail later, naming the flag, the fix and, for a value that was not
    on the command line, where it came from (`origins`: field -> a preset file, the resumed run)."""
    try:
        return _validate(cfg)
    except UserError as exc:
        named = dict.fromkeys(re.findall(r"--(\w+)", str(exc)))
        notes = [f"--{k} {getattr(cfg, k)!r} comes from {origins[k]}" for k in named if k in (origins or {})]
        raise UserError(f"{exc}{' (' + '; '.join(notes) + ')' if notes else ''}") from None


def _validate(cfg: Config) -> Config:
    checks = [
        (cfg.epochs >= 1, f"--epochs must be >= 1 (got {cfg.epochs})"),
        (cfg.batch_size >= 1, f"--batch_size must be >= 1 (got {cfg.batch_size})"),
        (cfg.lr_base is None or cfg.lr_base > 0, f"--lr_base must be > 0 or auto (got {cfg.lr_base})"),
        (cfg.img_size >= 16, f"--img_size must be >= 16 pixels (got {cfg.img_size})"),
        (cfg.workers >= 0, f"--workers must be >= 0 (got {cfg.workers})"),
        (0 <= cfg.aug_strength <= 1, f"--aug_strength must lie in [0, 1] (got {cfg.aug_strength})"),
        (0 <= cfg.mix_prob <= 1, f"--mix_prob must lie in [0, 1] (got {cfg.mix_prob})"),
        (cfg.mixup_alpha >= 0 and cfg.cutmix_alpha >= 0, "--mixup_alpha and --cutmix_alpha must be >= 0"),
        (0 <= cfg.label_smoothing < 1, f"--label_smoothing must lie in [0, 1) (got {cfg.label_smoothing})"),
        (
            cfg.warmup_epochs is None or 0 <= cfg.warmup_epochs < cfg.epochs,
            f"--warmup_epochs must lie in [0, --epochs) (got {cfg.warmup_epochs})",
        ),
        (
            cfg.min_img_size == 0 or 16 <= cfg.min_img_size <= cfg.img_size,
            f"--min_img_size must be 0 (off) or lie in [16, --img_size {cfg.img_size}] (got {cfg.min_img_size})",
        ),
        (0 < cfg.resize_until <= 1, f"--resize_until must lie in (0, 1] (got {cfg.resize_until})"),
        (
            cfg.eval_size == 0 or cfg.eval_size >= 16,
            f"--eval_size must be 0 (= --img_size) or >= 16 (got {cfg.eval_size})",
        ),
        (0 <= cfg.val_split < 1, f"--val_split must lie in [0, 1) (got {cfg.val_split})"),
        (cfg.accum_steps >= 1, f"--accum_steps must be >= 1 (got {cfg.accum_steps})"),
        (0 < cfg.ema_decay < 1, f"--ema_decay must lie in (0, 1) (got {cfg.ema_decay})"),
        (cfg.best_on == "model" or cfg.ema, "--best_on ema needs --ema"),
        (not cfg.nesterov or cfg.opt == "sgd", "--nesterov applies to --opt sgd only"),
        (cfg.gamma > 0 and cfg.step_size > 0, "--gamma and --step_size must be > 0"),
        (cfg.sched != "multistep" or cfg.milestones.strip(), "--sched multistep needs --milestones, e.g. 30,60,80"),
        (
            min(cfg.patience, cfg.keep_last, cfg.steps_per_epoch, cfg.lr_scale_batch) >= 0,
            "--patience, --keep_last, --steps_per_epoch and --lr_scale_batch must be >= 0",
        ),
        (cfg.grad_clip >= 0 and cfg.momentum >= 0, "--grad_clip and --momentum must be >= 0"),
        (not (cfg.trainval and cfg.val_split), "--trainval merges val back into train: drop --val_split"),
        (cfg.time_budget >= 0, f"--time_budget must be >= 0 minutes (got {cfg.time_budget})"),
        (cfg.eval_every >= 0, f"--eval_every must be >= 0 (got {cfg.eval_every})"),
        (cfg.progress_every >= 0, f"--progress_every must be >= 0 seconds (got {cfg.progress_every:g})"),
        (
            cfg.save_every_min >= 0,
            f"--save_every_min must be >= 0 minutes (got {cfg.save_every_min}; 0 = a checkpoint every epoch)",
        ),
        (
            not (cfg.time_budget and cfg.sched in ("step", "multistep")),
            f"--time_budget plans the run's length, which --sched {cfg.sched} counts in fixed epochs; "
            "use --sched cosine or linear with it",
        ),
    ]
    checks.append(
        (
            all(len(t) <= 64 for t in cfg.tag_list()),
            f"--tags: each tag may have at most 64 characters, as wandb allows (got {cfg.tags!r})",
        )
    )
    checks.append(
        (
            len(cfg.name) <= 100 and "/" not in cfg.name and cfg.name not in (".", ".."),
            f"--name {cfg.name!r}: a run name is a folder name: no '/', at most 100 characters",
        )
    )
    timm_teachers = [t for t in cfg.teacher if t.startswith("timm:")]
    checks += [
        (cfg.fit_params >= 0, f"--fit_params must be >= 0 (got {cfg.fit_params})"),
        (0 <= cfg.kd_alpha <= 1, f"--kd_alpha must lie in [0, 1] (got {cfg.kd_alpha})"),
        (cfg.kd_temperature > 0, f"--kd_temperature must be > 0 (got {cfg.kd_temperature})"),
        (cfg.kd_views >= 0, f"--kd_views must be >= 0 (got {cfg.kd_views}; 0 = the teacher in every step)"),
        (
            not (cfg.teacher and cfg.kd_views and cfg.aug_backend != "torch"),
            f"--kd_views {cfg.kd_views} replays cached crops in the batch augmentation, which --aug_backend "
            f"{cfg.aug_backend} does not do: pass --aug_backend torch, or --kd_views 0 (the teacher in every step)",
        ),
        (
            not (cfg.teacher and cfg.kd_views and cfg.no_cache),
            f"--kd_views {cfg.kd_views} stores soft labels beside the decode cache: drop --no_cache, or pass "
            "--kd_views 0 (the teacher in every step)",
        ),
        (
            len(timm_teachers) <= 1,
            f"--teacher: one timm:NAME teacher at most ({len(timm_teachers)} given), as --teacher_pretrained_path "
            "holds one file; train the others with main.py and pass their run folders",
        ),
        (
            not timm_teachers or cfg.teacher_pretrained_path,
            f"--teacher {timm_teachers[0] if timm_teachers else ''} needs --teacher_pretrained_path FILE: weights "
            "trained on the data's classes (timm's ImageNet heads know other classes)",
        ),
        (
            not cfg.teacher_pretrained_path or timm_teachers,
            "--teacher_pretrained_path is the weights of a --teacher timm:NAME; pass one (or drop the path)",
        ),
    ]
    for name in ("drop_rate", "attn_drop_rate", "drop_path_rate"):
        value = getattr(cfg, name)
        checks.append((0 <= value < 1, f"--{name} must lie in [0, 1) (got {value})"))
    mixing = cfg.mix_prob > 0 and (cfg.mixup_alpha > 0 or cfg.cutmix_alpha > 0)
    checks.append(
        (
            not mixing or cfg.batch_size % 2 == 0,
            f"CutMix/MixUp pair images within a batch, so --batch_size must be even (got {cfg.batch_size}); "
            "or pass --mix_prob 0",
        )
    )
    checks.append(
        (
            cfg.randaugment_n >= 1 and 0 <= cfg.randaugment_m <= 10,
            f"--randaugment_n must be >= 1 and --randaugment_m lie in [0, 10] (got {cfg.randaugment_n}, "
            f"{cfg.randaugment_m})",
        )
    )
    for ok, message in checks:
        if not ok:
            raise UserError(message)
    cfg.milestone_epochs()
    arch.resolve(cfg.arch)  # a typo: "did you mean", now
    if cfg.aug_backend == "albumentations":
        transforms.require_albumentations()  # installed? (optional: the torch backend needs none)
    try:
        cfg.recipe()
    except ValueError as exc:
        raise UserError(str(exc)) from None
    return cfg
