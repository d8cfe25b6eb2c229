"""One command that proves the GPU path on the machine at hand, in minutes, and prints one table.

    python -m bench.gpu_check                  # on a GPU machine (about 5 minutes on one H100)
    python -m bench.gpu_check --device cpu     # the same checks on a CPU (CUDA-only rows skipped, < 1 min)
    python bench/gpu_check.py --out DIR        # the same; DIR/gpu_check.md and DIR/gpu_check.json

Needs only the repository and its requirements (a GPU machine's own torch may differ from the pin:
the versions it ran with are printed). Its data: the built-in demo digits (demo_data.py), made here.

  1. training: the defaults on the demo data for 2 epochs under --deterministic on, interrupted
     (SIGINT) in epoch 2 and resumed, against an uninterrupted run: identical metrics; then evaluate.py
     on the checkpoint reproduces the run's val top-1
  2. host syncs per update in train_one_epoch over a fresh epoch of >= 100 updates (CUDA:
     torch.cuda.set_sync_debug_mode), trainer / bare loop for resnet18 and resnet9_slim at batch
     256 (bench/step.py), and what --deterministic on costs (each mode in a fresh process, so that
     cuBLAS starts with the workspace it asks for)
  3. BatchAugment on the CPU and on the GPU from the same seed, with TF32 as training has it: equal
     within float error; ms per batch
  4. fp32, bf16 and fp16 + gradient scaler training steps all finite; torch.compile recompilations
     across a progressive-resizing schedule
  5. DistributedDataParallel + EMA + compile on a one-process group (NCCL on a GPU, gloo on a CPU),
     and --sync_bn's conversion of efficientnet_b0 training there

Each row is written the moment its check ends: the table as Markdown for bench/RESULTS.md (with
the device's name) in OUT/gpu_check.md and as JSON in OUT/gpu_check.json (default OUT:
bench/results), so a check that is stopped (SIGTERM, a call's time limit) leaves every row before it
and a table that says where it stopped. The compile checks (4b, 5) run last: cold, they take minutes.
Exit status 1 if any check fails, 143 when stopped by SIGTERM.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

if __package__ in (None, ""):  # `python bench/gpu_check.py`: the repository's modules, as with -m
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import arch  # noqa: E402
import demo_data  # noqa: E402
import evaluate  # noqa: E402
import transforms  # noqa: E402
from bench import step  # noqa: E402
from tin.config.cli import parse_config  # noqa: E402
from tin.data.readers import read_dataset  # noqa: E402
from tin.engine.state import TrainState  # noqa: E402
from tin.plan import measure  # noqa: E402
from tin.run.build import build_parts, build_scheduler  # noqa: E402
from tin.runtime import distributed, hardware  # noqa: E402
from train import train_one_epoch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

ROWS: list[dict] = []
REPORT: dict = {"out": None, "header": "", "started": time.perf_counter(), "status": "running", "attempts": {}}
CHILDREN: list[subprocess.Popen] = []  # main.py processes of check 1: stopped with this one


class Stopped(BaseException):
    """SIGTERM arrived: not an Exception, so no check's own handler turns it into a row."""


def row(check: str, result: str, ok: bool | None, seconds: float = 0.0) -> None:
    """ok None = skipped (result says why). The table and the JSON are rewritten at once."""
    ROWS.append({"key": REPORT.get("key"), "check": check, "result": result, "ok": ok, "seconds": round(seconds, 1)})
    mark = "skip" if ok is None else ("ok" if ok else "FAIL")
    print(f"[{mark:>4}] {check}: {result}", file=sys.stderr, flush=True)
    write_report()


def table() -> str:
    lines = [
        REPORT["header"],
        "",
        f"status: {REPORT['status']}",
        "",
        "| check | result | verdict | s |",
        "|---|---|---|---|",
    ]
    for r in ROWS:
        verdict = "skipped" if r["ok"] is None else ("ok" if r["ok"] else "**FAIL**")
        lines.append(f"| {r['check']} | {r['result']} | {verdict} | {r['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def write_report() -> None:
    """OUT/gpu_check.md and OUT/gpu_check.json as they stand, each replaced atomically (a kill
    mid-write leaves the previous version, never half a file)."""
    out = REPORT["out"]
    if out is None:
        return
    summary = {
        "header": REPORT["header"],
        "status": REPORT["status"],
        "seconds": round(time.perf_counter() - REPORT["started"], 1),
        "attempts": REPORT.get("attempts", {}),
        **REPORT.get("facts", {}),
        "rows": ROWS,
    }
    for name, text in (("gpu_check.md", table()), ("gpu_check.json", json.dumps(summary, indent=2) + "\n")):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, out / name)


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
    proc = subprocess.Popen(
        [sys.executable, *wrapper, str(ROOT / "main.py"), *args],
        cwd=ROOT,
        stdout=out,
        stderr=subprocess.STDOUT,
    )
    CHILDREN.append(proc)
    return proc


