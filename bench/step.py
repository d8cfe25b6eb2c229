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
expensive), and at `--img_size` throughout (progressive resizing is turned off). Prints a Markdown
table: images/s of each, the ratio trainer / bare (median and range over the repetitions) and the
share of the trainer's time the host spent blocked fetching the next batch; then where the gap goes:
each part of the trainer's update (fetch, copy, augmentation, normalisation, mixing, forward and
backward, optimizer, schedule, EMA, metering) timed in a separate pass of `--part_steps` updates
that synchronises the device after every part (so its figures are not those of the ratio, whose
loops never wait), their sum beside the trainer's own time per update. Writes JSON (default
bench/results/step.json).
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from timm.loss import SoftTargetCrossEntropy

if __package__ in (None, ""):  # run as a file (python bench/X.py): the repository root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import batch_manager  # noqa: E402
from tin.augment import mixing  # noqa: E402
from tin.config.cli import parse_config  # noqa: E402
from tin.engine.state import (
    EpochMeters,  # noqa: E402
    TrainState,  # noqa: E402
)
from tin.plan import budget  # noqa: E402
from tin.run.build import build_parts, build_scheduler  # noqa: E402
from tin.runtime import distributed, hardware
from train import optimizer_step, train_one_epoch  # noqa: E402
from utils import write_json  # noqa: E402


def bench_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], add_help=False)
    p.add_argument("--steps", type=int, default=30, help="updates per timed repetition")
    p.add_argument("--reps", type=int, default=5, help="alternating repetitions of each")
    p.add_argument("--warmup", type=int, default=8, help="untimed updates of each first (>= 5 for bf16 on CPU)")
    p.add_argument(
        "--part_steps",
        type=int,
        default=None,
        help="updates of the pass timing each part (0: none; default and at most: --steps)",
    )
    p.add_argument("--strength", type=float, default=1.0, help="augmentation strength during the benchmark")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--out", default="bench/results/step.json")
    p.add_argument("-h", "--help", action="store_true")
    args, rest = p.parse_known_args(argv)
    # an epoch is --steps updates long (--steps_per_epoch): the parts pass is one such epoch at most
    args.part_steps = args.steps if args.part_steps is None else max(0, min(args.part_steps, args.steps))
    if args.help:
        p.print_help()
        print("\nevery other flag is main.py's (python main.py --help)")
        raise SystemExit(0)
    return args, rest


def build(cfg):
    """Data, loaders, model and what trains it exactly as main.py builds them (tin.run.build.build_parts),
    and the learning-rate schedule over --epochs."""
    cfg, parts, *_ = build_parts(cfg, distributed.Context())
    plan = budget.epochs_plan(cfg.epochs, cfg.steps_per_epoch, cfg.accum_steps)
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
    targets = mixing.soft_targets(images, labels.to(p.device), None, n, cfg.label_smoothing)[1]
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
    """(images/s, the share of the time the host was blocked in the loader's next()) of
    train.train_one_epoch over `updates` updates. That share is what train_one_epoch reports as
    data_wait_fraction: on a CPU, the loader's work its workers did not hide; on a GPU the host runs
    ahead of the device until the kernel launch queue is full, then blocks in whichever call
    launches next (with the data on the device, the loader's own gather in next()), so there it can
    count the queue's back-pressure rather than the GPU waiting for data. The parts pass's "fetch",
    taken with the device idle, is the data wait itself."""
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


# --------------------------------------------------------------------------- the update, part by part
PARTS = {  # key -> what it holds, in the order train.train_one_epoch and train.device_batch run them
    "fetch": "next batch from the loader (the device idle: the data wait itself)",
    "copy": "copy to the device",
    "augment": "augmentation on the device (and the cached views' lookup)",
    "normalize": "normalisation, memory format",
    "mix": "CutMix/MixUp, soft targets (and replayed soft labels)",
    "forward_backward": "forward, loss (the teacher's too), backward",
    "meters": "metering: loss and accuracy sums, the periodic host read",
    "optimizer": "optimizer step (unscale, clip, scaler, zero_grad)",
    "schedule": "learning-rate schedule",
    "ema": "EMA update",
}


