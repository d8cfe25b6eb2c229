"""Same seed, same outputs: a commit's training against this checkout's, byte for byte where it must be.

    python -m bench.parity REF [--here REF2] [--data_dir data/demo-digits] [--work /tmp/parity]

Checks out REF (and REF2, else this checkout is the other side) in a git worktree and trains the
same small run in both trees (the demo config's
ResNet-18 on the digits dataset, 3 epochs, --deterministic on, one process): once uninterrupted,
once stopped (SIGINT, a Ctrl-C) right after update K, mid-epoch 2, and resumed with --resume. It then compares
with REF's: metrics.csv (every column but the seconds), the weights in best.pth.tar and
last.pth.tar, and best_test_preds.csv; and the resumed run against the uninterrupted one. Prints
one line per comparison and exits 1 when one differs. For a change that must not change what a run
computes (a refactor); a change that means to (a new draw of the augmentation) differs by design.
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file (python bench/X.py): the repository root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

ROOT = Path(__file__).resolve().parents[1]
RUN = ["--config", "configs/demo.yaml", "--time_budget", "0", "--epochs", "3", "--seed", "0"]
RUN += ["--warmup_epochs", "0"]  # learning from the first update: the weights move in every epoch
RUN += ["--deterministic", "on", "--workers", "0", "--wandb", "disabled", "--name", "parity"]
STOP_AFTER = 50  # updates: mid-epoch 2 (the digits' 1,074 training images make 33 per epoch at batch 32)
TIMING = ("seconds", "time", "_s", "wall", "fraction", "lr_at")  # columns that measure the machine


def train(tree: Path, data: Path, out: Path, interrupt: bool) -> Path:
    """One run in `tree` (a checkout), its folder under `out`; interrupted and resumed when asked."""
    cmd = [sys.executable, "main.py", *RUN, "--data_dir", str(data), "--output_dir", str(out)]
    if interrupt:
        stop = [sys.executable, "-m", "bench.interrupt_at", str(STOP_AFTER)]
        subprocess.run([*stop, *cmd[1:]], cwd=tree, capture_output=True, text=True)  # ends non-zero: stopped
    else:
        _check(subprocess.run(cmd, cwd=tree, capture_output=True, text=True), cmd)
    (run,) = [p for p in out.iterdir() if p.is_dir()]
    if interrupt:
        resume = [sys.executable, "main.py", "--resume", str(run)]
        _check(subprocess.run(resume, cwd=tree, capture_output=True, text=True), resume)
    return run


def _check(proc: subprocess.CompletedProcess, cmd: list[str]) -> None:
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")


def metrics(run: Path) -> list[dict]:
    with open(run / "metrics.csv", newline="") as fh:
        return [{k: v for k, v in row.items() if not any(t in k for t in TIMING)} for row in csv.DictReader(fh)]


def weights(path: Path) -> dict[str, torch.Tensor]:
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    return {k: v for k, v in ckpt["state_dict"].items() if isinstance(v, torch.Tensor)}


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def compare(a: Path, b: Path, what: str) -> list[tuple[str, bool]]:
    return [
        (f"{what}: metrics.csv (but the seconds)", metrics(a) == metrics(b)),
        (f"{what}: best.pth.tar weights", same_weights(a / "best.pth.tar", b / "best.pth.tar")),
        (f"{what}: last.pth.tar weights", same_weights(a / "last.pth.tar", b / "last.pth.tar")),
        (
            f"{what}: best_test_preds.csv",
            (a / "best_test_preds.csv").read_bytes() == (b / "best_test_preds.csv").read_bytes(),
        ),
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("ref", help="the commit to compare with (e.g. the last one before a refactor)")
    p.add_argument(
        "--data_dir", default="data/demo-digits", help="a small dataset (python demo_data.py makes this one)"
    )
    p.add_argument("--here", default=None, help="a commit for the other side (default: this checkout, as it is)")
    p.add_argument("--work", default="/tmp/parity", help="a folder for the worktree and the runs (emptied first)")
    args = p.parse_args()
    data, work = (ROOT / args.data_dir).resolve(), Path(args.work)
    if not (data / "train").is_dir():
        sys.exit(f"{data} holds no train/ folder: run `python demo_data.py --out {args.data_dir}` first")
    subprocess.run(["rm", "-rf", str(work)], check=True)
    subprocess.run(["git", "worktree", "prune"], cwd=ROOT, check=True)
    ref_tree, here_tree = work / "ref", (work / "here" if args.here else ROOT)
    for tree, ref in ((ref_tree, args.ref), (here_tree, args.here)):
        if ref:
            add = ["git", "worktree", "add", "--detach", str(tree), ref]
            subprocess.run(add, cwd=ROOT, check=True, capture_output=True)
    try:
        runs = {}
        for side, tree in (("ref", ref_tree), ("here", here_tree)):
            for interrupt in (False, True):
                name = f"{side}_{'resumed' if interrupt else 'whole'}"
                runs[name] = train(tree, data, work / name, interrupt)
                print(f"trained {name}: {runs[name]}", flush=True)
    finally:
        for tree in (ref_tree, work / "here"):
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, capture_output=True)
    here = args.here or "this checkout"
    rows = compare(runs["ref_whole"], runs["here_whole"], f"{args.ref} vs {here}")
    rows += compare(runs["ref_resumed"], runs["here_resumed"], f"{args.ref} vs {here}, stopped and resumed")
    rows += compare(runs["here_whole"], runs["here_resumed"], f"{here}: resumed vs uninterrupted")
    for what, ok in rows:
        print(f"{'same' if ok else 'DIFFERENT':9s} {what}")
    sys.exit(0 if all(ok for _, ok in rows) else 1)


if __name__ == "__main__":
    main()