# --------------------------------------------------------------------------- 1. training, resume, evaluate.py
@check("1. training, interrupt, resume, evaluate.py")
def check_training(args, work: Path, data: Path, started: float) -> None:

    # --deterministic on: a resumed run is then bitwise the uninterrupted one on a GPU too, so any
    # difference is a resume bug. Under autotuning (the default) two processes may pick other cuDNN
    # algorithms and flip an image, which would read as one (one image is 0.28 points here)
    for folder in ("ref", "cut", "val"):  # an earlier, stopped attempt's (--continue)
        shutil.rmtree(work / folder, ignore_errors=True)
    common = ["--config", "configs/demo.yaml", "--data_dir", str(data), "--device", args.device, "--time_budget", "0"]
    common += "--epochs 2 --warmup_epochs 0.5 --wandb disabled --no_analysis --workers 2 --deterministic on".split()
    if args.device == "cpu":  # CI: the same path, smaller (a GPU runs the demo recipe as it is)
        common += "--arch resnet9_slim --img_size 32 --steps_per_epoch 8".split()
    with open(work / "reference.log", "w") as log:
        if _main_py([*common, "--output_dir", str(work / "ref")], log).wait(900) != 0:
            raise RuntimeError(f"the reference run failed: {work / 'reference.log'}")
    reference = next((work / "ref").iterdir())
    updates = json.loads((reference / "best_results.json").read_text())["updates"]
    cut_at = updates * 3 // 4  # the middle of epoch 2, whatever the machine's speed
    out = work / "cut"
    with open(work / "cut.log", "w") as log:
        code = _main_py([*common, "--output_dir", str(out)], log, interrupt_at=cut_at).wait(900)
    run = next(out.iterdir())
    with open(work / "resume.log", "w") as log:
        if _main_py(["--resume", str(run)], log).wait(900) != 0:
            raise RuntimeError(f"the resume failed: {work / 'resume.log'}")
    a, b = _metrics(reference), _metrics(run)
    differ = sorted({k for x, y in zip(a, b, strict=True) for k in x if x[k] != y[k]})
    n_val = len(read_dataset("tiny-imagenet", data).val)
    metrics = evaluate.run(
        ["--checkpoint", str(run / "best.pth.tar"), "--output_dir", str(work / "val"), "--device", args.device]
    )
    best = json.loads((run / "best_results.json").read_text())["val_top1"]
    # evaluate.py evaluates as the run did (precision, memory format, batch) but in this process, under
    # autotuning: cuDNN's algorithm choice may flip an argmax or two, at most two images' worth
    slack = 2 * 100.0 / n_val + 1e-6
    if differ:
        gap = max(abs(x["val_top1"] - y["val_top1"]) for x, y in zip(a, b, strict=True))
        # --deterministic on only warns for an op without a deterministic kernel: name those, or the
        # difference reads as a resume bug when it is a kernel's
        logs = "".join((work / f"{n}.log").read_text() for n in ("reference", "cut", "resume"))
        kernels = sorted({line.strip()[:100] for line in logs.splitlines() if "deterministic implementation" in line})
        exact = f"NOT identical to an uninterrupted run ({', '.join(differ)} differ; val top-1 by {gap * n_val / 100:.0f} images)"
        exact += (
            f"; ops without a deterministic kernel: {'; '.join(kernels)}"
            if kernels
            else "; no op warned of a nondeterministic kernel"
        )
    else:
        exact = "identical to an uninterrupted run (train loss, val loss, val top-1 of both epochs)"
    ok = code == 130 and len(b) == 2 and not differ and abs(metrics["val_top1"] - best) <= slack
    row(
        "1. demo run (--deterministic on), SIGINT in epoch 2, resume; evaluate.py",
        f"stopped with {code} at update {cut_at} of {updates}, resumed: {exact}; "
        f"evaluate.py top-1 {metrics['val_top1']:.2f} % vs the run's {best:.2f} % ({n_val} images)",
        ok,
        time.perf_counter() - started,
    )


