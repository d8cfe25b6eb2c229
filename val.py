"""Evaluation and test predictions.

``evaluate(...)`` -> {val_loss, val_top1, val_top5}; ``predict(...)`` -> class index per image;
``write_predictions(...)`` -> the submission CSV (``image,label``: file name, predicted wnid,
one row per test image, sorted by file name).

Also a CLI to evaluate a saved checkpoint::

    python val.py --checkpoint checkpoints/RUN/best.pth.tar [--data_dir data/tiny-imagenet-200]
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from transforms import Normalize
from utils import UserError

log = logging.getLogger("tin")


def _batches(model, loader, normalize, device, amp_dtype, desc):
    model.eval()
    with torch.inference_mode():
        for images, labels in tqdm(loader, desc=desc, leave=False, dynamic_ncols=True, disable=None):
            images = normalize(images.to(device, non_blocking=True))
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                logits = model(images)
            yield logits.float(), labels.to(device)


def evaluate(model, loader, normalize: Normalize, device, amp_dtype=None) -> dict[str, float]:
    """Mean cross-entropy and top-1/top-5 accuracy (%) over every labelled image in `loader`."""
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros(2, dtype=torch.long, device=device)
    count = 0
    for logits, labels in _batches(model, loader, normalize, device, amp_dtype, "val"):
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").double()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top.eq(labels.view(-1, 1))
        correct += torch.stack([hits[:, :1].any(1).sum(), hits.any(1).sum()])
        count += labels.shape[0]
    count = max(count, 1)
    top1, top5 = (100.0 * correct.double() / count).tolist()
    return {"val_loss": float(loss_sum) / count, "val_top1": top1, "val_top5": top5}


def predict(model, loader, normalize: Normalize, device, amp_dtype=None) -> list[int]:
    """Predicted class index for every image of `loader`, in loader order."""
    preds = [logits.argmax(1).cpu() for logits, _ in _batches(model, loader, normalize, device, amp_dtype, "test")]
    return torch.cat(preds).tolist() if preds else []


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


# --------------------------------------------------------------------------- CLI
def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Evaluate a checkpoint on the val split and predict the test split.")
    p.add_argument("--checkpoint", required=True, help="a best.pth.tar / last.pth.tar written by main.py")
    p.add_argument("--data_dir", default=None, help="dataset root (default: the one the run trained on)")
    p.add_argument("--output_dir", default=None, help="where to write test_preds.csv (default: beside the checkpoint)")
    p.add_argument("--batch_size", type=int, default=256)
    p.add_argument("--workers", type=int, default=None, help="loader processes (default: as in training)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    return p.parse_args(argv)


def run(argv: list[str] | None = None) -> dict[str, float]:
    import arch
    import batch_manager
    from config import Config
    from utils import amp_dtype as pick_amp
    from utils import load_checkpoint, resolve_device, setup_logging

    args = _parse(argv)
    setup_logging()
    ckpt = load_checkpoint(args.checkpoint)
    overrides = {"data_dir": args.data_dir} if args.data_dir else {}
    overrides.update({"workers": args.workers} if args.workers is not None else {})
    cfg = Config(**{**ckpt["config"], **overrides, "trainval": False})  # evaluate on the run's own val split
    if ckpt["config"].get("trainval"):
        log.warning("this model was trained on train + val: its val metrics are not a fair estimate")
    device = resolve_device(args.device)
    data = batch_manager.prepare_data(**cfg.data_kwargs())
    if data.classes != list(ckpt["classes"]):
        raise UserError(
            f"{args.checkpoint} was trained on other classes ({len(ckpt['classes'])}) than those in "
            f"{data.root} ({len(data.classes)}); pass the matching --data_dir"
        )
    val_loader, test_loader = batch_manager.eval_loaders(data, cfg.img_size, args.batch_size, cfg.workers)
    model = arch.build_model(cfg.arch, len(ckpt["classes"]), cfg.img_size).to(device)
    model.load_state_dict(ckpt["state_dict"])
    normalize, dtype = Normalize().to(device), pick_amp(device, cfg.amp)
    metrics = evaluate(model, val_loader, normalize, device, dtype)
    out_dir = Path(args.output_dir) if args.output_dir else Path(args.checkpoint).parent
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "val_metrics.json").write_text(json.dumps({"checkpoint": str(args.checkpoint), **metrics}, indent=2))
    where = "no unlabelled test split"
    if test_loader is not None:
        preds = predict(model, test_loader, normalize, device, dtype)
        where = str(write_predictions(data.test.ids, preds, data.classes, out_dir / "test_preds.csv"))
    log.info(
        "val loss %.4f  top-1 %.2f%%  top-5 %.2f%%  | test predictions: %s",
        metrics["val_loss"], metrics["val_top1"], metrics["val_top5"], where,
    )  # fmt: skip
    return metrics


if __name__ == "__main__":
    try:
        run()
    except UserError as exc:
        sys.exit(f"error: {exc}")
