"""Numeric format and compilation: training images/s of the main archs under fp32, bf16 (and, on a
GPU, fp16) autocast, channels_last and torch.compile, on the device at hand, and how main.py's
automatic choice (--amp auto, --channels_last auto: hardware.decide_runtime) compares with the best.

    python -m bench.precision [--archs resnet18,resnet9_slim,budget_cnn,vit_tiny] [--batch_size 64]
                              [--img_size 64] [--variants fp32,bf16,fp32_cl,bf16_cl,bf16_cl_compile]

Each (arch, variant) trains on one resident random batch (forward, backward, SGD step):
`--warmup` untimed updates (>= 5: the first bf16 steps on a CPU are erratic; compilation happens
here too and is reported separately), then `--steps` timed updates, `--reps` times; the table
gives the median images/s and the speed-up over fp32, and a last column: the variant main.py
picks here by default and its images/s as a fraction of the fastest of {fp32, bf16, fp16} x
{channels_last on, off} (the target: >= 0.9). cuDNN is set as main.py sets it (--deterministic
auto: autotuning on a GPU). This is the evidence behind main.py's defaults (README:
Speed). Prints a Markdown table and writes JSON (default bench/results/precision.json).
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
import torch.nn.functional as F

if __package__ in (None, ""):  # run as a file (python bench/X.py): the repository root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import arch  # noqa: E402
from tin.runtime import hardware  # noqa: E402
from tin.runtime.hardware import resolve_device  # noqa: E402
from utils import write_json  # noqa: E402

VARIANTS = {  # name -> (autocast dtype, channels_last, compile)
    "fp32": (None, False, False),
    "bf16": (torch.bfloat16, False, False),
    "fp32_cl": (None, True, False),
    "bf16_cl": (torch.bfloat16, True, False),
    "bf16_cl_compile": (torch.bfloat16, True, True),
    "fp16": (torch.float16, False, False),  # CUDA only (with a gradient scaler)
    "fp16_cl": (torch.float16, True, False),
}
PLAIN = ("fp32", "bf16", "fp16", "fp32_cl", "bf16_cl", "fp16_cl")  # the cells the default is compared with


def default_variant(device: torch.device) -> str:
    """The variant main.py runs with no precision flag on this device."""
    rt = hardware.decide_runtime(device)
    return rt.precision + ("_cl" if rt.channels_last else "")


def measure(name: str, variant: str, args, device: torch.device) -> dict:
    dtype, channels_last, compiled = VARIANTS[variant]
    torch.manual_seed(0)
    model = arch.build_model(name, 200, args.img_size).to(device).train()
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device)
    y = torch.randint(0, 200, (args.batch_size,), device=device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    net = torch.compile(model) if compiled else model
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    def step() -> None:
        with hardware.autocast(device, dtype):
            loss = F.cross_entropy(net(x).float(), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)

    start = time.perf_counter()
    for _ in range(args.warmup):
        step()
    _sync(device)
    warmup_s = time.perf_counter() - start
    ips = []
    for _ in range(args.reps):
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        _sync(device)
        ips.append(args.steps * args.batch_size / (time.perf_counter() - start))
    return {"arch": name, "variant": variant, "ips": statistics.median(ips), "ips_all": ips, "warmup_s": warmup_s}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> list[dict]:
    logging.basicConfig(level=logging.WARNING)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--archs", default="resnet18,resnet9_slim,budget_cnn,vit_tiny")
    p.add_argument(
        "--variants",
        default=None,
        help=f"any of {', '.join(VARIANTS)} (default: fp32,bf16,fp32_cl,bf16_cl,bf16_cl_compile; on a GPU "
        "also fp16,fp16_cl)",
    )
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--img_size", type=int, default=64)
    p.add_argument("--steps", type=int, default=0, help="timed updates per repetition (default: 8 on CPU, 50 on GPU)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=6)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument(
        "--deterministic",
        default="auto",
        choices=("auto", "on", "off"),
        help="GPU numerics as main.py's --deterministic (auto: cuDNN autotuning on a GPU)",
    )
    p.add_argument("--out", default="bench/results/precision.json")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    hardware.configure(device, deterministic=args.deterministic)
    args.steps = args.steps or (50 if device.type == "cuda" else 8)
    cuda_only = ("fp16", "fp16_cl")
    default_list = [v for v in VARIANTS if device.type == "cuda" or v not in cuda_only]
    variants = [v.strip() for v in args.variants.split(",") if v.strip()] if args.variants else default_list
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown --variants {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    if device.type != "cuda" and set(variants) & set(cuda_only):
        p.error("fp16 variants need a CUDA GPU (on a CPU, autocast is bf16)")
    archs = [a.strip() for a in args.archs.split(",") if a.strip()]
    for a in archs:
        arch.resolve(a)  # unknown names fail before anything runs

    default = default_variant(device)
    rows = []
    for name in archs:
        for variant in variants + ([default] if default not in variants else []):
            rows.append(measure(name, variant, args, device))
            print(f"  {name:<14} {variant:<16} {rows[-1]['ips']:8.0f} img/s", file=sys.stderr, flush=True)

    where = hardware.device_name(device)
    bf16 = hardware.cuda_bf16(device) if device.type == "cuda" else hardware.cpu_bf16()[0]
    print(
        f"\ntraining img/s, batch {args.batch_size}, {args.img_size}x{args.img_size}, {device} ({where}, "
        f"{'native' if bf16 else 'no native'} bf16, {torch.get_num_threads()} threads), median of {args.reps} x "
        f"{args.steps} updates; default = main.py's choice here ({hardware.decide_runtime(device).reason})\n"
    )
    print("| arch | " + " | ".join(variants) + " | default (÷ best plain cell) |")
    print("|---|" + "---|" * (len(variants) + 1))
    ratios = {}
    for name in archs:
        mine = {r["variant"]: r for r in rows if r["arch"] == name}
        fp32 = mine.get("fp32", {}).get("ips")
        cells = [
            f"{mine[v]['ips']:,.0f}" + (f" ({mine[v]['ips'] / fp32:.2f}x)" if fp32 and v != "fp32" else "")
            for v in variants
        ]
        best = max(mine[v]["ips"] for v in mine if v in PLAIN)
        ratios[name] = mine[default]["ips"] / best
        cells.append(f"{default} {mine[default]['ips']:,.0f} ({ratios[name]:.2f})")
        print(f"| {name} | " + " | ".join(cells) + " |")
    compiled = [r for r in rows if VARIANTS[r["variant"]][2]]
    for r in compiled:
        print(f"\n{r['arch']}: torch.compile warm-up (compilation included) took {r['warmup_s']:.0f} s", end="")
    machine = f"{platform.machine()}, {os.cpu_count()} cores"
    summary = {
        "args": vars(args),
        "device": str(device),
        "device_name": where,
        "machine": machine,
        "native_bf16": bf16,
        "default": {"variant": default, "ratio_to_best": ratios},
        "rows": rows,
    }
    out = write_json(summary, args.out)
    print(f"\n\nwritten: {out}")
    return rows


if __name__ == "__main__":
    main()