def _metrics(run: Path) -> list[dict]:
    import csv

    keep = ("epoch", "train_loss", "val_loss", "val_top1")
    with open(run / "metrics.csv") as fh:
        return [{k: float(v) for k, v in x.items() if k in keep} for x in csv.DictReader(fh)]


# --------------------------------------------------------------------------- 2. syncs and trainer overhead
@check("2a. host syncs per update")
def check_syncs(args, work: Path, data: Path, started: float) -> None:

    if args.device != "cuda":
        row(
            "2a. host syncs per update",
            "CUDA only (the CPU test suite records host traffic: tests/test_gpu_ready.py)",
            None,
        )
        return
    # 128 updates an epoch: the few syncs every epoch ends with (the meters' read-out) weigh
    # 0.02 per update, one sync per update would weigh 1
    synthetic = synthetic_npy(work / "synthetic", images=64 * 128)
    flags = ["--dataset", "npy", "--data_dir", str(synthetic), "--arch", "resnet9_slim", "--batch_size", "64"]
    cfg = parse_config([*flags, "--device", args.device, "--workers", "2", "--wandb", "disabled"])
    cfg, p, *_ = build_parts(cfg, distributed.Context())
    plan = measure.plan_run(cfg, p, 0.0)
    scheduler = build_scheduler(cfg, p.optimizer, plan)

    def epoch(e: int, state: TrainState) -> None:
        train_one_epoch(p, scheduler, state, epoch=e, end_batch=plan.end_batch(e), strength=1.0, size=cfg.img_size)

    epoch(0, TrainState())  # warm-up (cuDNN's autotuning, the first batches)
    state = TrainState(epoch=1)  # a fresh epoch from its first batch (one state for both ran zero updates)
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            epoch(1, state)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    updates = state.step  # counted, not planned
    syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
    where = sorted({str(w.message).split("\n")[0][:60] for w in syncs})[:3]
    per = len(syncs) / max(updates, 1)
    row(
        "2a. host syncs per update (resnet9_slim, defaults, one fresh epoch; target <= 0.1)",
        f"{len(syncs)} in {updates} updates = {per:.3f} per update{'; e.g. ' + '; '.join(where) if where else ''}",
        updates >= 100 and per <= 0.1,
        time.perf_counter() - started,
    )


@check("2b. trainer / bare loop")
def check_trainer_overhead(args, work: Path, data: Path, started: float) -> None:
    if args.device != "cuda" and not args.cpu_overhead:
        row("2b. trainer / bare loop, batch 256", "GPU figure (on a CPU: python -m bench.step, README: Speed)", None)
        return

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
        if not r.get("data_on_device"):
            # the host's time blocked in the loader's next(): on a GPU that includes waiting for the
            # launch queue to drain (the host runs ahead until it is full), so it is no data wait
            what += f", host blocked fetching batches {100 * r['data_wait_median']:.1f} %"
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
    # each mode in a fresh process: CUBLAS_WORKSPACE_CONFIG counts only if set before cuBLAS starts,
    # which in this process it did long ago (checks 1-2b)
    ips = {mode: _probe_in_process(mode) for mode in ("on", "auto")}
    det, auto = max(ips["on"]), max(ips["auto"])
    row(
        "2c. cost of --deterministic on (resnet18_cifar, batch 256, bf16, a fresh process each)",
        f"{det:,.0f} img/s deterministic vs {auto:,.0f} with cuDNN autotuning (the default): {det / auto:.2f}x",
        True,
        time.perf_counter() - started,
    )


