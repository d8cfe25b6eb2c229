"""Run several experiments and tabulate them (seed 000's "parallel execution").

    python sweep.py configs/seed000_*.yaml [--parallel 2] [--set epochs=5 --set data_dir=...]

Each config (with the --set overrides applied) runs as its own `python main.py --config ...` process,
logging to SWEEP/<name>.log, its run folder under SWEEP/<name>/. A failing run does not stop the
others. At the end SWEEP/summary.csv and SWEEP/summary.md hold one row per config: arch, params,
epochs, best val top-1/top-5, wall time and status. Exit status 1 if any run failed.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import queue
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

import yaml

from tin import hardware
from tin.config import config_from, load_yaml_defaults
from utils import UserError

COLUMNS = [
    "name",
    "status",
    "arch",
    "params",
    "epochs_run",
    "best_epoch",
    "val_top1",
    "val_top5",
    "wall_time_seconds",
    "run_dir",
]


def parse_sets(pairs: list[str]) -> dict:
    values = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise UserError(f"--set {pair!r}: expected key=value, e.g. --set epochs=5")
        values[key.strip()] = yaml.safe_load(raw)
    return values


def prepare(configs: list[str], sets: dict, sweep_dir: Path) -> list[tuple[str, Path]]:
    """One merged YAML per config, each validated whole before any run starts: an error names the
    preset, the --set values and where each bad value came from."""
    jobs, names = [], set()
    for path in configs:
        preset = load_yaml_defaults(path)
        merged = {**preset, **sets}
        origins = {**dict.fromkeys(preset, path), **dict.fromkeys(sets, "--set")}
        try:
            config_from({k: v for k, v in merged.items() if k != "output_dir"}, origins)
        except UserError as exc:
            overrides = " ".join(f"--set {k}={v}" for k, v in sets.items())
            raise UserError(
                f"{path}{' with ' + overrides if overrides else ''}: {exc}; change such a value in every preset "
                "with --set KEY=VALUE"
            ) from None
        name = Path(path).stem
        while name in names:
            name += "_"
        names.add(name)
        merged["output_dir"] = str(sweep_dir / name)
        cfg_path = sweep_dir / f"{name}.yaml"
        cfg_path.write_text(yaml.safe_dump(merged, sort_keys=False))
        load_yaml_defaults(str(cfg_path))
        jobs.append((name, cfg_path))
    return jobs


def gpu_slots(parallel: int, gpus: str | None = None) -> list[str]:
    """One GPU id per parallel run slot, round-robin over the GPUs (--gpus, else CUDA_VISIBLE_DEVICES,
    else every visible one); empty without GPUs."""
    if gpus is None:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible is not None:
            gpus = visible
        else:
            import torch

            gpus = ",".join(str(i) for i in range(torch.cuda.device_count()))
    ids = [g.strip() for g in gpus.split(",") if g.strip() and g.strip() != "-1"]
    return [ids[k % len(ids)] for k in range(max(1, parallel))] if ids else []


def run_one(name: str, cfg_path: Path, sweep_dir: Path, threads: int, gpus: queue.Queue | None = None) -> dict:
    """One config as its own main.py process; with GPUs it takes a GPU slot (CUDA_VISIBLE_DEVICES)
    for its duration, so parallel runs spread over the GPUs instead of all landing on cuda:0."""
    gpu = gpus.get() if gpus is not None else None
    start = time.monotonic()
    print(f"{time.strftime('%H:%M:%S')} {name}: started{f' on GPU {gpu}' if gpu is not None else ''}", flush=True)
    try:
        row = _run(name, cfg_path, sweep_dir, threads, gpu)
    finally:
        if gpu is not None:
            gpus.put(gpu)
    top1 = f"val top-1 {row['val_top1']:.2f} %, " if isinstance(row.get("val_top1"), float) else ""
    with _PROGRESS["lock"]:
        _PROGRESS["done"] += 1
        done, total = _PROGRESS["done"], _PROGRESS["total"]
    print(
        f"{time.strftime('%H:%M:%S')} {name}: {row['status']}, {top1}{time.monotonic() - start:.0f} s ({done}/{total} done)"
    )
    return row


_PROGRESS = {"lock": threading.Lock(), "done": 0, "total": 0}


def _run(name: str, cfg_path: Path, sweep_dir: Path, threads: int, gpu: str | None) -> dict:
    # Runs side by side share the cores: more threads than cores makes every run slower.
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(threads))}
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    with open(sweep_dir / f"{name}.log", "w") as log:
        code = subprocess.call(
            [sys.executable, str(Path(__file__).with_name("main.py")), "--config", str(cfg_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
    row = {"name": name, "status": "ok" if code == 0 else f"failed (exit {code}, see {name}.log)"}
    runs = sorted((sweep_dir / name).glob("*/best_results.json"))
    if runs:
        results = json.loads(runs[-1].read_text())
        row.update({k: results.get(k) for k in COLUMNS if k in results})
        row["run_dir"] = str(runs[-1].parent)
    return row


def write_summary(rows: list[dict], sweep_dir: Path) -> None:
    rows = sorted(rows, key=lambda r: -(r.get("val_top1") or -1))
    with open(sweep_dir / "summary.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)

    def cell(value) -> str:
        return f"{value:.2f}" if isinstance(value, float) else ("" if value is None else str(value))

    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in COLUMNS) + " |" for r in rows]
    (sweep_dir / "summary.md").write_text("\n".join(lines) + "\n")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Run several main.py configs and tabulate the results.")
    p.add_argument("configs", nargs="+", help="YAML presets (see configs/)")
    p.add_argument("--parallel", type=int, default=1, help="runs at the same time")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a key in every config")
    p.add_argument("--sweep_dir", default=None, help="default: checkpoints/sweep_<timestamp>")
    p.add_argument("--gpus", default=None, help="GPU ids to spread runs over, e.g. 0,1 (default: all visible)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    sweep_dir = Path(args.sweep_dir or f"checkpoints/sweep_{datetime.now():%Y-%m-%d_%H-%M-%S}")
    try:
        sweep_dir.mkdir(parents=True, exist_ok=True)
        jobs = prepare(args.configs, parse_sets(args.set), sweep_dir)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    slots = gpu_slots(args.parallel, args.gpus)
    gpus: queue.Queue | None = None
    if slots:
        gpus = queue.Queue()
        for gpu in slots:
            gpus.put(gpu)
        print(f"runs take GPUs {', '.join(slots)} in turn (CUDA_VISIBLE_DEVICES per run)")
    _PROGRESS.update(done=0, total=len(jobs))
    with ThreadPoolExecutor(max_workers=max(1, args.parallel)) as pool:
        threads = max(1, hardware.usable_cpus() // max(1, args.parallel))  # affinity and CPU quota
        rows = list(pool.map(lambda job: run_one(*job, sweep_dir, threads, gpus), jobs))
    write_summary(rows, sweep_dir)
    print((sweep_dir / "summary.md").read_text())
    print(f"summary: {sweep_dir / 'summary.csv'}")
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
