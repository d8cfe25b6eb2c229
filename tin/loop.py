"""The epoch loop: train the plan's epochs from where the run stands, evaluate, keep the best,
checkpoint, and stop cleanly on a signal, the time budget or early stopping.

    fit(run)    # run: tin.build.Run

Per epoch: the plan (re-planned by the time budget) gives the augmentation strength and training
size; train.train_one_epoch runs the updates; val (and EMA val) make the epoch's metrics row;
best.pth.tar (+ test predictions) on a new best, last.pth.tar always; the row goes to every sink.
"""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path

import torch

import transforms
import val
from tin import checkpoint, distributed, outputs, time_budget
from tin.build import Run
from train import train_one_epoch

log = logging.getLogger("tin")


def fit(run: Run) -> None:
    """Train the plan from `run.state` on; a signal saves the exact position and exits 128 + signal."""
    cfg, parts, state, clock = run.cfg, run.parts, run.state, run.clock
    outputs.announce(run)
    run.scheduler.step_update(num_updates=state.step)  # a resumed run's learning rate
    while state.epoch < clock.plan.n_epochs and not state.finished:
        epoch, t0, batch0 = state.epoch, time_budget.clock(), state.batch
        clock.epoch_start(state, run.scheduler)  # --time_budget: re-plan if the machine drifted
        plan = clock.plan
        stats = train_one_epoch(
            parts,
            run.scheduler,
            state,
            epoch=epoch,
            end_batch=plan.end_batch(epoch),
            strength=transforms.strength_at(epoch, plan.epochs, cfg.aug_schedule, cfg.aug_strength),
            size=transforms.train_size_at(epoch, plan.epochs, cfg.img_size, cfg.min_img_size, cfg.resize_until),
            should_stop=clock.should_stop,
            desc=f"epoch {epoch + 1}/{outputs.epochs_text(plan)}",
        )
        clock.epoch_trained(stats["train_size"], updates=-(-(state.batch - batch0) // parts.accum_steps))
        if clock.signal:  # agreed by every process
            exit_interrupted(run)
        last = epoch + 1 == plan.n_epochs or clock.deadline_hit
        row = epoch_row(run, epoch, stats, validate=last or time_budget.evaluated(epoch, plan.epochs, cfg.eval_every))
        row["epoch_seconds"], row["wall_seconds"] = time_budget.clock() - t0, clock.elapsed()
        improved = end_epoch(run, row, last)
        outputs.log_epoch(run, row, improved)
        if clock.signalled():  # a signal that came during evaluation or saving
            exit_interrupted(run)
    final_test_preds(run)
    outputs.log_done(run)
    if not cfg.no_analysis and parts.loaders.val is not None and parts.ctx.is_main:
        analyze(run.run_dir, cfg.workers, parts.device)


def epoch_row(run: Run, epoch: int, stats: dict, validate: bool) -> dict:
    """The epoch's metrics row: its training figures (over every process's images), then, when
    `validate`, val and EMA val over every process's shard."""
    parts = run.parts
    row = {"epoch": epoch + 1, **{k: v for k, v in stats.items() if k not in ("interrupted", "first_batch_seconds")}}
    if parts.ctx.enabled:
        row.update(_global_train_metrics(run.state.meters, parts.device))
        same_statistics(parts)
    if parts.loaders.val is not None and validate:  # the unwrapped model: each evaluates its shard, sums reduced
        amp, tta = parts.runtime.amp_dtype, run.cfg.tta
        row.update(val.evaluate(parts.model, parts.loaders.val, parts.normalize, parts.device, amp, tta))
        if parts.ema is not None:
            ema = val.evaluate(parts.ema.module, parts.loaders.val, parts.normalize, parts.device, amp, tta)
            row.update({f"ema_{k}": v for k, v in ema.items()})
    return row


def same_statistics(parts) -> None:
    """Under torchrun: BatchNorm statistics (the model's and the EMA's) from rank 0, as saved, on every
    process, which saw only its own shard of the data."""
    distributed.broadcast_buffers(parts.model)
    if parts.ema is not None:
        distributed.broadcast_buffers(parts.ema.module)


def _global_train_metrics(meters: dict, device: torch.device) -> dict:
    """Train loss/accuracy over every process's images (images/s stays per process)."""
    sums = distributed.all_reduce_(
        torch.tensor([meters["loss"], meters["top1"], meters["top5"], meters["n"]], dtype=torch.float64, device=device)
    ).tolist()
    n = max(sums[3], 1.0)
    return {"train_loss": sums[0] / n, "train_top1": 100 * sums[1] / n, "train_top5": 100 * sums[2] / n}


def end_epoch(run: Run, row: dict, last: bool) -> bool:
    """Update the best, write best (+ predictions) first and last.pth.tar second: a kill between
    the two re-runs this epoch on resume, identically. Returns whether this epoch is the best."""
    cfg, parts, state = run.cfg, run.parts, run.state
    key = "ema_val_top1" if cfg.best_on == "ema" else "val_top1"
    score, best = row.get(key), state.best.get("val_top1")
    skipped = score is None and parts.loaders.val is not None  # --eval_every: not evaluated, cannot be best
    improved = not skipped and (score is None or best is None or score > best)  # no val: the latest is kept
    state.epoch, state.batch, state.meters = state.epoch + 1, 0, None
    state.history.append(row)
    state.elapsed_s = row["wall_seconds"]
    state.bad_epochs = 0 if improved else state.bad_epochs + (0 if skipped else 1)
    state.finished = last or bool(cfg.patience and state.bad_epochs >= cfg.patience)  # early stop
    if improved:
        state.best = {
            "best_epoch": row["epoch"],
            "val_top1": score,
            "val_top5": row.get(key.replace("top1", "top5")),
            "val_loss": row.get(key.replace("top1", "loss")),
            "weights": cfg.best_on,
        }
    ckpt = checkpoint.make_checkpoint(parts, run.scheduler, cfg.to_dict(), state, run.clock.plan)  # every process
    if improved:
        weights = parts.ema.module if cfg.best_on == "ema" else parts.model
        preds = test_preds(run, weights) if cfg.test_preds == "best" else None
        if parts.ctx.is_main:
            checkpoint.write_checkpoint({**ckpt, "state_dict": weights.state_dict()}, run.run_dir / "best.pth.tar")
            if preds is not None:
                val.write_predictions(
                    parts.loaders.data.test.ids, preds, parts.loaders.data.classes, run.run_dir / "best_test_preds.csv"
                )
    if parts.ctx.is_main:
        checkpoint.write_checkpoint(ckpt, run.run_dir / "last.pth.tar")
        checkpoint.save_epoch_copy(run.run_dir / "last.pth.tar", run.run_dir, state.epoch, cfg.keep_last)
        outputs.write_results(run, row)
    return improved and score is not None


def test_preds(run: Run, weights: torch.nn.Module) -> list[int] | None:
    """Every test image's predicted class (None without a test split): each process predicts its
    shard, the shards are gathered in order."""
    parts = run.parts
    if parts.loaders.test is None:
        return None
    amp = parts.runtime.amp_dtype
    shard = val.predict(weights, parts.loaders.test, parts.normalize, parts.device, amp, run.cfg.tta)
    return distributed.interleave(distributed.gather(shard))


def final_test_preds(run: Run) -> None:
    """--test_preds end: predict the test split once, with the weights saved in best.pth.tar
    (the main process reads them; every process gets them by broadcast)."""
    parts = run.parts
    if parts.loaders.test is None or run.cfg.test_preds != "end":
        return
    best = checkpoint.load_checkpoint(run.run_dir / "best.pth.tar")["state_dict"] if parts.ctx.is_main else None
    weights = copy.deepcopy(parts.model)
    weights.load_state_dict(distributed.broadcast(best))
    preds = test_preds(run, weights)
    if parts.ctx.is_main:
        data = parts.loaders.data
        val.write_predictions(data.test.ids, preds, data.classes, run.run_dir / "best_test_preds.csv")


def exit_interrupted(run: Run) -> None:
    """Save the exact position (mid-epoch; an epoch's end was saved already), say how to go on, and
    exit with 128 + the signal, on every process."""
    state = run.state
    if state.batch:
        state.elapsed_s = run.clock.elapsed()
        ckpt = checkpoint.make_checkpoint(run.parts, run.scheduler, run.cfg.to_dict(), state, run.clock.plan)
        if run.parts.ctx.is_main:
            checkpoint.write_checkpoint(ckpt, run.run_dir / "last.pth.tar")
    log.warning(
        "interrupted; state saved in %s. Resume with:\n  %s", run.run_dir / "last.pth.tar", resume_command(run.run_dir)
    )
    raise SystemExit(128 + run.clock.signal)


def resume_command(run_dir: Path) -> str:
    """The command that resumes `run_dir`; in a container that docker/run_docker.sh started, the one to
    type on the host (it mounts checkpoints/ at the same place relative to the repository). Any other
    container (RunPod, Vast, Kubernetes) resumes where it runs, like a plain machine."""
    if os.environ.get("TIN_LAUNCHED_BY") != "run_docker":
        return f"python main.py --resume {run_dir}"
    try:
        run_dir = Path(run_dir).resolve().relative_to(Path.cwd().resolve())
    except ValueError:
        pass
    return f"bash docker/run_docker.sh -- python main.py --resume {run_dir}   (on the host, in the repository, with the run_docker.sh options this run was started with)"


def analyze(run_dir: Path, workers: int, device: torch.device) -> None:
    """End-of-run plots and confusions; a failure here must not turn a finished run into an error."""
    import analyze as analysis

    try:
        analysis.analyze_run(run_dir, workers=workers, device=device)
    except Exception as exc:  # noqa: BLE001 - reported, and the trained run stays complete
        log.warning("analysis failed (%s: %s); retry with: python analyze.py run %s", type(exc).__name__, exc, run_dir)
