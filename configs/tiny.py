"""Embedded default: see balcap_jax/default_config.py (kept in the package so `python -m balcap_jax.train` runs
it with no recipe file). Override any field from the command line, e.g. --config.train.rl_steps=60."""

from balcap_jax.default_config import get_config  # noqa: F401
