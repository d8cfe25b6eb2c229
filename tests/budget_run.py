"""main.py with the measurements of a --time_budget run replaced by fixed figures and a clock that
stands still, so two processes plan the same run: for the SIGKILL-and-resume test of a budgeted run.

    PYTHONPATH=. python tests/budget_run.py MAIN.PY-ARGS...

A resumed process would measure 10x slower figures: if resuming re-planned instead of following
the plan stored in the checkpoint, its schedule (and weights) would differ."""

from __future__ import annotations

import sys

import main
from tin.plan import budget, measure

SLOWER = 10.0 if "--resume" in sys.argv else 1.0
COSTS = budget.Costs(update_s={32: 4.0 * SLOWER}, epoch_end_s=6.0 * SLOWER, test_s=2.0 * SLOWER)

measure.measure_costs = lambda *args, **kwargs: COSTS
budget.clock = lambda: 0.0

if __name__ == "__main__":
    main.cli()