class Laps:
    """Seconds spent in each of PARTS, summed over a pass. The device is synchronised at every
    boundary, so each part's queued device work is counted in its own lap, not the next one's (a
    CPU has no queue: nothing to wait for)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.seconds, self.t = device, dict.fromkeys(PARTS, 0.0), 0.0

    def start(self) -> None:
        hardware.synchronize(self.device)
        self.t = time.perf_counter()

    def lap(self, part: str) -> None:
        hardware.synchronize(self.device)
        now = time.perf_counter()
        self.seconds[part] += now - self.t
        self.t = now


def timed_parts(p, scheduler, cfg, epoch: int, strength: float, updates: int) -> dict[str, float]:
    """Milliseconds per update of each of PARTS over `updates` updates: what train.train_one_epoch
    and train.device_batch call, in their order, one lap each (one process: no DDP no_sync, no
    progress bar). A copy of their steps can drift from them: the printed sum of the parts beside
    the trainer's own time per update shows it."""
    accum = cfg.accum_steps
    p.loaders.set_epoch(epoch, strength, start_batch=0, size=cfg.img_size)
    if p.mixer is not None:
        p.mixer.set_strength(strength)
    meters, loss_fn, laps, step = EpochMeters(None, p.device), SoftTargetCrossEntropy(), Laps(p.device), 0
    p.net.train()
    p.optimizer.zero_grad(set_to_none=True)
    laps.start()
    batches = iter(p.loaders.train)  # in the fetch: the trainer's epoch starts its iterator too
    for b in range(updates * accum):
        images, labels = next(batches)
        laps.lap("fetch")
        inputs, targets, labels, taught = prepared(p, images, labels, b, laps)
        with p.autocast():
            logits = p.net(inputs)
            loss = loss_fn(logits.float(), targets)
            if p.teacher is not None:
                loss = p.teacher.loss(loss, logits, inputs, cached=taught)
        p.scaler.scale(loss / accum).backward()
        laps.lap("forward_backward")
        meters.add(loss, logits, labels, step)
        laps.lap("meters")
        if (b + 1) % accum == 0:
            step = optimizer_update(p, scheduler, step, laps)
            if step % p.sync_every == 0 or step == updates:  # the trainer's host reads, the epoch's last too
                meters.check_finite(p.optimizer)
                laps.lap("meters")
    return {part: 1000 * s / updates for part, s in laps.seconds.items()}


def prepared(p, images, labels, b: int, laps: Laps):
    """train.device_batch, one lap per part."""
    images = images.to(p.device, non_blocking=True)
    labels = labels.to(p.device, non_blocking=True)
    laps.lap("copy")
    replay = p.teacher.replay(p.loaders, b) if p.teacher is not None else None
    if p.loaders.augment is not None:
        images = p.loaders.augment(images, b, views=replay.views if replay is not None else None)
    laps.lap("augment")
    images = p.normalize(images)
    if p.runtime.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    laps.lap("normalize")
    inputs, targets = mixing.soft_targets(images, labels, p.mixer, p.num_classes, p.label_smoothing)
    lam = p.mixer.lam if p.mixer is not None else 1.0
    taught = replay.probs(p.device, p.num_classes, lam) if replay is not None else None
    laps.lap("mix")
    return inputs, targets, labels, taught


def optimizer_update(p, scheduler, step: int, laps: Laps) -> int:
    """train.train_one_epoch's update, one lap per part; returns the update count after it."""
    optimizer_step(p)
    laps.lap("optimizer")
    step += 1
    if scheduler is not None:
        scheduler.step_update(num_updates=step)
    laps.lap("schedule")
    if p.ema is not None:
        p.ema.update(p.model, step=step)
    laps.lap("ema")
    return step


# --------------------------------------------------------------------------- the run
def measure(args, p, scheduler, cfg) -> dict:
    """Warm-up, then `--reps` alternating repetitions of the bare loop, the trainer (and without its
    teacher), then the parts pass: every figure the result holds, as lists."""
    images, targets, raw = resident_batch(p, cfg)
    bare_steps(p, images, targets, args.warmup)
    trainer_steps(p, scheduler, cfg, 0, args.strength, args.warmup)  # also starts the persistent workers
    teacher = p.teacher
    if teacher is not None:
        untaught(p, lambda: trainer_steps(p, scheduler, cfg, 0, args.strength, args.warmup))
    bare, trainer, blocked, alone = [], [], [], []
    for rep in range(args.reps):
        bare.append(bare_steps(p, images, targets, args.steps))
        ips, w = trainer_steps(p, scheduler, cfg, rep + 1, args.strength, args.steps)
        trainer.append(ips)
        blocked.append(w)
        if teacher is not None:
            alone.append(
                untaught(p, lambda r=rep: trainer_steps(p, scheduler, cfg, r + 1, args.strength, args.steps))[0]
            )
    parts = timed_parts(p, scheduler, cfg, args.reps + 1, args.strength, args.part_steps) if args.part_steps else {}
    return {"bare": bare, "trainer": trainer, "blocked": blocked, "alone": alone, "parts": parts, "raw": raw}


