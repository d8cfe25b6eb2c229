"""Run configuration: one frozen ``Config`` dataclass and the argparse parser built from it.

Precedence, lowest to highest: dataclass defaults < ``--config FILE.yaml`` < command line.
The original project's flag names (``--arch --lr_base --batch_size --epochs --drop_rate
--attn_drop_rate --drop_path_rate``) are kept; ``auto`` values (learning rate, warm-up,
precision, memory format) are decided when the run starts, from the model and the machine
(main.py logs the decision and writes it into the run's config.yaml under ``resolved:``).
Each field declares whether it may change when a run is resumed (``resume=True``).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import transforms
from tin import optim
from tin.data.readers import READERS
from tin.runtime import hardware
from utils import UserError

ON_OFF = ("auto", "on", "off")
WANDB_MODES = ("auto", "online", "offline", "disabled")
TTA_FINAL = "final"  # --tta final: flip TTA in the end's pass only (per-epoch evaluations without it)
PATHS = "tuple[str, ...]"  # the type of a field that takes several paths (--teacher A B)


def _opt(help_text: str, *, default: Any, resume: bool = False, before: Any = None, **extra: Any) -> Any:
    """A Config field whose metadata carries its --help text and how it behaves:

    resume=True: may change when a run is resumed (where it runs, not what it computes);
    before=X:    runs saved before this field existed behaved as X (a resumed old run keeps it);
    flag=True:   a plain switch (--no_cache); other bools get --name / --no-name;
    onoff=True:  auto|on|off, with --name meaning on and --no-name off;
    choices=...: the allowed values, or a function giving them, read where they are implemented
                 (a dataset reader, a schedule, a backend added there is a choice at once)."""
    meta = {"help": help_text, "resume": resume, "before": before, **extra}
    if callable(default):
        return field(default_factory=default, metadata=meta)
    return field(default=default, metadata=meta)


def _default_workers() -> int:
    """Up to 8 loader processes per training process: this process's CPUs (its affinity mask, as
    taskset/cpusets/SLURM give it, capped by a cgroup CPU quota) shared among the processes
    torchrun starts on this node."""
    cpus = hardware.usable_cpus()
    return max(1, min(8, cpus // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))))


@dataclass(frozen=True)
class Config:
    # --- the seed's flags (names unchanged; defaults: README "How defaults are decided") ---
    arch: str = _opt("model name from the arch/ registry (see README: Models)", default="swin_tiny")
    lr_base: float | None = _opt(
        "peak learning rate; auto = the recipe table for the model family, optimizer and pretrained or not, "
        "scaled to the batch (README: Learning rates)",
        default=None,
    )
    batch_size: int = _opt("images per process per forward pass (micro-batch with --accum_steps)", default=128)
    epochs: int = _opt("number of training epochs (an upper bound with --time_budget)", default=100)
    drop_rate: float = _opt("dropout before the classifier", default=0.2)
    attn_drop_rate: float = _opt("attention dropout (transformers only)", default=0.1)
    drop_path_rate: float = _opt("stochastic depth rate", default=0.1)
    pretrained: bool = _opt(
        "start from timm's ImageNet weights (needs the internet)", default=False, flag=True, resume=True
    )
    pretrained_path: str = _opt(
        "start from these weights (.safetensors or .pth); works offline", default="", resume=True
    )
    max_params: int = _opt("refuse models with more parameters than this (0 = no limit)", default=0, resume=True)
    fit_params: int = _opt(
        "size --arch's family to this many parameters: the widest resnet9_wN or budget_cnn_wN that fits (the "
        "name it resolves to is what config.yaml records; 0 = --arch as named; README: Models)",
        default=0,
    )
    list_archs: bool = _opt(
        "print the model catalogue (params, GFLOPs at --img_size) and exit", default=False, flag=True, resume=True
    )
    format: str = _opt("--list_archs output", default="table", choices=("table", "csv"), resume=True)
    # --- knowledge distillation (README: Distillation) ---
    teacher: tuple[str, ...] = _opt(
        "distil from these models: run folders (their best.pth.tar) or .pth.tar files of this toolkit, or "
        "timm:NAME with --teacher_pretrained_path; several: the mean of their probabilities",
        default=(),
        metavar="PATH",
    )
    teacher_pretrained_path: str = _opt(
        "the weights of a timm:NAME teacher (.safetensors or .pth), trained on the data's classes", default=""
    )
    kd_alpha: float = _opt(
        "weight of the distillation term (KL to the teacher) against the label loss (1 = the teacher alone)",
        default=0.5,
    )
    kd_temperature: float = _opt(
        "softmax temperature of teacher and student in the distillation term (scaled by T^2)", default=1.0
    )
    kd_views: int = _opt(
        "cached soft labels: the teachers' predictions on K crops-and-flips of every training image, made once "
        "beside the decode cache and replayed (epoch e shows view e mod K), so teaching costs the step nothing; "
        "0 = the teacher runs in every step, on exactly the student's batch (README: Distillation)",
        default=4,
    )
    # --- data and outputs ---
    dataset: str = _opt(
        "dataset format (see README: Other datasets)", default="tiny-imagenet", choices=lambda: tuple(READERS)
    )
    data_dir: str = _opt("dataset root folder", default="data/tiny-imagenet-200", resume=True)
    cache_dir: str = _opt("where the decode-once cache goes (default: DATA_DIR/.cache)", default="", resume=True)
    no_cache: bool = _opt("decode image files every epoch instead of once", default=False, flag=True, resume=True)
    skip_bad_images: bool = _opt(
        "train without unreadable images (they are listed) instead of stopping", default=False, flag=True
    )
    val_split: float = _opt(
        "hold out this stratified fraction of train as val (0 = use the dataset's val)", default=0.0
    )
    trainval: bool = _opt(
        "final fit on train + val: no val metrics, predictions still written", default=False, flag=True
    )
    output_dir: str = _opt("where timestamped run folders are created", default="checkpoints", resume=True)
    name: str = _opt(
        "the run's name: its folder is OUTPUT_DIR/<timestamp>_<name> (default: the arch); kept in config.yaml, "
        "best_results.json and wandb",
        default="",
        resume=True,
        before="",
    )
    tags: str = _opt(
        "comma-separated labels, e.g. baseline,lr-search: kept in config.yaml, best_results.json and wandb",
        default="",
        resume=True,
        before="",
    )
    img_size: int = _opt("training resolution; 64 is native, 224 resizes", default=64)
    min_img_size: int = _opt(
        "progressive resizing: train at this resolution first, growing to --img_size (0 = off)", default=0
    )
    resize_until: float = _opt("fraction of the run after which training is at full --img_size", default=0.75)
    eval_size: int = _opt(
        "resolution of evaluation and test predictions (0 = --img_size); a little above --img_size undoes the "
        "zoom that random-resized-crop training shows the model (FixRes); convolutional models only",
        default=0,
    )
    workers: int = _opt(
        "DataLoader worker processes for training (0 = load in the main process; evaluation uses at most 2)",
        default=_default_workers,
        resume=True,
    )
    data_on_device: str = _opt(
        "keep the decoded dataset on the training device and gather batches there (no DataLoader): auto = on "
        "for a GPU when it fits in half its free memory (with --aug_backend torch)",
        default="auto",
        choices=ON_OFF,
        onoff=True,
        resume=True,
    )
    # --- optimisation ---
    opt: str = _opt("optimizer", default="adamw", choices=optim.OPTIMIZERS)
    momentum: float = _opt("SGD momentum", default=0.9)
    nesterov: bool = _opt("Nesterov momentum (with --opt sgd)", default=False, flag=True)
    weight_decay: float = _opt("weight decay (not applied to norms and biases)", default=0.05)
    lr_scale_batch: int = _opt(
        "linear scaling rule: lr = lr_base * global batch / N (0 = use lr_base as given)", default=0
    )
    sched: str = _opt(
        "learning-rate schedule, updated every step", default="cosine", choices=lambda: tuple(optim.SCHEDULES)
    )
    warmup_epochs: float | None = _opt(
        "linear learning-rate warm-up before the schedule; auto = from the recipe table", default=None
    )
    min_lr: float = _opt("learning rate at the end of the cosine or linear schedule", default=0.0)
    step_size: float = _opt("--sched step: epochs between decays", default=30.0)
    gamma: float = _opt("--sched step/multistep: factor applied at each decay", default=0.1)
    milestones: str = _opt("--sched multistep: comma-separated epochs, e.g. 30,60,80", default="")
    label_smoothing: float = _opt("label smoothing of the training targets", default=0.1)
    grad_clip: float = _opt("clip the gradient norm to this value (0 = off)", default=0.0)
    accum_steps: int = _opt("batches accumulated per optimizer step", default=1)
    ema: bool = _opt(
        "keep an exponential moving average of the weights, evaluated every epoch", default=False, flag=True
    )
    ema_decay: float = _opt("EMA decay per optimizer step (after timm's warm-up: 1 - (1 + step)^-2/3)", default=0.9998)
    best_on: str = _opt(
        "which weights pick best.pth.tar and the test predictions", default="model", choices=("model", "ema")
    )
    tta: bool | str = _opt(
        "horizontal-flip test-time augmentation (2x an evaluation's cost): --tta (or --tta flip) for every "
        "evaluation and the test predictions, as in evaluate.py and predict.py; --tta final: the epochs' evaluations "
        "without it, then once at the end best.pth.tar on val with it (val_top1_tta in best_results.json, "
        "apart from the curve and the choice of best) and the test predictions with it; --tta none: off",
        default=False,
        words={"flip": True, "none": False, TTA_FINAL: TTA_FINAL},
    )
    test_preds: str = _opt(
        "when best_test_preds.csv is written: at every new best (an interrupted run has them), or once at "
        "the end from best.pth.tar (one test evaluation per run instead of per improvement)",
        default="best",
        choices=("best", "end"),
    )
    patience: int = _opt("stop after N evaluations without a better val top-1 (0 = never)", default=0)
    eval_every: int = _opt(
        "evaluate every N epochs and after the last (0 = only after the last); epochs in between have no val "
        "figures and cannot become best.pth.tar",
        default=1,
        before=1,
    )
    time_budget: float = _opt(
        "train for this many minutes of wall clock, start to final predictions: the run measures its own speed "
        "and plans the schedule to fit (0 = off; --epochs becomes an upper bound)",
        default=0.0,
    )
    # --- progressive augmentation (strength s in [0, 1]) ---
    aug_backend: str = _opt(
        "torch: the recipe on whole batches on the device (faster; README: Augmentation recipe); albumentations: "
        "per image in the loader workers",
        default="torch",
        choices=transforms.AUG_BACKENDS,
        before="albumentations",
    )
    aug_schedule: str = _opt(
        "how s grows over the run", default="cosine", choices=lambda: tuple(transforms.AUG_SCHEDULES)
    )
    aug_strength: float = _opt("s for --aug_schedule constant; the ceiling for the others", default=1.0)
    aug_ops: str = _opt(
        'per-op changes to the augmentation recipe, "op.param=value,...", e.g. "flip.p=0,affine.rotate=30" '
        "(values at s = 1; README: Augmentation recipe)",
        default="",
    )
    randaugment: bool = _opt(
        "add RandAugment (torchvision's 14 ops), scaled by s like every op", default=False, flag=True
    )
    randaugment_n: int = _opt("RandAugment: ops per image", default=2)
    randaugment_m: float = _opt("RandAugment: magnitude 0-10 at s = 1", default=9.0)
    mixup_alpha: float = _opt("MixUp Beta(a, a) parameter at s = 1 (0 disables MixUp)", default=0.8)
    cutmix_alpha: float = _opt("CutMix Beta(a, a) parameter at s = 1 (0 disables CutMix)", default=1.0)
    mix_prob: float = _opt("probability of mixing a batch at s = 1", default=1.0)
    # --- runtime ---
    seed: int = _opt("seed for python, numpy, torch and the data order", default=42)
    device: str = _opt("where to train", default="auto", choices=hardware.DEVICES, resume=True)
    amp: str = _opt(
        "autocast: auto = bf16 where the device has native bf16, fp16 + grad scaler on older GPUs, else fp32 "
        "(README: How defaults are decided); --amp forces it on, --no-amp off",
        default="auto",
        choices=ON_OFF,
        onoff=True,
        resume=True,
    )
    amp_dtype: str = _opt(
        "autocast type: auto, bf16, or fp16 with a gradient scaler",
        default="auto",
        choices=("auto", *hardware.DTYPES),
        resume=True,
    )
    channels_last: str = _opt(
        "channels-last memory format: auto = on for CUDA and for bf16 on a CPU, off for fp32 on a CPU",
        default="auto",
        choices=ON_OFF,
        onoff=True,
        resume=True,
    )
    deterministic: str = _opt(
        "bitwise-repeatable runs: auto = deterministic where it costs nothing (CPUs) and cuDNN autotuning on GPUs; "
        "on = deterministic GPU kernels too (slower; README: How defaults are decided); off = autotune",
        default="auto",
        choices=ON_OFF,
        onoff=True,
        resume=True,
        before="on",
    )
    sync_bn: bool = _opt("synchronise batch-norm statistics across processes (torchrun)", default=False, flag=True)
    compile: bool = _opt("torch.compile the model (off by default)", default=False, flag=True, resume=True)
    keep_last: int = _opt(
        "also keep the last K epoch checkpoints epoch_NNN.pth.tar (0 = none; with --save_every_min, of the "
        "epochs written)",
        default=0,
        resume=True,
    )
    save_every_min: float = _opt(
        "write last.pth.tar, best.pth.tar (with best_test_preds.csv under --test_preds best) and the epoch copies "
        "only at the first epoch end M minutes of wall clock after the last write, at the last epoch and on "
        "Ctrl-C/SIGTERM, not every epoch (0 = every epoch); a SIGKILL or a crash then loses up to M minutes of "
        "training plus one epoch, which --resume repeats exactly",
        default=0.0,
        resume=True,
        before=0.0,
    )
    progress_every: float = _opt(
        "seconds between progress lines (batches, images/s, loss, the epoch's ETA) where the output is not a "
        "terminal (a log file, nohup, docker logs, and then log.txt too; a terminal has the bar); 0 = none",
        default=30.0,
        resume=True,
        before=30.0,
    )
    steps_per_epoch: int = _opt("cap on training batches per epoch (0 = all); for smoke tests", default=0)
    no_analysis: bool = _opt(
        "skip the end-of-run analysis and its page (smoke tests; analyze.py run RUN makes them later)",
        default=False,
        flag=True,
        resume=True,
    )
    analysis: str = _opt(
        "the end-of-run analysis: full (the run page with curves, per-class accuracy, confusions, mistakes, "
        "t-SNE, and the saved features) or page (the same page without the t-SNE and the saved features: "
        "seconds less, what the time-budgeted presets use)",
        default="full",
        choices=("full", "page"),
        resume=True,
        before="full",
    )
    resume: str = _opt("continue the run in this run folder (or from this checkpoint)", default="", resume=True)
    wandb: str = _opt(
        "wandb mode; auto = online when logged in, otherwise offline", default="auto", choices=WANDB_MODES, resume=True
    )
    wandb_project: str = _opt(
        "wandb project name (default: $WANDB_PROJECT, else tiny-imagenet-200)", default="", resume=True
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "teacher", tuple(self.teacher))  # a list from argparse or YAML: frozen too

    @property
    def eval_px(self) -> int:
        """The resolution val and test images are evaluated at."""
        return self.eval_size or self.img_size

    @property
    def tta_each(self) -> bool:
        """Every evaluation (and the test predictions at a new best) with flip TTA: --tta flip."""
        return self.tta is True

    @property
    def tta_end(self) -> bool:
        """The test predictions from best.pth.tar at the end with flip TTA: --tta flip or final."""
        return self.tta is True or self.tta == TTA_FINAL

    def milestone_epochs(self) -> list[float]:
        """--milestones '30,60' -> [30.0, 60.0] (epochs, ascending)."""
        try:
            values = [float(v) for v in self.milestones.split(",") if v.strip()]
        except ValueError:
            raise UserError(
                f"--milestones must be comma-separated epochs like 30,60,80 (got {self.milestones!r})"
            ) from None
        if values != sorted(values) or any(v <= 0 for v in values):
            raise UserError(f"--milestones must be positive and ascending (got {self.milestones!r})")
        return values

    def recipe(self) -> dict[str, dict[str, float]]:
        """The augmentation recipe table with --randaugment and --aug_ops applied (transforms.RECIPE)."""
        return transforms.build_recipe(self.aug_ops, self.randaugment, self.randaugment_n, self.randaugment_m)

    def tag_list(self) -> list[str]:
        """--tags 'a, b' -> ['a', 'b']."""
        return [t.strip() for t in self.tags.split(",") if t.strip()]

    def data_kwargs(self) -> dict[str, Any]:
        """Arguments of batch_manager.prepare_data for this run."""
        return {
            "kind": self.dataset,
            "data_dir": self.data_dir,
            "img_size": self.img_size,
            "workers": self.workers,
            "use_cache": not self.no_cache,
            "cache_dir": self.cache_dir or None,
            "skip_bad": self.skip_bad_images,
            "val_split": self.val_split,
            "trainval": self.trainval,
            "seed": self.seed,
        }

    def to_dict(self) -> dict[str, Any]:
        """Plain types only (scalars, lists of paths), so checkpoints load with
        ``torch.load(weights_only=True)`` and config.yaml with yaml.safe_load."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


