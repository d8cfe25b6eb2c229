"""Trainer overhead: the full trainer on the real data path against a bare loop, same model.

    python -m bench.step --arch resnet18 --batch_size 64 [any main.py flag] [--steps 30] [--reps 5]

bare:    forward, backward and optimizer step on one batch already resident on the device (already
         augmented and normalised): what the model's arithmetic alone costs;
trainer: train.train_one_epoch, i.e. what `main.py` runs per epoch: the loader (cache, augmentation
         in the workers or on the device at full strength), copy, normalisation, CutMix/MixUp,
         loss, accuracy, LR schedule, EMA if asked, progress accounting.

With ``--teacher PATH`` (distillation) the trainer runs with the teacher, and a third loop, the
trainer without it, gives what teaching costs: the student's step with the teacher ÷ without.

Both use the same model, optimizer, autocast and memory format, built from main.py's own flags
(config.py; `--config FILE` works too). They alternate `--reps` times, `--steps` updates each,
after `--warmup` updates of each (the first bf16 steps on a CPU are erratic; the warm-up also
starts the loader's workers). Augmentation runs at strength `--strength` (default 1, the most
expensive), and at `--img_size` throughout (progressive resizing is turned off). Prints a Markdown table: images/s of each, the ratio trainer / bare (median and
range over the repetitions) and the trainer's data-wait fraction; writes JSON
(default bench/results/step.json).
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import time

import torch
from timm.loss import SoftTargetCrossEntropy

import batch_manager
import transforms
from tin import distributed, hardware, time_budget
from tin.build import build_parts, build_scheduler
from tin.checkpoint import TrainState
from tin.config import parse_config
from train import train_one_epoch
from utils import write_json


def bench_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], add_help=False)
    p.add_argument("--steps", type=int, default=30, help="updates per timed repetition")
    p.add_argument("--reps", type=int, default=5, help="alternating repetitions of each")
    p.add_argument("--warmup", type=int, default=8, help="untimed updates of each first (>= 5 for bf16 on CPU)")
    p.add_argument("--strength", type=float, default=1.0, help="augmentation strength during the benchmark")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--out", default="bench/results/step.json")
    p.add_argument("-h", "--help", action="store_true")
    args, rest = p.parse_known_args(argv)
    if args.help:
        p.print_help()
        print("\nevery other flag is main.py's (python main.py --help)")
        raise SystemExit(0)
    return args, rest


def build(cfg):
    """Data, loaders, model and what trains it exactly as main.py builds them (tin.build.build_parts),
    and the learning-rate schedule over --epochs."""
    cfg, parts, *_ = build_parts(cfg, distributed.Context())
    plan = time_budget.epochs_plan(cfg.epochs, cfg.steps_per_epoch, cfg.accum_steps)
    return cfg, parts, build_scheduler(cfg, parts.optimizer, plan)


def resident_batch(p, cfg):
    """One training batch, augmented and normalised, kept on the device (the bare loop's input),
    and the same batch as it leaves the loader (uint8, on the device)."""
    images, labels = next(iter(p.loaders.train))
    raw = images = images.to(p.device)
    if p.loaders.augment is not None:
        images = p.loaders.augment(images, 0)
    images = p.normalize(images)
    if p.runtime.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    n = len(p.loaders.data.classes)
    targets = transforms.soft_targets(images, labels.to(p.device), None, n, cfg.label_smoothing)[1]
    return images, targets, raw


def augment_ms(p, raw, batches: int) -> float | None:
    """Milliseconds per batch of the on-device augmentation alone (None: it runs in the loader)."""
    if p.loaders.augment is None:
        return None
    hardware.synchronize(p.device)
    start = time.perf_counter()
    for b in range(batches):
        p.loaders.augment(raw, b)
    hardware.synchronize(p.device)
    return 1000 * (time.perf_counter() - start) / batches


def bare_steps(p, images, targets, steps: int) -> float:
    """images/s of forward + backward + optimizer step on resident tensors."""
    loss_fn = SoftTargetCrossEntropy()
    p.net.train()
    hardware.synchronize(p.device)
    start = time.perf_counter()
    for _ in range(steps):
        with p.autocast():
            loss = loss_fn(p.net(images).float(), targets)
        loss.backward()
        p.optimizer.step()
        p.optimizer.zero_grad(set_to_none=True)
    hardware.synchronize(p.device)
    return steps * images.shape[0] / (time.perf_counter() - start)


def trainer_steps(p, scheduler, cfg, epoch: int, strength: float, updates: int) -> tuple[float, float]:
    """(images/s, data-wait fraction) of train.train_one_epoch over `updates` updates."""
    state = TrainState()
    hardware.synchronize(p.device)
    start = time.perf_counter()
    end = updates * cfg.accum_steps
    tr = train_one_epoch(p, scheduler, state, epoch=epoch, end_batch=end, strength=strength, size=cfg.img_size)
    hardware.synchronize(p.device)
    return state.batch * cfg.batch_size / (time.perf_counter() - start), tr["data_wait_fraction"]


def untaught(p, run):
    """`run()` with the trainer's teacher taken out (the student's step alone), then put back."""
    teacher, p.teacher = p.teacher, None
    try:
        return run()
    finally:
        p.teacher = teacher


def main(argv: list[str] | None = None) -> dict:
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("TQDM_DISABLE", "1")
    args, rest = bench_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    # constant strength: every timed epoch augments at --strength
    base = ["--aug_schedule", "constant", "--aug_strength", str(args.strength), "--no_analysis", "--wandb", "disabled"]
    fixed = ["--min_img_size", "0"]  # every timed epoch at --img_size, like the resident batch
    cfg, p, scheduler = build(parse_config(base + rest + fixed + ["--steps_per_epoch", str(args.steps)]))
    device = p.device
    images, targets, raw = resident_batch(p, cfg)

    bare_steps(p, images, targets, args.warmup)
    trainer_steps(p, scheduler, cfg, 0, args.strength, args.warmup)  # also starts the persistent workers
    teacher, alone = p.teacher, []
    if teacher is not None:
        untaught(p, lambda: trainer_steps(p, scheduler, cfg, 0, args.strength, args.warmup))
    bare, trainer, wait = [], [], []
    for rep in range(args.reps):
        bare.append(bare_steps(p, images, targets, args.steps))
        ips, w = trainer_steps(p, scheduler, cfg, rep + 1, args.strength, args.steps)
        trainer.append(ips)
        wait.append(w)
        if teacher is not None:
            alone.append(
                untaught(p, lambda r=rep: trainer_steps(p, scheduler, cfg, r + 1, args.strength, args.steps))[0]
            )
    ratios = [t / b for t, b in zip(trainer, bare, strict=True)]
    taught = [t / a for t, a in zip(trainer, alone, strict=True)] if alone else []
    aug_ms = augment_ms(p, raw, args.steps)
    result = {
        "arch": cfg.arch,
        "batch_size": cfg.batch_size,
        "img_size": cfg.img_size,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
        "amp": p.runtime.precision,
        "channels_last": p.runtime.channels_last,
        "compile": cfg.compile,
        "aug_backend": cfg.aug_backend,
        "workers": cfg.workers,
        "strength": args.strength,
        "bare_ips": statistics.median(bare),
        "trainer_ips": statistics.median(trainer),
        "ratio_median": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "data_wait_median": statistics.median(wait),
        "augment_ms": aug_ms,
        "data_on_device": isinstance(p.loaders.train, batch_manager.DeviceBatches),
        "teachers": teacher.summary() if teacher is not None else [],
        "untaught_ips": statistics.median(alone) if alone else None,
        "taught_ratio_median": statistics.median(taught) if taught else None,
        "taught_ratios": taught,
        "untaught_all": alone,
        "bare_all": bare,
        "trainer_all": trainer,
        "ratios": ratios,
        "data_wait_all": wait,
        "steps": args.steps,
        "reps": args.reps,
        "warmup": args.warmup,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
    }
    r = result
    print(
        f"\n{r['arch']}, batch {r['batch_size']}, {r['img_size']}x{r['img_size']}, {r['device']} "
        f"({r['device_name']}, {r['threads']} threads), autocast {r['amp']}, channels_last {r['channels_last']}, "
        f"aug {r['aug_backend']} at s={r['strength']}, {r['workers']} workers; {r['reps']} x {r['steps']} updates\n"
    )
    print("| bare img/s | trainer img/s | trainer / bare (median, range) | data wait | augmentation ms per batch |")
    print("|---|---|---|---|---|")
    aug = "in the loader" if r["augment_ms"] is None else f"{r['augment_ms']:.2f}"
    print(
        f"| {r['bare_ips']:,.0f} | {r['trainer_ips']:,.0f} | {r['ratio_median']:.3f} "
        f"({r['ratio_min']:.3f}-{r['ratio_max']:.3f}) | {100 * r['data_wait_median']:.1f} % | {aug} |"
    )
    if teacher is not None:
        names = " + ".join(f"{t['arch']} at {t['img_size']} px" for t in r["teachers"])
        print(f"\nwith the teacher ({names}) against the same trainer without it:\n")
        print("| trainer img/s without the teacher | with it | with ÷ without (median, range) |")
        print("|---|---|---|")
        print(
            f"| {r['untaught_ips']:,.0f} | {r['trainer_ips']:,.0f} | {r['taught_ratio_median']:.3f} "
            f"({min(taught):.3f}-{max(taught):.3f}) |"
        )
    print(f"\nwritten: {write_json(result, args.out)}")
    return result


if __name__ == "__main__":
    main()
