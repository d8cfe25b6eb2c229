"""Evaluation and test predictions, through one loop (``forward``).

``evaluate(...)`` -> {val_loss, val_top1, val_top5, ...} (every entry of METRICS); ``predict(...)``
-> class index per image; ``infer(...)`` -> logits, labels and penultimate features (optionally
flip-TTA); ``combine(...)`` -> an ensemble's probabilities; ``metrics_from_probs`` and
``per_class_accuracy`` from probabilities. Used by training (tin/run/loop.py), the time budget's
measuring, evaluate.py, predict.py and export.py; saved runs are loaded by tin/run/load.py and
their CSV files written by tin/run/submission.py.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from tqdm import tqdm

from tin.runtime import distributed, hardware
from transforms import Normalize
from utils import topk_correct

log = logging.getLogger("tin")

# val_<name> in metrics.csv, the log line and wandb: (sum over a batch of (logits, labels), scale of
# the mean). Sums are kept on the device and reduced across processes; the figure is scale * sum / images.
METRICS: dict[str, tuple[Callable[[torch.Tensor, torch.Tensor], torch.Tensor], float]] = {
    "loss": (lambda logits, labels: F.cross_entropy(logits, labels, reduction="sum"), 1.0),
    "top1": (lambda logits, labels: topk_correct(logits, labels, (1,))[0], 100.0),
    "top5": (lambda logits, labels: topk_correct(logits, labels, (5,))[0], 100.0),
}


# --tta for the scripts that evaluate saved runs (evaluate.py, predict.py): one definition, one meaning
TTA_OPTION = {
    "nargs": "?",
    "const": "flip",
    "default": "none",
    "choices": ("none", "flip"),
    "help": "test-time augmentation: --tta (or --tta flip) averages each image with its mirror image, as main.py --tta",
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


if __name__ == "__main__":
    sys.exit(
        "val.py holds the evaluation loop that training and evaluate.py use; evaluate runs with: python evaluate.py RUN"
    )
