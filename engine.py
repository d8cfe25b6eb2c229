"""The epoch loop: build the training parts, run the plan's epochs (from any resumed position),
evaluate, keep the best, checkpoint, stop cleanly on signals, the time budget or early stopping.
main.py sets up and calls fit().

Per epoch: strength s and training size from the plan -> loaders and CutMix/MixUp;
train.train_one_epoch; evaluate (and the EMA); best.pth.tar + test predictions on a new best;
last.pth.tar; one metrics row to the sinks.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from pathlib import Path

import torch
from timm.layers import convert_sync_batchnorm
from timm.utils import ModelEmaV3

import train
import transforms
from tin import checkpoint, distributed, optim, time_budget
from tin.checkpoint import StopRequest, TrainState, load_checkpoint
from tin.config import Config, milestones
from tin.time_budget import Plan
from train import Parts, StepSpec
from val import evaluate, predict, write_predictions

log = logging.getLogger("tin")

# metrics.csv lists these first, then every other key the rows carry (in order of appearance)
METRIC_ORDER = [
    "epoch",
    "lr",
    "aug_strength",
    "train_size",
    "train_loss",
    "train_top1",
    "train_top5",
    "val_loss",
    "val_top1",
    "val_top5",
    "ema_val_loss",
    "ema_val_top1",
    "ema_val_top5",
    "epoch_seconds",
    "train_seconds",
    "images_per_second",
    "data_wait_fraction",
    "wall_seconds",
]


# --------------------------------------------------------------------------- building
def build_parts(cfg: Config, model: torch.nn.Module, loaders, runtime, ctx: distributed.Context) -> Parts:
    device = runtime.device
    if runtime.channels_last:
        model = model.to(memory_format=torch.channels_last)
    net = model
    if ctx.enabled:
        if cfg.sync_bn:
            model = net = to_sync_batchnorm(model)
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    # linear scaling rule on the global batch: per-process batch x accumulation x processes
    global_batch = cfg.batch_size * cfg.accum_steps * ctx.world
    lr = cfg.lr_base * (global_batch / cfg.lr_scale_batch if cfg.lr_scale_batch else 1.0)
    optimizer = optim.build_optimizer(
        model, cfg.opt, lr=lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum, nesterov=cfg.nesterov
    )
    dtype = runtime.amp_dtype
    p = Parts(
        model=model,
        net=torch.compile(net) if cfg.compile else net,
        optimizer=optimizer,
        scheduler=None,
        scaler=torch.amp.GradScaler(device.type, enabled=dtype == torch.float16),
        ema=ModelEmaV3(model, decay=cfg.ema_decay, use_warmup=True) if cfg.ema else None,  # warms up: short runs too
        mixer=transforms.build_mixer(
            mixup_alpha=cfg.mixup_alpha,
            cutmix_alpha=cfg.cutmix_alpha,
            mix_prob=cfg.mix_prob,
            label_smoothing=cfg.label_smoothing,
            num_classes=len(loaders.data.classes),
        ),
        normalize=transforms.Normalize().to(device),
        loaders=loaders,
        runtime=runtime,
        ctx=ctx,
    )
    p.scheduler = build_scheduler(cfg, p, base_plan(cfg, loaders))
    return p


def to_sync_batchnorm(model: torch.nn.Module) -> torch.nn.Module:
    """--sync_bn: timm's converter, which turns timm's BatchNormAct2d (batch norm + activation, in
    efficientnet_b0, mobilenetv2_100 and many timm models) into SyncBatchNormAct; torch's own
    convert_sync_batchnorm makes it a plain SyncBatchNorm and drops the activation."""
    return convert_sync_batchnorm(model)


def build_scheduler(cfg: Config, p: Parts, plan: Plan):
    """The LR schedule over the plan's first length (re-plans of a time budget stretch it)."""
    return optim.build_scheduler(
        p.optimizer,
        cfg.sched,
        plan.schedule_updates,
        plan.updates_per_epoch,
        warmup_epochs=cfg.warmup_epochs,
        min_lr=cfg.min_lr,
        step_size=cfg.step_size,
        gamma=cfg.gamma,
        milestones=milestones(cfg),
    )


def base_plan(cfg: Config, loaders) -> Plan:
    """--epochs whole epochs of this process's share of the data (the plan without a budget)."""
    full = loaders.train.sampler.num_samples // cfg.batch_size
    batches = min(full, cfg.steps_per_epoch) if cfg.steps_per_epoch else full
    return time_budget.epochs_plan(
        cfg.epochs, optim.updates_per_epoch(batches, cfg.accum_steps), batches, cfg.accum_steps
    )


