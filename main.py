"""Train a classifier on Tiny-ImageNet-200: the CLI entry. It reads argv, sets up data, model, run
folder and metric sinks, and hands them to engine.fit (the epoch loop).

    python main.py --arch resnet18 --batch_size 128 --lr_base 1e-3 --epochs 100
    python main.py --config configs/demo.yaml --epochs 3
    python main.py --resume checkpoints/RUN          # continue an interrupted run exactly

Writes checkpoints/<YYYY-MM-DD_HH-MM-SS>_<arch>/ with config.yaml, log.txt, metrics.csv,
last.pth.tar, best.pth.tar, best_results.json and best_test_preds.csv (see README).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

import arch
import batch_manager
import engine
from tin import checkpoint, distributed, hardware, optim, time_budget
from tin.checkpoint import StopRequest, TrainState, load_checkpoint
from tin.config import RESOLVED_KEY, Config, parse_config
from tin.outputs import CsvSink, WandbSink, make_run_dir, resolve_wandb_mode, setup_logging
from train import Parts
from utils import UserError, seed_everything

log = logging.getLogger("tin")


def main(argv: list[str] | None = None) -> Path | None:
    """Parse argv, train (or resume), and return the run folder (None for --list_archs)."""
    started = time_budget.clock()
    setup_logging()
    cfg = parse_config(argv)
    if cfg.list_archs:
        arch.print_catalogue(cfg.img_size, cfg.format)
        return None
    ckpt, run_dir = None, None
    if cfg.resume:  # before the process group: the resumed run's --device decides NCCL or gloo
        path = checkpoint.find_checkpoint(cfg.resume)
        ckpt, run_dir = load_checkpoint(path), path.parent
        cfg = parse_config(argv, base=ckpt["config"])
        checkpoint.check_compatible(ckpt["config"], cfg.to_dict(), path)
    ctx = distributed.init(cfg.device)
    try:
        return _main(cfg, ctx, ckpt, run_dir, started)
    finally:
        distributed.shutdown()


@dataclass
class Built:
    """What build() makes from a config: the resolved config and everything the loop needs."""

    cfg: Config
    parts: Parts
    recipe: optim.LrRecipe | None = None
    recipe_fields: list[str] = field(default_factory=list)


def build(cfg: Config, ctx: distributed.Context, ckpt: dict | None = None) -> Built:
    """Device and precision, data, loaders, model, training parts: for a new run (auto learning
    rate and warm-up resolved from the recipe table) or for `ckpt`'s (weights not yet loaded).
    bench/step.py and bench/gpu_check.py build exactly this way."""
    seed_everything(cfg.seed)
    threads = hardware.fit_threads()
    if threads:
        log.info(threads)
    runtime = hardware.decide_runtime(
        distributed.device_for(ctx, hardware.resolve_device(cfg.device)), cfg.amp, cfg.amp_dtype, cfg.channels_last
    )
    log.info("%s (%s): %s", runtime.device, runtime.device_name, runtime.reason)
    if ckpt is not None:
        hardware.warn_if_changed(ckpt.get("runtime"), runtime)
    log.info("numerics: %s", hardware.configure(runtime.device, deterministic=cfg.deterministic))
    if cfg.eval_px != cfg.img_size and arch.resolve(cfg.arch).family in ("vit", "swin"):
        raise UserError(
            f"--eval_size {cfg.eval_size}: {cfg.arch} is built for {cfg.img_size}x{cfg.img_size} inputs "
            "(a transformer's position grid); evaluate it at --img_size (--eval_size 0)"
        )
    data = _prepare_data_once(cfg, ctx)
    if ckpt is not None and list(ckpt["classes"]) != data.classes:
        raise UserError(f"--resume {cfg.resume}: the run was trained on other classes than those in {data.root}")
    cfg, recipe, recipe_fields = _resolve_recipe(cfg, ctx) if ckpt is None else (cfg, None, [])
    resident, why = hardware.decide_data_on_device(
        cfg.data_on_device, runtime.device, batch_manager.resident_bytes(data), cfg.aug_backend
    )
    log.info(why)
    loaders = batch_manager.build_loaders(
        data,
        img_size=cfg.img_size,
        batch_size=cfg.batch_size,
        workers=cfg.workers,
        seed=cfg.seed,
        pin_memory=runtime.device.type == "cuda",
        rank=ctx.rank,
        world=ctx.world,
        aug_backend=cfg.aug_backend,
        recipe=cfg.recipe(),
        on_device=runtime.device if resident else None,
        eval_size=cfg.eval_px,
    )
    fresh = ckpt is None  # pretrained weights only for a new run; a resumed one loads its own
    model = arch.build_model(
        cfg.arch,
        len(data.classes),
        img_size=cfg.img_size,
        drop_rate=cfg.drop_rate,
        attn_drop_rate=cfg.attn_drop_rate,
        drop_path_rate=cfg.drop_path_rate,
        pretrained=cfg.pretrained and fresh,
        pretrained_path=(cfg.pretrained_path or None) if fresh else None,
    ).to(runtime.device)
    params, gflops = arch.model_stats(model, cfg.img_size)
    if cfg.max_params and params > cfg.max_params:
        raise UserError(f"--arch {cfg.arch} has {params:,} parameters, over --max_params {cfg.max_params:,}")
    log.info(
        "%s: %s parameters, %.3f GFLOPs per %dx%d image", cfg.arch, f"{params:,}", gflops, cfg.img_size, cfg.img_size
    )
    if ctx.enabled:  # same initial weights everywhere (DDP broadcasts them); own dropout/mixing draws per process
        seed_everything(cfg.seed + ctx.rank)
    parts = engine.build_parts(cfg, model, loaders, runtime=runtime, ctx=ctx)
    parts.params, parts.gflops = params, gflops
    return Built(cfg, parts, recipe, recipe_fields)


def _main(cfg: Config, ctx: distributed.Context, ckpt: dict | None, run_dir: Path | None, started: float) -> Path:
    if not ctx.is_main:
        setup_logging(level=logging.WARNING)  # one process speaks; the others only warn
    elif run_dir is not None:
        setup_logging(run_dir)  # a resumed run's lines go on in its log.txt
    wandb_mode = resolve_wandb_mode(cfg.wandb) if ctx.is_main else "disabled"  # before any work: a missing install
    built = build(cfg, ctx, ckpt)
    cfg, parts = built.cfg, built.parts
    if ckpt is not None:
        plan = time_budget.Plan.from_dict(ckpt["plan"]) if "plan" in ckpt else engine.base_plan(cfg, parts.loaders)
        parts.scheduler = engine.build_scheduler(cfg, parts, plan)
        state = checkpoint.restore(parts, ckpt)
    else:
        plan = distributed.broadcast(engine.plan_run(cfg, parts, time_budget.clock() - started))  # rank 0's, everywhere
        cfg = _fit_warmup_to_plan(cfg, plan, built.recipe)
        parts.scheduler = engine.build_scheduler(cfg, parts, plan)
        state = TrainState()
    on_device = isinstance(parts.loaders.train, batch_manager.DeviceBatches)
    resolved = {"runtime": {**parts.runtime.to_dict(), "data_on_device": on_device}, "plan": plan.to_dict()}
    if built.recipe is not None:
        resolved["recipe"] = {"why": built.recipe.why, **{k: getattr(cfg, k) for k in built.recipe_fields}}
    run_dir = distributed.broadcast(_open_run_dir(cfg, parts.model, run_dir, resolved) if ctx.is_main else None)
    sinks: list = [CsvSink(run_dir / "metrics.csv", engine.METRIC_ORDER, rows=state.history)] if ctx.is_main else []
    stop = StopRequest()
    try:
        if wandb_mode != "disabled":
            sinks.append(WandbSink(run_dir, wandb_mode, cfg.wandb_project, cfg.to_dict(), run_id=state.wandb_id))
            state.wandb_id = sinks[-1].run.id
        if ckpt is not None:
            rngs = ckpt.get("rng_all") or [ckpt["rng"]]
            checkpoint.set_rng_state(
                rngs[ctx.rank] if len(rngs) == ctx.world else ckpt["rng"]
            )  # last: nothing may draw after
            log.info("resumed %s at epoch %d, batch %d (update %d)", run_dir, state.epoch + 1, state.batch, state.step)
        engine.fit(cfg, parts, state, plan=plan, run_dir=run_dir, sinks=sinks, stop=stop, started=started)
    finally:
        stop.restore()
        for sink in sinks:
            sink.close()
    return run_dir


def _resolve_recipe(cfg: Config, ctx: distributed.Context) -> tuple[Config, optim.LrRecipe | None, list[str]]:
    """--lr_base auto / --warmup_epochs auto -> numbers from the recipe table, logged, and written
    into the config (so config.yaml and the checkpoints hold the numbers the run used)."""
    if cfg.lr_base is not None and cfg.warmup_epochs is not None:
        return cfg, None, []
    spec = arch.resolve(cfg.arch)
    recipe = optim.lr_recipe(spec.family, cfg.pretrained or bool(cfg.pretrained_path), cfg.opt)
    changes = {}
    if cfg.lr_base is None:
        per = cfg.lr_scale_batch or 256  # the recipe's rate is per 256 images; the scaling rule applies it
        changes.update(lr_base=recipe.lr_per_256 * per / 256, lr_scale_batch=per)
        global_batch = cfg.batch_size * cfg.accum_steps * ctx.world
        log.info(
            "learning rate %.3g for a global batch of %d (%.3g per %d images; recipe: %s; --lr_base to set it)",
            changes["lr_base"] * global_batch / per,
            global_batch,
            changes["lr_base"],
            per,
            recipe.why,
        )
    if cfg.warmup_epochs is None:
        changes["warmup_epochs"] = min(recipe.warmup_epochs, 0.1 * cfg.epochs)
    return dataclasses.replace(cfg, **changes), recipe, list(changes)


def _fit_warmup_to_plan(cfg: Config, plan: time_budget.Plan, recipe: optim.LrRecipe | None) -> Config:
    """A warm-up from the recipe is at most a tenth of the run the time budget planned; one the user
    gave must fit inside it."""
    if not plan.budget_s:
        return cfg
    if recipe is not None and cfg.warmup_epochs > 0.1 * plan.epochs:
        cfg = dataclasses.replace(cfg, warmup_epochs=round(min(recipe.warmup_epochs, 0.1 * plan.epochs), 4))
    if cfg.warmup_epochs >= plan.epochs:
        raise UserError(
            f"--warmup_epochs {cfg.warmup_epochs:g} is as long as the {plan.epochs:.2f} epochs that fit "
            f"--time_budget {cfg.time_budget:g}; shorten the warm-up or give more minutes"
        )
    return cfg


def _prepare_data_once(cfg: Config, ctx: distributed.Context):
    """One process per node (local rank 0) decodes/caches first, so node-local data gets a cache on
    every node; the others then find it ready. The wait is a long gloo barrier, not NCCL's."""
    if ctx.local_rank != 0:
        distributed.barrier_long()
    data = batch_manager.prepare_data(**cfg.data_kwargs())
    if ctx.local_rank == 0:
        distributed.barrier_long()
    return data


def _open_run_dir(cfg: Config, model, run_dir: Path | None, resolved: dict) -> Path:
    """A new run folder (or the resumed one), created only once data and model are known good.
    config.yaml: the configuration (usable as --config), then what the auto settings became here."""
    new_run = run_dir is None
    run_dir = run_dir or make_run_dir(cfg.output_dir, cfg.arch)
    try:
        checkpoint.check_disk(run_dir, model, extra_copies=cfg.keep_last + (1 if cfg.ema else 0))
    except UserError:
        if new_run:
            run_dir.rmdir()
        raise
    setup_logging(run_dir)
    if not new_run:  # a write that a kill cut short left its temporary file: never valid, never needed
        for stale in run_dir.glob("*.tmp"):
            stale.unlink()
            log.info("removed %s, an unfinished write of the interrupted run", stale.name)
    text = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
    text += f"# {RESOLVED_KEY}: what auto settings became on this machine (ignored when read back with --config)\n"
    (run_dir / "config.yaml").write_text(text + yaml.safe_dump({RESOLVED_KEY: resolved}, sort_keys=False))
    return run_dir


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
