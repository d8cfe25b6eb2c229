"""Run experiments and tabulate them: presets, a grid over their values and seeds, or a
hyperparameter search that never chooses on val.

    python sweep.py configs/seed000_*.yaml [--parallel 2] [--set epochs=5 --set data_dir=...]
    python sweep.py configs/demo.yaml --grid lr_base=1e-3,2e-3 weight_decay=0.05,0.1 --seeds 3
    python sweep.py configs/demo.yaml --search 12 --set time_budget=2 [--space FILE] [--seeds 3 --baseline]

Presets and grids: each run (preset x grid values x seed) is its own `python main.py --config
SWEEP/<name>.yaml` process, logging to SWEEP/<name>.log, its run folder SWEEP/<name>/<time>_<name>/;
a failing run does not stop the others; a line as each run starts and ends, then the overall
progress. SWEEP/summary.md: per configuration the mean ± std of val top-1 over its seeds, then one
row per run (also summary.csv, summary_groups.csv). The same command again resumes the sweep:
finished runs are skipped, interrupted ones continue (SWEEP/manifest.json lists every run).
--search: see tin/sweep/search.py. Exit status 1 if any run failed, 130 when stopped (Ctrl-C).
"""

from __future__ import annotations

import argparse
import itertools
import sys
from dataclasses import fields
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from tin.config.cli import config_from, load_yaml_defaults
from tin.config.schema import Config
from tin.sweep import experiments, search
from utils import UserError

DEFAULT_SEED = next(f.default for f in fields(Config) if f.name == "seed")


def parse_sets(pairs: list[str]) -> dict:
    values = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise UserError(f"--set {pair!r}: expected key=value, e.g. --set epochs=5")
        values[key.strip()] = yaml.safe_load(raw)
    return values


def parse_grid(items: list[str]) -> dict[str, list[tuple[str, Any]]]:
    """--grid lr_base=1e-3,2e-3 wd=0.05 -> {key: [(text, value), ...]} (values read as YAML)."""
    grid: dict[str, list[tuple[str, Any]]] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key, texts = key.strip(), [v.strip() for v in raw.split(",")]
        if not sep or not key or not all(texts):
            raise UserError(f"--grid {item!r}: expected KEY=V1,V2,..., e.g. --grid lr_base=1e-3,2e-3")
        if key in grid:
            raise UserError(f"--grid names {key} twice; give all its values at once: {key}=A,B,C")
        grid[key] = [(t, yaml.safe_load(t)) for t in texts]
    return grid


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in text)


def expand(configs: list[str], sets: dict, grid: dict, seeds: int, sweep_dir: Path) -> list[experiments.Job]:
    """One job per preset x grid combination x seed, each configuration validated whole before any
    run starts: an error names the preset, the --set and --grid values and where each bad value came
    from. Nothing is written."""
    combos = list(itertools.product(*[[(k, t, v) for t, v in values] for k, values in grid.items()]))
    jobs, stems = [], set()
    for path in configs:
        preset = load_yaml_defaults(path)
        stem = Path(path).stem
        while stem in stems:
            stem += "_"
        stems.add(stem)
        for combo in combos:
            varied = {k: v for k, _, v in combo}
            group = _safe("_".join([stem, *(f"{k}-{t}" for k, t, _ in combo)]))
            cfg = _check(path, {**preset, **sets, **varied, "name": group}, preset, sets, combo)
            varied = {k: getattr(cfg, k) for k in varied}  # as the run reads them: '1e-3' is 0.001
            values = {**preset, **sets, **varied, "name": group}
            for seed in experiments.seed_list(values.get("seed", DEFAULT_SEED), seeds):
                name = f"{group}_s{seed}" if seeds > 1 else group
                run = {**values, "seed": seed, "name": name, "output_dir": str(sweep_dir / name)}
                jobs.append(experiments.Job(name, group, run, sweep_dir / f"{name}.yaml", seed, varied))
    return jobs


