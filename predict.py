"""Predict the classes of image files with a trained checkpoint, or an ensemble of them.

    python predict.py RUN_OR_CHECKPOINT [MORE_CHECKPOINTS ...] IMAGES ... [--topk 5] [--tta flip]
                      [--out predictions.csv] [--batch_size N] [--device auto|cpu|cuda] [--ensemble mean|max_conf]
    python predict.py --checkpoint A/best.pth.tar [B/best.pth.tar ...] IMAGES ...   (as evaluate.py takes them)

Which argument is which: a run folder (one holding best.pth.tar; its best.pth.tar is used) or a
file named *.pth.tar is a checkpoint; every other argument is an image source: a file (any name), a
folder (searched recursively for .jpg .jpeg .png .bmp .webp .tif .tiff .gif files) or a quoted glob
('photos/**/*.png'). With --checkpoint, its first value is a checkpoint whatever its name, and so
are the values after it up to the first one that is not a checkpoint by the rule above.

Images of any size and mode are decoded as training decodes them (tin.data.readers.decode_rgb: grayscale,
palette, CMYK and 16-bit files become RGB; an alpha channel is dropped), then sized as the run's
evaluation sized its val images: to the size the run cached its images at (Tiny-ImageNet: 64x64,
PIL bilinear, as tin.data.decode_cache.decode_to) and then to the run's evaluation size (cv2 bilinear,
as the evaluation loader). A Tiny-ImageNet image thus gets exactly the pixels the run evaluated,
and a large photo is first reduced with PIL's antialiasing filter rather than cv2's, which would
alias. The model runs through val.py's evaluation loop, at the precision and memory format the run
chose for this device; an ensemble combines probabilities as evaluate.py does.

Output: a CSV (path, then wnid_k, name_k, prob_k for k = 1..topk; rows in argument order) and the
top-1 of each image on the console. Unreadable files are listed with the reason and skipped. Class
names come from the checkpoint, so no dataset folder is needed (checkpoints written before they
held names show wnids).
"""

from __future__ import annotations

import argparse
import csv
import glob
import itertools
import logging
import os
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

import batch_manager
import val
from tin.data import decode_cache
from tin.data.readers import IMAGE_ERRORS, IMAGE_SUFFIXES
from tin.run import load
from tin.run.folder import setup_logging
from tin.runtime import hardware
from transforms import Normalize
from utils import UserError

log = logging.getLogger("tin")

CHECKPOINT_SUFFIX = ".pth.tar"
CONSOLE_ROWS = 20  # the console shows the first rows; the CSV has them all


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Predict the classes of image files with a checkpoint or an ensemble of checkpoints.",
        epilog="Arguments that are run folders (holding best.pth.tar) or *.pth.tar files are checkpoints; "
        "the others are image files, folders (recursive) or globs.",
    )
    p.add_argument("inputs", nargs="*", metavar="RUN_OR_CHECKPOINT_OR_IMAGES")
    p.add_argument("--checkpoint", nargs="+", default=None, help="checkpoints, as evaluate.py takes them")
    p.add_argument("--topk", type=int, default=5, help="classes per image in the CSV (default 5)")
    p.add_argument("--tta", **val.TTA_OPTION)
    p.add_argument("--out", default="predictions.csv", help="the CSV to write (default predictions.csv)")
    p.add_argument("--batch_size", type=int, default=None, help="images per batch (default: twice the run's)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument(
        "--ensemble",
        choices=("mean", "max_conf"),
        default="mean",
        help="mean of probabilities, or each image takes the most confident model's",
    )
    args = p.parse_args(argv)
    if args.topk < 1:
        raise UserError(f"--topk must be at least 1 (got {args.topk})")
    if args.batch_size is not None and args.batch_size < 1:
        raise UserError(f"--batch_size must be at least 1 (got {args.batch_size})")
    return args


# --------------------------------------------------------------------------- arguments
def is_checkpoint(arg: str) -> bool:
    path = Path(arg)
    return arg.endswith(CHECKPOINT_SUFFIX) or (path.is_dir() and (path / "best.pth.tar").is_file())


