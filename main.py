"""Train a classifier on Tiny-ImageNet-200: read the configuration, build the run, fit it.

    python main.py --arch resnet18 --batch_size 128 --lr_base 1e-3 --epochs 100
    python main.py --config configs/demo.yaml --epochs 3
    python main.py --resume checkpoints/RUN          # continue an interrupted run exactly

Writes checkpoints/<YYYY-MM-DD_HH-MM-SS>_<arch>/ with config.yaml, log.txt, metrics.csv,
last.pth.tar, best.pth.tar, best_results.json and best_test_preds.csv (see README).

    main() -> tin.run.build.build (the run, complete) -> tin.run.loop.fit (the epochs)
           -> train.train_one_epoch (the updates) -> optimizer step
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import arch
from tin import checkpoint
from tin.config import schema
from tin.config.cli import parse_config
from tin.plan import budget
from tin.run.build import build
from tin.run.folder import setup_logging
from tin.run.loop import fit
from tin.runtime import distributed
from utils import UserError

log = logging.getLogger("tin")


def main(argv: list[str] | None = None) -> Path | None:
    """Parse argv, train (or resume), and return the run folder (None for --list_archs)."""
    started = budget.clock()
    setup_logging()
    cfg = parse_config(argv)
    if cfg.list_archs:
        arch.print_catalogue(cfg.img_size, cfg.format)
        return None
    ckpt, run_dir = None, None
    if cfg.resume:  # before the process group: the resumed run's --device decides NCCL or gloo
        path = checkpoint.find_checkpoint(cfg.resume)
        ckpt, run_dir = checkpoint.load_checkpoint(path), path.parent
        cfg = parse_config(argv, base=ckpt["config"])
        schema.check_compatible(ckpt["config"], cfg.to_dict(), path)
    ctx = distributed.init(cfg.device)
    try:
        if not ctx.is_main:
            setup_logging(level=logging.WARNING)  # one process speaks; the others only warn
        elif run_dir is not None:
            setup_logging(run_dir)  # a resumed run's lines go on in its log.txt
        run = build(cfg, ctx, ckpt, started, run_dir, argv)
        try:
            fit(run)
        finally:
            run.close()
        return run.run_dir
    finally:
        distributed.shutdown()


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
