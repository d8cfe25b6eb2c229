"""sweep.py PRESET --search N: a hyperparameter search that never chooses on val.

    python sweep.py configs/X.yaml --search 12 --set time_budget=2 [--space FILE] [--seeds 3] [--baseline]

- The study: Optuna, TPE sampling, in SWEEP/study.db (SQLite). The same command again resumes it:
  finished trials are kept, a trial the interruption cut short continues its run (main.py --resume).
  `optuna-dashboard sqlite:///SWEEP/study.db` shows it.
- A trial: one main.py run (SWEEP/trials/trial_NNN/) of the preset with the trial's values, under
  the preset's --time_budget, trained on train less a stratified held-out part (--val_split, 0.1 by
  default) which is all it is evaluated on: with --val_split the dataset's val split is not even
  listed (tin.data.readers.read_dataset(val=False)). Its held-out top-1 per epoch goes to the pruner
  (median or successive halving), which may stop it (SIGINT: it saves and exits; state PRUNED).
- The space: a small YAML (--space FILE): per main.py option a range {low, high[, log, step]}, a
  list of choices or a fixed value; without one, a space around the preset (default_space).
- The answer: the best trial's configuration retrained on all of train (--val_split 0), --seeds
  times, evaluated on val once, after the last epoch (--eval_every 0, no --patience: nothing is
  chosen on val); --baseline retrains the preset as it is the same way. SWEEP/search.md: the trials,
  the best parameters, their importances, the retrained figures (mean ± std); trials.csv,
  search.png, best.yaml (the best configuration as a preset), summary.md (the retrained runs).
"""

from __future__ import annotations

import argparse
import csv
import json
import threading
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import yaml

import arch
from tin import optim
from tin.config.cli import config_from, load_yaml_defaults
from tin.config.schema import Config, base_type, may_change_on_resume
from tin.sweep import experiments
from utils import UserError, with_guess

STUDY = "search"
DEFAULT_HOLDOUT = 0.1
# Options that are not a trial's to choose: where a run goes and how it is named, what it is chosen on.
NOT_SEARCHED = {"seed", "val_split", "trainval", "name", "tags", "output_dir", "resume"}


@dataclass(frozen=True)
class Dim:
    """One searched option: a range (low, high; log-uniform with log) or choices."""

    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple | None = None


@dataclass
class Search:
    """What a search runs (its plan: the preset, the space, the held-out share, the trials), checked
    whole before anything is written. Not a tin.plan.budget.Plan, which is a run's length."""

    preset: str
    base: dict[str, Any]  # the preset with --set
    origins: dict[str, str]
    space: dict[str, Any]  # option -> Dim, or a fixed value
    holdout: float
    seed: int
    n_trials: int


# --------------------------------------------------------------------------- the space
def parse_space(raw: Any, where: str) -> dict[str, Any]:
    """A space file's mapping -> {option: Dim or a fixed value}; mistakes name the file and the key."""
    if not isinstance(raw, dict) or not raw:
        raise UserError(f"{where}: a search space is a mapping of option: range, choices or value")
    known = {f.name: f for f in fields(Config)}
    space: dict[str, Any] = {}
    for key, spec in raw.items():
        if key not in known:
            raise UserError(f"{where}: unknown option {with_guess(key, known)}")
        if key in NOT_SEARCHED or key in may_change_on_resume():
            raise UserError(
                f"{where}: {key} is not a hyperparameter a search may choose (it says where a run goes, what it "
                "is named, or what it is chosen on); set it in the preset or with --set"
            )
        kind = base_type(known[key])
        if isinstance(spec, list):
            if not spec:
                raise UserError(f"{where}: {key}: give at least one choice")
            space[key] = Dim(choices=tuple(spec))
        elif isinstance(spec, dict):
            space[key] = _range(key, spec, kind, where)
        else:
            space[key] = spec
    return space


