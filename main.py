"""Train a classifier on Tiny-ImageNet-200: the CLI entry. It reads argv, sets up data, model, run
folder and metric sinks, and hands them to engine.fit (the epoch loop).

    python main.py --arch resnet18 --batch_size 128 --lr_base 1e-3 --epochs 100
    python main.py --config configs/demo.yaml --epochs 3
    python main.py --resume checkpoints/RUN          # continue an interrupted run exactly

Writes checkpoints/<YYYY-MM-DD_HH-MM-SS>_<arch>/ with config.yaml, log.txt, metrics.csv,
last.pth.tar, best.pth.tar, best_results.json and best_test_preds.csv (see README).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import yaml

import arch
import batch_manager
import distributed
import engine
import run_state
from config import Config, parse_config
from run_state import StopRequest, TrainState
from utils import (
    CsvSink,
    UserError,
    WandbSink,
    load_checkpoint,
    make_run_dir,
    resolve_device,
    seed_everything,
    setup_logging,
)

log = logging.getLogger("tin")


def main(argv: list[str] | None = None) -> Path | None:
    """Parse argv, train (or resume), and return the run folder (None for --list_archs)."""
    setup_logging()
    cfg = parse_config(argv)
    if cfg.list_archs:
        print_catalogue(cfg.img_size, cfg.format)
        return None
    ctx = distributed.init(cfg.device)
    try:
        return _main(cfg, ctx, argv)
    finally:
        distributed.shutdown()


def _main(cfg: Config, ctx: distributed.Context, argv) -> Path:
    ckpt, run_dir = None, None
    if not ctx.is_main:
        setup_logging(level=logging.WARNING)  # one process speaks; the others only warn
    if cfg.resume:
        path = run_state.find_checkpoint(cfg.resume)
        ckpt, run_dir = load_checkpoint(path), path.parent
        cfg = parse_config(argv, base=ckpt["config"])
        run_state.check_compatible(ckpt["config"], cfg.to_dict(), path)
    seed_everything(cfg.seed)
    device = distributed.device_for(ctx, resolve_device(cfg.device))
    data = _prepare_data_once(cfg, ctx)
    if ckpt is not None and list(ckpt["classes"]) != data.classes:
        raise UserError(f"--resume {cfg.resume}: the run was trained on other classes than those in {data.root}")
    loaders = batch_manager.build_loaders(data, cfg.img_size, cfg.batch_size, cfg.workers, cfg.seed,
                                          pin_memory=device.type == "cuda", rank=ctx.rank, world=ctx.world,
                                          aug_backend=cfg.aug_backend)  # fmt: skip
    model = arch.build_model(cfg.arch, len(data.classes), cfg.img_size, cfg.drop_rate, cfg.attn_drop_rate,
                             cfg.drop_path_rate, cfg.pretrained and ckpt is None,
                             (cfg.pretrained_path or None) if ckpt is None else None).to(device)  # fmt: skip
    params, gflops = arch.model_stats(model, cfg.img_size)
    if cfg.max_params and params > cfg.max_params:
        raise UserError(f"--arch {cfg.arch} has {params:,} parameters, over --max_params {cfg.max_params:,}")
    if ctx.enabled:  # same initial weights everywhere (DDP broadcasts them); own dropout/mixing draws per process
        seed_everything(cfg.seed + ctx.rank)
    run_dir = distributed.broadcast(_open_run_dir(cfg, model, run_dir) if ctx.is_main else None)
    parts = engine.build_parts(cfg, model, loaders, device, ctx)
    parts.params, parts.gflops = params, gflops
    log.info("%s: %s parameters, %.3f GFLOPs per %dx%d image", cfg.arch, f"{params:,}", gflops, cfg.img_size,
             cfg.img_size)  # fmt: skip
    state = run_state.restore(parts, ckpt) if ckpt is not None else TrainState()
    columns = engine.METRIC_COLUMNS + (engine.EMA_COLUMNS if cfg.ema else [])
    sinks: list = [CsvSink(run_dir / "metrics.csv", columns, rows=state.history)] if ctx.is_main else []
    stop = StopRequest()
    try:
        if cfg.wandb != "disabled" and ctx.is_main:
            sinks.append(WandbSink(run_dir, cfg.wandb, cfg.wandb_project, cfg.to_dict(), run_id=state.wandb_id))
            state.wandb_id = sinks[-1].run.id
        if ckpt is not None:
            rngs = ckpt.get("rng_all") or [ckpt["rng"]]
            run_state.set_rng_state(
                rngs[ctx.rank] if len(rngs) == ctx.world else ckpt["rng"]
            )  # last: nothing may draw after
            log.info("resumed %s at epoch %d, batch %d (update %d)", run_dir, state.epoch + 1, state.batch, state.step)
        engine.fit(cfg, parts, state, run_dir, sinks, stop)
    finally:
        stop.restore()
        for sink in sinks:
            sink.close()
    return run_dir


def _prepare_data_once(cfg: Config, ctx: distributed.Context):
    """The main process decodes/caches first; the others then find the cache ready."""
    if not ctx.is_main:
        distributed.barrier()
    data = batch_manager.prepare_data(**cfg.data_kwargs())
    if ctx.is_main:
        distributed.barrier()
    return data


def _open_run_dir(cfg: Config, model, run_dir: Path | None) -> Path:
    """A new run folder (or the resumed one), created only once data and model are known good."""
    new_run = run_dir is None
    run_dir = run_dir or make_run_dir(cfg.output_dir, cfg.arch)
    try:
        run_state.check_disk(run_dir, model, extra_copies=cfg.keep_last + (1 if cfg.ema else 0))
    except UserError:
        if new_run:
            run_dir.rmdir()
        raise
    setup_logging(run_dir)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return run_dir


def print_catalogue(img_size: int, fmt: str) -> None:
    rows = arch.catalogue(img_size)
    if fmt == "csv":
        print("name,family,params,gflops,drop_path")
        for r in rows:
            print(f"{r['name']},{r['family']},{r['params']},{r['gflops']},{str(r['drop_path']).lower()}")
        return
    print(f"{'name':<18}{'family':<14}{'params':>14}{f'GFLOPs@{img_size}':>14}  drop-path")
    for r in rows:
        print(
            f"{r['name']:<18}{r['family']:<14}{r['params']:>14,}{r['gflops']:>14.3f}  {'yes' if r['drop_path'] else 'no'}"
        )
    print("any other timm model: --arch timm:NAME   (GFLOPs: torch's flop counter, a multiply-add = 2 FLOPs)")


def cli() -> None:
    """`python main.py`: bad input and a diverged run end with one line, not a traceback."""
    try:
        main()
    except BrokenPipeError:  # `python main.py --list_archs | head`: the reader left, nothing is wrong
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (UserError, FloatingPointError) as exc:
        # A DataLoader worker re-raises with the worker's traceback in the message: keep its last line.
        lines = [ln for ln in str(exc).splitlines() if ln.strip()]
        sys.exit(f"error: {lines[-1].split('Error: ', 1)[-1] if len(lines) > 1 else exc}")


if __name__ == "__main__":
    cli()
