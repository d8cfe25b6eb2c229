"""One build: a resolved configuration -> a complete ``Run`` (the model and what trains it, the data,
the plan and the schedule that follows it, where the run stands, its folder and sinks). Nothing is
created empty and filled in later: the plan comes first (a time budget measures the real step),
then what depends on it.

    run = build(cfg, ctx, ckpt, started)      # ckpt: a resumed run's checkpoint, else None
    loop.fit(run)

bench/step.py and bench/gpu_check.py build exactly this way (``build_parts`` alone: no run folder).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch
import yaml
from timm.layers import convert_sync_batchnorm
from timm.utils import ModelEmaV3

import arch
import batch_manager
import train
import transforms
from tin import checkpoint, distill, optim
from tin.augment import mixing
from tin.config.schema import RESOLVED_KEY, Config
from tin.data import readers
from tin.engine.state import TrainState
from tin.plan import budget, measure, stop
from tin.run import folder, load, sinks, source
from tin.run.run import Run
from tin.runtime import distributed, hardware
from utils import UserError, seed_everything

log = logging.getLogger("tin")


def build(
    cfg: Config,
    ctx: distributed.Context,
    ckpt: dict | None,
    started: float,
    run_dir: Path | None = None,
    argv: list[str] | None = None,
) -> Run:
    """The run of `cfg` (a new one, or `ckpt`'s resumed in `run_dir`), from the process's start
    `started` (budget.clock()); `argv`: main()'s arguments, recorded with the run's source (None: the
    process's own)."""
    wandb_mode = sinks.resolve_wandb_mode(cfg.wandb) if ctx.is_main else "disabled"  # a missing install: now
    cfg, parts, params, gflops, (recipe, auto) = build_parts(cfg, ctx, ckpt)
    if ckpt is not None:
        plan = budget.Plan.from_dict(ckpt["plan"]) if "plan" in ckpt else measure.plan_run(cfg, parts, 0.0)
    else:
        plan = distributed.broadcast(measure.plan_run(cfg, parts, budget.clock() - started))  # rank 0's
        cfg = _fit_warmup_to_plan(cfg, plan, recipe if "warmup_epochs" in auto else None)
    scheduler = build_scheduler(cfg, parts.optimizer, plan)
    state = checkpoint.restore(parts, scheduler, ckpt) if ckpt is not None else TrainState()
    if ckpt is not None:
        distill.check_same_teachers(ckpt.get("teachers"), parts.teacher, cfg.resume)
    resolved = {
        "runtime": {
            **parts.runtime.to_dict(),
            "data_on_device": isinstance(parts.loaders.train, batch_manager.DeviceBatches),
        },
        "plan": plan.to_dict(),
        **({"teachers": parts.teacher.summary()} if parts.teacher is not None else {}),
        **({"recipe": {"why": recipe.why, **{k: getattr(cfg, k) for k in auto}}} if recipe else {}),
    }
    if ctx.is_main:
        resolved["sources"] = _sources(run_dir, argv)
    run_dir = distributed.broadcast(_open_run_dir(cfg, parts.model, run_dir, resolved) if ctx.is_main else None)
    outputs: list[sinks.Sink] = []
    if ctx.is_main:
        outputs.append(sinks.CsvSink(run_dir / "metrics.csv", sinks.METRIC_ORDER, rows=state.history))
        if wandb_mode != "disabled":
            tags = cfg.tag_list()
            wandb_sink = sinks.WandbSink(run_dir, wandb_mode, cfg.wandb_project, cfg.to_dict(), state.wandb_id, tags)
            state.wandb_id = wandb_sink.run.id
            outputs.append(wandb_sink)
    clock = stop.Timekeeper(plan, cfg, state, started, ctx, parts.device, parts.sync_every)
    if ckpt is not None:
        checkpoint.restore_rng(ckpt, ctx)  # last: nothing may draw after it
        log.info("resumed %s at epoch %d, batch %d (update %d)", run_dir, state.epoch + 1, state.batch, state.step)
    return Run(cfg, parts, scheduler, clock, state, run_dir, outputs, params, gflops)


def build_parts(cfg: Config, ctx: distributed.Context, ckpt: dict | None = None):
    """Device and precision, data, loaders, model and what trains it: (cfg with auto values resolved,
    train.Parts, parameters, GFLOPs per image, (the learning-rate recipe used or None, the fields it
    set)). For `ckpt`'s run, its weights are loaded later (checkpoint.restore)."""
    seed_everything(cfg.seed)
    threads = hardware.fit_threads()
    if threads:
        log.info(threads)
    runtime = hardware.decide_runtime(
        distributed.device_for(ctx, hardware.resolve_device(cfg.device)), cfg.amp, cfg.amp_dtype, cfg.channels_last
    )
    log.info("%s (%s): %s", runtime.device, runtime.device_name, runtime.reason)
    log.info("numerics: %s", hardware.configure(runtime.device, deterministic=cfg.deterministic))
    if ckpt is not None:
        hardware.warn_if_changed(ckpt.get("runtime"), runtime)
    spec = arch.resolve(cfg.arch)  # once: what the build needs to know of the model is in its spec
    if cfg.eval_px != cfg.img_size and spec.fixed_grid:
        raise UserError(
            f"--eval_size {cfg.eval_size}: {cfg.arch} is built for {cfg.img_size}x{cfg.img_size} inputs "
            "(a transformer's position grid); evaluate it at --img_size (--eval_size 0)"
        )
    # file names only: fast. A held-out val (--val_split) never touches the dataset's own val images.
    listing = readers.read_dataset(cfg.dataset, cfg.data_dir, val=not cfg.val_split)
    cfg, spec = _fit_params(cfg, spec, len(listing.classes))
    _check_params(cfg, spec, len(listing.classes))  # before the decoding, not after
    if ckpt is not None and list(ckpt["classes"]) != listing.classes:  # likewise
        raise UserError(f"--resume {cfg.resume}: the run was trained on other classes than those in {listing.root}")
    data = _prepare_data_once(cfg, ctx, listing)
    cfg, recipe, auto = _resolve_recipe(cfg, spec, ctx) if ckpt is None else (cfg, None, [])
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
    model, params, gflops = _model(cfg, spec, len(data.classes), runtime, fresh=ckpt is None)
    if ctx.enabled:  # same initial weights everywhere (DDP broadcasts them); own dropout/mixing draws per process
        seed_everything(cfg.seed + ctx.rank)
    net = model
    if ctx.enabled:
        if cfg.sync_bn:  # timm's converter keeps BatchNormAct2d's activation (torch's drops it)
            model = net = convert_sync_batchnorm(model)
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[runtime.device.index] if runtime.device.type == "cuda" else None
        )
    global_batch = cfg.batch_size * cfg.accum_steps * ctx.world  # the linear scaling rule's batch
    lr = cfg.lr_base * (global_batch / cfg.lr_scale_batch if cfg.lr_scale_batch else 1.0)
    parts = train.Parts(
        model=model,
        net=torch.compile(net) if cfg.compile else net,
        optimizer=optim.build_optimizer(
            model, cfg.opt, lr=lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum, nesterov=cfg.nesterov
        ),
        scaler=torch.amp.GradScaler(runtime.device.type, enabled=runtime.amp_dtype == torch.float16),
        ema=ModelEmaV3(model, decay=cfg.ema_decay, use_warmup=True) if cfg.ema else None,  # warms up: short runs too
        teacher=_teachers_once(cfg, ctx, data, runtime),
        mixer=mixing.build_mixer(
            cfg.mixup_alpha, cfg.cutmix_alpha, cfg.mix_prob, cfg.label_smoothing, num_classes=len(data.classes)
        ),
        normalize=transforms.Normalize().to(runtime.device),
        loaders=loaders,
        runtime=runtime,
        ctx=ctx,
        num_classes=len(data.classes),
        label_smoothing=cfg.label_smoothing,
        accum_steps=cfg.accum_steps,
        grad_clip=cfg.grad_clip,
        progress_every=cfg.progress_every,
    )
    return cfg, parts, params, gflops, (recipe, auto)


def build_scheduler(cfg: Config, optimizer: torch.optim.Optimizer, plan: budget.Plan) -> optim.Stretchable:
    """The learning rate per update over the plan's (first) length."""
    return optim.build_scheduler(
        optimizer,
        cfg.sched,
        plan.schedule_updates,
        plan.updates_per_epoch,
        warmup_epochs=cfg.warmup_epochs,
        min_lr=cfg.min_lr,
        step_size=cfg.step_size,
        gamma=cfg.gamma,
        milestones=cfg.milestone_epochs(),
    )


def _model(
    cfg: Config, spec: arch.ArchSpec, num_classes: int, runtime: hardware.Runtime, fresh: bool
) -> tuple[torch.nn.Module, int, float]:
    """The model on its device and in its memory format; pretrained weights only for a new run."""
    model = arch.build_model(
        spec,
        num_classes,
        img_size=cfg.img_size,
        drop_rate=cfg.drop_rate,
        attn_drop_rate=cfg.attn_drop_rate,
        drop_path_rate=cfg.drop_path_rate,
        pretrained=cfg.pretrained and fresh,
        pretrained_path=(cfg.pretrained_path or None) if fresh else None,
    ).to(runtime.device)
    params, gflops = arch.model_stats(model, cfg.img_size)
    defaults = {f.name: f.default for f in dataclasses.fields(Config)}
    told = {k: getattr(cfg, k) for k in arch.DROP_KNOBS if getattr(cfg, k) != defaults[k]}  # set by the user
    unused = arch.unused_knobs(spec, **told)
    if unused:
        log.info("%s has no %s; ignored for this model", cfg.arch, " / ".join(f"--{k}" for k in unused))
    log.info(
        "%s: %s parameters, %.3f GFLOPs per %dx%d image", cfg.arch, f"{params:,}", gflops, cfg.img_size, cfg.img_size
    )
    if runtime.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model, params, gflops


def _fit_params(cfg: Config, spec: arch.ArchSpec, num_classes: int) -> tuple[Config, arch.ArchSpec]:
    """--fit_params N: --arch becomes the widest of its family with at most N parameters (a name like
    resnet9_w24, which config.yaml, the checkpoints and evaluate.py then use as any other), and its spec."""
    if not cfg.fit_params:
        return cfg, spec
    name, params = arch.fit_width(cfg.arch, cfg.fit_params, num_classes, cfg.img_size)
    if name != cfg.arch:
        log.info(
            "--fit_params %s: --arch %s becomes %s, %s parameters with %d classes",
            f"{cfg.fit_params:,}",
            cfg.arch,
            name,
            f"{params:,}",
            num_classes,
        )
    return dataclasses.replace(cfg, arch=name), arch.resolve(name)


def _check_params(cfg: Config, spec: arch.ArchSpec, num_classes: int) -> None:
    """--max_params: the model's parameters counted on the meta device (no memory, no time)."""
    if not cfg.max_params:
        return
    params = arch.count_params(spec, num_classes, cfg.img_size)
    if params > cfg.max_params:
        fits = [(n, k) for n, k in arch.smallest(num_classes, cfg.img_size) if k <= cfg.max_params]
        hint = f"; {', '.join(f'--arch {n} ({k:,})' for n, k in fits[:2])} fit{'s' if len(fits) == 1 else ''}"
        raise UserError(
            f"--arch {cfg.arch} has {params:,} parameters with {num_classes} classes, over --max_params "
            f"{cfg.max_params:,}{hint if fits else ''}"
        )


def _prepare_data_once(cfg: Config, ctx: distributed.Context, listing):
    """One process per node (local rank 0) decodes/caches first, so node-local data gets a cache on
    every node; the others then find it ready. The wait is a long gloo barrier, not NCCL's."""
    if ctx.local_rank != 0:
        distributed.barrier_long()
    data = batch_manager.prepare_data(**cfg.data_kwargs(), listing=listing)
    if ctx.local_rank == 0:
        distributed.barrier_long()
    return data


def _teachers_once(cfg: Config, ctx: distributed.Context, data, runtime: hardware.Runtime):
    """The teachers; their cached soft labels made by one process per node (local rank 0), as the
    decode cache is, the others then finding them ready."""
    if ctx.local_rank != 0 and cfg.teacher and cfg.kd_views:
        distributed.barrier_long()
    teacher = load.load_teachers(cfg, data, runtime)
    if ctx.local_rank == 0 and cfg.teacher and cfg.kd_views:
        distributed.barrier_long()
    return teacher


def _resolve_recipe(
    cfg: Config, spec: arch.ArchSpec, ctx: distributed.Context
) -> tuple[Config, optim.LrRecipe | None, list[str]]:
    """--lr_base auto / --warmup_epochs auto -> numbers from the recipe table, logged, and written
    into the config (so config.yaml and the checkpoints hold the numbers the run used). Returns the
    config, the recipe (None when nothing was auto) and the fields it set."""
    if cfg.lr_base is not None and cfg.warmup_epochs is not None:
        return cfg, None, []
    recipe = optim.lr_recipe(spec.lr_group, cfg.pretrained or bool(cfg.pretrained_path), cfg.opt)
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


def _fit_warmup_to_plan(cfg: Config, plan: budget.Plan, recipe: optim.LrRecipe | None) -> Config:
    """A warm-up from the recipe (`recipe`, when it set the warm-up) is at most a tenth of the run the
    time budget planned. One given (a preset's, or typed) that does not fit the plan — a slower or
    busier machine plans fewer epochs, and the budget is the promise — shrinks to a tenth of it too,
    with a warning that says so."""
    if not plan.budget_s:
        return cfg
    if recipe is not None and cfg.warmup_epochs > 0.1 * plan.epochs:
        cfg = dataclasses.replace(cfg, warmup_epochs=round(min(recipe.warmup_epochs, 0.1 * plan.epochs), 4))
    if cfg.warmup_epochs >= plan.epochs:
        short = round(0.1 * plan.epochs, 4)
        log.warning(
            "--warmup_epochs %g is as long as the %.2f epochs that fit --time_budget %g on this machine now: warm-up "
            "shortened to %g epochs (a tenth of the plan); give more minutes for the full warm-up",
            cfg.warmup_epochs,
            plan.epochs,
            cfg.time_budget,
            short,
        )
        cfg = dataclasses.replace(cfg, warmup_epochs=short)
    return cfg


def _open_run_dir(cfg: Config, model: torch.nn.Module, run_dir: Path | None, resolved: dict[str, Any]) -> Path:
    """A new run folder (or the resumed one), created only once data and model are known good.
    config.yaml: the configuration (usable as --config), then what the auto settings became here."""
    new_run = run_dir is None
    run_dir = run_dir or folder.make_run_dir(cfg.output_dir, cfg.name or cfg.arch)
    try:
        checkpoint.check_disk(run_dir, model, extra_copies=cfg.keep_last + (1 if cfg.ema else 0))
    except UserError:
        if new_run:
            run_dir.rmdir()
        raise
    folder.setup_logging(run_dir)
    if not new_run:  # a write that a kill cut short left its temporary file: never valid, never needed
        for stale in run_dir.glob("*.tmp"):
            stale.unlink()
            log.info("removed %s, an unfinished write of the interrupted run", stale.name)
    text = yaml.safe_dump({**cfg.to_dict(), "resume": ""}, sort_keys=False)  # a preset: --config reads it back
    text += f"# {RESOLVED_KEY}: what auto settings became on this machine (ignored when read back with --config)\n"
    (run_dir / "config.yaml").write_text(text + yaml.safe_dump({RESOLVED_KEY: resolved}, sort_keys=False))
    return run_dir


def _sources(run_dir: Path | None, argv: list[str] | None) -> list[dict]:
    """Where the run came from: this process's code, versions and command (tin/run/source.py), after
    those of the processes before it when the run is resumed (each resume may run other code)."""
    earlier = []
    if run_dir is not None and (run_dir / "config.yaml").is_file():
        saved = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
        earlier = (saved.get(RESOLVED_KEY) or {}).get("sources") or []
    return [*earlier, source.source(argv)]