def summary(args, cfg, p, m: dict) -> dict:
    """The JSON result from `measure`'s figures `m`."""
    device, teacher, bare, trainer, alone = p.device, p.teacher, m["bare"], m["trainer"], m["alone"]
    ratios = [t / b for t, b in zip(trainer, bare, strict=True)]
    taught = [t / a for t, a in zip(trainer, alone, strict=True)] if alone else []
    images = cfg.batch_size * cfg.accum_steps  # per update
    return {
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
        # data_wait_*: the names train_one_epoch gives it; host_blocked_in_next_*: what it measures
        "data_wait_median": statistics.median(m["blocked"]),
        "host_blocked_in_next_median": statistics.median(m["blocked"]),
        "augment_ms": augment_ms(p, m["raw"], args.steps),
        "data_on_device": isinstance(p.loaders.train, batch_manager.DeviceBatches),
        "teachers": teacher.summary() if teacher is not None else [],
        "untaught_ips": statistics.median(alone) if alone else None,
        "taught_ratio_median": statistics.median(taught) if taught else None,
        "taught_ratios": taught,
        "untaught_all": alone,
        "bare_all": bare,
        "trainer_all": trainer,
        "ratios": ratios,
        "data_wait_all": m["blocked"],
        "host_blocked_in_next_all": m["blocked"],
        "trainer_update_ms": 1000 * images / statistics.median(trainer),  # the ratio's own, never synchronised
        "bare_update_ms": 1000 * images / statistics.median(bare),  # the same images through the bare loop
        "parts_ms": m["parts"],  # PARTS -> ms per update, from the synchronised pass
        "parts_sum_ms": sum(m["parts"].values()) if m["parts"] else None,
        "part_steps": args.part_steps,
        "steps": args.steps,
        "reps": args.reps,
        "warmup": args.warmup,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
    }


def print_tables(r: dict, p) -> None:
    print(
        f"\n{r['arch']}, batch {r['batch_size']}, {r['img_size']}x{r['img_size']}, {r['device']} "
        f"({r['device_name']}, {r['threads']} threads), autocast {r['amp']}, channels_last {r['channels_last']}, "
        f"aug {r['aug_backend']} at s={r['strength']}, {r['workers']} workers; {r['reps']} x {r['steps']} updates\n"
    )
    print(
        "| bare img/s | trainer img/s | trainer / bare (median, range) | host blocked fetching next batch "
        "| augmentation ms per batch |"
    )
    print("|---|---|---|---|---|")
    aug = "in the loader" if r["augment_ms"] is None else f"{r['augment_ms']:.2f}"
    print(
        f"| {r['bare_ips']:,.0f} | {r['trainer_ips']:,.0f} | {r['ratio_median']:.3f} "
        f"({r['ratio_min']:.3f}-{r['ratio_max']:.3f}) | {100 * r['host_blocked_in_next_median']:.1f} % | {aug} |"
    )
    if r["device"].startswith("cuda"):
        print("\n(on a GPU the host also blocks there when the launch queue is full: see the fetch part below)")
    if r["teachers"]:
        names = " + ".join(f"{t['arch']} at {t['img_size']} px" for t in r["teachers"])
        print(f"\nwith the teacher ({names}) against the same trainer without it:\n")
        print("| trainer img/s without the teacher | with it | with ÷ without (median, range) |")
        print("|---|---|---|")
        taught = r["taught_ratios"]
        print(
            f"| {r['untaught_ips']:,.0f} | {r['trainer_ips']:,.0f} | {r['taught_ratio_median']:.3f} "
            f"({min(taught):.3f}-{max(taught):.3f}) |"
        )
    if r["parts_ms"]:
        print_parts(r, p)


def print_parts(r: dict, p) -> None:
    """Where the trainer's time per update goes: the parts pass, against the ratio's own figures."""
    off = {
        "augment": " (in the loader: part of the fetch)" if p.loaders.augment is None else "",
        "mix": " (no CutMix/MixUp)" if p.mixer is None else "",
        "ema": " (off: --ema)" if p.ema is None else "",
    }
    total = r["parts_sum_ms"]
    print(
        f"\nthe trainer's update part by part ({r['part_steps']} updates, the device synchronised after each "
        "part; ms per update):\n"
    )
    print("| part | ms per update | share |")
    print("|---|---|---|")
    for key, what in PARTS.items():
        ms = r["parts_ms"][key]
        print(f"| {what}{off.get(key, '')} | {ms:.2f} | {100 * ms / max(total, 1e-12):.1f} % |")
    print(f"| **sum of the parts** | **{total:.2f}** | 100 % |")
    print(
        f"| the trainer's own time per update (the ratio's loop, never synchronised) | {r['trainer_update_ms']:.2f} | |"
    )
    print(f"| the bare loop, the same images | {r['bare_update_ms']:.2f} | |")


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
    result = summary(args, cfg, p, measure(args, p, scheduler, cfg))
    print_tables(result, p)
    print(f"\nwritten: {write_json(result, args.out)}")
    return result


if __name__ == "__main__":
    main()
