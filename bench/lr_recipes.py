"""Learning rates per model family: short real-data runs that chose the recipe table in optim.py.

    python -m bench.lr_recipes --data_dir data/tiny-imagenet-200 [--classes 20] [--epochs 2]
                               [--families cnn,mobile,small,vit,swin] [--batch_size 128]

For each family, one representative model trains from scratch for `--epochs` epochs on a subset of
`--classes` Tiny-ImageNet classes (every k-th wnid; all their train and val images) at several
AdamW peak rates, the original project's 2e-5 among them, with everything else at main.py's
defaults (cosine schedule, warm-up from the recipe table, progressive augmentation, CutMix/MixUp,
label smoothing, the precision this machine gets). Prints a Markdown table of val top-1 per rate
(rates are per 256 images, scaled to the batch as main.py does) and writes JSON
(default bench/results/lr_recipes.json). Each run is a real main.py run folder under --output_dir.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file (python bench/X.py): the repository root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import arch  # noqa: E402
import main as toolkit  # noqa: E402 - main.py; this file has its own main
from bench.subset import make_subset  # noqa: E402
from tin import optim  # noqa: E402
from tin.runtime import hardware  # noqa: E402
from utils import write_json  # noqa: E402

FAMILIES = {  # family group -> (representative --arch, AdamW rates per 256 images to compare)
    "cnn": ("resnet18", [4e-5, 1e-3, 2e-3, 4e-3, 8e-3]),
    "mobile": ("mobilenetv2_100", [4e-5, 1e-3, 4e-3, 8e-3]),
    "small": ("resnet9_slim", [4e-5, 1e-3, 4e-3, 8e-3]),
    "vit": ("vit_tiny", [4e-5, 5e-4, 1e-3, 2e-3]),
    "swin": ("swin_tiny", [4e-5, 5e-4, 1e-3, 2e-3]),
}
SEED_RATE = 4e-5  # the original project's 2e-5 at its batch of 128, per 256 images


def subset(root: Path, classes: int, out: Path) -> Path:
    """A Tiny-ImageNet layout of every k-th class (symbolic links to the real files): bench/subset.py's."""
    return make_subset(root, classes, out / f"tiny-imagenet-{classes}")


def lr_group(name: str) -> str:
    return arch.resolve(name).lr_group


def run_one(arch: str, lr_per_256: float, args, data: Path) -> dict:
    per = 256
    argv = [
        "--arch",
        arch,
        "--data_dir",
        str(data),
        "--epochs",
        str(args.epochs),
        "--batch_size",
        str(args.batch_size),
        "--lr_base",
        f"{lr_per_256:g}",
        "--lr_scale_batch",
        str(per),
        "--workers",
        str(args.workers),
        "--output_dir",
        args.output_dir,
        *"--wandb disabled --no_analysis --seed".split(),
        str(args.seed),
    ]
    start = time.perf_counter()
    run = toolkit.main(argv)
    results = json.loads((run / "best_results.json").read_text())
    return {
        "arch": arch,
        "lr_per_256": lr_per_256,
        "val_top1": results["val_top1"],
        "val_top5": results["val_top5"],
        "seconds": round(time.perf_counter() - start, 1),
        "run": str(run),
    }


def main(argv: list[str] | None = None) -> list[dict]:
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("TQDM_DISABLE", "1")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data_dir", default="data/tiny-imagenet-200")
    p.add_argument("--classes", type=int, default=20)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--families", default=",".join(FAMILIES))
    p.add_argument("--rates", default="", help="comma-separated rates per 256 images instead of each family's list")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--output_dir", default="checkpoints/lr_recipes")
    p.add_argument("--out", default="bench/results/lr_recipes.json")
    args = p.parse_args(argv)
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        p.error(f"unknown --families {', '.join(unknown)}; choose from {', '.join(FAMILIES)}")
    data = subset(Path(args.data_dir), args.classes, Path(args.output_dir))
    rows = []
    for family in families:
        arch, rates = FAMILIES[family]
        for rate in [float(r) for r in args.rates.split(",") if r] or rates:
            rows.append({"family": family, **run_one(arch, rate, args, data)})
            r = rows[-1]
            print(
                f"  {family:<7} {arch:<16} {rate:8.1e}  val top-1 {r['val_top1']:6.2f}  ({r['seconds']:.0f} s)",
                file=sys.stderr,
                flush=True,
            )
            out = write_json({"args": vars(args), "device": hardware.cpu_name(), "rows": rows}, args.out)
    print(
        f"\nval top-1 (%) after {args.epochs} epochs from scratch, {args.classes} classes, batch {args.batch_size}, "
        f"AdamW, rates per 256 images ({hardware.decide_runtime(hardware.resolve_device('auto')).reason})\n"
    )
    print("| family (model) | val top-1 at each rate per 256 images | best | recipe table |")
    print("|---|---|---|---|")
    for family in families:
        mine = [r for r in rows if r["family"] == family]
        recipe = optim.lr_recipe(lr_group(mine[0]["arch"]), False, "adamw")
        cells = ", ".join(
            f"{r['lr_per_256']:.0e}{' (original)' if r['lr_per_256'] == SEED_RATE else ''}: {r['val_top1']:.1f} %"
            for r in mine
        )
        best = max(mine, key=lambda r: r["val_top1"])
        print(f"| {family} ({mine[0]['arch']}) | {cells} | {best['lr_per_256']:.0e} | {recipe.lr_per_256:.0e} |")
    print(f"\nwritten: {out}")
    return rows


if __name__ == "__main__":
    main()