def split_inputs(args: argparse.Namespace) -> tuple[list[Path], list[str]]:
    """(checkpoint files, image sources) from the command line."""
    if args.checkpoint:  # argparse gives --checkpoint every word up to the next flag: the images may be among them
        first, rest = args.checkpoint[0], args.checkpoint[1:]
        n = next((i for i, a in enumerate(rest) if not is_checkpoint(a)), len(rest))
        checkpoints, sources = [first, *rest[:n]], rest[n:] + args.inputs
    else:
        checkpoints = [a for a in args.inputs if is_checkpoint(a)]
        sources = [a for a in args.inputs if not is_checkpoint(a)]
    if not checkpoints:
        raise UserError(
            "no checkpoint among the arguments; pass a run folder (holding best.pth.tar) or a .pth.tar file, "
            "then the images"
        )
    if not sources:
        raise UserError("no images to predict; pass image files, folders or globs after the checkpoint")
    files = [Path(c) / "best.pth.tar" if Path(c).is_dir() else Path(c) for c in checkpoints]
    return files, sources


def _image_files(folder: Path) -> list[Path]:
    return sorted(f for f in folder.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)


def gather_images(sources: list[str]) -> tuple[list[Path], dict[str, str]]:
    """(image files in argument order, without repeats; {source: why it gave none})."""
    found: dict[str, Path] = {}
    empty: dict[str, str] = {}
    for src in sources:
        path = Path(src)
        if path.is_dir():
            files, why = _image_files(path), "a folder without image files"
        elif path.is_file():
            files, why = [path], ""
        elif any(c in src for c in "*?["):
            matches = [Path(m) for m in sorted(glob.glob(src, recursive=True))]
            files = [f for m in matches for f in (_image_files(m) if m.is_dir() else [m])]
            why = "no file matches this pattern"
        else:
            files, why = [], "no such file or folder"
        if not files:
            empty[src] = why
        found.update((str(f), f) for f in files)
    return list(found.values()), empty


# --------------------------------------------------------------------------- images
def load_image(path: Path, store: int | None, size: int) -> np.ndarray:
    """(size, size, 3) uint8 RGB of an image file, as the run's evaluation saw its val images: decoded
    and stored at `store` (None: as decoded; the run did not cache), then resized to `size`."""
    return batch_manager.resize_to(decode_cache.decode_to(path, store), size)


def _try_load(path: Path, store: int | None, size: int) -> tuple[np.ndarray | None, str]:
    try:
        return load_image(path, store, size), ""
    except IMAGE_ERRORS as exc:
        return None, f"{type(exc).__name__}: {exc}"


def batches(
    paths: list[Path], store: int | None, size: int, batch_size: int, bad: dict[str, str]
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """What val.forward takes as a loader: (uint8 (B, 3, size, size), index of each image in `paths`)
    for the readable images; the unreadable go into `bad` (path -> reason). Decoding runs in threads
    (PIL and cv2 release the GIL)."""
    with ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1))) as pool:
        for start in range(0, len(paths), batch_size):
            chunk = paths[start : start + batch_size]
            loaded = list(pool.map(lambda p: _try_load(p, store, size), chunk))
            keep = [(start + j, image) for j, (image, _) in enumerate(loaded) if image is not None]
            bad.update((str(p), why) for p, (_, why) in zip(chunk, loaded, strict=True) if why)
            if keep:
                images = torch.from_numpy(np.stack([image for _, image in keep])).permute(0, 3, 1, 2)
                # the memory layout the run's evaluation loader gives (AugmentedDataset.__getitems__): its
                # NHWC cache viewed as NCHW at the cached size, contiguous NCHW where it resized. The same
                # layout gives the same sums in the model: the run's own predictions, image for image
                images = images if store == size else images.contiguous()
                yield images, torch.tensor([i for i, _ in keep])


def store_of(cfg) -> int | None:
    """The size the run decoded its image files to (None: --no_cache, images decoded as they are)."""
    return None if cfg.no_cache else batch_manager.store_size(cfg.dataset, cfg.img_size)


