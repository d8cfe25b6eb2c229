"""Evaluate saved runs on the val split, alone or as an ensemble, and predict the test split.

    python evaluate.py RUN_OR_CHECKPOINT [MORE ...] [--tta flip] [--ensemble mean|max_conf] [--out DIR]

Each checkpoint is built as its run built it (tin/run/load.py) and runs through the evaluation loop
of val.py at the precision and memory format its run chose for this device. Writes val_metrics.json,
per_class_accuracy.csv and test_preds.csv (the submission's form) into a folder of its own.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import batch_manager
from tin.run.folder import setup_logging
from tin.run.load import checkpoint_file, load_models
from tin.run.submission import write_csv, write_predictions
from tin.runtime import hardware
from transforms import Normalize
from utils import UserError
from val import TTA_OPTION, combine, infer, metrics_from_probs, per_class_accuracy

log = logging.getLogger("tin")


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
    p.add_argument("--tta", **TTA_OPTION)
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
        p.error("give the run folders or checkpoints to evaluate: python evaluate.py RUN [RUN ...]")
    return args


def run(argv: list[str] | None = None) -> dict[str, float]:

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
    members = [
        {"checkpoint": str(m.path), **metrics_from_probs(p, labels)} for m, p in zip(models, val_probs, strict=True)
    ]
    if len(models) > 1:  # what the ensemble adds is read against what each member scores alone
        for i, member in enumerate(members, 1):
            log.info(
                "member %d: %s | val top-1 %.2f%%  top-5 %.2f%%",
                i,
                member["checkpoint"],
                member["val_top1"],
                member["val_top5"],
            )
    out_dir = output_folder(args)
    summary = {"checkpoints": [str(c) for c in args.checkpoint], "tta": args.tta, "ensemble": args.ensemble, **metrics}
    summary["members"] = members
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
    if len(files) > 1:  # each member by its run folder's time and name: two resnet18 runs stay apart
        members = "+".join(f.parent.name.split("_", 1)[-1] for f in files)
        name = f"ensemble{len(files)}_{args.ensemble}_{members[:80]}"
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
