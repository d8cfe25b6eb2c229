"""Evaluation and test predictions, through one loop (``forward``).

``evaluate(...)`` -> {val_loss, val_top1, val_top5, ...} (every entry of METRICS); ``predict(...)``
-> class index per image; ``infer(...)`` -> logits, labels and penultimate features (optionally
flip-TTA); ``combine(...)`` -> an ensemble's probabilities; ``write_predictions(...)`` -> the
submission CSV (``image,label``: file name, predicted class id, one row per test image, sorted by
file name); ``load_model(...)`` / ``load_models(...)`` -> checkpoints built as their runs evaluated
(val.py, predict.py and export.py load them through it).

Also a CLI to evaluate saved checkpoints, alone or as an ensemble::

    python val.py RUN_OR_CHECKPOINT [MORE ...] [--tta flip] [--ensemble mean|max_conf] [--out DIR]
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from tin.runtime import distributed, hardware
from transforms import Normalize
from utils import UserError, topk_correct

log = logging.getLogger("tin")

# val_<name> in metrics.csv, the log line and wandb: (sum over a batch of (logits, labels), scale of
# the mean). Sums are kept on the device and reduced across processes; the figure is scale * sum / images.
METRICS: dict[str, tuple[Callable[[torch.Tensor, torch.Tensor], torch.Tensor], float]] = {
    "loss": (lambda logits, labels: F.cross_entropy(logits, labels, reduction="sum"), 1.0),
    "top1": (lambda logits, labels: topk_correct(logits, labels, (1,))[0], 100.0),
    "top5": (lambda logits, labels: topk_correct(logits, labels, (5,))[0], 100.0),
}


def _logits(model, x: torch.Tensor, tta: bool) -> torch.Tensor:
    """Float logits; with tta, the log of the mean softmax over the image and its horizontal flip."""
    logits = model(x).float()
    if not tta:
        return logits
    probs = (logits.softmax(1) + model(x.flip(3)).float().softmax(1)) / 2
    return probs.clamp_min(1e-12).log()


def forward(
    model, loader, normalize: Normalize, device, amp_dtype=None, tta: bool = False, features: bool = False
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """The evaluation loop: (logits, labels, penultimate features or None) of each batch of `loader`,
    on the device, in eval mode, without gradients. Features are the last Linear layer's input for
    the unflipped image."""
    captured: list[torch.Tensor] = []
    hook = _last_linear(model).register_forward_hook(lambda m, i, o: captured.append(i[0])) if features else None
    model.eval()
    try:
        with torch.inference_mode():
            for images, labels in tqdm(loader, desc="eval", leave=False, dynamic_ncols=True, disable=None):
                x = normalize(images.to(device, non_blocking=True))
                with hardware.autocast(device, amp_dtype):
                    logits = _logits(model, x, tta)
                feats = captured[0].float().flatten(1) if features else None
                captured.clear()
                yield logits, labels.to(device, non_blocking=True), feats
    finally:
        if hook is not None:
            hook.remove()


def evaluate(model, loader, normalize: Normalize, device, amp_dtype=None, tta: bool = False) -> dict[str, float]:
    """Every METRICS entry over every labelled image in `loader` (with tta: of the flip-averaged
    prediction), as val_<name>; under torchrun each process's shard is summed in (no image twice)."""
    sums, count = torch.zeros(len(METRICS), dtype=torch.float64, device=device), 0
    for logits, labels, _ in forward(model, loader, normalize, device, amp_dtype, tta):
        sums += torch.stack([fn(logits, labels).double() for fn, _ in METRICS.values()])
        count += labels.shape[0]
    *totals, count = distributed.all_reduce_(torch.cat([sums, sums.new_tensor([count])])).tolist()
    count = max(count, 1.0)
    return {
        f"val_{name}": scale * total / count for (name, (_, scale)), total in zip(METRICS.items(), totals, strict=True)
    }


def predict(model, loader, normalize: Normalize, device, amp_dtype=None, tta: bool = False) -> list[int]:
    """Predicted class index for every image of `loader`, in loader order."""
    preds = [logits.argmax(1).cpu() for logits, _, _ in forward(model, loader, normalize, device, amp_dtype, tta)]
    return torch.cat(preds).tolist() if preds else []


