"""Compare training runs: one table row per run (its --name too), the seeds of one configuration
grouped (mean ± std), and their val curves overlaid.

    python report.py checkpoints/ [more folders...] [--output_dir DIR]

Each folder given is a run folder, or is searched for run folders (a sweep's folder, checkpoints/).
Reads each run's best_results.json, config.yaml and metrics.csv; folders that are not finished runs
are skipped with a note. Runs whose configurations differ only in --seed (and in where they ran:
the options that may change on resume, --name and --tags among them) and that trained on the same
dataset are one configuration. The dataset is known by what it holds (best_results.json's
`dataset`: its format, class list and split sizes, digested), not by its path; runs of the same
recipe on other datasets are kept apart, and the report says which.
Writes report.md (sorted by val top-1) and report_val_top1.png / report_val_loss.png into
--output_dir (default: reports/<timestamp>/, never the repository root).
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
from datetime import datetime
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import yaml  # noqa: E402

from tin.config.schema import RESOLVED_KEY, may_change_on_resume  # noqa: E402
from tin.run import page  # noqa: E402
from tin.sweep import experiments  # noqa: E402

COLUMNS = [
    "run",
    "name",
    "seed",
    "data",
    "arch",
    "params",
    "gflops",
    "epochs",
    "val_top1",
    "val_top5",
    "wall_time_s",
    "images_per_s",
]


def load_run(run: Path) -> dict | None:
    files = [run / "best_results.json", run / "metrics.csv", run / "config.yaml"]
    if not all(f.is_file() for f in files):
        return None
    best = json.loads(files[0].read_text())
    rows = list(csv.DictReader(open(files[1])))
    cfg = yaml.safe_load(files[2].read_text())
    speeds = [float(r["images_per_second"]) for r in rows if r.get("images_per_second")]
    data = dataset_of(best, cfg)
    return {
        "run": run.name,
        "name": best.get("name") or cfg.get("name") or cfg.get("arch"),
        "seed": cfg.get("seed"),
        "data": data["label"],
        "evaluated_on": evaluated_on(cfg),
        "_config": configuration(cfg, data["key"]),
        "_recipe": configuration(cfg),
        "_data": data,
        "arch": best.get("arch", cfg.get("arch")),
        "params": best.get("params"),
        "gflops": best.get("gflops"),
        "epochs": best.get("epochs_run"),
        "val_top1": best.get("val_top1"),
        "val_top5": best.get("val_top5"),
        "wall_time_s": best.get("wall_time_seconds"),
        "images_per_s": round(sum(speeds) / len(speeds), 1) if speeds else None,
        "_rows": rows,
    }


def evaluated_on(cfg: dict) -> str:
    """Where a run's val figures come from: val, a held-out part of train (a search's trials), none."""
    if cfg.get("trainval"):
        return "none (train + val)"
    return f"held-out {cfg['val_split']:.0%} of train" if cfg.get("val_split") else "val"


# options that may change on resume (where a run runs) but decide what a new run computes
STARTS_FROM = ("pretrained", "pretrained_path")


def configuration(cfg: dict, dataset: str | None = None) -> str:
    """What a run computed, less its seed: the options that may not change on resume, the weights
    it started from, and (given) its dataset's identity."""
    free = (may_change_on_resume() | {"seed", RESOLVED_KEY}) - set(STARTS_FROM)
    key = {k: v for k, v in cfg.items() if k not in free}
    if dataset is not None:
        key["dataset identity"] = dataset
    return json.dumps(key, sort_keys=True, default=str)


def dataset_of(best: dict, cfg: dict) -> dict:
    """The run's dataset: its identity from best_results.json; a run written before that field was
    known only by its data_dir, and says so in its label."""
    data = best.get("dataset")
    if isinstance(data, dict) and data.get("digest"):
        label = f"{data['kind']}, {data['classes']} classes, {data['train']:,} train ({data['digest'][:6]})"
        return {"key": data["digest"], "label": label}
    path = str(cfg.get("data_dir", "?"))
    return {"key": f"path {path}", "label": f"{path} (by path: an older run)"}


def kept_apart(runs: list[dict]) -> list[str]:
    """One line per recipe run on more than one dataset: those runs were not grouped together."""
    by_recipe: dict[str, dict[str, list[str]]] = {}
    for r in runs:
        by_recipe.setdefault(r["_recipe"], {}).setdefault(r["data"], []).append(r["run"])
    lines = []
    for datasets in by_recipe.values():
        if len(datasets) > 1:
            parts = [f"{label}: {', '.join(sorted(names))}" for label, names in sorted(datasets.items())]
            lines.append("- the same recipe on other datasets, not grouped: " + "; ".join(parts))
    return lines