def step_spec(cfg: Config, p: Parts) -> StepSpec:
    return StepSpec(
        num_classes=len(p.loaders.data.classes),
        label_smoothing=cfg.label_smoothing,
        accum_steps=cfg.accum_steps,
        grad_clip=cfg.grad_clip,
    )


def plan_run(cfg: Config, p: Parts, elapsed_s: float) -> Plan:
    """The plan of a new run: --epochs, or what fits --time_budget here (measured on `p`, which is
    left as it was; the caller builds the scheduler for the plan)."""
    plan = base_plan(cfg, p.loaders)
    if not cfg.time_budget:
        return plan
    return time_budget.make_plan(
        p,
        step_spec(cfg, p),
        plan,
        minutes=cfg.time_budget,
        elapsed_s=elapsed_s,
        size_at=time_budget.size_schedule(cfg.img_size, cfg.min_img_size, cfg.resize_until),
        ema=cfg.ema,
        tta=cfg.tta,
        test_every_epoch=cfg.test_preds == "best",
        eval_every=cfg.eval_every,
    )


# --------------------------------------------------------------------------- the loop
def fit(
    cfg: Config, p: Parts, state: TrainState, plan: Plan, run_dir: Path, sinks, stop: StopRequest, started: float
) -> None:
    """Run the plan from `state` on; `started` = time_budget.clock() when this process began."""
    data, spec = p.loaders.data, step_spec(cfg, p)
    log.info(
        "run folder %s | %s, %.2fM params, %d classes | train %d, val %d, test %d images | %s, %s",
        run_dir,
        cfg.arch,
        p.params / 1e6,
        len(data.classes),
        len(data.train),
        len(data.val or []),
        len(data.test or []),
        p.device,
        p.runtime.reason,
    )
    if p.loaders.test is None:
        log.info("this dataset has no unlabelled test split: no best_test_preds.csv will be written")
    if state.finished:
        log.info("this run has already finished (%d epochs); nothing left to train", state.epoch)
    origin = started - state.elapsed_s  # the run's time 0, across resumes
    deadline = time_budget.Deadline(plan, time_budget.clock() - origin)
    p.scheduler.step_update(num_updates=state.step)
    window, trained_s = (state.step, time_budget.clock() - origin), 0.0  # speed measured from here (not start-up)
    epoch = state.epoch
    while epoch < plan.n_epochs and not state.finished:
        t0 = time_budget.clock()
        if plan.budget_s and state.step > window[0]:  # re-plan from whole epochs trained in this process
            if window[0] % plan.updates_per_epoch == 0:
                plan = _replan(cfg, p, state, plan, deadline, window, elapsed_s=t0 - origin, trained_s=trained_s)
            window, trained_s = (state.step, t0 - origin), 0.0
        deadline.epoch_start()
        tr = train_epoch(cfg, p, spec, state, plan=plan, epoch=epoch, should_stop=_stopper(p, spec, stop, deadline))
        trained_s += time_budget.clock() - t0
        if tr["interrupted"] and stop.signum:  # saved; tell how to go on
            _exit_interrupted(
                p, cfg, state, plan=plan, run_dir=run_dir, stop=stop, elapsed_s=time_budget.clock() - origin
            )
        last = epoch + 1 == plan.n_epochs or deadline.hit
        row = _evaluate(cfg, p, epoch, tr, validate=last or time_budget.evaluated(epoch, plan.epochs, cfg.eval_every))
        row["epoch_seconds"], row["wall_seconds"] = time_budget.clock() - t0, time_budget.clock() - origin
        improved = _end_epoch(cfg, p, state, plan=plan, run_dir=run_dir, row=row, last=last)
        for sink in sinks:
            sink.log(row)
        log.info("epoch %d/%s  %s%s", epoch + 1, _epochs_text(plan), _summary(row), "  *best*" if improved else "")
        if deadline.hit:
            log.warning(
                "--time_budget: training stopped at update %d of the %d planned, to finish on time (the "
                "last epoch ran slower than planned)",
                state.step,
                plan.updates,
            )
        elif state.finished and not last:
            log.info(
                "early stop: no better val top-1 for %d evaluations (--patience %d)", state.bad_epochs, cfg.patience
            )
        if distributed.any_flag(bool(stop.signum), p.device):
            _exit_interrupted(
                p, cfg, state, plan=plan, run_dir=run_dir, stop=stop, elapsed_s=time_budget.clock() - origin
            )
        epoch = state.epoch
    _final_test_preds(cfg, p, run_dir)
    _log_done(state, plan, run_dir=run_dir, has_test=p.loaders.test is not None, seconds=time_budget.clock() - origin)
    if not cfg.no_analysis and p.loaders.val is not None and p.ctx.is_main:
        _analyze(run_dir, cfg.workers, p.device)