# main.py --help's groups, in the README reference's order (tests/test_readme.py checks that they list
# the same flags): the original project's flags first, then by what they set.
HELP_GROUPS: dict[str, tuple[str, ...]] = {
    "the original project's flags": (
        "arch",
        "lr_base",
        "batch_size",
        "epochs",
        "drop_rate",
        "attn_drop_rate",
        "drop_path_rate",
    ),
    "model": ("pretrained", "pretrained_path", "max_params", "fit_params", "list_archs", "format"),
    "distillation": ("teacher", "teacher_pretrained_path", "kd_alpha", "kd_temperature", "kd_views"),
    "data": (
        *("dataset", "data_dir", "cache_dir", "no_cache", "skip_bad_images", "val_split", "trainval"),
        *("img_size", "min_img_size", "resize_until", "eval_size", "workers", "data_on_device"),
    ),
    "optimizer": ("opt", "momentum", "nesterov", "weight_decay", "lr_scale_batch"),
    "schedule (per update)": (
        "sched",
        "warmup_epochs",
        "min_lr",
        "step_size",
        "gamma",
        "milestones",
        "patience",
        "time_budget",
    ),
    "regularisation": ("label_smoothing", "grad_clip", "accum_steps", "ema", "ema_decay", "best_on"),
    "augmentation": (
        *("aug_backend", "aug_schedule", "aug_strength", "aug_ops", "randaugment", "randaugment_n", "randaugment_m"),
        *("mixup_alpha", "cutmix_alpha", "mix_prob"),
    ),
    "evaluation": ("tta", "test_preds", "eval_every"),
    "device and speed": ("device", "amp", "amp_dtype", "channels_last", "deterministic", "sync_bn", "compile"),
    "run control": (
        *("output_dir", "name", "tags", "seed", "keep_last", "save_every_min", "progress_every", "steps_per_epoch"),
        *("no_analysis", "analysis", "resume", "wandb", "wandb_project"),
    ),
}