def _check(path: str, values: dict, preset: dict, sets: dict, combo: tuple) -> Config:
    origins = {**dict.fromkeys(preset, path), **dict.fromkeys(sets, "--set"), **{k: "--grid" for k, _, _ in combo}}
    try:
        return config_from({k: v for k, v in values.items() if k != "output_dir"}, origins)
    except UserError as exc:
        given = [f"--set {k}={v}" for k, v in sets.items()] + [f"--grid {k}={t}" for k, t, _ in combo]
        raise UserError(
            f"{path}{' with ' + ' '.join(given) if given else ''}: {exc}; change such a value in every preset "
            "with --set KEY=VALUE"
        ) from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Run main.py presets, grids over their values and seeds, or a hyperparameter search; "
        "tabulate the results. The same command again resumes a sweep."
    )
    p.add_argument("configs", nargs="+", help="YAML presets (see configs/); one with --search")
    p.add_argument(
        "--grid",
        nargs="+",
        action="extend",
        default=[],
        metavar="KEY=V1,V2",
        help="run every combination of these values (a cross product, over every preset)",
    )
    p.add_argument(
        "--seeds",
        type=int,
        default=1,
        help="runs per configuration, seeds S, S+1, ... from its --seed: the summary gives mean ± std over them; "
        "with --search: retrains of the best (0: search only)",
    )
    p.add_argument("--parallel", type=int, default=1, help="runs at the same time (GPUs taken round-robin)")
    p.add_argument(
        "--set",
        nargs="+",
        action="extend",
        default=[],
        metavar="KEY=VALUE",
        help="override keys in every config: --set epochs=5 workers=2 (repeatable, as --grid)",
    )
    p.add_argument("--sweep_dir", default=None, help="default: checkpoints/sweep_<timestamp>; again to resume")
    p.add_argument("--gpus", default=None, help="GPU ids to spread runs over, e.g. 0,1 (default: all visible)")
    s = p.add_argument_group("search (Optuna, TPE; README: Hyperparameter search)")
    s.add_argument("--search", type=int, default=0, metavar="N", help="search with N trials (in all, across resumes)")
    s.add_argument("--space", default=None, metavar="FILE.yaml", help="the search space (default: around the preset)")
    s.add_argument(
        "--pruner",
        default="median",
        choices=tuple(search.PRUNERS),
        help="stop trials whose per-epoch held-out top-1 falls behind: median, halving (successive halving), none",
    )
    s.add_argument(
        "--val_split",
        type=float,
        default=None,
        help="the stratified fraction of train that trials choose on (default: the preset's, else 0.1); never val",
    )
    s.add_argument(
        "--baseline", action="store_true", help="also retrain the preset as it is, the way the best is retrained"
    )
    return p


def check_args(args: argparse.Namespace) -> None:
    """Flags that do not go together, refused before anything is written."""
    if args.parallel < 1:
        raise UserError(f"--parallel must be >= 1 (got {args.parallel})")
    if args.search < 0:
        raise UserError(f"--search must be a number of trials >= 1 (got {args.search})")
    if not args.search:
        extra = [f for f, on in (("--space", args.space), ("--val_split", args.val_split is not None)) if on]
        extra += ["--baseline"] * args.baseline + ["--pruner"] * (args.pruner != "median")
        if extra:
            raise UserError(f"{', '.join(extra)} belong to --search N; for a grid's runs use --set val_split=F")
        if args.seeds < 1:
            raise UserError(f"--seeds must be >= 1 (got {args.seeds}; 0 is for --search: search only)")
        return
    if len(args.configs) != 1:
        raise UserError(f"--search tunes one preset (got {len(args.configs)}); run one search per preset")
    if args.grid:
        raise UserError("--search and --grid: choose one (a search space can give choices: --space FILE)")
    if args.seeds < 0:
        raise UserError(f"--seeds must be >= 0 (got {args.seeds})")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    sweep_dir = Path(args.sweep_dir or f"checkpoints/sweep_{datetime.now():%Y-%m-%d_%H-%M-%S}")
    try:
        check_args(args)
        sets = parse_sets(args.set)
        if args.search:
            plan = search.prepare(args.configs[0], sets, args, sweep_dir)  # checked whole before anything is written
            sweep_dir.mkdir(parents=True, exist_ok=True)
            with experiments.holding(sweep_dir):
                return search.run(plan, args, sweep_dir)
        jobs = expand(args.configs, sets, parse_grid(args.grid), args.seeds, sweep_dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        with experiments.holding(sweep_dir):
            for job in jobs:
                job.write()
            rows = experiments.run_jobs(jobs, sweep_dir, args.parallel, args.gpus)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"stopped: run the same command again to resume (sweep folder {sweep_dir})", file=sys.stderr)
        return 130
    experiments.write_summary(rows, sweep_dir)
    print((sweep_dir / "summary.md").read_text())
    print(f"summary: {sweep_dir / 'summary.md'} ({sweep_dir / 'summary.csv'})")
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