def _replan(
    cfg: Config,
    p: Parts,
    state: TrainState,
    plan: Plan,
    deadline: time_budget.Deadline,
    window: tuple[int, float],
    elapsed_s: float,
    trained_s: float,
) -> Plan:
    """--time_budget at an epoch's start: re-plan the rest from the machine's training speed over
    the whole epochs since `window` against the start's measurement (time_budget.replan). The LR
    schedule stretches or squeezes to end with the new plan; rank 0 decides for every process.
    A steady machine keeps its plan (a resumed run then repeats an uninterrupted one exactly);
    one whose speed drifts re-plans, which a resumed run, measuring its own speed, may do
    differently. A resumed run measures from its first whole epoch."""
    new = distributed.broadcast(
        time_budget.replan(
            plan,
            step=state.step,
            elapsed_s=elapsed_s,
            window=window,
            trained_s=trained_s,
            size_at=time_budget.size_schedule(cfg.img_size, cfg.min_img_size, cfg.resize_until),
            test_every_epoch=cfg.test_preds == "best",
            eval_every=cfg.eval_every,
        )
    )
    deadline.slower(new.slowness)
    if new.updates != plan.updates:
        p.scheduler.replan(state.step, new.updates)
        log.info(
            "--time_budget: this machine now trains at %.2fx the measured time per update; re-planned to %d "
            "updates = %.2f epochs (was %d)",
            new.slowness,
            new.updates,
            new.epochs,
            plan.updates,
        )
    return new


def train_epoch(
    cfg: Config, p: Parts, spec: StepSpec, state: TrainState, plan: Plan, epoch: int, should_stop=None
) -> dict:
    """Train epoch `epoch` from state.batch (the trainer proper, no evaluation): the epoch's
    augmentation strength and resolution from the plan, then train.train_one_epoch; advances
    `state`. Returns its dict plus lr, aug_strength and train_size. bench/step.py times this."""
    strength = transforms.strength_at(epoch, plan.epochs, cfg.aug_schedule, cfg.aug_strength)
    size = transforms.train_size_at(epoch, plan.epochs, cfg.img_size, cfg.min_img_size, cfg.resize_until)
    p.loaders.set_epoch(epoch, strength, start_batch=state.batch, size=size)  # reaches the persistent workers
    if p.mixer is not None:
        p.mixer.set_strength(strength)  # and CutMix/MixUp
    meters = train.EpochMeters(state.meters, p.device)
    lr = state.epoch_lr if state.batch else p.optimizer.param_groups[0]["lr"]  # the epoch's starting lr
    tr = train.train_one_epoch(
        p,
        spec,
        step=state.step,
        start_batch=state.batch,
        end_batch=plan.end_batch(epoch),
        meters=meters,
        should_stop=should_stop,
        desc=f"epoch {epoch + 1}/{_epochs_text(plan)}",
    )
    state.step, state.batch, state.meters, state.epoch_lr = tr["steps"], tr["batch"], tr["meters"], lr
    return {**tr, "lr": lr, "aug_strength": strength, "train_size": size}


def _stopper(p: Parts, spec: StepSpec, stop: StopRequest, deadline: time_budget.Deadline):
    """should_stop(step) for train_one_epoch: a signal or the deadline. Under torchrun the
    processes agree every spec.sync_every updates (an all-reduce), never in between."""

    def should_stop(step: int) -> bool:
        if not p.ctx.enabled:
            return bool(stop.signum) or deadline.passed()
        if step % spec.sync_every:
            return False
        return distributed.any_flag(bool(stop.signum) or deadline.passed(), p.device)

    return should_stop