# --------------------------------------------------------------------------- prediction
def ensemble_probs(models: list[load.Loaded], paths: list[Path], args, device, bad: dict[str, str]):
    """(probabilities (N, C) of the readable images, their indices in `paths`), or (None, None) when
    none is readable: each model at its own evaluation size, precision and memory format; combined
    by args.ensemble."""
    normalize = Normalize().to(device)
    probs, index = [], None
    for m in models:
        loader = batches(paths, store_of(m.cfg), m.cfg.eval_px, args.batch_size or 2 * m.cfg.batch_size, bad)
        first = next(loader, None)
        if first is None:  # nothing readable (the same for every model)
            return None, None
        out = val.infer(m.model, itertools.chain([first], loader), normalize, device, m.amp_dtype, args.tta == "flip")
        probs.append(out["logits"].softmax(1))
        index = out["labels"]
    return val.combine(probs, args.ensemble), index


def class_names(models: list[load.Loaded]) -> dict[str, str]:
    """wnid -> name from the first checkpoint that holds names; else the wnids themselves (said once)."""
    names = next((m.names for m in models if m.names), None)
    if names is None:
        log.warning("%s holds no class names (written before checkpoints stored them): showing wnids", models[0].path)
        return {c: c for c in models[0].classes}
    return names


def top_rows(probs: torch.Tensor, index: torch.Tensor, paths, classes, names, k: int) -> list[dict]:
    """One CSV row per image: path, then wnid_j, name_j, prob_j for j = 1..k."""
    # a stable sort: exact ties (frequent in bf16) go to the lower class index, as argmax and the run's own
    # predictions break them (topk's order among equal values is unspecified)
    values, ids = (t[:, :k] for t in probs.sort(dim=1, descending=True, stable=True))
    rows = []
    for i, vs, cs in zip(index.tolist(), values.tolist(), ids.tolist(), strict=True):
        row = {"path": str(paths[i])}
        for j, (v, c) in enumerate(zip(vs, cs, strict=True), start=1):
            row.update({f"wnid_{j}": classes[c], f"name_{j}": names.get(classes[c], classes[c]), f"prob_{j}": v})
        rows.append(row)
    return rows


def write_rows(rows: list[dict], out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({k: f"{v:.6f}" if isinstance(v, float) else v for k, v in r.items()} for r in rows)
    return out


def print_table(rows: list[dict], out: Path) -> None:
    width = min(max(len(r["path"]) for r in rows), 60)
    print(f"{'path':<{width}}  {'top-1':<32}  prob")
    for r in rows[:CONSOLE_ROWS]:
        path = r["path"] if len(r["path"]) <= width else "..." + r["path"][-(width - 3) :]
        print(f"{path:<{width}}  {r['name_1'][:32]:<32}  {r['prob_1']:.3f}")
    more = f" ({len(rows) - CONSOLE_ROWS} more)" if len(rows) > CONSOLE_ROWS else ""
    print(f"{len(rows)} image(s){more}; top-{(len(rows[0]) - 1) // 3} in {out}")


def run(argv: list[str] | None = None) -> Path:
    """Predict; returns the CSV written."""

    args = parse_args(argv)
    setup_logging()
    checkpoints, sources = split_inputs(args)
    device = hardware.resolve_device(args.device)
    models = load.load_models(checkpoints, device)
    names = class_names(models)
    paths, bad = gather_images(sources)
    probs, index = ensemble_probs(models, paths, args, device, bad)
    if bad:
        log.warning("skipped %d argument(s) or file(s) that gave no image:", len(bad))
        for what, why in bad.items():
            log.warning("  %s: %s", what, why)
    if probs is None:
        raise UserError(
            f"no readable image among {', '.join(sources)} (each is listed above with the reason); "
            "pass image files, folders or globs"
        )
    rows = top_rows(probs, index, paths, models[0].classes, names, args.topk)
    out = write_rows(rows, Path(args.out))
    print_table(rows, out)
    return out


if __name__ == "__main__":
    try:
        run()
    except UserError as exc:
        sys.exit(f"error: {exc}")
