"""Benchmarks and GPU checks, run from the repository root as modules: python -m bench.NAME."""