def _evaluate(cfg: Config, p: Parts, epoch: int, tr: dict, validate: bool = True) -> dict:
    """The epoch's metrics row: training figures, then (when `validate`) val and EMA val over every
    process's shard."""
    row = {"epoch": epoch + 1, "lr": tr["lr"], "aug_strength": tr["aug_strength"], "train_size": tr["train_size"]}
    row.update(
        {k: v for k, v in tr.items() if k.startswith("train_") or k in ("images_per_second", "data_wait_fraction")}
    )
    if p.ctx.enabled:
        row.update(_global_train_metrics(tr["meters"], p.device))
        distributed.broadcast_buffers(p.model)  # BatchNorm statistics: rank 0's, as saved
    if p.loaders.val is not None and validate:  # the unwrapped model: each evaluates its shard, sums are reduced
        row.update(evaluate(p.model, p.loaders.val, p.normalize, p.device, amp_dtype=p.amp_dtype, tta=cfg.tta))
        if p.ema is not None:
            ema = evaluate(p.ema.module, p.loaders.val, p.normalize, p.device, amp_dtype=p.amp_dtype, tta=cfg.tta)
            row.update({f"ema_{k}": v for k, v in ema.items()})
    return row


def _global_train_metrics(m: dict, device: torch.device) -> dict:
    """Train loss/accuracy over every process's images (images/s stays per process)."""
    sums = distributed.all_reduce_(
        torch.tensor([m["loss"], m["top1"], m["top5"], m["n"]], dtype=torch.float64, device=device)
    )
    n = max(float(sums[3]), 1.0)
    return {
        "train_loss": float(sums[0]) / n,
        "train_top1": 100 * float(sums[1]) / n,
        "train_top5": 100 * float(sums[2]) / n,
    }


def _end_epoch(cfg: Config, p: Parts, state: TrainState, plan: Plan, run_dir: Path, row: dict, last: bool) -> bool:
    """Update the best, write best (+ predictions) first and last.pth.tar second: a kill between
    the two re-runs this epoch on resume, identically. Returns whether this epoch is the best."""
    key = "ema_val_top1" if cfg.best_on == "ema" else "val_top1"
    score, best = row.get(key), state.best.get("val_top1")
    skipped = score is None and p.loaders.val is not None  # --eval_every: not evaluated, cannot be best
    improved = not skipped and (score is None or best is None or score > best)  # no val: the latest is kept
    state.epoch, state.batch, state.meters = state.epoch + 1, 0, None
    state.history.append(row)
    state.elapsed_s, state.finished = row["wall_seconds"], last
    state.bad_epochs = 0 if improved else state.bad_epochs + (0 if skipped else 1)
    state.finished = state.finished or bool(cfg.patience and state.bad_epochs >= cfg.patience)  # early stop
    if improved:
        state.best = {
            "best_epoch": row["epoch"],
            "val_top1": score,
            "val_top5": row.get(key.replace("top1", "top5")),
            "val_loss": row.get(key.replace("top1", "loss")),
            "weights": cfg.best_on,
        }
    ckpt = checkpoint.make_checkpoint(p, cfg.to_dict(), state, plan)  # every process: gathers the RNG states
    if improved:
        weights = p.ema.module if cfg.best_on == "ema" else p.model
        preds = _test_preds(cfg, p, weights) if cfg.test_preds == "best" else None
        if p.ctx.is_main:
            checkpoint.write_checkpoint({**ckpt, "state_dict": weights.state_dict()}, run_dir / "best.pth.tar")
            if preds is not None:
                write_predictions(
                    p.loaders.data.test.ids, preds, p.loaders.data.classes, run_dir / "best_test_preds.csv"
                )
    if not p.ctx.is_main:
        return improved and score is not None
    checkpoint.write_checkpoint(ckpt, run_dir / "last.pth.tar")
    checkpoint.save_epoch_copy(run_dir / "last.pth.tar", run_dir, state.epoch, cfg.keep_last)
    results = {
        "arch": cfg.arch,
        "params": p.params,
        "gflops": round(p.gflops, 4),
        **state.best,
        "epochs_run": state.epoch,
        "updates": state.step,
        "wall_time_seconds": round(row["wall_seconds"], 2),
        **_plan_summary(plan),
        "runtime": p.runtime.to_dict(),
    }
    tmp = run_dir / "best_results.json.tmp"
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    tmp.replace(run_dir / "best_results.json")
    return improved and score is not None


def _plan_summary(plan: Plan) -> dict:
    if not plan.budget_s:
        return {}
    return {
        "time_budget_seconds": plan.budget_s,
        "planned_updates": plan.updates,
        "planned_epochs": round(plan.epochs, 3),
        "first_planned_updates": plan.schedule_updates,
        "slowness": plan.slowness,
    }


