"""Many runs: sweeps (grids, seeds) and hyper-parameter searches, and what they share with report.py."""
