"""One command that proves the GPU path on the machine at hand, in minutes, and prints one table.

    python -m bench.gpu_check                  # on a GPU machine (about 5 minutes on one H100)
    python -m bench.gpu_check --device cpu     # the same checks on a CPU (CUDA-only rows skipped, < 1 min)

Needs only the repository and its requirements (a GPU machine's own torch may differ from the pin:
the versions it ran with are printed). Its data: the built-in demo digits (demo_data.py), made here.

  1. training: the defaults on the demo data for 2 epochs, interrupted (SIGINT) in epoch 2 and
     resumed, against an uninterrupted run; then val.py on the checkpoint reproduces the run's val top-1
  2. host syncs per update in train_one_epoch (CUDA: torch.cuda.set_sync_debug_mode), trainer
     / bare loop with its data wait for resnet18 and resnet9_slim at batch 256 (bench/step.py), and
     what --deterministic (cuDNN's deterministic algorithms, no autotuning) costs
  3. BatchAugment on the CPU and on the GPU from the same seed: equal within float error; ms per batch
  4. fp32, bf16 and fp16 + gradient scaler training steps all finite; torch.compile recompilations
     across a progressive-resizing schedule
  5. DistributedDataParallel + EMA + compile on a one-process group (NCCL on a GPU, gloo on a CPU),
     and --sync_bn's conversion of efficientnet_b0 training there

Writes the table as Markdown for bench/RESULTS.md (with the device's name) and JSON
(default bench/results/gpu_check.json). Exit status 1 if any check fails.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

import arch
import demo_data
import transforms
from tin import hardware
from utils import write_json

ROOT = Path(__file__).resolve().parents[1]

ROWS: list[dict] = []


def row(check: str, result: str, ok: bool | None, seconds: float = 0.0) -> None:
    """ok None = skipped (result says why)."""
    ROWS.append({"check": check, "result": result, "ok": ok, "seconds": round(seconds, 1)})
    mark = "skip" if ok is None else ("ok" if ok else "FAIL")
    print(f"[{mark:>4}] {check}: {result}", file=sys.stderr, flush=True)


def check(title: str):
    """A check: an exception inside it becomes a FAIL row under `title`, and the other checks still
    run (the table always prints)."""

    def wrap(fn):
        def run(*args, **kwargs):
            start = time.perf_counter()
            try:
                fn(*args, **kwargs, started=start)
            except Exception as exc:  # noqa: BLE001 - a failed check is a row, the others still run
                row(title, f"{type(exc).__name__}: {exc}"[:300], False, time.perf_counter() - start)

        run.title = title
        return run

    return wrap


def _main_py(args: list[str], out, interrupt_at: int = 0) -> subprocess.Popen:
    """main.py in its own process; with interrupt_at K, SIGINT arrives right after update K
    (bench/interrupt_at.py), wherever that falls in wall-clock time."""
    wrapper = ["-m", "bench.interrupt_at", str(interrupt_at)] if interrupt_at else []
    return subprocess.Popen(
        [sys.executable, *wrapper, str(ROOT / "main.py"), *args],
        cwd=ROOT,
        stdout=out,
        stderr=subprocess.STDOUT,
    )


# --------------------------------------------------------------------------- 1. training, resume, val.py
@check("1. training, interrupt, resume, val.py")
def check_training(args, work: Path, data: Path, started: float) -> None:
    import csv

    import val
    from tin.readers import read_dataset

    common = ["--config", "configs/demo.yaml", "--data_dir", str(data), "--device", args.device, "--time_budget", "0"]
    common += "--epochs 2 --warmup_epochs 0.5 --wandb disabled --no_analysis --workers 2".split()
    if args.device == "cpu":  # CI: the same path, smaller (a GPU runs the demo recipe as it is)
        common += "--arch resnet9_slim --img_size 32 --steps_per_epoch 8".split()
    with open(work / "reference.log", "w") as log:
        assert _main_py([*common, "--output_dir", str(work / "ref")], log).wait(900) == 0, "reference run failed"
    reference = next((work / "ref").iterdir())
    updates = json.loads((reference / "best_results.json").read_text())["updates"]
    cut_at = updates * 3 // 4  # the middle of epoch 2, whatever the machine's speed
    out = work / "cut"
    with open(work / "cut.log", "w") as log:
        code = _main_py([*common, "--output_dir", str(out)], log, interrupt_at=cut_at).wait(900)
    run = next(out.iterdir())
    with open(work / "resume.log", "w") as log:
        assert _main_py(["--resume", str(run)], log).wait(900) == 0, "resume failed"

    def rows(r: Path) -> list[dict]:
        keep = ("epoch", "train_loss", "val_loss", "val_top1")
        return [{k: float(v) for k, v in x.items() if k in keep} for x in csv.DictReader(open(r / "metrics.csv"))]

    a, b = rows(reference), rows(run)
    gap = max(abs(x[k] - y[k]) for x, y in zip(a, b, strict=True) for k in x)
    metrics = val.run(
        ["--checkpoint", str(run / "best.pth.tar"), "--output_dir", str(work / "val"), "--device", args.device]
    )
    best = json.loads((run / "best_results.json").read_text())["val_top1"]
    # val.py evaluates as the run did (precision, memory format, batch); on a GPU cuDNN's algorithm
    # choice may still flip an argmax or two: at most two images' worth of difference
    slack = 2 * 100.0 / len(read_dataset("tiny-imagenet", data).val) + 1e-6
    exact = "identical" if gap == 0 else f"max difference {gap:.2g}"
    ok = code == 130 and len(b) == 2 and abs(metrics["val_top1"] - best) <= slack and gap < 0.05
    row(
        "1. demo run, SIGINT in epoch 2, resume; val.py",
        f"stopped with {code} at update {cut_at} of {updates}, resumed: {exact} to an uninterrupted run; "
        f"val.py top-1 {metrics['val_top1']:.2f} % vs the run's {best:.2f} %",
        ok,
        time.perf_counter() - started,
    )


# --------------------------------------------------------------------------- 2. syncs and trainer overhead
@check("2a. host syncs per update")
def check_syncs(args, work: Path, data: Path, started: float) -> None:
    from tin import distributed, time_budget
    from tin.build import build_parts, build_scheduler
    from tin.checkpoint import TrainState
    from tin.config import parse_config
    from train import train_one_epoch

    if args.device != "cuda":
        row(
            "2a. host syncs per update",
            "CUDA only (the CPU test suite records host traffic: tests/test_gpu_ready.py)",
            None,
        )
        return
    flags = ["--data_dir", str(data), "--arch", "resnet9_slim", "--batch_size", "64", "--device", args.device]
    cfg = parse_config([*flags, "--workers", "2", "--wandb", "disabled"])
    cfg, p, *_ = build_parts(cfg, distributed.Context())
    plan = time_budget.plan_run(cfg, p, 0.0)
    scheduler = build_scheduler(cfg, p.optimizer, plan)

    def epoch(e: int, state: TrainState) -> None:
        train_one_epoch(p, scheduler, state, epoch=e, end_batch=plan.end_batch(e), strength=1.0, size=cfg.img_size)

    state = TrainState()
    epoch(0, state)  # warm-up (cuDNN's autotuning, the first batches)
    updates = plan.end_batch(1) // cfg.accum_steps
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            epoch(1, state)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
    where = sorted({str(w.message).split("\n")[0][:60] for w in syncs})[:3]
    per = len(syncs) / max(updates, 1)
    row(
        "2a. host syncs per update (resnet9_slim, defaults)",
        f"{len(syncs)} in {updates} updates = {per:.2f} per update{'; e.g. ' + '; '.join(where) if where else ''}",
        per <= 0.2,
        time.perf_counter() - started,
    )


@check("2b. trainer / bare loop")
def check_trainer_overhead(args, work: Path, data: Path, started: float) -> None:
    if args.device != "cuda" and not args.cpu_overhead:
        row("2b. trainer / bare loop, batch 256", "GPU figure (on a CPU: python -m bench.step, README: Speed)", None)
        return
    from bench import step

    results = []
    synthetic = synthetic_npy(work / "synthetic", images=256 * (args.steps + 10))
    for name in ("resnet18", "resnet9_slim"):
        r = step.main(
            [
                *"--dataset npy --data_dir".split(),
                str(synthetic),
                "--arch",
                name,
                *"--batch_size 256 --device".split(),
                args.device,
                *"--workers 4 --steps".split(),
                str(args.steps),
                *"--reps 3 --out".split(),
                str(work / f"step_{name}.json"),
            ]
        )
        results.append(r)

    def describe(r: dict) -> str:
        what = f"{r['arch']} {r['ratio_median']:.2f} ({r['trainer_ips']:,.0f} vs {r['bare_ips']:,.0f} img/s"
        if r.get("augment_ms") is not None:
            what += f", augmentation {r['augment_ms']:.2f} ms per batch"
        if not r.get("data_on_device"):  # the loader path: how long the step waited for a batch
            what += f", data wait {100 * r['data_wait_median']:.1f} %"
        return what + ")"

    # with the data on the device the step never waits for a loader: what bounds the GPU is what
    # the trainer adds to the bare step (augmentation, mixing, metrics, schedule, EMA)
    ok = all(r["ratio_median"] >= 0.85 for r in results)
    row(
        "2b. trainer / bare loop, batch 256 (target >= 0.85)",
        "; ".join(describe(r) for r in results),
        ok,
        time.perf_counter() - started,
    )


@check("2c. cost of --deterministic on")
def check_determinism_cost(args, work: Path, data: Path, started: float) -> None:
    if args.device != "cuda":
        row("2c. cost of --deterministic on", "CUDA only (a CPU is deterministic at no cost)", None)
        return
    device = torch.device("cuda")
    ips = {}
    for mode in ("on", "auto", "on", "auto"):  # alternating: the second pair confirms the first
        hardware.configure(device, deterministic=mode)
        torch.manual_seed(0)
        model = arch.build_model("resnet18_cifar", 200, img_size=64).to(device).to(memory_format=torch.channels_last)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        x = torch.randn(256, 3, 64, 64, device=device).contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 200, (256,), device=device)
        for i in range(25):
            if i == 5:
                _sync(device)
                start = time.perf_counter()
            with hardware.autocast(device, torch.bfloat16):
                loss = F.cross_entropy(model(x).float(), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        _sync(device)
        ips.setdefault(mode, []).append(20 * 256 / (time.perf_counter() - start))
    hardware.configure(device, deterministic="auto")
    det, auto = max(ips["on"]), max(ips["auto"])
    row(
        "2c. cost of --deterministic on (resnet18_cifar, batch 256, bf16)",
        f"{det:,.0f} img/s deterministic vs {auto:,.0f} with cuDNN autotuning (the default): {det / auto:.2f}x",
        True,
        time.perf_counter() - started,
    )


# --------------------------------------------------------------------------- 3. BatchAugment CPU vs GPU
@check("3. BatchAugment CPU vs GPU")
def check_augment(args, work: Path, data: Path, started: float) -> None:
    n = 256 if args.device == "cuda" else 64  # a CI-sized batch on a CPU
    x = torch.randint(0, 256, (n, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    recipe = transforms.build_recipe(randaugment=True)
    devices = ["cpu"] + (["cuda"] if args.device == "cuda" else [])
    # TF32 rounds matmuls and convolutions (RandAugment's sharpness blur) to 10 bits of mantissa on
    # the GPU: off here, so that the comparison sees the augmentation's own differences only
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        timings, outputs = _time_augment(x, recipe, devices, reps=10 if args.device == "cuda" else 2)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    if len(devices) == 1:
        row(
            "3. BatchAugment CPU vs GPU, same seed",
            f"GPU only; CPU {timings['cpu']:.1f} ms per batch of {n} (with RandAugment)",
            None,
            time.perf_counter() - started,
        )
        return
    diff = (outputs["cpu"] - outputs["cuda"]).abs()
    close = float((diff > 2.0).float().mean())  # pixels off by more than 2 grey levels (bilinear edges, rounding)
    ok = close < 0.01 and float(diff.mean()) < 0.5
    row(
        "3. BatchAugment CPU vs GPU, same seed (256 images, with RandAugment)",
        f"mean |difference| {float(diff.mean()):.3f} grey levels, {100 * close:.2f} % of values off by > 2; "
        f"{timings['cpu']:.1f} ms (CPU) vs {timings['cuda']:.2f} ms (GPU) per batch",
        ok,
        time.perf_counter() - started,
    )


def _time_augment(x: torch.Tensor, recipe: dict, devices: list[str], reps: int) -> tuple[dict, dict]:
    """ms per batch and the output of BatchAugment on each device, from the same seed."""
    timings, outputs = {}, {}
    for dev in devices:
        aug = transforms.BatchAugment(seed=3, recipe=recipe)
        aug.set_epoch(1, 1.0, 56)
        xd = x.to(dev)
        for _ in range(3):
            out = aug(xd, 7)
        _sync(dev)
        start = time.perf_counter()
        for _ in range(reps):
            out = aug(xd, 7)
        _sync(dev)
        timings[dev], outputs[dev] = 1000 * (time.perf_counter() - start) / reps, out.float().cpu()
    return timings, outputs


# --------------------------------------------------------------------------- 4. precisions and compile
@check("4a. precisions")
def check_precisions(args, work: Path, data: Path, started: float) -> None:
    device = torch.device(args.device)
    results = {}
    for name, dtype in (("fp32", None), ("bf16", torch.bfloat16), ("fp16+scaler", torch.float16)):
        if dtype is torch.float16 and device.type != "cuda":
            continue
        torch.manual_seed(0)
        model = arch.build_model("resnet18", 200, img_size=64).to(device).to(memory_format=torch.channels_last)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        scaler = torch.amp.GradScaler(device.type, enabled=dtype is torch.float16)
        losses = []
        batch = 64 if device.type == "cuda" else 8  # bf16 is emulated (slow) on some CPUs: keep CI short
        for _ in range(5):
            x = torch.randn(batch, 3, 64, 64, device=device).contiguous(memory_format=torch.channels_last)
            y = torch.randint(0, 200, (batch,), device=device)
            with hardware.autocast(device, dtype):
                loss = F.cross_entropy(model(x).float(), y)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
        results[name] = all(map(torch.isfinite, map(torch.tensor, losses))), losses[-1]
    text = ", ".join(f"{k} {'finite' if ok else 'NOT FINITE'} (last loss {v:.2f})" for k, (ok, v) in results.items())
    skipped = "" if device.type == "cuda" else "; fp16 + scaler: CUDA only"
    row(
        "4a. 5 training steps in each precision (resnet18)",
        text + skipped,
        all(ok for ok, _ in results.values()),
        time.perf_counter() - started,
    )


@check("4b. torch.compile")
def check_compile(args, work: Path, data: Path, started: float) -> None:
    if args.device != "cuda" and not args.cpu_compile:
        row(
            "4b. torch.compile across training sizes",
            "GPU check (on a CPU compiling takes minutes; --cpu_compile)",
            None,
        )
        return
    import torch._dynamo

    device = torch.device(args.device)
    torch._dynamo.reset()
    model = arch.build_model("resnet9_slim", 200, img_size=64).to(device).to(memory_format=torch.channels_last)
    net = torch.compile(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sizes = [transforms.train_size_at(e, 10, 64, 32, 0.8) for e in range(10)]
    compile_s = {}
    for size in sorted(set(sizes)):
        start = time.perf_counter()
        for _ in range(2):
            x = torch.randn(128, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
            with hardware.autocast(device, torch.bfloat16):
                loss = F.cross_entropy(net(x).float(), torch.randint(0, 200, (128,), device=device))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        _sync(device)
        compile_s[size] = time.perf_counter() - start
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    text = f"{len(set(sizes))} sizes {sorted(set(sizes))}: {graphs} compiled graphs; first steps per size " + ", ".join(
        f"{s}px {t:.0f} s" for s, t in compile_s.items()
    )
    row(
        "4b. torch.compile across a progressive-resizing schedule",
        text,
        graphs <= 2 * len(set(sizes)) + 2,
        time.perf_counter() - started,
    )


# --------------------------------------------------------------------------- 5. DDP + EMA + compile, SyncBN
@check("5. DDP + EMA + compile")
def check_ddp(args, work: Path, data: Path, started: float) -> None:
    import torch.distributed as dist
    from timm.layers import convert_sync_batchnorm
    from timm.utils import ModelEmaV3

    device = torch.device(args.device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"file://{work / 'store'}", rank=0, world_size=1)
    try:
        results = []
        for name, compile_it, sync_bn in (
            ("resnet18", device.type == "cuda" or args.cpu_compile, False),
            ("efficientnet_b0", False, device.type == "cuda"),  # SyncBatchNorm trains on GPUs only
        ):
            torch.manual_seed(0)
            model = arch.build_model(name, 200, img_size=64).to(device)
            if sync_bn:
                model = convert_sync_batchnorm(model)
            ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[0] if device.type == "cuda" else None)
            net = torch.compile(ddp) if compile_it else ddp
            ema = ModelEmaV3(model, decay=0.99, use_warmup=True)
            start_state = copy.deepcopy(ema.module.state_dict())
            opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
            batch = 32 if device.type == "cuda" else 8
            for step in range(4):
                x = torch.randn(batch, 3, 64, 64, device=device)
                with hardware.autocast(device, torch.bfloat16 if device.type == "cuda" else None):
                    loss = F.cross_entropy(net(x).float(), torch.randint(0, 200, (batch,), device=device))
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                ema.update(model, step=step + 1)
            ema_moved = any(not torch.equal(v, start_state[k]) for k, v in ema.module.state_dict().items())
            n_sync = sum(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules())
            results.append((name, bool(torch.isfinite(loss)), ema_moved, compile_it, n_sync))
        text = "; ".join(
            f"{n}: loss {'finite' if f else 'NOT FINITE'}, EMA {'tracks' if e else 'stuck'}"
            f"{', compiled' if c else ''}{f', {s} SyncBatchNorm layers' if s else ''}"
            for n, f, e, c, s in results
        )
        if device.type != "cuda":
            text += "; SyncBatchNorm: GPUs only (its conversion is tested on CPU in tests/test_gpu_ready.py)"
        ok = all(f and e for _, f, e, _, _ in results) and (results[1][4] > 0 or device.type != "cuda")
        row(f"5. DDP ({backend}, one process) + EMA (+ compile); --sync_bn", text, ok, time.perf_counter() - started)
    finally:
        dist.destroy_process_group()


def synthetic_npy(folder: Path, images: int, classes: int = 200) -> Path:
    """A 64x64 dataset of random pixels in the .npy format (--dataset npy): for timing only."""
    import numpy as np

    if (folder / "y_val.npy").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", images), ("val", 512)):
        np.save(folder / f"x_{split}.npy", rng.integers(0, 256, (n, 64, 64, 3), dtype=np.uint8))
        np.save(folder / f"y_{split}.npy", rng.integers(0, classes, n))
    return folder


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def versions(device: torch.device) -> str:
    parts = [f"torch {torch.__version__}", f"python {platform.python_version()}"]
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        parts += [f"CUDA {torch.version.cuda}", f"cuDNN {torch.backends.cudnn.version()}", f"sm_{major}{minor}"]
    return ", ".join(parts)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("WANDB_MODE", "disabled")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--steps", type=int, default=30, help="updates per timed repetition in check 2b")
    p.add_argument("--cpu_overhead", action="store_true", help="run check 2b on a CPU too (minutes)")
    p.add_argument("--cpu_compile", action="store_true", help="run the compile checks on a CPU too (minutes)")
    p.add_argument("--work_dir", default=None, help="where runs and data go (default: a temporary folder)")
    p.add_argument("--out", default="bench/results/gpu_check.json")
    args = p.parse_args(argv)
    device = hardware.resolve_device(args.device)
    args.device = device.type
    hardware.configure(device, deterministic="auto")
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    data = demo_data.ensure_demo_dataset(work / "demo-digits")
    name = hardware.device_name(device)
    print(
        f"gpu_check on {name} ({versions(device)}); default precision here: {hardware.decide_runtime(device).reason}",
        file=sys.stderr,
    )
    start = time.perf_counter()
    for check in (
        check_training,
        check_syncs,
        check_trainer_overhead,
        check_determinism_cost,
        check_augment,
        check_precisions,
        check_compile,
        check_ddp,
    ):
        check(args, work, data)
    total = time.perf_counter() - start
    print(f"\n{name} — {versions(device)} — {time.strftime('%Y-%m-%d')}, {total:.0f} s in all\n")
    print("| check | result | verdict | s |")
    print("|---|---|---|---|")
    for r in ROWS:
        verdict = "skipped" if r["ok"] is None else ("ok" if r["ok"] else "**FAIL**")
        print(f"| {r['check']} | {r['result']} | {verdict} | {r['seconds']:.0f} |")
    summary = {"device": name, "versions": versions(device), "seconds": round(total, 1), "rows": ROWS}
    print(f"\nwritten: {write_json(summary, args.out)}")
    return 1 if any(r["ok"] is False for r in ROWS) else 0


if __name__ == "__main__":
    sys.exit(main())
