"""Benchmarks and ablations, run from the repository root as modules: `python -m experiments.bench_rl_step`."""
