"""See what a model learned, and what a dataset holds.

    python analyze.py run checkpoints/RUN [--out DIR] [--tsne_samples 2000]
    python analyze.py dataset --data_dir data/tiny-imagenet-200 [--dataset tiny-imagenet] [--out DIR]

`run` (also done at the end of every training run) writes into the run folder: curves.png,
confusion_matrix.png (classes ordered so that confusions cluster) + top_confusions.csv,
features/{logits,labels,features}.pt, tsne.png, misclassified.png and per_class_accuracy.csv,
and logs the best and worst 10 classes. `dataset` writes size_distribution_histograms.png,
split_image_counts.png, class_balance.png, sample_grid.png and dataset_summary.json.
The analyses themselves are in tin/run/analysis.py.
"""

from __future__ import annotations

import argparse
import sys

from tin.run.analysis import analyze_dataset, analyze_run
from tin.run.folder import setup_logging
from tin.runtime import hardware
from utils import UserError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="what", required=True)
    r = sub.add_parser("run", help="analyse a trained run folder")
    r.add_argument("run_dir")
    r.add_argument("--out", "--output_dir", dest="output_dir", default=None, help="default: the run folder")
    r.add_argument("--tsne_samples", type=int, default=2000)
    r.add_argument("--workers", type=int, default=None)
    r.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="where the model runs")
    d = sub.add_parser("dataset", help="analyse a dataset folder")
    d.add_argument("--data_dir", default="data/tiny-imagenet-200")
    d.add_argument("--dataset", default="tiny-imagenet")
    d.add_argument("--out", "--output_dir", dest="output_dir", default="analysis", help="default: analysis/")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    try:
        if args.what == "run":
            device = hardware.resolve_device(args.device)
            analyze_run(args.run_dir, args.output_dir, args.tsne_samples, args.workers, device)
        else:
            analyze_dataset(args.dataset, args.data_dir, args.output_dir)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
