"""Versioned judge prompts, stored as text files under `balcap_jax/rewards/prompts/<name>.v<version>.txt`.

A prompt's wording is part of the reward definition: changing it changes the numbers. So prompts are never
edited in place; a new wording is a new version file, and components name the version they use in their config
(and in every score record). Templates use `$field` placeholders (`string.Template`), so the JSON examples in
them need no escaping.
"""

from __future__ import annotations

import functools
import importlib.resources
import re
import string

_FILE_NAME = re.compile(r"^(?P<name>[a-z_]+)\.v(?P<version>\d+)\.txt$")


def _prompt_dir():
    return importlib.resources.files("balcap_jax.rewards").joinpath("prompts")


def available_prompts() -> dict[str, tuple[int, ...]]:
    """{prompt name: sorted versions} for every prompt file shipped with the package."""
    found: dict[str, list[int]] = {}
    for entry in _prompt_dir().iterdir():
        match = _FILE_NAME.match(entry.name)
        if match:
            found.setdefault(match["name"], []).append(int(match["version"]))
    return {name: tuple(sorted(versions)) for name, versions in sorted(found.items())}


@functools.cache
def load_prompt(name: str, version: int) -> string.Template:
    """The template of prompt `name` at `version`; a clear error lists what exists when it does not."""
    path = _prompt_dir().joinpath(f"{name}.v{version}.txt")
    if not path.is_file():
        raise ValueError(
            f"no prompt {name!r} version {version}; shipped prompts: {available_prompts()} "
            f"(add balcap_jax/rewards/prompts/{name}.v{version}.txt for a new one)"
        )
    return string.Template(path.read_text(encoding="utf-8"))


def render_prompt(name: str, version: int, **fields: str) -> str:
    """The prompt with every `$field` filled; missing or unknown fields raise ValueError naming them."""
    template = load_prompt(name, version)
    expected = set(template.get_identifiers())
    missing, unknown = expected - fields.keys(), fields.keys() - expected
    if missing or unknown:
        raise ValueError(
            f"prompt {name}.v{version} takes fields {sorted(expected)}; missing {sorted(missing)}, "
            f"unknown {sorted(unknown)}"
        )
    return template.substitute(fields)