# --------------------------------------------------------------------------- argparse from the fields
def choices_of(f: dataclasses.Field) -> tuple | None:
    """A field's allowed values (None: any), computed now when declared as a function."""
    choices = f.metadata.get("choices")
    return tuple(choices()) if callable(choices) else choices


def base_type(f: dataclasses.Field) -> str:
    """'float | None' -> 'float' (None stands for auto)."""
    return str(f.type).replace(" | None", "")


# --------------------------------------------------------------------------- YAML presets and saved configs
RESOLVED_KEY = "resolved"  # written by main.py into config.yaml: what the auto settings became; ignored on reading


def upgrade_saved(saved: dict[str, Any]) -> dict[str, Any]:
    """A config saved by an older version of this toolkit, in today's terms: fields it lacked take
    the behaviour that version had (`before=`), fields that no longer exist are dropped, and
    values of an older type are converted (amp: true -> 'on')."""
    known = {f.name: f for f in fields(Config)}
    out = {k: v for k, v in saved.items() if k in known}
    for name, f in known.items():
        if name not in out and f.metadata.get("before") is not None:
            out[name] = f.metadata["before"]
        elif f.metadata.get("onoff") and isinstance(out.get(name), bool):
            out[name] = "on" if out[name] else "off"
    return out


def from_saved(saved: dict[str, Any], **overrides: Any) -> Config:
    """The Config of a saved run (a checkpoint's config), with overrides."""
    return Config(**{**upgrade_saved(saved), **overrides})


def may_change_on_resume() -> set[str]:
    return {f.name for f in fields(Config) if f.metadata.get("resume")}


def check_compatible(saved: dict[str, Any], cfg_dict: dict[str, Any], path: Path) -> None:
    """A resumed run is the same run: refuse settings that would change what is computed (those
    not declared `resume=True` in config.Config)."""

    free, saved = may_change_on_resume(), upgrade_saved(saved)
    diffs = [
        f"--{k} {cfg_dict[k]!r} (the run has {saved[k]!r})"
        for k in cfg_dict
        if k not in free and k in saved and saved[k] != cfg_dict[k]
    ]
    if diffs:
        raise UserError(
            f"--resume {path}: {'; '.join(diffs)}. Resuming continues the same run; "
            "drop those flags, or start a new run (optionally from these weights)"
        )