def infer(model, loader, normalize: Normalize, device, amp_dtype=None, tta: bool = False, features: bool = False):
    """-> {"logits": (N, C) float, "labels": (N,) long, "features": (N, D) or None}, on the CPU."""
    out = {"logits": [], "labels": [], "features": []}
    for logits, labels, feats in forward(model, loader, normalize, device, amp_dtype, tta, features):
        out["logits"].append(logits.cpu())
        out["labels"].append(labels.cpu())
        if feats is not None:
            out["features"].append(feats.cpu())
    return {
        "logits": torch.cat(out["logits"]),
        "labels": torch.cat(out["labels"]),
        "features": torch.cat(out["features"]) if features else None,
    }


def _last_linear(model: torch.nn.Module) -> torch.nn.Linear:
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no Linear classifier to read features from")
    return linears[-1]


def combine(prob_list: list[torch.Tensor], rule: str = "mean") -> torch.Tensor:
    """Ensemble (N, C) probabilities: `mean` averages them; `max_conf` (seed 003) gives each image
    the probabilities of the single model most confident about it."""
    probs = torch.stack(prob_list)  # (M, N, C)
    if rule == "mean":
        return probs.mean(0)
    if rule == "max_conf":
        best = probs.max(2).values.argmax(0)  # (N,) most confident model per image
        return probs[best, torch.arange(probs.shape[1])]
    raise ValueError(f"unknown ensemble rule {rule!r}; use mean or max_conf")


def metrics_from_probs(probs: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """NLL loss and top-1/top-5 (%) of (N, C) probabilities against labels."""
    loss = F.nll_loss(probs.clamp_min(1e-12).log(), labels).item()
    top1, top5 = (100.0 * hits / max(len(labels), 1) for hits in topk_correct(probs, labels).tolist())
    return {"val_loss": loss, "val_top1": top1, "val_top5": top5}


def per_class_accuracy(preds: torch.Tensor, labels: torch.Tensor, classes: list[str], names: dict[str, str]):
    """Rows (class id, name, accuracy %, count), in class order."""
    rows = []
    for k, cid in enumerate(classes):
        mask = labels == k
        n = int(mask.sum())
        acc = 100.0 * float((preds[mask] == k).float().mean()) if n else float("nan")
        rows.append({"wnid": cid, "name": names.get(cid, cid), "accuracy": acc, "count": n})
    return rows


def write_csv(rows: list[dict], path: Path) -> Path:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]) if rows else ["empty"])
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_predictions(ids: list[str], preds: list[int], classes: list[str], out_csv: Path) -> Path:
    """Submission CSV: header image,label; one row per image (file name, class id), sorted by name."""
    if len(ids) != len(preds):
        raise ValueError(f"{len(ids)} test images but {len(preds)} predictions")
    rows = sorted((name, classes[k]) for name, k in zip(ids, preds, strict=True))
    tmp = out_csv.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image", "label"])
        writer.writerows(rows)
    tmp.replace(out_csv)
    return out_csv


def check_predictions(path: Path, ids: list[str], classes: list[str]) -> int:
    """A submission as the format wants it: header image,label, one row per test image (each image of
    `ids` once), every label a class id of `classes`. Returns the row count; a UserError names what
    is wrong."""
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    problems = []
    if not rows or rows[0] != ["image", "label"]:
        problems.append(f"the header is {rows[0] if rows else 'missing'}, not ['image', 'label']")
    body = rows[1:]
    if sorted(r[0] for r in body if r) != sorted(ids):
        problems.append(f"{len(body)} rows for {len(ids)} test images (every image once is needed)")
    unknown = {r[1] for r in body if len(r) > 1} - set(classes)
    if unknown:
        problems.append(f"labels that are no class: {sorted(unknown)[:3]}")
    if problems:
        raise UserError(f"{path} is not a valid submission: {'; '.join(problems)}")
    return len(body)


