"""Versioned judge prompts of the evaluation protocols: `balcap_jax/evaluation/prompts/<name>.v<version>.txt`.

A prompt's wording is part of the metric: a new wording is a new version file, never an edit, and every result
records the versions it was judged with (they are part of each item's cache key). Templates use `$field`
placeholders (`string.Template`), so the JSON examples inside them need no escaping.
"""

from __future__ import annotations

import functools
import importlib.resources
import string


def _prompt_path(name: str, version: int):
    return importlib.resources.files("balcap_jax.evaluation").joinpath("prompts", f"{name}.v{version}.txt")


@functools.cache
def load_prompt(name: str, version: int) -> string.Template:
    path = _prompt_path(name, version)
    if not path.is_file():
        folder = importlib.resources.files("balcap_jax.evaluation").joinpath("prompts")
        shipped = sorted(p.name for p in folder.iterdir())
        raise ValueError(f"no evaluation prompt {name!r} version {version}; shipped: {shipped}")
    return string.Template(path.read_text(encoding="utf-8"))


def render_prompt(name: str, version: int, **fields: str) -> str:
    """The prompt with every `$field` filled; missing or unknown fields raise ValueError naming them."""
    template = load_prompt(name, version)
    expected = set(template.get_identifiers())
    missing, unknown = expected - fields.keys(), fields.keys() - expected
    if missing or unknown:
        raise ValueError(
            f"evaluation prompt {name}.v{version} takes fields {sorted(expected)}; missing {sorted(missing)}, "
            f"unknown {sorted(unknown)}"
        )
    return template.substitute(fields)
