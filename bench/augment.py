"""The batched augmentation against kornia's: the same recipe on the same batches, ms per batch;
and the host's share of it, parameters drawn a chunk of batches at a time against per batch.

    pip install kornia                      # not a requirement of the toolkit; this comparison only
    python -m bench.augment [--device cpu|cuda] [--batch_size 256] [--img_size 64] [--reps 10]

Both run the default recipe at full strength (random-resized crop to the training size, flip,
rotation + shear, colour jitter, grey, one erased rectangle) on uint8 batches already on the
device, output float images; with `--randaugment` both add RandAugment (2 ops, magnitude 9).
kornia: `kornia.augmentation` with per-sample parameters (one module per op, each drawing and
warping on its own); ours: `transforms.BatchAugment` (parameters drawn on the host, one composed
warp, pixel ops only where drawn). Alternating repetitions, the median reported; on a GPU each
timing ends with a synchronisation. Without kornia installed, ours alone.

Host ms per batch (what makes a trainer host-bound on a fast GPU): drawing the parameters, and
drawing them and packing them for the device's copy, on one thread, at batches of 256 and 512, over
4 chunks of batches: BatchAugment's chunked drawing against drawing per batch as it did before
(`per_batch_draw`, kept here only as that reference; the same ops). Not timed: the kernel launches
that follow, the same in both (and not measurable on torch's `meta` device, where grid_sample and
others run as Python decompositions). Prints Markdown tables and writes JSON (default
bench/results/augment.json).
"""

from __future__ import annotations

import argparse
import itertools
import platform
import statistics
import sys
import time
import zlib
from pathlib import Path

if __package__ in (None, ""):  # `python bench/augment.py`: the repository's modules, as with -m
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import transforms  # noqa: E402
from tin.runtime import hardware  # noqa: E402
from utils import write_json  # noqa: E402


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


def per_batch_draw(aug: transforms.BatchAugment, n: int, b: int) -> tuple[list, torch.Tensor]:
    """The drawing BatchAugment did before chunks (issue 28), the reference: per batch and op a
    SeedSequence, a Generator and the op's draw of n images, and the warp composed."""
    drawn, theta = [], torch.eye(3).expand(n, 3, 3)
    for name, params in transforms.at_strength(aug.recipe, aug.strength).items():
        op = transforms.OPS[name]
        if not op.active(params):
            continue
        key = [aug.seed, aug.epoch, b, aug.rank, zlib.crc32(name.encode())]
        seed = int(np.random.SeedSequence(key).generate_state(1)[0])
        u = torch.rand(n, op.columns(params), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        d = op.draw(u.float(), params)
        m = op.matrix(d)
        if m is not None:
            theta = theta @ m
        drawn.append((op, d))
    return drawn, theta[:, :2, :]


def per_batch_params(aug: transforms.BatchAugment, n: int, b: int, device: torch.device) -> tuple[list, dict]:
    """BatchAugment's parameters before chunks: the batch's own draw and its own copy to `device`."""
    drawn, theta = per_batch_draw(aug, n, b)
    tree = {"theta": theta, **{op.name: op.device_params(d) for op, d in drawn}}
    return drawn, transforms._to_device(tree, device)


def host_ms(recipe: dict, size: int, n: int) -> dict:
    """Host ms per batch of `n`, per batch and chunked: drawing alone, and with the packing for the
    device; median of 3 alternating passes over 4 chunks of batches, each a fresh epoch (nothing
    cached). "worst": the slowest batch's draw + pack (chunked: the batch that draws its chunk, the
    host's longest pause between two steps, which a GPU's launch queue must cover)."""
    batches = 4 * transforms.CHUNK_BATCHES
    times = {way: {"draw": [], "params": [], "worst": []} for way in ("per batch", "chunked")}
    for rep in range(4):  # the first pass a warm-up
        for way, what in itertools.product(times, ("draw", "params")):
            aug = transforms.BatchAugment(seed=0, recipe=recipe)
            aug.set_epoch(rep, 1.0, size)
            step = _step(aug, n, what, way == "chunked")
            each = []
            for b in range(batches):
                start = time.perf_counter()
                step(b)
                each.append(1000 * (time.perf_counter() - start))
            if rep:
                times[way][what].append(sum(each) / batches)
                if what == "params":
                    times[way]["worst"].append(max(each))
    return {way: {k: statistics.median(v) for k, v in t.items()} for way, t in times.items()}


def _step(aug: transforms.BatchAugment, n: int, what: str, chunked: bool):
    """One batch's host work: drawing alone, or drawing and packing for the device (the CPU as the
    device: the packing is timed, no copy), chunked (BatchAugment) or per batch (the reference)."""
    cpu = torch.device("cpu")
    if what == "draw":
        return (lambda b: aug.draw(n, b)) if chunked else (lambda b: per_batch_draw(aug, n, b))
    return (lambda b: aug._on_device(n, b, None, cpu)) if chunked else (lambda b: per_batch_params(aug, n, b, cpu))


def host_table(recipe: dict, size: int) -> dict:
    """Host ms per batch, chunked against per batch, at batches of 256 and 512, on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the trainer's host thread: one core's work
    try:
        return {n: host_ms(recipe, size, n) for n in (256, 512)}
    finally:
        torch.set_num_threads(threads)


def print_host(host: dict) -> None:
    print(f"\nhost ms per batch, one thread, {transforms.CHUNK_BATCHES} batches per chunk, full strength\n")
    print(
        "| batch | draw: per batch | draw: chunked | ratio | draw + pack: per batch | draw + pack: chunked | ratio "
        "| slowest batch: per batch | chunked |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for n, r in host.items():
        old, new = r["per batch"], r["chunked"]
        cells = [f"{old[k]:.3f} | {new[k]:.3f} | {old[k] / new[k]:.1f}x" for k in ("draw", "params")]
        cells.append(f"{old['worst']:.1f} | {new['worst']:.1f}")
        print(f"| {n} | {' | '.join(cells)} |")


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
    device = hardware.resolve_device(args.device)
    recipe = transforms.build_recipe(randaugment=args.randaugment)
    host = host_table(recipe, args.img_size)
    x = torch.randint(0, 256, (args.batch_size, 3, 64, 64), dtype=torch.uint8, device=device)
    runners = {"ours (BatchAugment)": ours(recipe, args.img_size)}
    try:
        import kornia

        runners[f"kornia {kornia.__version__}"] = kornias(recipe, args.img_size)
    except ImportError:
        print("kornia is not installed (pip install kornia): ours alone")
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
        "host_ms_per_batch": {str(n): r for n, r in host.items()},
        "chunk_batches": transforms.CHUNK_BATCHES,
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
    print_host(host)
    print(f"\nwritten: {write_json(result, args.out)}")
    return result


if __name__ == "__main__":
    main()