def _range(key: str, spec: dict, kind: str, where: str) -> Dim:
    usage = f"{where}: {key}: a range is {{low: A, high: B}}, optionally log: true (log-uniform) or step: S"
    if set(spec) - {"low", "high", "log", "step"} or not {"low", "high"} <= set(spec):
        raise UserError(f"{usage} (got {spec})")
    if kind not in ("int", "float"):
        raise UserError(f"{where}: {key} is not a number: give a list of choices, e.g. {key}: [a, b]")
    try:
        low, high = float(spec["low"]), float(spec["high"])
        step = float(spec["step"]) if spec.get("step") is not None else None
    except (TypeError, ValueError):
        raise UserError(f"{usage} (got {spec})") from None
    log = bool(spec.get("log", False))
    if not low < high or (log and low <= 0) or (log and step) or (step is not None and step <= 0):
        raise UserError(f"{usage}, low < high, low > 0 with log, and not log and step together (got {spec})")
    if kind == "int" and not (low.is_integer() and high.is_integer() and (step or 1).is_integer()):
        raise UserError(f"{where}: {key} is a whole number: give whole low, high and step (got {spec})")
    return Dim(low, high, log, step)


def default_space(cfg: Config) -> dict[str, Any]:
    """Around the preset: learning rate ÷4..×4 and weight decay ÷10..×4 (log-uniform), label
    smoothing 0-0.2, augmentation strength 0.25-1, the mixing probability (when the preset mixes)
    and drop-path (when the model has it) uniform. An automatic learning rate is the recipe's, per
    256 images as auto applies it."""
    space: dict[str, Any] = {}
    lr = cfg.lr_base
    if lr is None:
        recipe = optim.lr_recipe(arch.resolve(cfg.arch).lr_group, cfg.pretrained or bool(cfg.pretrained_path), cfg.opt)
        lr = recipe.lr_per_256 * (cfg.lr_scale_batch or 256) / 256
        if not cfg.lr_scale_batch:
            space["lr_scale_batch"] = 256  # the rate is per 256 images, as the recipe's
    wd = cfg.weight_decay or (5e-4 if cfg.opt == "sgd" else 0.05)
    space.update(
        lr_base=Dim(lr / 4, lr * 4, log=True),
        weight_decay=Dim(wd / 10, wd * 4, log=True),
        label_smoothing=Dim(0.0, 0.2),
        aug_strength=Dim(0.25, 1.0),
    )
    if cfg.mix_prob > 0 and (cfg.mixup_alpha > 0 or cfg.cutmix_alpha > 0):
        space["mix_prob"] = Dim(0.0, 1.0)
    if not arch.unused_knobs(cfg.arch, drop_path_rate=0.1):
        space["drop_path_rate"] = Dim(0.0, 0.3)
    return space


def suggest(trial, space: dict[str, Any]) -> dict[str, Any]:
    """The trial's values of the searched options (an enqueued trial gets its own back)."""
    params = {}
    for key, dim in space.items():
        if not isinstance(dim, Dim):
            continue
        if dim.choices is not None:
            params[key] = trial.suggest_categorical(key, list(dim.choices))
        elif base_type(next(f for f in fields(Config) if f.name == key)) == "int":
            params[key] = trial.suggest_int(key, int(dim.low), int(dim.high), step=int(dim.step or 1), log=dim.log)
        else:
            params[key] = trial.suggest_float(key, dim.low, dim.high, step=dim.step, log=dim.log)
    return params


def corners(space: dict[str, Any]) -> list[dict[str, Any]]:
    """The space's extremes (every range at its low end, then its high end; first and last choices)."""
    ends = []
    for end in (0, -1):
        ends.append(
            {
                k: (d.choices[end] if d.choices is not None else (d.low, d.high)[end]) if isinstance(d, Dim) else d
                for k, d in space.items()
            }
        )
    for values in ends:  # whole numbers stay whole
        for k, v in values.items():
            if isinstance(space[k], Dim) and space[k].choices is None and float(v).is_integer():
                f = next(f for f in fields(Config) if f.name == k)
                values[k] = int(v) if base_type(f) == "int" else float(v)
    return ends