def _test_preds(cfg: Config, p: Parts, weights: torch.nn.Module) -> list[int] | None:
    """Every test image's predicted class (None without a test split): each process predicts its
    shard, the shards are gathered in order."""
    if p.loaders.test is None:
        return None
    shard = predict(weights, p.loaders.test, p.normalize, p.device, amp_dtype=p.amp_dtype, tta=cfg.tta)
    return distributed.interleave(distributed.gather(shard))


def _final_test_preds(cfg: Config, p: Parts, run_dir: Path) -> None:
    """--test_preds end: predict the test split once, with the weights saved in best.pth.tar
    (the main process reads them; every process gets them by broadcast)."""
    if p.loaders.test is None or cfg.test_preds != "end":
        return
    state = load_checkpoint(run_dir / "best.pth.tar")["state_dict"] if p.ctx.is_main else None
    weights = copy.deepcopy(p.model)
    weights.load_state_dict(distributed.broadcast(state))
    preds = _test_preds(cfg, p, weights)
    if p.ctx.is_main:
        write_predictions(p.loaders.data.test.ids, preds, p.loaders.data.classes, run_dir / "best_test_preds.csv")


def _exit_interrupted(
    p: Parts, cfg: Config, state: TrainState, plan: Plan, run_dir: Path, stop: StopRequest, elapsed_s: float
) -> None:
    if state.batch:  # mid-epoch: save the exact position (an epoch end has just been saved otherwise)
        state.elapsed_s = elapsed_s
        ckpt = checkpoint.make_checkpoint(p, cfg.to_dict(), state, plan)
        if p.ctx.is_main:
            checkpoint.write_checkpoint(ckpt, run_dir / "last.pth.tar")
    log.warning("interrupted; state saved in %s. Resume with:\n  %s", run_dir / "last.pth.tar", resume_command(run_dir))
    raise SystemExit(128 + stop.signum)


IN_CONTAINER = os.path.exists("/.dockerenv")


def resume_command(run_dir: Path) -> str:
    """The command that resumes `run_dir`; in a Docker container, the one to type on the host
    (docker/run_docker.sh mounts checkpoints/ at the same place relative to the repository)."""
    if not IN_CONTAINER:
        return f"python main.py --resume {run_dir}"
    try:
        run_dir = Path(run_dir).resolve().relative_to(Path.cwd().resolve())
    except ValueError:
        pass
    return f"bash docker/run_docker.sh -- python main.py --resume {run_dir}   (on the host, in the repository, with the run_docker.sh options this run was started with)"


def _analyze(run_dir: Path, workers: int, device: torch.device) -> None:
    """End-of-run plots and confusions; a failure here must not turn a finished run into an error."""
    import analyze

    try:
        analyze.analyze_run(run_dir, workers=workers, device=device)
    except Exception as exc:  # noqa: BLE001 - reported, and the trained run stays complete
        log.warning("analysis failed (%s: %s); retry with: python analyze.py run %s", type(exc).__name__, exc, run_dir)


def _epochs_text(plan: Plan) -> str:
    return f"{plan.n_epochs}" if plan.updates % plan.updates_per_epoch == 0 else f"{plan.epochs:.2f}"


def _summary(row: dict) -> str:
    text = (
        f"lr {row['lr']:.2e}  s {row['aug_strength']:.2f}  {row['train_size']}px | train loss "
        f"{row['train_loss']:.3f} top-1 {row['train_top1']:.2f}%"
    )
    if "val_top1" in row:
        text += f" | val loss {row['val_loss']:.3f} top-1 {row['val_top1']:.2f}% top-5 {row['val_top5']:.2f}%"
    if "ema_val_top1" in row:
        text += f" | EMA top-1 {row['ema_val_top1']:.2f}%"
    return text + (
        f" | {row['epoch_seconds']:.0f}s, {row['images_per_second']:.0f} img/s, "
        f"data wait {100 * row['data_wait_fraction']:.1f}%"
    )


def _log_done(state: TrainState, plan: Plan, run_dir: Path, has_test: bool, seconds: float) -> None:
    b = state.best
    final = "trained on train + val (no val metrics)"
    if b.get("val_top1") is not None:
        final = f"best val top-1 {b['val_top1']:.2f}% (top-5 {b['val_top5']:.2f}%) at epoch {b['best_epoch']}"
    out = f"submit {run_dir / 'best_test_preds.csv'}" if has_test else f"weights in {run_dir}"
    within = f" (--time_budget {plan.budget_s:.0f}s)" if plan.budget_s else ""
    log.info("done: %s in %.0fs%s | %s", final, seconds, within, out)
