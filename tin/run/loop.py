"""The epoch loop: train the plan's epochs from where the run stands, evaluate, keep the best,
checkpoint, and stop cleanly on a signal, the time budget or early stopping.

    fit(run)    # run: tin.run.build.Run

Per epoch: the plan (re-planned by the time budget) gives the augmentation strength and training
size; train.train_one_epoch runs the updates; val (and EMA val) make the epoch's metrics row;
best.pth.tar (+ test predictions) on a new best, last.pth.tar always (--save_every_min: both when
due, at the end and on a signal); the row, with the seconds spent in updates, evaluation and
checkpoint writes, goes to every sink. After the last epoch, from best.pth.tar: --tta final's one
flipped evaluation on val and the test predictions (--test_preds end, --tta final).
"""

from __future__ import annotations

import copy
import json
import logging
import os
from pathlib import Path

import torch

import transforms
import val
from tin import checkpoint
from tin.config.schema import TTA_FINAL
from tin.plan import budget
from tin.run import analysis, console, folder, submission
from tin.run.run import Run
from tin.runtime import distributed
from train import train_one_epoch

log = logging.getLogger("tin")


def fit(run: Run) -> None:
    """Train the plan from `run.state` on; a signal saves the exact position and exits 128 + signal."""
    cfg, parts, state, clock = run.cfg, run.parts, run.state, run.clock
    console.announce(run)
    already = state.finished  # resumed after its last epoch
    saves = Saves(cfg.save_every_min)
    run.scheduler.step_update(num_updates=state.step)  # a resumed run's learning rate
    while state.epoch < clock.plan.n_epochs and not state.finished:
        epoch, t0, batch0 = state.epoch, budget.clock(), state.batch
        clock.epoch_start(state, run.scheduler)  # --time_budget: re-plan if the machine drifted
        plan, t_train = clock.plan, budget.clock()
        stats = train_one_epoch(
            parts,
            run.scheduler,
            state,
            epoch=epoch,
            end_batch=plan.end_batch(epoch),
            strength=transforms.strength_at(epoch, plan.epochs, cfg.aug_schedule, cfg.aug_strength),
            size=transforms.train_size_at(epoch, plan.epochs, cfg.img_size, cfg.min_img_size, cfg.resize_until),
            should_stop=clock.should_stop,
            desc=f"epoch {epoch + 1}/{console.epochs_text(plan)}",
        )
        update_s = budget.clock() - t_train  # train_one_epoch synchronised the device before returning
        clock.epoch_trained(stats["train_size"], updates=-(-(state.batch - batch0) // parts.accum_steps))
        if clock.signal:  # agreed by every process
            exit_interrupted(run, saves)
        last = epoch + 1 == plan.n_epochs or clock.deadline_hit
        row = epoch_row(run, epoch, stats, validate=last or budget.evaluated(epoch, plan.epochs, cfg.eval_every))
        row["update_seconds"] = update_s
        # the row as a checkpoint of this epoch stores it; the sinks get it with its writes timed in
        row["epoch_seconds"], row["wall_seconds"] = budget.clock() - t0, clock.elapsed()
        improved = end_epoch(run, saves, row, last)
        row["epoch_seconds"], row["wall_seconds"] = budget.clock() - t0, clock.elapsed()
        console.log_epoch(run, row, improved)
        if clock.signalled():  # a signal that came during evaluation or saving
            exit_interrupted(run, saves)
    if already and ended_before(run):
        return
    final = end_pass(run)
    console.log_done(run, final)
    if not cfg.no_analysis and parts.loaders.val is not None and parts.ctx.is_main:
        analyze(run.run_dir, cfg.workers, parts.device, full=cfg.analysis == "full")


def ended_before(run: Run) -> bool:
    """A run resumed after it had finished: whether its end (the predictions, the page) was written
    too, which is then said and not redone; one killed between its last epoch and its end does that
    end now. Every process answers alike (they see the same run folder)."""
    folder, parts = run.run_dir, run.parts
    preds = parts.loaders.test is None or (folder / "best_test_preds.csv").is_file()
    page = run.cfg.no_analysis or parts.loaders.val is None or (folder / "index.html").is_file()
    results = folder / "best_results.json"
    if not (preds and page and results.is_file()):
        return False
    if (
        run.cfg.tta == TTA_FINAL
        and parts.loaders.val is not None
        and "val_top1_tta" not in json.loads(results.read_text())
    ):
        return False  # its end pass (flipped val, flipped predictions) did not finish
    log.info("its predictions and page are there; `python analyze.py run %s` redoes the analysis", folder)
    return True


def epoch_row(run: Run, epoch: int, stats: dict, validate: bool) -> dict:
    """The epoch's metrics row: its training figures (over every process's images), then, when
    `validate`, val and EMA val over every process's shard (flipped with --tta flip only), and the
    seconds they took."""
    parts = run.parts
    row = {"epoch": epoch + 1, **{k: v for k, v in stats.items() if k not in ("interrupted", "first_batch_seconds")}}
    if parts.ctx.enabled:
        row.update(_global_train_metrics(run.state.meters, parts.device))
        same_statistics(parts)
    row["eval_seconds"] = 0.0
    if parts.loaders.val is not None and validate:  # the unwrapped model: each evaluates its shard, sums reduced
        t0, amp, tta = budget.clock(), parts.runtime.amp_dtype, run.cfg.tta_each
        row.update(val.evaluate(parts.model, parts.loaders.val, parts.normalize, parts.device, amp, tta))
        if parts.ema is not None:
            ema = val.evaluate(parts.ema.module, parts.loaders.val, parts.normalize, parts.device, amp, tta)
            row.update({f"ema_{k}": v for k, v in ema.items()})
        row["eval_seconds"] = budget.clock() - t0  # evaluate returns host floats: the device is done
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


def end_epoch(run: Run, saves: Saves, row: dict, last: bool) -> bool:
    """Update the best (its test predictions at once with --test_preds best), then checkpoint
    (`saves`). Returns whether this epoch is the best."""
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
    preds = None
    if improved and cfg.test_preds == "best":
        t0 = budget.clock()
        preds = test_preds(run, best_weights(run), cfg.tta_each)
        row["eval_seconds"] += budget.clock() - t0
    t0 = budget.clock()
    saves.epoch_end(run, improved, preds)
    row["save_seconds"] = budget.clock() - t0  # after the write that stores the row: the next one has it
    return improved and score is not None


def best_weights(run: Run) -> torch.nn.Module:
    """The weights --best_on picks for best.pth.tar: the model's or the EMA's."""
    return run.parts.ema.module if run.cfg.best_on == "ema" else run.parts.model


class Saves:
    """When an epoch's end is written: every epoch, or with --save_every_min M at the first epoch end
    M minutes of wall clock after the last write, and always at the run's end and on a signal
    (exit_interrupted). Between writes a new best waits in memory (copied: training goes on changing
    the weights), so best.pth.tar always holds the weights that last.pth.tar's `best` names, and
    best_results.json the same best. Writing reads the random states and never draws from them: a
    resumed run repeats the epochs after its checkpoint exactly, whatever the cadence."""

    def __init__(self, minutes: float) -> None:
        self.every_s = 60.0 * minutes
        self.last_write = budget.clock()  # from the process's start: the first write comes M minutes in
        self.behind = False  # epoch ends have passed that last.pth.tar does not hold
        self.best: dict | None = None  # a new best's checkpoint, not written yet (main process)
        self.preds: list[int] | None = None  # and its test predictions (--test_preds best)
        if minutes:
            log.info(
                "--save_every_min %g: checkpoints every %g min of wall clock, at the end and on Ctrl-C/SIGTERM; a "
                "SIGKILL or a crash loses up to %g min of training plus one epoch",
                minutes,
                minutes,
                minutes,
            )

    def due(self, finished: bool) -> bool:
        """Whether this epoch end is written: rank 0's clock decides for every process (each makes
        its part of the checkpoint)."""
        if not self.every_s or finished:
            return True
        return bool(distributed.broadcast(budget.clock() - self.last_write >= self.every_s))

    def epoch_end(self, run: Run, improved: bool, preds: list[int] | None) -> None:
        """Write the epoch's end when due, keeping a new best for the next write when not."""
        due = self.due(run.state.finished)
        if not (due or improved):
            self.behind = True
            return
        ckpt = checkpoint.make_checkpoint(
            run.parts, run.scheduler, run.cfg.to_dict(), run.state, run.clock.plan.to_dict()
        )
        if improved and run.parts.ctx.is_main:
            best = {**ckpt, "state_dict": best_weights(run).state_dict()}
            self.best, self.preds = (best if due else copy.deepcopy(best)), preds
        if due:
            self.write(run, ckpt)
        else:
            self.behind = True

    def write(self, run: Run, ckpt: dict) -> None:
        """The best waiting (+ its predictions) first and last.pth.tar second: a kill between the two
        re-runs these epochs on resume, identically; then the epoch copy and best_results.json."""
        if run.parts.ctx.is_main:
            if self.best is not None:
                checkpoint.write_checkpoint(self.best, run.run_dir / "best.pth.tar")
                if self.preds is not None:
                    data = run.parts.loaders.data
                    submission.write_predictions(
                        data.test.ids, self.preds, data.classes, run.run_dir / "best_test_preds.csv"
                    )
            checkpoint.write_checkpoint(ckpt, run.run_dir / "last.pth.tar")
            if ckpt["batch"] == 0:  # epoch_NNN copies are of epoch ends
                checkpoint.save_epoch_copy(run.run_dir / "last.pth.tar", run.run_dir, ckpt["epoch"], run.cfg.keep_last)
            folder.write_results(run, run.state.elapsed_s)
        self.best, self.preds, self.behind, self.last_write = None, None, False, budget.clock()


def test_preds(run: Run, weights: torch.nn.Module, tta: bool) -> list[int] | None:
    """Every test image's predicted class (None without a test split): each process predicts its
    shard, the shards are gathered in order."""
    parts = run.parts
    if parts.loaders.test is None:
        return None
    shard = val.predict(weights, parts.loaders.test, parts.normalize, parts.device, parts.runtime.amp_dtype, tta)
    return distributed.interleave(distributed.gather(shard))


def end_pass(run: Run) -> dict:
    """After the last epoch, with the weights saved in best.pth.tar: --tta final's one flipped
    evaluation on val (returned as val_top1_tta, ...: apart from the per-epoch curve and the choice
    of best), the test predictions of --test_preds end or --tta final, and best_results.json with
    the run's whole time."""
    cfg, parts = run.cfg, run.parts
    final_val = cfg.tta == TTA_FINAL and parts.loaders.val is not None and run.state.best.get("val_top1") is not None
    predict = parts.loaders.test is not None and (cfg.test_preds == "end" or cfg.tta == TTA_FINAL)
    final = {}
    if final_val or predict:
        weights = saved_best(run)
        if final_val:
            amp = parts.runtime.amp_dtype
            flipped = val.evaluate(weights, parts.loaders.val, parts.normalize, parts.device, amp, True)
            final = {f"{k}_tta": v for k, v in flipped.items()}
        preds = test_preds(run, weights, cfg.tta_end) if predict else None
        if preds is not None and parts.ctx.is_main:
            data = parts.loaders.data
            submission.write_predictions(data.test.ids, preds, data.classes, run.run_dir / "best_test_preds.csv")
    if parts.ctx.is_main:
        folder.write_results(run, run.clock.elapsed(), final)
    return final


def saved_best(run: Run) -> torch.nn.Module:
    """A copy of the model with best.pth.tar's weights (the main process reads them; every process
    gets them by broadcast)."""
    best = checkpoint.load_checkpoint(run.run_dir / "best.pth.tar")["state_dict"] if run.parts.ctx.is_main else None
    weights = copy.deepcopy(run.parts.model)
    weights.load_state_dict(distributed.broadcast(best))
    return weights


def exit_interrupted(run: Run, saves: Saves) -> None:
    """Save the exact position when the disk is behind it (mid-epoch, or epoch ends --save_every_min
    has not written yet, with the best waiting), say how to go on, and exit with 128 + the signal,
    on every process."""
    state = run.state
    if state.batch or saves.behind:
        state.elapsed_s = run.clock.elapsed()
        saves.write(
            run,
            checkpoint.make_checkpoint(run.parts, run.scheduler, run.cfg.to_dict(), state, run.clock.plan.to_dict()),
        )
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


def analyze(run_dir: Path, workers: int, device: torch.device, full: bool = True) -> None:
    """End-of-run plots, confusions and the run page (`full`: with the t-SNE and the saved features);
    a failure here must not turn a finished run into an error."""
    try:
        analysis.analyze_run(run_dir, workers=workers, device=device, full=full)
    except Exception as exc:  # noqa: BLE001 - reported, and the trained run stays complete
        log.warning("analysis failed (%s: %s); retry with: python analyze.py run %s", type(exc).__name__, exc, run_dir)