# --------------------------------------------------------------------------- preparing
def prepare(preset: str, sets: dict, args: argparse.Namespace, sweep_dir: Path) -> Search:
    """The search's plan, refused before anything is written when it could choose on val or when
    the space's extremes make an invalid configuration."""
    try:
        import optuna  # noqa: F401 - needed from here on: say so before anything is written
    except ImportError:
        raise UserError("--search needs optuna: pip install optuna==5.0.0 (as in requirements.txt)") from None
    values = load_yaml_defaults(preset)
    origins = {**dict.fromkeys(values, preset), **dict.fromkeys(sets, "--set")}
    base = {**values, **sets}
    base.pop("output_dir", None)
    if base.get("trainval"):
        raise UserError(
            f"--search with --trainval ({origins['trainval']}): trials choose on a held-out part of train, and "
            "--trainval would train on val; drop it (the best configuration is retrained on all of train anyway)"
        )
    holdout = args.val_split if args.val_split is not None else (base.get("val_split") or DEFAULT_HOLDOUT)
    if not 0 < holdout < 1:
        raise UserError(f"--val_split {holdout}: trials need a held-out part of train to choose on, in (0, 1)")
    cfg = _checked(base, origins, preset)
    if args.space:
        path = Path(args.space)
        if not path.is_file():
            raise UserError(f"--space {path} does not exist; see configs/spaces/example.yaml for the format")
        try:
            raw = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise UserError(f"--space {path} is not valid YAML: {exc}".replace("\n", " ")) from None
        space = parse_space(raw, str(path))
    else:
        space = default_space(cfg)
    for corner in corners(space):
        _checked({**base, **corner, "val_split": holdout}, {**origins, **dict.fromkeys(corner, "--space")}, preset)
    seed = int(base.get("seed", cfg.seed))
    return Search(preset, base, origins, space, float(holdout), seed, args.search)


def _checked(values: dict, origins: dict, preset: str) -> Config:
    try:
        return config_from(values, origins)
    except UserError as exc:
        raise UserError(f"--search {preset}: {exc}") from None


