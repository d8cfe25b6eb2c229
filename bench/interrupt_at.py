"""Run a script that trains, delivering SIGINT to it right after its optimizer's update K, as a
user's Ctrl-C at that moment would (or another signal: KILL for a crash): resume checks that must stop mid-epoch whatever the machine's
speed (a timer fires too late on a fast GPU, too early on a slow CPU).

    python -m bench.interrupt_at K main.py [main.py flags...]
    python -m bench.interrupt_at K --signal KILL main.py ...     # a crash or an OOM kill at that update

Updates are counted by a global optimizer step hook (torch's register_optimizer_step_post_hook),
so nothing in the toolkit is patched: its own signal handler sees a real signal.
"""

from __future__ import annotations

import os
import runpy
import signal
import sys
from pathlib import Path

from torch.optim.optimizer import register_optimizer_step_post_hook

if __package__ in (None, ""):  # run as a file (python bench/X.py): the repository root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


USAGE = "usage: python -m bench.interrupt_at K [--signal NAME] SCRIPT [ARGS...]"


def main() -> None:
    args = sys.argv[1:]
    if args[:1] in (["-h"], ["--help"]):
        print(f"{USAGE}\n\n{__doc__}")
        return
    if len(args) < 2 or not args[0].isdigit():
        sys.exit(USAGE)
    at, args = int(args[0]), args[1:]
    signum = signal.SIGINT
    if args[0] == "--signal":
        signum, args = signal.Signals[f"SIG{args[1].upper().removeprefix('SIG')}"], args[2:]
    script = args[0]
    done = 0

    def after_step(optimizer, args, kwargs) -> None:
        nonlocal done
        done += 1
        if done == at:
            os.kill(os.getpid(), signum)

    register_optimizer_step_post_hook(after_step)
    sys.argv = [script, *args[1:]]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
