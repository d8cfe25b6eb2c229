"""The batched augmentation against kornia's: the same recipe on the same batches, ms per batch.

    pip install kornia                      # not a requirement of the toolkit; this comparison only
    python -m bench.augment [--device cpu|cuda] [--batch_size 256] [--img_size 64] [--reps 10]

Both run the default recipe at full strength (random-resized crop to the training size, flip,
rotation + shear, colour jitter, grey, one erased rectangle) on uint8 batches already on the
device, output float images; with `--randaugment` both add RandAugment (2 ops, magnitude 9).
kornia: `kornia.augmentation` with per-sample parameters (one module per op, each drawing and
warping on its own); ours: `transforms.BatchAugment` (parameters drawn on the host, one composed
warp, pixel ops only where drawn). Alternating repetitions, the median reported; on a GPU each
timing ends with a synchronisation. Prints a Markdown table and writes JSON
(default bench/results/augment.json).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time

import torch

import transforms
from tin import hardware
from utils import write_json


def ours(recipe: dict, size: int):
    aug = transforms.BatchAugment(seed=0, recipe=recipe)
    aug.set_epoch(1, 1.0, size)
    counter = iter(range(10**9))
    return lambda x: aug(x, next(counter))


def kornias(recipe: dict, size: int):
    """The same recipe in kornia.augmentation (its parameters at strength 1)."""
    import kornia.augmentation as K

    r = transforms.at_strength(recipe, 1.0)
    c, a, j, e = r["crop"], r["affine"], r["jitter"], r["erase"]
    ops = [
        K.RandomResizedCrop((size, size), scale=(1 - c["area"], 1.0), ratio=(1 - c["squeeze"], 1 + c["stretch"])),
        K.RandomHorizontalFlip(p=r["flip"]["p"]),
    ]
    if r["randaugment"]["p"] > 0:
        from kornia.augmentation.auto import RandAugment

        ops.append(RandAugment(n=int(r["randaugment"]["n"]), m=int(r["randaugment"]["m"])))
    ops += [
        K.RandomAffine(degrees=a["rotate"], shear=a["shear"], p=a["p"]),
        K.ColorJitter(j["brightness"], j["contrast"], j["saturation"], j["hue"], p=j["p"]),
        K.RandomGrayscale(p=r["gray"]["p"]),
        K.RandomErasing(scale=(e["min_side"] ** 2, e["max_side"] ** 2), ratio=(0.3, 3.3), value=0.0, p=e["p"]),
    ]
    pipeline = K.AugmentationSequential(*ops)
    return lambda x: pipeline(x.float() / 255.0) * 255.0


def _time(fn, x: torch.Tensor, reps: int) -> float:
    hardware.synchronize(x.device)
    start = time.perf_counter()
    for _ in range(reps):
        fn(x)
    hardware.synchronize(x.device)
    return 1000 * (time.perf_counter() - start) / reps


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--batch_size", type=int, default=256)
    p.add_argument("--img_size", type=int, default=64)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--randaugment", action="store_true")
    p.add_argument("--out", default="bench/results/augment.json")
    args = p.parse_args(argv)
    try:
        import kornia
    except ImportError:
        sys.exit("error: this comparison needs kornia: pip install kornia")
    device = hardware.resolve_device(args.device)
    recipe = transforms.build_recipe(randaugment=args.randaugment)
    x = torch.randint(0, 256, (args.batch_size, 3, 64, 64), dtype=torch.uint8, device=device)
    runners = {
        "ours (BatchAugment)": ours(recipe, args.img_size),
        f"kornia {kornia.__version__}": kornias(recipe, args.img_size),
    }
    for fn in runners.values():  # warm-up (kernels, allocator)
        for _ in range(2):
            fn(x)
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(5):
        for name, fn in runners.items():
            times[name].append(_time(fn, x, args.reps))
    where = hardware.device_name(device)
    result = {
        "device": str(device),
        "device_name": where,
        "torch": torch.__version__,
        "batch_size": args.batch_size,
        "img_size": args.img_size,
        "randaugment": args.randaugment,
        "ms_per_batch": {name: statistics.median(t) for name, t in times.items()},
        "all": times,
        "machine": f"{platform.machine()}, threads {torch.get_num_threads()}",
    }
    ms = result["ms_per_batch"]
    base = next(iter(ms.values()))
    print(
        f"\n{where} ({device}), batch {args.batch_size}, 64 -> {args.img_size} px, full strength"
        f"{', with RandAugment' if args.randaugment else ''}; median of 5 x {args.reps} batches\n"
    )
    print("| augmentation | ms per batch | relative to ours |")
    print("|---|---|---|")
    for name, value in ms.items():
        print(f"| {name} | {value:.2f} | {value / base:.2f}x |")
    print(f"\nwritten: {write_json(result, args.out)}")
    return result


if __name__ == "__main__":
    main()
