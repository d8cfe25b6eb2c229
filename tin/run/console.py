"""What a run says: its first line (the run folder, the model, the data, the device), one line per
epoch, and the last line with the submission, checked."""

from __future__ import annotations

import logging

from tin.plan.budget import Plan
from tin.run import submission
from tin.run.folder import update_seconds
from tin.run.run import Run

log = logging.getLogger("tin")


# --------------------------------------------------------------------------- the run's console story
def announce(run: Run) -> None:
    """The run's first line after set-up: its folder, model, data and device."""
    data, p = run.parts.loaders.data, run.parts
    log.info(
        "run folder %s | %s, %.2fM params, %d classes | train %d, val %d, test %d images | %s, %s",
        run.run_dir,
        run.cfg.arch,
        run.params / 1e6,
        len(data.classes),
        len(data.train),
        len(data.val or []),
        len(data.test or []),
        p.device,
        p.runtime.reason,
    )
    if p.loaders.test is None:
        log.info("this dataset has no unlabelled test split: no best_test_preds.csv will be written")
    if run.state.finished:
        log.info("this run has already finished (%d epochs); nothing left to train", run.state.epoch)


def log_epoch(run: Run, row: dict, improved: bool) -> None:
    """One metrics row to every sink, one line to the log, and why training ends, if it does."""
    for sink in run.sinks:
        sink.log(row)
    plan = run.clock.plan
    log.info("epoch %d/%s  %s%s", row["epoch"], epochs_text(plan), summary(row), "  *best*" if improved else "")
    if run.clock.deadline_hit:
        log.warning(
            "--time_budget: training stopped at update %d of the %d planned, to finish on time (the last epoch "
            "ran slower than planned)",
            run.state.step,
            plan.updates,
        )
    elif run.state.finished and row["epoch"] < plan.n_epochs:
        log.info(
            "early stop: no better val top-1 for %d evaluations (--patience %d)", run.state.bad_epochs, run.cfg.patience
        )


def epochs_text(plan: Plan) -> str:
    return f"{plan.n_epochs}" if plan.updates % plan.updates_per_epoch == 0 else f"{plan.epochs:.2f}"


_SHOWN = {  # the log line's figures, in this order; any other key of the row follows as "key value"
    "lr": "lr {:.2e} at its start,",  # the epoch's first update's (metrics.csv's lr)
    "aug_strength": "augmentation {:.2f}",  # the strength s in [0, 1] (README: Augmentation recipe)
    "train_size": "{}px |",
    "train_loss": "train loss {:.3f}",
    "train_top1": "top-1 {:.2f}% |",
    "val_loss": "val loss {:.3f}",
    "val_top1": "top-1 {:.2f}%",
    "val_top5": "top-5 {:.2f}% |",
    "ema_val_top1": "EMA top-1 {:.2f}% |",
    "epoch_seconds": "{:.0f}s,",
    "images_per_second": "{:.0f} img/s,",
}


_QUIET = {
    "epoch",
    "train_top5",
    "ema_val_loss",
    "ema_val_top5",
    "train_seconds",
    "wall_seconds",
    "data_wait_fraction",
    "update_seconds",
    "eval_seconds",
    "save_seconds",
}


def summary(row: dict) -> str:
    """The epoch's log line: the usual figures, then every other figure the row carries."""
    parts = [fmt.format(row[k]) for k, fmt in _SHOWN.items() if k in row]
    parts.append(f"data wait {100 * row.get('data_wait_fraction', 0.0):.1f}%")
    extra = [k for k in row if k not in _SHOWN and k not in _QUIET]
    parts += [f"{k} {row[k]:.4g}" if isinstance(row[k], float) else f"{k} {row[k]}" for k in extra]
    return " ".join(parts)


def log_done(run: Run, final: dict | None = None) -> None:
    """The run's last line: the best figures (and --tta final's flipped ones), the time and the share
    of it in updates, and the submission, checked."""
    b, plan, final = run.state.best, run.clock.plan, final or {}
    best = "trained on train + val (no val metrics)"
    held_out = run.cfg.val_split  # a search's trial: its "val" is a held-out part of train
    if b.get("val_top1") is not None:
        what = f"held-out top-1 (on {held_out:g} of train, not the val split)" if held_out else "val top-1"
        best = f"best {what} {b['val_top1']:.2f}% (top-5 {b['val_top5']:.2f}%) at epoch {b['best_epoch']}"
    if "val_top1_tta" in final:
        best += f", with flip TTA {final['val_top1_tta']:.2f}% (top-5 {final['val_top5_tta']:.2f}%)"
    data, preds = run.parts.loaders.data, run.run_dir / "best_test_preds.csv"
    out = f"weights in {run.run_dir}"
    if data.test is not None and run.parts.ctx.is_main:  # the submission, checked before it is called one
        rows = submission.check_predictions(preds, data.test.ids, data.classes)
        out = f"submit {preds} ({rows:,} rows, checked)"
        if held_out:  # trained on part of train: retrain on all of it before submitting
            out = f"test predictions {preds} ({rows:,} rows; trained without the held-out {held_out:g} of train)"
    within = f" (--time_budget {plan.budget_s:.0f}s)" if plan.budget_s else ""
    wall = run.clock.elapsed()
    share = update_seconds(run.state.history) / wall if wall > 0 else 0.0
    log.info("done: %s in %.0fs%s, %.0f%% of it in updates | %s", best, wall, within, 100 * share, out)
