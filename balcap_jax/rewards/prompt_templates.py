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


class PromptLibrary:
    """The versioned prompt files `<package>/prompts/<name>.v<version>.txt` of one package (rewards, evaluation)."""

    def __init__(self, package: str):
        self.package = package

    def _dir(self):
        return importlib.resources.files(self.package).joinpath("prompts")

    def available(self) -> dict[str, tuple[int, ...]]:
        """{prompt name: sorted versions} for every prompt file shipped with the package."""
        found: dict[str, list[int]] = {}
        for entry in self._dir().iterdir():
            match = _FILE_NAME.match(entry.name)
            if match:
                found.setdefault(match["name"], []).append(int(match["version"]))
        return {name: tuple(sorted(versions)) for name, versions in sorted(found.items())}

    @functools.cache
    def load(self, name: str, version: int) -> string.Template:
        """The template of prompt `name` at `version`; a clear error lists what exists when it does not."""
        path = self._dir().joinpath(f"{name}.v{version}.txt")
        if not path.is_file():
            folder = self.package.replace(".", "/")
            raise ValueError(
                f"no prompt {name!r} version {version} in {self.package}; shipped prompts: {self.available()} "
                f"(add {folder}/prompts/{name}.v{version}.txt for a new one)"
            )
        return string.Template(path.read_text(encoding="utf-8"))

    def render(self, name: str, version: int, **fields: str) -> str:
        """The prompt with every `$field` filled; missing or unknown fields raise ValueError naming them."""
        template = self.load(name, version)
        expected = set(template.get_identifiers())
        missing, unknown = expected - fields.keys(), fields.keys() - expected
        if missing or unknown:
            raise ValueError(
                f"prompt {name}.v{version} takes fields {sorted(expected)}; missing {sorted(missing)}, "
                f"unknown {sorted(unknown)}"
            )
        return template.substitute(fields)


_REWARD_PROMPTS = PromptLibrary("balcap_jax.rewards")
available_prompts = _REWARD_PROMPTS.available
load_prompt = _REWARD_PROMPTS.load
render_prompt = _REWARD_PROMPTS.render
