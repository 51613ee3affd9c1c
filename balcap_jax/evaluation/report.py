"""The evaluation's outputs: `results.json` (every aggregate, per-item results, run settings) and
`summary.md` (one table per protocol), both written atomically (temp file + rename)."""

from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping, Sequence

from balcap_jax.evaluation.runner import ProtocolRun


def _atomic_write(path: str, text: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.replace(tmp, path)


def _number(value: Any) -> str:
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.2f}"
    return str(value)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_number(v) for v in row) + " |" for row in rows]
    return lines


def protocol_markdown(run: ProtocolRun) -> list[str]:
    metrics = run.metrics
    lines = [f"## {run.name}", ""]
    scalars = [(k, v) for k, v in metrics.items() if not isinstance(v, dict)]
    lines += _table(["metric", "value"], scalars)
    if isinstance(metrics.get("per_domain"), dict):
        lines += ["", *_table(["domain", "score"], sorted(metrics["per_domain"].items()))]
    if isinstance(metrics.get("per_baseline"), dict):
        rows = [(name, m["score"], m["wins"], m["losses"], m["ties"], m["unscored"])
                for name, m in sorted(metrics["per_baseline"].items())]  # fmt: skip
        lines += ["", *_table(["baseline", "score", "wins", "losses", "ties", "unscored"], rows)]
    lines += ["", f"items judged this run: {run.judged} ({run.not_stored} with judge failures, retried next run), "
              f"read back from the results cache: {run.resumed}, without a caption: {len(run.missing_captions)}; "
              f"{run.seconds:.1f} s", ""]  # fmt: skip
    return lines


def summary_markdown(runs: Sequence[ProtocolRun], settings: Mapping[str, Any]) -> str:
    lines = ["# Evaluation summary", ""]
    lines += [f"- {key}: `{value}`" for key, value in settings.items()] + [""]
    for run in runs:
        lines += protocol_markdown(run)
    return "\n".join(lines)


def json_safe(value: Any) -> Any:
    """NaN/inf -> None (strict JSON has no NaN), recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_report(output_dir: str, runs: Sequence[ProtocolRun], settings: Mapping[str, Any]) -> dict[str, Any]:
    """Writes results.json and summary.md into `output_dir`; returns what results.json holds."""
    payload = json_safe({
        "settings": dict(settings),
        "metrics": {run.name: run.metrics for run in runs},
        "counts": {run.name: {"judged": run.judged, "resumed": run.resumed, "retry_next_run": run.not_stored,
                              "missing_captions": run.missing_captions} for run in runs},  # fmt: skip
        "items": {run.name: run.results for run in runs},
    })
    text = json.dumps(payload, indent=1, ensure_ascii=False, allow_nan=False) + "\n"
    _atomic_write(os.path.join(output_dir, "results.json"), text)
    _atomic_write(os.path.join(output_dir, "summary.md"), summary_markdown(runs, settings))
    return payload