def seed_groups(runs: list[dict]) -> list[dict]:
    """Per configuration with more than one run: its runs' mean ± std (experiments.group_rows), named
    after its runs (a sweep's _s<seed> suffix dropped)."""
    by_config: dict[str, list[dict]] = {}
    for r in runs:
        by_config.setdefault(r["_config"], []).append(r)
    rows, labels = [], set()
    for members in by_config.values():
        if len(members) < 2:
            continue
        label = sorted(re.sub(r"_s\d+$", "", str(m["name"])) for m in members)[0]
        while label in labels:
            label += "'"
        labels.add(label)
        for m in members:
            rows.append(
                {
                    "group": label,
                    "status": "ok",
                    "seed": m["seed"],
                    "val_top1": m["val_top1"],
                    "val_top5": m["val_top5"],
                    "wall_time_seconds": m["wall_time_s"],
                }
            )
    return experiments.group_rows(rows)


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.2f}"
    if isinstance(value, int) and value > 10_000:
        return f"{value:,}"
    return str(value)


def write_report(runs: list[dict], out_dir: Path, skipped: list[str]) -> Path:
    runs = sorted(runs, key=lambda r: -(r["val_top1"] if r["val_top1"] is not None else -1))
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = ["# Runs compared", "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cell(r[c]) for c in COLUMNS) + " |" for r in runs]
    groups = seed_groups(runs)
    if groups:
        lines += ["", "## Configurations run with several seeds (val top-1 and top-5: mean ± std)", ""]
        lines += experiments.markdown_table(groups, experiments.GROUP_COLUMNS)
    apart = kept_apart(runs)
    if apart:
        lines += ["", "## Kept apart", "", *apart]
    lines += ["", "![val top-1](report_val_top1.png)", "", "![val loss](report_val_loss.png)"]
    if skipped:
        lines += ["", "Skipped (not finished runs): " + ", ".join(skipped)]
    for key in ("val_top1", "val_loss"):
        fig, ax = plt.subplots(figsize=(8, 5))
        for r in runs:
            xs = [float(row["epoch"]) for row in r["_rows"] if row.get(key)]
            ys = [float(row[key]) for row in r["_rows"] if row.get(key)]
            ax.plot(xs, ys, label=f"{r['run']} ({r['arch']})" if r["name"] in r["run"] else f"{r['run']} ({r['name']})")
        ax.set(xlabel="epoch", ylabel=key.replace("_", " "), title=f"{key.replace('_', ' ')} per epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out_dir / f"report_{key}.png", dpi=110)
        plt.close(fig)
    report = out_dir / "report.md"
    report.write_text("\n".join(lines) + "\n")
    write_page(runs, out_dir, skipped)
    return report


def write_page(runs: list[dict], out_dir: Path, skipped: list[str]) -> Path:
    """out_dir/index.html: the table (sortable) and the overlaid curves on one self-contained page."""

    sections = [
        ("Runs (click a column to sort)", page.table(runs, COLUMNS, "runs")),
        ("val top-1 per epoch", page.figure(out_dir / "report_val_top1.png", "val top-1")),
        ("val loss per epoch", page.figure(out_dir / "report_val_loss.png", "val loss")),
    ]
    if skipped:
        sections.append(("Skipped (not finished runs)", f"<p>{', '.join(skipped)}</p>"))
    return page.write_page(out_dir / "index.html", f"{len(runs)} runs compared", sections)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Compare training runs (one row per run, overlaid val curves).")
    p.add_argument("runs", nargs="+", help="run folders, or folders holding them (checkpoints/, a sweep's folder)")
    p.add_argument(
        "--out",
        "--output_dir",
        dest="output_dir",
        default=None,
        help="where report.md and the plots go (default: reports/<timestamp>)",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    runs, skipped = [], []
    for path in (r for given in map(Path, args.runs) for r in find_runs(given)):
        run = load_run(path)
        (runs.append(run) if run else skipped.append(path.name))
    if not runs:
        print(
            f"error: none of {len(args.runs)} folder(s) is a finished run (best_results.json, metrics.csv, "
            "config.yaml)",
            file=sys.stderr,
        )
        return 1
    out = Path(args.output_dir or f"reports/{datetime.now():%Y-%m-%d_%H-%M-%S}")
    report = write_report(runs, out, skipped)
    print(report.read_text())
    print(f"written: {report}")
    return 0


def find_runs(path: Path) -> list[Path]:
    """`path` itself when it is a run folder (it has config.yaml), else every run folder below it,
    at any depth (a sweep's runs sit two levels down)."""
    if (path / "config.yaml").is_file() or not path.is_dir():
        return [path]
    return sorted(p.parent for p in path.rglob("config.yaml") if p.parent != path) or [path]  # none: said skipped


if __name__ == "__main__":
    sys.exit(main())