# --------------------------------------------------------------------------- the study
def _pruner(kind: str, n_trials: int):
    import optuna

    if kind == "median":  # a trial below the median of the finished trials at the same epoch stops
        return optuna.pruners.MedianPruner(n_startup_trials=max(1, min(5, n_trials // 4)), n_warmup_steps=0)
    if kind == "halving":  # rungs at epochs 1, 3, 9...: the best third go on
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3)
    return optuna.pruners.NopPruner()


PRUNERS = ("median", "halving", "none")  # sweep.py --pruner; built by _pruner


def open_study(plan: Search, sweep_dir: Path, pruner: str):
    """The study in SWEEP/study.db: new, or the one this command made before (what it computes must
    be the same: a changed preset or space is a new search, in another folder; where it runs, such
    as --data_dir or --workers, may change)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # sweep.py prints a line per trial itself
    sampler = optuna.samplers.TPESampler(seed=plan.seed, n_startup_trials=max(2, min(10, plan.n_trials // 3)))
    storage = f"sqlite:///{(sweep_dir / 'study.db').resolve()}"
    study = optuna.create_study(
        study_name=STUDY,
        storage=storage,
        direction="maximize",
        sampler=sampler,
        pruner=_pruner(pruner, plan.n_trials),
        load_if_exists=True,
    )
    setup = json.loads(json.dumps(_setup(plan)))
    saved = study.user_attrs.get("setup")
    if saved is None:
        study.set_user_attr("setup", setup)
    elif saved != setup:
        changed = sorted(k for k in setup if setup[k] != saved.get(k))
        raise UserError(
            f"{sweep_dir / 'study.db'} holds a search with other settings ({', '.join(changed)} differ); the same "
            "command resumes it, a new search needs another --sweep_dir"
        )
    return study


def _setup(plan: Search) -> dict:
    space = {
        k: ({k2: v2 for k2, v2 in asdict(d).items() if v2 is not None} if isinstance(d, Dim) else d)
        for k, d in plan.space.items()
    }
    computed = {k: v for k, v in plan.base.items() if k not in may_change_on_resume()}  # where it runs may change
    return {"preset": plan.preset, "base": computed, "space": space, "val_split": plan.holdout}


def recover(study) -> None:
    """Trials an interrupted sweep left: a RUNNING one (its sweep died; the folder's lock says none
    runs now) becomes FAIL, marked interrupted; each interrupted trial is queued again with its
    values, to continue its run where it stopped (or start again when it never saved)."""
    from optuna.trial import TrialState

    storage = study._storage  # noqa: SLF001 - no public call ends a trial another process left; Optuna's fail_stale_trials does it so
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        storage.set_trial_user_attr(t._trial_id, "interrupted", True)  # noqa: SLF001
        storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL)  # noqa: SLF001
    trials = study.get_trials(deepcopy=False)
    queued = {t.user_attrs.get("resumes") for t in trials}
    for t in trials:
        if t.state == TrialState.FAIL and t.user_attrs.get("interrupted") and t.number not in queued:
            attrs: dict[str, Any] = {"resumes": t.number}
            run = t.user_attrs.get("run_dir")
            if run and (Path(run) / "last.pth.tar").is_file():
                attrs["resume_run"] = run
            study.enqueue_trial(t.params, user_attrs=attrs)


def counted(study) -> int:
    """Trials that count towards N: finished, pruned, or failed for a reason that would fail again."""
    from optuna.trial import TrialState

    return sum(
        t.state in (TrialState.COMPLETE, TrialState.PRUNED)
        or (t.state == TrialState.FAIL and not t.user_attrs.get("interrupted"))
        for t in study.get_trials(deepcopy=False)
    )


# --------------------------------------------------------------------------- running
def run(plan: Search, args: argparse.Namespace, sweep_dir: Path) -> int:
    """Search, write the results, retrain the best (and the baseline), write them again."""
    study = open_study(plan, sweep_dir, args.pruner)
    recover(study)
    todo = max(0, plan.n_trials - counted(study))
    print(
        f"search: {plan.n_trials} trials ({plan.n_trials - todo} done before), choosing on {plan.holdout:.0%} of "
        f"train held out (never on val); study {sweep_dir / 'study.db'}",
        flush=True,
    )
    if not plan.base.get("time_budget"):
        print("note: no --time_budget: each trial runs its --epochs (--set time_budget=MINUTES caps them)", flush=True)
    if todo:
        Trials(plan, study, sweep_dir, args).run(todo)
    write_results(plan, study, sweep_dir)
    if args.seeds == 0:
        print(f"search only (--seeds 0): results in {sweep_dir / 'search.md'}; val was not used", flush=True)
        return 0
    return retrain(plan, study, sweep_dir, args)


class Trials:
    """Runs trials `parallel` at a time: ask the study, run the trial's main.py, report its
    per-epoch held-out top-1, prune, tell."""

    def __init__(self, plan: Search, study, sweep_dir: Path, args: argparse.Namespace) -> None:
        self.plan, self.study, self.sweep_dir = plan, study, sweep_dir
        self.runner = experiments.Runner(sweep_dir, args.parallel, args.gpus)
        self.parallel, self.lock = max(1, args.parallel), threading.Lock()
        self.started = 0
        self.progress: experiments.Progress | None = None
        self.stopped_by: str | None = None  # the first trial's failure, when no trial had worked

    def run(self, todo: int) -> None:
        self.todo = todo
        self.progress = experiments.Progress(todo, self.parallel, label="held-out top-1")
        self.runner.each(self._worker, list(range(min(self.parallel, todo))))
        if self.stopped_by:
            raise UserError(self.stopped_by)

    def _give_up_if_nothing_worked(self, trial, why: str) -> None:
        """A failure before any trial worked would repeat in every trial (a budget too short, a bad
        option): stop the search (running trials save and resume next time) and say why."""
        from optuna.trial import TrialState

        worked = self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
        if not worked and self.stopped_by is None:
            self.stopped_by = (
                f"trial {trial.number} failed ({why}) before any trial worked; the search stops rather than fail "
                "every trial. Fix the cause; a changed preset or --set is a new search (another --sweep_dir)"
            )
            self.runner.stop()

    def _worker(self, _: int) -> None:
        while True:
            with self.lock:
                if self.runner.stopping.is_set() or self.started >= self.todo:
                    return
                self.started += 1
                trial = self.study.ask()
                params = suggest(trial, self.plan.space)
            self._trial(trial, params)

    def _trial(self, trial, params: dict) -> None:
        from optuna.trial import TrialState

        job, resume = self._job(trial, params)
        try:
            cfg = config_from(job.values, self._origins(params))
        except UserError as exc:
            self._tell(trial, TrialState.FAIL, error=str(exc))
            print(f"trial {trial.number}: not run: {exc}", flush=True)
            self._give_up_if_nothing_worked(trial, str(exc))
            return
        if resume is None:
            job.write()
        seen: dict[int, float] = {}  # epoch -> held-out top-1 reported
        how = f"resumes trial {trial.user_attrs['resumes']}" if "resumes" in trial.user_attrs else "started"
        shown = ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in params.items())
        outcome = self.runner.run(
            job,
            job.config.with_suffix(".log"),
            resume=resume,
            watch=self._watcher(trial, "ema_val_top1" if cfg.best_on == "ema" else "val_top1", seen),
            on_start=lambda gpu: self.progress.started(f"trial {trial.number}", f"{how} ({shown})", gpu),
        )
        self._finish(trial, outcome, seen, job.config.with_suffix(".log"))

    def _origins(self, params: dict) -> dict:
        return {**self.plan.origins, **dict.fromkeys(params, "--space")}

    def _job(self, trial, params: dict) -> tuple[experiments.Job, Path | None]:
        """The trial's run: the preset with the space's values, on train less the held-out part; a
        trial queued to continue an interrupted one resumes that one's run folder."""
        plan, name = self.plan, f"trial_{trial.number:03d}"
        fixed = {k: v for k, v in plan.space.items() if not isinstance(v, Dim)}
        values = {**plan.base, **fixed, **params, "val_split": plan.holdout, "seed": plan.seed, "name": name}
        values["no_analysis"] = True  # the plots would be of the held-out part: time better spent training
        resume = trial.user_attrs.get("resume_run")
        out = Path(resume).parent if resume else self.sweep_dir / "trials" / name
        job = experiments.Job(
            name, name, {**values, "output_dir": str(out)}, out.with_suffix(".yaml"), plan.seed, params
        )
        return job, Path(resume) if resume else None

    def _watcher(self, trial, key: str, seen: dict[int, float]):
        """Reads the trial's metrics.csv as it grows: each epoch's held-out top-1 to the study; True
        (stop the run) when the pruner says so."""

        def watch(run: Path | None) -> bool:
            if run is None:
                return False
            with self.lock:
                if trial.user_attrs.get("run_dir") != str(run):
                    trial.set_user_attr("run_dir", str(run))
            for row in experiments.metric_rows(run):
                epoch = int(float(row.get("epoch") or 0))
                if not row.get(key) or epoch in seen:
                    continue
                seen[epoch] = float(row[key])
                with self.lock:
                    trial.report(seen[epoch], epoch)
                    if trial.should_prune():
                        return True
            return False

        return watch

    def _finish(self, trial, outcome: experiments.Outcome, seen: dict[int, float], log: Path) -> None:
        """Tell the study how the trial ended: complete (its best held-out top-1), pruned, interrupted
        (queued again next time) or failed (with the run's error line)."""
        from optuna.trial import TrialState

        value, status = experiments.results(outcome.run).get("val_top1"), outcome.status
        if status == "ok" and value is None:
            status = "failed (no held-out figure)"
        why = experiments.last_error(log) if status.startswith("failed") else ""
        with self.lock:
            trial.set_user_attr("seconds", round(outcome.seconds, 1))
        if status == "ok":
            self._tell(trial, TrialState.COMPLETE, value=value)
        elif status == "pruned":
            self._tell(trial, TrialState.PRUNED)
            value = seen[max(seen)] if seen else None
        elif status == "interrupted":
            self._tell(trial, TrialState.FAIL, interrupted=True)
        else:
            self._tell(trial, TrialState.FAIL, error=f"{status}: {why}")
        self.progress.ended(f"trial {trial.number}", status, value, outcome.seconds, why)
        if status.startswith("failed"):
            self._give_up_if_nothing_worked(trial, f"{why}; see {log}")

    def _tell(self, trial, state, value: float | None = None, **attrs: Any) -> None:
        with self.lock:
            for k, v in attrs.items():
                trial.set_user_attr(k, v)
            self.study.tell(trial, value if state.name == "COMPLETE" else None, state=state)


# --------------------------------------------------------------------------- the answer
def best_values(plan: Search, params: dict) -> dict:
    """The best trial's configuration for a retrain: all of train, val evaluated once, at the end."""
    fixed = {k: v for k, v in plan.space.items() if not isinstance(v, Dim)}
    return {**plan.base, **fixed, **params, **RETRAIN}


RETRAIN = {"val_split": 0.0, "eval_every": 0, "patience": 0}  # all of train; val once, after the last epoch


def retrain(plan: Search, study, sweep_dir: Path, args: argparse.Namespace) -> int:
    """The best trial retrained on all of train with --seeds seeds (and --baseline: the preset as it
    is, the same way), each reported once on val; summary.md and search.md say the figures."""
    from optuna.trial import TrialState

    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        raise UserError(f"no trial finished (all pruned or failed; see {sweep_dir / 'search.md'}): nothing to retrain")
    best = study.best_trial
    configs = [(f"best-trial{best.number}", best_values(plan, best.params))]
    if args.baseline:
        configs.append(("baseline", {**plan.base, **RETRAIN}))
    jobs = []
    for group, values in configs:
        for seed in experiments.seed_list(plan.seed, args.seeds):
            name = f"{group}_s{seed}" if args.seeds > 1 else group
            out = sweep_dir / "final" / name
            run_values = {**values, "seed": seed, "name": name, "output_dir": str(out)}
            jobs.append(experiments.Job(name, group, run_values, out.with_suffix(".yaml"), seed))
    for job in jobs:
        job.write()
    print(f"retraining on all of train, reported once on val: {', '.join(j.name for j in jobs)}", flush=True)
    rows = experiments.run_jobs(jobs, sweep_dir, args.parallel, args.gpus)
    experiments.write_summary(rows, sweep_dir, title=f"Search: {plan.preset}, retrained on all of train")
    write_results(plan, study, sweep_dir, rows)
    print((sweep_dir / "search.md").read_text())
    print(f"results: {sweep_dir / 'search.md'}", flush=True)
    return 0 if all(r["status"] == "ok" for r in rows) else 1


def write_results(plan: Search, study, sweep_dir: Path, final: list[dict] | None = None) -> None:
    """search.md (setup, best trial, importances, the trials, the retrained figures), trials.csv,
    best.yaml and search.png."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    keys = list(dict.fromkeys(k for t in trials for k in t.params))
    rows = [_trial_row(t, keys) for t in trials]
    with open(sweep_dir / "trials.csv", "w", newline="") as fh:
        writer = csv.DictWriter(
            fh, fieldnames=["trial", "state", "held_out_top1", "epochs", "seconds", *keys, "run_dir"]
        )
        writer.writeheader()
        writer.writerows(rows)
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    lines = [
        f"# Search: {plan.preset}",
        "",
        f"{len(trials)} trials ({_states(trials)}); each trained on train less a stratified {plan.holdout:.0%} held "
        f"out (seed {plan.seed}) and chose on that part, never on val; "
        f"{'--time_budget ' + str(plan.base['time_budget']) + ' min' if plan.base.get('time_budget') else 'no time budget'} "
        f"per trial. The study: `{sweep_dir / 'study.db'}` (`optuna-dashboard sqlite:///{sweep_dir / 'study.db'}`).",
        "",
    ]
    if done:
        best = study.best_trial
        (sweep_dir / "best.yaml").write_text(
            f"# The best trial of {sweep_dir} (trial {best.number}, held-out top-1 {best.value:.2f} %), as a preset:\n"
            "# all of train, val evaluated once after the last epoch. python main.py --config best.yaml\n"
            + yaml.safe_dump(best_values(plan, best.params), sort_keys=False)
        )
        lines += [f"## Best trial: {best.number}, held-out top-1 {best.value:.2f} %", ""]
        lines += experiments.markdown_table(
            [{"option": k, "value": v} for k, v in best.params.items()], ["option", "value"]
        )
        lines += ["", f"As a preset: `{sweep_dir / 'best.yaml'}`.", "", "## Parameter importances", ""]
        lines += _importances(study)
    lines += ["", "## Trials", ""]
    lines += experiments.markdown_table(rows, ["trial", "state", "held_out_top1", "epochs", "seconds", *keys])
    if final:
        lines += ["", "## Retrained on all of train, reported once on val (mean ± std over seeds)", ""]
        lines += experiments.markdown_table(experiments.group_rows(final), experiments.GROUP_COLUMNS)
    lines += ["", "![the search](search.png)"]
    (sweep_dir / "search.md").write_text("\n".join(lines) + "\n")
    plot_search(trials, sweep_dir / "search.png")


def _trial_row(t, keys: list[str]) -> dict:
    inter = t.intermediate_values
    value = t.value if t.value is not None else (max(inter.values()) if inter else None)
    return {
        "trial": t.number,
        "state": t.state.name.lower() + (" (interrupted)" if t.user_attrs.get("interrupted") else ""),
        "held_out_top1": value,
        "epochs": max(inter) if inter else "",
        "seconds": t.user_attrs.get("seconds", ""),
        **{k: t.params.get(k, "") for k in keys},
        "run_dir": t.user_attrs.get("run_dir", ""),
    }


def _states(trials) -> str:
    counts: dict[str, int] = {}
    for t in trials:
        counts[t.state.name.lower()] = counts.get(t.state.name.lower(), 0) + 1
    return ", ".join(f"{n} {s}" for s, n in counts.items())


FEW_TRIALS = 20  # below this many finished trials, importances come with a caveat


def _importances(study) -> list[str]:
    """Optuna's parameter importances (fANOVA over the finished trials), or why there are none."""
    import warnings

    import optuna

    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        try:
            found = optuna.importance.get_param_importances(study)
        except (RuntimeError, ValueError) as exc:
            return [f"Not computed: {exc}"]
    if not found:
        return ["Not computed: fewer than two finished trials, or no searched option varied."]
    notes = [f"Optuna: {w.message}" for w in said if issubclass(w.category, UserWarning)]
    if any("will be equal" in n for n in notes):  # a table of equal shares would look like a finding
        return [f"Not computed: {' '.join(notes)}"]
    table = [{"option": k, "importance": round(v, 3)} for k, v in found.items()]
    finished = sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    if finished < FEW_TRIALS:  # fANOVA on a handful of points is mostly noise: say so beside the table
        notes.insert(
            0, f"From {finished} finished trials only: a rough hint, not a finding (tens of trials make it one)."
        )
    return experiments.markdown_table(table, ["option", "importance"]) + ([""] + notes if notes else [])


def plot_search(trials, path: Path) -> None:
    """Left: each trial's held-out top-1 (pruned ones at their last figure) and the best so far.
    Right: every trial's per-epoch held-out top-1, pruned ones dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    from optuna.trial import TrialState

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    best, xs, bests = None, [], []
    for t in trials:
        inter = t.intermediate_values
        if t.state == TrialState.COMPLETE:
            left.scatter(t.number, t.value, color="tab:blue", zorder=3)
            best = t.value if best is None else max(best, t.value)
        elif t.state == TrialState.PRUNED and inter:
            left.scatter(t.number, inter[max(inter)], marker="x", color="tab:gray", zorder=3)
        if best is not None:
            xs.append(t.number)
            bests.append(best)
        if inter:
            steps = sorted(inter)
            pruned = t.state == TrialState.PRUNED
            right.plot(steps, [inter[s] for s in steps], "--" if pruned else "-", alpha=0.5 if pruned else 0.9)
    left.step(xs, bests, where="post", color="tab:orange", label="best so far")
    left.set(xlabel="trial", ylabel="held-out top-1 (%)", title="trials (x: pruned, at its last figure)")
    left.legend(fontsize=8)
    right.set(xlabel="epoch", ylabel="held-out top-1 (%)", title="per epoch (dashed: pruned)")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))  # trials and epochs are whole
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
