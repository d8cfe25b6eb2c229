"""--time_budget: the plan's arithmetic, a budgeted run planning and stopping at its budget under a
controlled clock (no test here depends on how fast this machine is), and exact resume of a
budgeted run killed with SIGKILL."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import re
import signal
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import yaml
from torch.optim.optimizer import register_optimizer_step_post_hook

import main
import val
from conftest import FAST_RUN, PINNED, ROOT, TIMING, same_weights
from tin import optim
from tin.plan import budget, measure, stop

# the fixture: 64 train images, batch 8 -> 8 updates per epoch
COSTS = budget.Costs(update_s={16: 0.5, 24: 0.75, 32: 1.0}, epoch_end_s=0.0, test_s=1.0, eval_s=2.0)


def test_predicted_time_follows_the_sizes_and_the_epoch_ends():
    def size_at(e, epochs):
        return 32

    assert budget.predicted_seconds(16, 8, COSTS, size_at, test_every_epoch=False) == 2 * (8 + 2) + 1
    assert budget.predicted_seconds(12, 8, COSTS, size_at, test_every_epoch=True) == (8 + 2 + 1) + (4 + 2 + 1)
    grow = budget.size_schedule(32, 16, 0.5)
    assert budget.predicted_seconds(16, 8, COSTS, grow, False) == (8 * 0.5 + 2) + (8 * 1.0 + 2) + 1


def test_evaluations_are_counted_only_where_they_happen():
    costs = budget.Costs(update_s={32: 1.0}, epoch_end_s=0.5, test_s=1.0, eval_s=3.0)

    def size_at(e, epochs):
        return 32

    every = budget.predicted_seconds(32, 8, costs, size_at, test_every_epoch=False, eval_every=1)
    last_only = budget.predicted_seconds(32, 8, costs, size_at, test_every_epoch=False, eval_every=0)
    assert every == 4 * (8 + 0.5 + 3) + 1 and last_only == 4 * (8 + 0.5) + 3 + 1
    assert [budget.evaluated(e, 4, 2) for e in range(4)] == [False, True, False, True]
    assert [budget.evaluated(e, 3.5, 0) for e in range(4)] == [False, False, False, True]


def test_the_plan_is_the_most_updates_that_fit():
    def size_at(e, epochs):
        return 32

    updates, predicted = budget.plan_updates(59.1, 8, 160, COSTS, size_at, test_every_epoch=True)
    assert (updates, predicted) == (41, 5 * 11 + 1 + 2 + 1)  # 5 epochs of 11 s, then 1 update, an evaluation, a test
    assert budget.plan_updates(1e6, 8, 160, COSTS, size_at, True)[0] == 160  # --epochs caps it
    assert budget.plan_updates(2.0, 8, 160, COSTS, size_at, True)[0] == 0
    plan = budget.Plan(41, 8, 8)
    assert plan.n_epochs == 6 and plan.epochs == pytest.approx(5.125)
    assert [plan.end_batch(e) for e in range(6)] == [8, 8, 8, 8, 8, 1]
    assert budget.Plan(10, 4, 8, accum_steps=2).end_batch(2) == 4  # 2 updates left = 4 batches


def test_schedules_stretch_to_a_fractional_run():
    from transforms import strength_at, train_size_at

    assert strength_at(5, 5.125, "linear") == pytest.approx(5 / 5.125)
    assert train_size_at(2, 5.125, 64, 32, until=0.8) == 48
    model = torch.nn.Linear(2, 2)
    opt = optim.build_optimizer(model, "sgd", 1.0, 0.0)
    sched = optim.build_scheduler(opt, "linear", 41, 8)
    sched.step_update(num_updates=41)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-9)  # the decay ends where the plan ends


class MachineClock:
    """A controlled clock: an update takes `update_s` seconds (after `slow_after` updates,
    `slow_update_s`), an evaluation `eval_s`, a test prediction `test_s`."""

    def __init__(self, update_s: float, eval_s: float, test_s: float, slow_after: int, slow_update_s: float) -> None:
        self.now, self.updates = 0.0, 0
        self.update_s, self.eval_s, self.test_s = update_s, eval_s, test_s
        self.slow_after, self.slow_update_s = slow_after, slow_update_s

    def __call__(self) -> float:
        return self.now

    def update(self) -> None:
        self.updates += 1
        self.now += self.slow_update_s if self.updates > self.slow_after else self.update_s


@pytest.fixture
def machine(monkeypatch):
    """Runs main() on a controlled clock: each optimizer update (counted by torch's global step hook),
    evaluation (val.evaluate) and test prediction (val.predict) advances it by its cost."""
    hooks = []

    def make(update_s: float, slow_after: int = 10**9, slow_update_s: float = 0.0) -> MachineClock:
        clock = MachineClock(update_s, COSTS.eval_s, COSTS.test_s, slow_after, slow_update_s)
        monkeypatch.setattr(budget, "clock", clock)
        monkeypatch.setattr(measure, "measure_costs", lambda *a, **k: COSTS)
        hooks.append(register_optimizer_step_post_hook(lambda *args: clock.update()))
        real_evaluate, real_predict = val.evaluate, val.predict

        def evaluate(*args, **kwargs):
            clock.now += clock.eval_s
            return real_evaluate(*args, **kwargs)

        def predict(*args, **kwargs):
            clock.now += clock.test_s
            return real_predict(*args, **kwargs)

        monkeypatch.setattr(val, "evaluate", evaluate)
        monkeypatch.setattr(val, "predict", predict)
        return clock

    yield make
    for hook in hooks:
        hook.remove()


def _budgeted(tiny_data, tmp_path, minutes="1", *extra):
    return main.main(
        [
            *FAST_RUN,
            "--data_dir",
            str(tiny_data),
            "--output_dir",
            str(tmp_path),
            *"--epochs 20 --time_budget".split(),
            minutes,
            "--wandb",
            "disabled",
            *extra,
        ]
    )


def _rows(run):
    with open(run / "metrics.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def test_a_budgeted_run_plans_from_its_measurements_and_ends_within_the_budget(tiny_data, tmp_path, machine):
    # the machine is as fast as it measured, and the test predictions are made once, at the end, as
    # planned (with the default --test_preds best the plan reserves them at every evaluation, and a
    # re-plan hands back what went unused): the plan holds. 5 epochs of 8 + 2 s, then 6 updates,
    # an evaluation and the test predictions: 59 s of the 59.1 s the margin leaves.
    clock = machine(update_s=1.0)
    run = _budgeted(tiny_data, tmp_path, "1", "--test_preds", "end")
    results = json.loads((run / "best_results.json").read_text())
    assert (results["planned_updates"], results["planned_epochs"], results["updates"]) == (46, 5.75, 46)
    rows = _rows(run)
    assert len(rows) == 6 and float(rows[-1]["wall_seconds"]) <= 60 and clock.now == 59
    assert float(rows[-1]["aug_strength"]) == pytest.approx(1 - math.cos(math.pi / 2 * 5 / 5.75))  # the plan's length
    assert (run / "best_test_preds.csv").is_file()
    saved = torch.load(run / "last.pth.tar", weights_only=True)
    assert saved["plan"]["updates"] == 46 and saved["finished"]
    log_text = (run / "log.txt").read_text()
    assert "plan: 46 updates = 5.75 epochs" in log_text and "re-planned" not in log_text


def _final_lr(run) -> float:
    return torch.load(run / "last.pth.tar", weights_only=True)["optimizer"]["param_groups"][0]["lr"]


def test_a_machine_slower_than_it_measured_re_plans_and_still_anneals_on_time(tiny_data, tmp_path, machine):
    clock = machine(update_s=1.5)  # 50 % slower than measured: the first plan does not fit
    run = _budgeted(tiny_data, tmp_path)
    results = json.loads((run / "best_results.json").read_text())
    assert results["updates"] == results["planned_updates"] < results["first_planned_updates"] == 41
    assert clock.now <= 60 and float(_rows(run)[-1]["wall_seconds"]) <= 60
    log_text = (run / "log.txt").read_text()
    assert "re-planned to" in log_text and "training stopped at update" not in log_text
    assert _final_lr(run) < 1e-6  # the schedule was squeezed to end with the new plan, not cut
    assert torch.load(run / "last.pth.tar", weights_only=True)["finished"]
    main.main(["--resume", str(run)])  # a finished run resumes to nothing more
    assert json.loads((run / "best_results.json").read_text())["updates"] == results["updates"]


def test_a_faster_machine_plans_more_updates(tiny_data, tmp_path, machine):
    machine(update_s=0.5)
    run = _budgeted(tiny_data, tmp_path)
    results = json.loads((run / "best_results.json").read_text())
    assert 41 < results["updates"] == results["planned_updates"] <= 160 and _final_lr(run) < 1e-6


def test_a_machine_that_slows_within_the_last_epoch_is_stopped_on_time(tiny_data, tmp_path, machine):
    clock = machine(update_s=1.0, slow_after=41, slow_update_s=4.0)  # too late for a re-plan to help
    run = _budgeted(tiny_data, tmp_path, "1", "--test_preds", "end")
    results = json.loads((run / "best_results.json").read_text())
    assert results["updates"] < results["planned_updates"] == 46
    assert clock.now <= 60 and (run / "best_test_preds.csv").is_file()
    assert "--time_budget: training stopped at update" in (run / "log.txt").read_text()


def test_too_short_a_budget_is_a_clear_error(tiny_data, tmp_path, machine):
    machine(update_s=1.0)
    with pytest.raises(main.UserError, match="--time_budget 0.01 min leaves no time to train"):
        _budgeted(tiny_data, tmp_path, "0.01")


def test_measuring_stops_inside_the_budget_and_names_a_budget_that_trains(tiny_data, tmp_path, monkeypatch):
    """`--time_budget 1` on a machine where an update takes 10 s: measuring alone (8 updates per
    training size, then an evaluation) would take minutes. It stops once the minute is spent, before
    any run folder, and names the smallest budget that would train here."""
    clock = MachineClock(10.0, 0.0, 0.0, 10**9, 0.0)
    monkeypatch.setattr(budget, "clock", clock)
    hook = register_optimizer_step_post_hook(lambda *args: clock.update())
    try:
        with pytest.raises(main.UserError, match="--time_budget 1 min is spent before training could start") as err:
            _budgeted(tiny_data, tmp_path / "runs", "1")
    finally:
        hook.remove()
    assert clock.updates == 8 and clock.now == 80  # the one training size measured, then it stopped
    suggested = float(re.search(r"give at least --time_budget ([\d.]+)", str(err.value)).group(1))
    assert suggested * 60 > clock.now and not (tmp_path / "runs").exists()


def test_a_warmup_longer_than_the_planned_run_shrinks_with_the_plan_and_says_so(tiny_data, tmp_path, machine):
    """`make demo` on a busy machine planned 0.73 epochs against its preset's 1-epoch warm-up and
    stopped with an error after 46 s; the budget is the promise: the warm-up shrinks, saying so."""
    clock = machine(update_s=1.0)
    run = _budgeted(tiny_data, tmp_path, "1", "--warmup_epochs", "8")
    text = (run / "log.txt").read_text()
    assert "--warmup_epochs 8 is as long as the 5.12 epochs that fit --time_budget 1" in text
    assert "warm-up shortened to 0.5125 epochs (a tenth of the plan)" in text
    assert yaml.safe_load((run / "config.yaml").read_text())["warmup_epochs"] == 0.5125
    assert clock.now <= 60 and (run / "best_test_preds.csv").is_file()


# ---------------------------------------------------------------------------- SIGKILL and resume
BUDGET_RUN = [
    *"--arch resnet9_slim --img_size 32 --batch_size 8 --workers 0 --epochs 5 --lr_base 0.05 --opt sgd --sched linear --time_budget 2 --wandb disabled --no_analysis --aug_schedule linear".split(),
    *PINNED,
]


def _start(args, out, kill_at: int = 0):
    """tests/budget_run.py (main.py with fixed costs) in a subprocess; kill_at K: SIGKILL right after
    update K (bench/interrupt_at.py)."""
    wrapper = ["-m", "bench.interrupt_at", str(kill_at), "--signal", "KILL"] if kill_at else []
    return subprocess.Popen(
        [sys.executable, *wrapper, "tests/budget_run.py", *args],
        cwd=ROOT,
        stdout=out,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def _only_run(folder):
    runs = [p for p in folder.glob("*_resnet9_slim") if p.is_dir()]
    return runs[0] if runs else None


def test_sigkilled_budgeted_run_resumes_to_identical_weights(tiny_data, tmp_path):
    args = [*BUDGET_RUN, "--data_dir", str(tiny_data)]
    ref_out, out = tmp_path / "reference", tmp_path / "killed"
    with open(tmp_path / "ref.log", "w") as log:
        assert _start([*args, "--output_dir", str(ref_out)], log).wait(300) == 0, (tmp_path / "ref.log").read_text()
    reference = _only_run(ref_out)
    plan = torch.load(reference / "last.pth.tar", weights_only=True)["plan"]
    assert plan["updates"] == 23 and plan["updates"] % plan["updates_per_epoch"]  # 2.875 epochs, fixed costs
    with open(tmp_path / "log", "w") as log:  # 8 updates per epoch: killed in the middle of epoch 2
        assert _start([*args, "--output_dir", str(out)], log, kill_at=12).wait(300) == -signal.SIGKILL
    run = _only_run(out)
    with open(tmp_path / "resume.log", "w") as log:
        assert _start(["--resume", str(run)], log).wait(300) == 0, (tmp_path / "resume.log").read_text()[-3000:]

    def strip(rows):
        return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]

    assert strip(_rows(run)) == strip(_rows(reference)) and len(_rows(run)) == 3
    assert same_weights(run / "last.pth.tar", reference / "last.pth.tar")
    assert torch.load(run / "last.pth.tar", weights_only=True)["plan"] == plan


def test_measuring_times_updates_from_the_first_batch_not_the_loaders_start(tiny_data, tmp_path, monkeypatch):
    """The loader's start (the order's copy, workers' first batches) is an epoch's cost, not an
    update's: counted in each of the 5 timed updates, a slow start would shorten the plan. On a
    controlled clock: the loader takes 2 s to start, an update 0.1 s."""
    import batch_manager
    import train
    from tin.config.cli import parse_config
    from tin.run.build import build_parts
    from tin.runtime import distributed

    args = [*FAST_RUN, "--data_dir", str(tiny_data), "--data_on_device", "on", "--cache_dir", str(tmp_path)]
    _, parts, *_ = build_parts(parse_config(args), distributed.Context())
    now, real = [0.0], batch_manager.DeviceBatches.__iter__

    def slow_start(self):
        now[0] += 2.0
        yield from real(self)

    monkeypatch.setattr(batch_manager.DeviceBatches, "__iter__", slow_start)
    monkeypatch.setattr(train.time, "perf_counter", lambda: now[0])
    hook = register_optimizer_step_post_hook(lambda *args: now.__setitem__(0, now[0] + 0.1))
    try:
        costs = measure.measure_costs(parts, [32], ema=False, tta=False, test_images=0, warmup=1, timed=5)
    finally:
        hook.remove()
    assert costs.epoch_start_s == pytest.approx(2.0) and costs.update_s[32] == pytest.approx(0.1)  # not 0.5


def _epochs_on(machine_s: dict, measured: dict, upe: int = 390):
    """The re-planned lengths (in epochs) at each epoch start of a 30-minute run whose start-up
    measurement per training size was `measured` and whose machine really takes `machine_s`."""
    from types import SimpleNamespace

    from tin.config.cli import parse_config
    from tin.engine.state import TrainState
    from tin.runtime.distributed import Context

    now = [0.0]
    costs = budget.Costs(update_s=measured, epoch_end_s=0.2, test_s=20.0, eval_s=20.0)
    size_at = budget.size_schedule(64, 32, 0.8)
    updates, _ = budget.plan_updates(1800 * (1 - budget.MARGIN), upe, 40 * upe, costs, size_at, False, 0)
    plan = budget.Plan(updates, upe, upe, budget_s=1800.0, costs=budget.costs_dict(costs), max_updates=40 * upe)
    cfg = parse_config("--img_size 64 --min_img_size 32 --resize_until 0.8 --eval_every 0 --test_preds end".split())
    state, lengths = TrainState(), [plan.epochs]
    schedule = SimpleNamespace(replan=lambda t0, new: None)
    clock = stop.Timekeeper(plan, cfg, state, 0.0, Context(), "cpu", 25)
    budget.clock = lambda: now[0]
    try:
        while state.step < clock.plan.updates:
            clock.epoch_start(state, schedule)
            lengths.append(clock.plan.epochs)
            size = size_at(state.step // upe, clock.plan.epochs)
            k = min(upe, clock.plan.updates - state.step)
            now[0] += k * machine_s[size]
            clock.epoch_trained(size, k)
            state.step += k
            now[0] += 0.2
    finally:
        clock.close()
    return lengths, now[0]


def test_re_plans_keep_each_sizes_observed_time_and_follow_only_a_lasting_drift(monkeypatch):
    monkeypatch.setattr(budget, "clock", budget.clock)  # _epochs_on replaces it; restored after
    # the CPU speed-run of 2026-11-27 (README: Time budget): measured at its start (5 updates per size)
    # and what its epochs then took per update (metrics.csv's epoch seconds / 390 updates)
    measured = {32: 0.262, 40: 0.293, 48: 0.376, 56: 0.482, 64: 0.556}
    steady = {32: 0.23, 40: 0.285, 48: 0.355, 56: 0.44, 64: 0.535}
    lengths, end = _epochs_on(steady, measured)
    changes = [b for a, b in zip(lengths, lengths[1:], strict=False) if a != b]
    assert len(changes) <= 1 and end <= 1800  # (that run, re-planning from its last epoch alone: six re-plans)
    slower = {s: 1.5 * t for s, t in measured.items()}
    lengths, end = _epochs_on(slower, measured)
    assert lengths[2] < 0.7 * lengths[0] and end <= 1800  # shorter at the first epoch start that sees it
    faster = {s: 0.7 * t for s, t in measured.items()}
    lengths, end = _epochs_on(faster, measured)
    assert lengths[2] == lengths[0] < lengths[3] and end <= 1800  # longer once it lasts two epochs


def test_a_cadence_charges_each_epoch_its_share_of_the_checkpoints_and_tta_final_its_end_pass():
    def size_at(e, epochs):
        return 32

    costs = budget.Costs(update_s={32: 1.0}, epoch_end_s=1.0, test_s=1.0, eval_s=2.0, final_s=5.0)
    # 4 epochs of 8 + 2 s; a write every 20 s: half of each epoch's checkpoints, all of the last one's
    cadence = budget.predicted_seconds(32, 8, costs, size_at, test_every_epoch=False, save_every_s=20.0)
    assert cadence == 5.0 + 4 * 10 + (3 * 0.5 + 1) * 1.0  # the end's flip pass replaces the one test prediction
    every = budget.predicted_seconds(32, 8, dataclasses.replace(costs, final_s=0.0), size_at, False)
    assert every == 1.0 + 4 * 10 + 4 * 1.0
    assert budget.costs_from_dict(budget.costs_dict(costs)) == costs
    old_plan = {k: v for k, v in budget.costs_dict(costs).items() if k != "final_s"}  # saved before final_s
    assert budget.costs_from_dict(old_plan).final_s == 0.0


# ---------------------------------------------------------------------------- --save_every_min
CADENCE_RUN = [*FAST_RUN, *"--arch budget_cnn_w8 --epochs 4 --wandb disabled".split()]
TOP1 = [10.0, 30.0, 40.0, 20.0]  # val top-1 by epoch: new bests at 1, 2, 3


@pytest.fixture
def cadence_machine(monkeypatch):
    """A controlled clock (10 s per update: 80 s per epoch of the fixture), val top-1 following TOP1
    (by the epoch the updates reached), an optional SIGINT at update K or in epoch E's evaluation,
    and every checkpoint write recorded: (file, epoch, batch, best epoch), each checked to leave
    the random states as it found them. A new run (not a resumed one) starts counting at update 0."""
    import random

    import numpy as np

    from tin import checkpoint
    from tin.run import loop

    now, updates, writes, interrupt = [0.0], [0], [], {}
    real_evaluate, real_write, real_epoch_end = val.evaluate, checkpoint.write_checkpoint, loop.Saves.epoch_end

    def step(*args):
        updates[0] += 1
        now[0] += 10.0
        if interrupt.get("update") == updates[0]:
            os.kill(os.getpid(), signal.SIGINT)

    def evaluate(*args, **kwargs):
        epoch = updates[0] // 8
        if interrupt.get("eval") == epoch:
            os.kill(os.getpid(), signal.SIGINT)
        return {**real_evaluate(*args, **kwargs), "val_top1": TOP1[epoch - 1]}

    def rngs():
        return torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()

    def unchanged(before) -> bool:
        after = rngs()
        return torch.equal(before[0], after[0]) and (before[1] == after[1]).all() and before[2] == after[2]

    def write(ckpt, path):
        before = rngs()
        real_write(ckpt, path)
        assert unchanged(before), f"writing {path.name} drew random numbers"
        writes.append((path.name, ckpt["epoch"], ckpt["batch"], ckpt["best"]["best_epoch"]))

    def epoch_end(self, *args, **kwargs):
        before = rngs()
        real_epoch_end(self, *args, **kwargs)
        assert unchanged(before), "an epoch end's checkpoints (written or kept for later) drew random numbers"

    monkeypatch.setattr(budget, "clock", lambda: now[0])
    monkeypatch.setattr(val, "evaluate", evaluate)
    monkeypatch.setattr(checkpoint, "write_checkpoint", write)
    monkeypatch.setattr(loop.Saves, "epoch_end", epoch_end)
    hook = register_optimizer_step_post_hook(step)
    yield SimpleNamespace(writes=writes, interrupt=interrupt, updates=updates)
    hook.remove()


def _cadence_run(machine, tiny_data, out, *extra):
    """A new run on `machine`: its writes alone recorded."""
    machine.updates[0] = 0
    machine.writes.clear()
    return main.main([*CADENCE_RUN, "--data_dir", str(tiny_data), "--output_dir", str(out), *extra])


def test_a_cadence_writes_when_due_and_at_the_end_and_changes_nothing_computed(tiny_data, tmp_path, cadence_machine):
    writes = cadence_machine.writes
    reference = _cadence_run(cadence_machine, tiny_data, tmp_path / "every")
    best, last = "best.pth.tar", "last.pth.tar"
    assert [w[:2] for w in writes] == [(best, 1), (last, 1), (best, 2), (last, 2), (best, 3), (last, 3), (last, 4)]
    run = _cadence_run(cadence_machine, tiny_data, tmp_path / "cadence", "--save_every_min", "2.5")
    # epoch ends at 80, 160, 240, 320 s: 160 s is the first 150 s after the start, then only the end;
    # epoch 3's new best waits in memory and is written with the end
    assert writes == [
        ("best.pth.tar", 2, 0, 2),
        ("last.pth.tar", 2, 0, 2),
        ("best.pth.tar", 3, 0, 3),
        ("last.pth.tar", 4, 0, 3),
    ]
    strip = [{k: v for k, v in r.items() if k not in TIMING} for r in _rows(run)]
    assert strip == [{k: v for k, v in r.items() if k not in TIMING} for r in _rows(reference)]
    for name in ("best.pth.tar", "last.pth.tar"):
        assert same_weights(run / name, reference / name)
    assert json.loads((run / "best_results.json").read_text())["best_epoch"] == 3
    assert "--save_every_min 2.5: checkpoints every 2.5 min" in (run / "log.txt").read_text()


@pytest.mark.parametrize("where, at", [("eval", 3), ("update", 28)])
def test_a_signal_under_a_cadence_writes_what_the_disk_lacks_and_resumes_exactly(
    tiny_data, tmp_path, cadence_machine, where, at
):
    """SIGINT in epoch 3's evaluation (its end not due: the disk holds epoch 2) or mid-epoch 4 (epoch 3
    not written): the best waiting and the position are written, and the resumed run ends as an
    uninterrupted one (with the checkpoint every epoch)."""
    writes, interrupt = cadence_machine.writes, cadence_machine.interrupt
    reference = _cadence_run(cadence_machine, tiny_data, tmp_path / "every")
    interrupt[where] = at
    with pytest.raises(SystemExit) as stop:
        _cadence_run(cadence_machine, tiny_data, tmp_path / "cadence", "--save_every_min", "2.5")
    assert stop.value.code == 128 + signal.SIGINT
    position = (3, 0) if where == "eval" else (3, 4)
    assert writes == [
        ("best.pth.tar", 2, 0, 2),
        ("last.pth.tar", 2, 0, 2),
        ("best.pth.tar", 3, 0, 3),
        ("last.pth.tar", *position, 3),
    ]
    run = next((tmp_path / "cadence").iterdir())
    interrupt.clear()
    writes.clear()
    main.main(["--resume", str(run)])
    assert writes == [("last.pth.tar", 4, 0, 3)]
    strip = [{k: v for k, v in r.items() if k not in TIMING} for r in _rows(run)]
    assert strip == [{k: v for k, v in r.items() if k not in TIMING} for r in _rows(reference)]
    for name in ("best.pth.tar", "last.pth.tar"):
        assert same_weights(run / name, reference / name)
    assert (run / "best_test_preds.csv").read_text() == (reference / "best_test_preds.csv").read_text()