def _probe_in_process(mode: str) -> list[float]:
    proc = subprocess.run(
        [sys.executable, "-m", "bench.gpu_check", "--probe_deterministic", mode],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if proc.returncode:
        raise RuntimeError(f"--deterministic {mode} probe failed: {proc.stderr.strip()[-300:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def probe_determinism(mode: str) -> list[float]:
    """img/s of resnet18_cifar training steps under --deterministic `mode`, in two timed windows,
    configured before anything touches cuBLAS (this is a fresh process)."""
    device = torch.device("cuda")
    hardware.configure(device, deterministic=mode)
    torch.manual_seed(0)
    model = arch.build_model("resnet18_cifar", 200, img_size=64).to(device).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x = torch.randn(256, 3, 64, 64, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 200, (256,), device=device)
    ips = []
    for window in range(3):  # the first is the warm-up (autotuning, allocator)
        _sync(device)
        start = time.perf_counter()
        for _ in range(20):
            with hardware.autocast(device, torch.bfloat16):
                loss = F.cross_entropy(model(x).float(), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        _sync(device)
        if window:
            ips.append(20 * 256 / (time.perf_counter() - start))
    return ips


# --------------------------------------------------------------------------- 3. BatchAugment CPU vs GPU
@check("3. BatchAugment CPU vs GPU")
def check_augment(args, work: Path, data: Path, started: float) -> None:
    n = 256 if args.device == "cuda" else 64  # a CI-sized batch on a CPU
    x = torch.randint(0, 256, (n, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    recipe = transforms.build_recipe(randaugment=True)
    devices = ["cpu"] + (["cuda"] if args.device == "cuda" else [])
    # with TF32 as training has it (hardware.configure: matmul precision "high", cuDNN TF32 on): what
    # the model is fed, rounding of affine_grid's product and RandAugment's sharpness blur included
    timings, outputs = _time_augment(x, recipe, devices, reps=transforms.CHUNK_BATCHES if args.device == "cuda" else 2)
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
        "3. BatchAugment CPU vs GPU, same seed (256 images, with RandAugment, TF32 as in training)",
        f"mean |difference| {float(diff.mean()):.3f} grey levels, {100 * close:.2f} % of values off by > 2; "
        f"{timings['cpu']:.1f} ms (CPU) vs {timings['cuda']:.2f} ms (GPU) per batch",
        ok,
        time.perf_counter() - started,
    )


def _time_augment(x: torch.Tensor, recipe: dict, devices: list[str], reps: int) -> tuple[dict, dict]:
    """ms per batch (a fresh chunk's batches 0..reps-1: its drawing included, shared as in training)
    and the output of BatchAugment on each device for the same batch, from the same seed."""
    timings, outputs = {}, {}
    for dev in devices:
        aug = transforms.BatchAugment(seed=3, recipe=recipe)
        aug.set_epoch(0, 1.0, 56)
        xd = x.to(dev)
        for b in range(3):  # warm-up, in another epoch
            aug(xd, b)
        aug.set_epoch(1, 1.0, 56)
        _sync(dev)
        start = time.perf_counter()
        for b in range(reps):
            out = aug(xd, b)
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
    (work / "store").unlink(missing_ok=True)  # an earlier, stopped attempt's (--continue): init needs a fresh one
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

    if (folder / "y_val.npy").is_file() and len(np.load(folder / "y_train.npy", mmap_mode="r")) >= images:
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
    import numpy
    import timm

    parts = [f"torch {torch.__version__}", f"timm {timm.__version__}", f"numpy {numpy.__version__}"]
    parts.append(f"python {platform.python_version()}")
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        parts += [f"CUDA {torch.version.cuda}", f"cuDNN {torch.backends.cudnn.version()}", f"sm_{major}{minor}"]
    return ", ".join(parts)


# in this order: the compile checks last (cold, they take minutes; a stopped run keeps the rest)
CHECKS = {
    "1": check_training,
    "2a": check_syncs,
    "2b": check_trainer_overhead,
    "2c": check_determinism_cost,
    "3": check_augment,
    "4a": check_precisions,
    "4b": check_compile,
    "5": check_ddp,
}


def out_dir(value: str) -> Path:
    """--out DIR (gpu_check.md and gpu_check.json in it); a path ending in .json names the JSON's
    folder, as the flag did before."""
    path = Path(value)
    return path.parent if path.suffix == ".json" else path


def kept_rows(path: Path) -> set[str]:
    """--continue: the finished rows of an earlier run of this report into ROWS; their check keys."""
    try:
        report = json.loads(path.read_text())
        rows, status = report["rows"], report.get("status", "")
    except (OSError, ValueError, KeyError):
        return set()
    ROWS.extend(r for r in rows if r.get("key") in CHECKS)
    REPORT["attempts"] = dict(report.get("attempts", {}))
    died = next((k for k, c in CHECKS.items() if status == f"running {c.title}"), None)
    # the process ended inside a check without a word (SIGKILL at a call's end, or a crash): once
    # more, then a FAIL row, so that a check that crashes cannot keep the ones after it from running
    if died is not None and died not in {r["key"] for r in ROWS} and REPORT["attempts"].get(died, 0) >= 2:
        REPORT["key"] = died
        ROWS.append(
            {
                "key": died,
                "check": CHECKS[died].title,
                "result": "the process ended inside this check twice (a crash, or a call's end): see gpu_check.log",
                "ok": False,
                "seconds": 0.0,
            }
        )
    return {r["key"] for r in ROWS}


def _stop(signum, frame) -> None:
    raise Stopped(signum)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("WANDB_MODE", "disabled")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--only", default="", help=f"run these checks only, comma-separated ({', '.join(CHECKS)})")
    p.add_argument("--steps", type=int, default=30, help="updates per timed repetition in check 2b")
    p.add_argument("--cpu_overhead", action="store_true", help="run check 2b on a CPU too (minutes)")
    p.add_argument("--cpu_compile", action="store_true", help="run the compile checks on a CPU too (minutes)")
    p.add_argument("--work_dir", default=None, help="where runs and data go (default: a temporary folder)")
    p.add_argument("--out", default="bench/results", help="the folder for gpu_check.md and gpu_check.json")
    p.add_argument(
        "--continue",
        dest="carry_on",
        action="store_true",
        help="keep the rows OUT/gpu_check.json holds and run only the checks it lacks (a stopped check again)",
    )
    p.add_argument("--probe_deterministic", default=None, help=argparse.SUPPRESS)  # check 2c's own process
    args = p.parse_args(argv)
    if args.probe_deterministic:
        print(json.dumps(probe_determinism(args.probe_deterministic)))
        return 0
    chosen = [c.strip() for c in args.only.split(",") if c.strip()] or list(CHECKS)
    unknown = [c for c in chosen if c not in CHECKS]
    if unknown:
        p.error(f"--only {args.only}: no check {', '.join(unknown)}; the checks are {', '.join(CHECKS)}")
    device = hardware.resolve_device(args.device)
    args.device = device.type
    hardware.configure(device, deterministic="auto")
    REPORT["out"] = out_dir(args.out)
    REPORT["out"].mkdir(parents=True, exist_ok=True)
    name = hardware.device_name(device)
    REPORT["header"] = f"{name} — {versions(device)} — {time.strftime('%Y-%m-%d')}"
    REPORT["facts"] = {"device": name, "versions": versions(device)}
    print(
        f"gpu_check on {name} ({versions(device)}); default precision here: {hardware.decide_runtime(device).reason}",
        file=sys.stderr,
    )
    signal.signal(signal.SIGTERM, _stop)
    if args.carry_on:
        done = kept_rows(REPORT["out"] / "gpu_check.json")
        chosen = [key for key in chosen if key not in done]
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    code = run_checks(args, work, chosen)
    print(table())
    print(f"written: {REPORT['out'] / 'gpu_check.md'}, {REPORT['out'] / 'gpu_check.json'}")
    return code


def run_checks(args, work: Path, chosen: list[str]) -> int:
    """Every chosen check in order, the report rewritten after each; SIGTERM ends the sequence
    where it is, stops check 1's runs, and says so in the report."""
    current = "the demo dataset"
    try:
        write_report()
        data = demo_data.ensure_demo_dataset(work / "demo-digits")
        for key in chosen:
            current, REPORT["key"] = CHECKS[key].title, key
            REPORT["status"] = f"running {current}"
            REPORT["attempts"][key] = REPORT["attempts"].get(key, 0) + 1
            write_report()
            CHECKS[key](args, work, data)
    except Stopped:
        for proc in CHILDREN:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)  # its loader workers notice and follow within seconds
        REPORT["status"] = f"stopped by SIGTERM during {current}: the rows above are complete, the rest did not run"
        write_report()
        print(REPORT["status"], file=sys.stderr)
        return 128 + signal.SIGTERM
    total = time.perf_counter() - REPORT["started"]
    REPORT["status"] = f"finished: {len(ROWS)} checks in {total:.0f} s"
    write_report()
    return 1 if any(r["ok"] is False for r in ROWS) else 0


if __name__ == "__main__":
    sys.exit(main())
