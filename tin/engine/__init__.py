"""The engine's state: where a run stands and the running sums of an epoch (the step is train.py, evaluation val.py)."""
