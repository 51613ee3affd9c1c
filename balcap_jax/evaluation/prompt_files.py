"""Versioned judge prompts of the evaluation protocols: `balcap_jax/evaluation/prompts/<name>.v<version>.txt`.

A prompt's wording is part of the metric: a new wording is a new version file, never an edit, and every result
records the versions it was judged with (they are part of each item's cache key). Same file scheme and
`$field` templates as the reward prompts (`rewards.prompt_templates.PromptLibrary`).
"""

from __future__ import annotations

from balcap_jax.rewards.prompt_templates import PromptLibrary

_EVALUATION_PROMPTS = PromptLibrary("balcap_jax.evaluation")
load_prompt = _EVALUATION_PROMPTS.load
render_prompt = _EVALUATION_PROMPTS.render