# --------------------------------------------------------------------------- CLI
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Evaluate checkpoints (alone or as an ensemble) and predict the test split."
    )
    p.add_argument(
        "runs",
        nargs="*",
        metavar="RUN_OR_CHECKPOINT",
        help="run folders (their best.pth.tar) or .pth.tar files written by main.py; several: an ensemble "
        "(as predict.py and export.py take them)",
    )
    p.add_argument("--checkpoint", nargs="+", default=[], help="the same, as a flag (the original project's form)")
    p.add_argument("--data_dir", default=None, help="dataset root (default: the one the first run trained on)")
    p.add_argument(
        "--out",
        "--output_dir",
        dest="output_dir",
        default=None,
        help="a new folder for the outputs (default: FIRST_RUN/eval/<checkpoints and options>, never overwritten)",
    )
    p.add_argument(
        "--tta",
        nargs="?",
        const="flip",
        default="none",
        choices=("none", "flip"),
        help="test-time augmentation: --tta (or --tta flip) averages each image with its mirror image, as main.py --tta",
    )
    p.add_argument(
        "--ensemble",
        choices=("mean", "max_conf"),
        default="mean",
        help="mean of probabilities, or each image takes the most confident model's label",
    )
    p.add_argument(
        "--batch_size", type=int, default=None, help="evaluation batch (default: the run's, twice its training batch)"
    )
    p.add_argument("--workers", type=int, default=None, help="loader processes (default: as in training)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    args = p.parse_args(argv)
    args.checkpoint = [*args.runs, *args.checkpoint]
    if not args.checkpoint:
        p.error("give the run folders or checkpoints to evaluate: python val.py RUN [RUN ...]")
    return args


@dataclass
class Loaded:
    """A checkpoint ready to evaluate: its model in eval mode on the device, in the memory format and
    with the autocast dtype the run decided for that device, and what the checkpoint says about it."""

    path: Path
    model: torch.nn.Module
    cfg: Any  # tin.config.Config, overrides applied
    saved: dict  # the config as the run saved it
    classes: list[str]  # index = the model's output
    names: dict[str, str] | None  # wnid -> human name; None in checkpoints written before they held names
    amp_dtype: torch.dtype | None
    best: dict  # the run's best so far: val_top1, best_epoch, ...
    epoch: int


def load_model(path: str | Path, device: torch.device, like: Loaded | None = None, **overrides) -> Loaded:
    """One checkpoint, built as the run built it (`overrides`: config fields to replace, e.g.
    data_dir). With `like`, a checkpoint for other classes is refused before anything is built: in an
    ensemble the same output index must mean the same class."""
    import arch
    from tin.checkpoint import load_checkpoint
    from tin.config.schema import from_saved

    path = checkpoint_file(path)  # a run folder stands for its best.pth.tar
    ckpt = load_checkpoint(path)
    classes = list(ckpt["classes"])
    if like is not None and classes != like.classes:
        raise UserError(
            f"{path} was trained on other classes ({len(classes)}) than {like.path} ({len(like.classes)}); "
            "cannot ensemble them: pass checkpoints of runs on the same dataset"
        )
    cfg = from_saved(ckpt["config"], **overrides, trainval=False, resume="")
    model = arch.build_model(cfg.arch, len(classes), cfg.img_size).to(device)
    model.load_state_dict(ckpt["state_dict"])
    # as the run evaluated: its precision and memory format decided for this device
    runtime = hardware.decide_runtime(device, cfg.amp, cfg.amp_dtype, cfg.channels_last)
    if runtime.channels_last:
        model = model.to(memory_format=torch.channels_last)
    best, epoch = ckpt.get("best") or {}, ckpt.get("epoch", 0)
    return Loaded(
        Path(path), model.eval(), cfg, ckpt["config"], classes, ckpt.get("names"), runtime.amp_dtype, best, epoch
    )


def load_models(paths: list[str | Path], device: torch.device, **overrides) -> list[Loaded]:
    """load_model for each of an ensemble's checkpoints (all for the same classes)."""
    models: list[Loaded] = []
    for path in paths:
        models.append(load_model(path, device, models[0] if models else None, **overrides))
    return models


def run(argv: list[str] | None = None) -> dict[str, float]:
    import batch_manager
    from tin.run.outputs import setup_logging

    args = parse_args(argv)
    setup_logging()
    device = hardware.resolve_device(args.device)
    overrides = {"data_dir": args.data_dir} if args.data_dir else {}
    overrides.update({"workers": args.workers} if args.workers is not None else {})
    models = load_models(args.checkpoint, device, **overrides)
    for m in models:
        if m.saved.get("trainval"):
            log.warning("%s was trained on train + val: its val metrics are not a fair estimate", m.path)
    cfg0, classes = models[0].cfg, models[0].classes
    data = batch_manager.prepare_data(**cfg0.data_kwargs())
    if data.classes != classes:
        raise UserError(
            f"{args.checkpoint[0]} was trained on other classes ({len(classes)}) than those in "
            f"{data.root} ({len(data.classes)}); pass the matching --data_dir"
        )
    normalize = Normalize().to(device)
    val_probs, test_probs, labels = [], [], None
    for m in models:  # each model at its own resolution, from the same decoded data
        model, cfg, dtype = m.model, m.cfg, m.amp_dtype
        batch = args.batch_size or 2 * cfg.batch_size
        val_loader, test_loader = batch_manager.eval_loaders(data, cfg.eval_px, batch, cfg.workers)
        tta = args.tta == "flip"
        out = infer(model, val_loader, normalize, device, dtype, tta=tta)
        val_probs.append(out["logits"].softmax(1))
        labels = out["labels"]
        if test_loader is not None:
            test_probs.append(infer(model, test_loader, normalize, device, dtype, tta=tta)["logits"].softmax(1))
    probs = combine(val_probs, args.ensemble)
    metrics = metrics_from_probs(probs, labels)
    out_dir = output_folder(args)
    summary = {"checkpoints": [str(c) for c in args.checkpoint], "tta": args.tta, "ensemble": args.ensemble, **metrics}
    (out_dir / "val_metrics.json").write_text(json.dumps(summary, indent=2))
    write_csv(per_class_accuracy(probs.argmax(1), labels, data.classes, data.names), out_dir / "per_class_accuracy.csv")
    where = "no unlabelled test split"
    if test_probs:
        preds = combine(test_probs, args.ensemble).argmax(1).tolist()
        where = str(write_predictions(data.test.ids, preds, data.classes, out_dir / "test_preds.csv"))
    log.info(
        "%d model(s), tta %s, ensemble %s | val loss %.4f  top-1 %.2f%%  top-5 %.2f%% | test predictions: %s",
        len(models),
        args.tta,
        args.ensemble,
        metrics["val_loss"],
        metrics["val_top1"],
        metrics["val_top5"],
        where,
    )
    log.info("written to %s", out_dir)
    return metrics


def checkpoint_file(path: str | Path) -> Path:
    """A run folder stands for its best.pth.tar; a file is itself."""
    p = Path(path)
    if p.is_dir():
        if not (p / "best.pth.tar").is_file():
            raise UserError(f"{p} holds no best.pth.tar; pass a run folder of main.py or a .pth.tar file")
        return p / "best.pth.tar"
    return p


def output_folder(args) -> Path:
    """A folder of its own for this evaluation, never one that holds another's outputs: --output_dir
    (refused when it already holds an evaluation), else FIRST_RUN/eval/NAME, NAME from the
    checkpoints and options (NAME_2, NAME_3, ... when taken)."""
    if args.output_dir:
        out = Path(args.output_dir)
        if (out / "val_metrics.json").exists():
            raise UserError(f"--output_dir {out} already holds an evaluation (val_metrics.json); pass a new folder")
        out.mkdir(parents=True, exist_ok=True)
        return out
    files = [checkpoint_file(c) for c in args.checkpoint]
    name = files[0].name.removesuffix(".pth.tar")
    if len(files) > 1:
        name = f"ensemble{len(files)}_{args.ensemble}_" + "+".join(f.parent.name.split("_", 2)[-1] for f in files)[:60]
    name += "_tta" if args.tta == "flip" else ""
    root = files[0].parent / "eval"
    for n in range(1, 1000):
        out = root / (name if n == 1 else f"{name}_{n}")
        try:
            out.mkdir(parents=True)
            return out
        except FileExistsError:
            continue
    raise UserError(f"{root} holds 999 evaluations named {name}; pass --output_dir")


if __name__ == "__main__":
    try:
        run()
    except UserError as exc:
        sys.exit(f"error: {exc}")
