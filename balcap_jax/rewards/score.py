"""Score captions with the reward components, for debugging rewards and judges.

    python -m balcap_jax.rewards.score --judge-url http://host:8000/v1 --judge-model Qwen/Qwen2.5-7B-Instruct \
        [--vlm-judge-url http://host:8001/v1 --vlm-judge-model Qwen/Qwen2.5-VL-7B-Instruct] \
        --input captions.jsonl --output scored.jsonl

Input rows (JSON lines): {"image": path (relative paths are relative to the input file), "reference": str (or
"references": [str, ...]), "caption": str, optional "image_id" (default: the image path), optional "questions"
(for --components ...,caprl_qa; see caprl_qa.py)}.
Output rows: the input row plus "rewards" {component: value in [0, 1] or null when unscorable}, "records"
{component: what the judges said}, "errors" {component: failed judge calls}. The last stdout line summarises.
Exits 0 once every row is written, even when some are unscorable; 2 on unusable input.

Without --vlm-judge-*, the text judge also verifies claims against images, so it must then be multimodal.
--judge-url (and --vlm-judge-url) may repeat, or hold comma-separated URLs: requests round-robin over them.
Images go to the visual judge with their longest side at most --image-max-side px (0 keeps the size); each
prompt's JSON Schema is sent as --response-format (json_schema | json_object | none).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Any, Sequence

from balcap_jax.rewards.components import COMPONENT_NAMES, judged_components
from balcap_jax.rewards.judges.openai_compatible import RESPONSE_FORMATS
from balcap_jax.rewards.judges.openai_pair import Endpoint, openai_judge_pair, split_urls
from balcap_jax.rewards.judges.wire_images import DEFAULT_MAX_SIDE
from balcap_jax.rewards.manager import RewardBatch, RewardManager
from balcap_jax.rewards.types import RewardItem

COMPONENTS = COMPONENT_NAMES



def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m balcap_jax.rewards.score", description=__doc__.split("\n")[0])
    parser.add_argument("--judge-url", action="append", required=True, help="text judge base URL(s), ending in /v1")
    parser.add_argument("--judge-model", required=True, help="served name of the text judge model")
    parser.add_argument("--vlm-judge-url", action="append", help="visual judge base URL(s) (default: the text judge)")
    parser.add_argument("--vlm-judge-model", help="served name of the visual judge model")
    parser.add_argument("--input", required=True, help="captions JSONL")
    parser.add_argument("--output", required=True, help="scored JSONL to write")
    parser.add_argument("--components", default="precision,recall,linguistic", help=f"comma list of {COMPONENTS}")
    parser.add_argument("--api-key-env", help="env var holding the text judge's API key")
    parser.add_argument("--vlm-api-key-env", help="env var holding the visual judge's API key")
    parser.add_argument("--judge-api", choices=("chat", "completions"), default="chat")
    parser.add_argument("--cache", help="SQLite response cache file (re-runs make no repeated calls)")
    parser.add_argument("--max-concurrency", type=int, default=64)
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per HTTP attempt")
    parser.add_argument("--max-attempts", type=int, default=6)
    parser.add_argument("--backoff", type=float, default=0.5, help="initial retry backoff in seconds")
    parser.add_argument("--image-max-side", type=int, default=DEFAULT_MAX_SIDE,
                        help="longest side (px) of the images sent to the visual judge; 0 keeps the size")
    parser.add_argument("--response-format", choices=RESPONSE_FORMATS, default="json_schema",
                        help="how each prompt's JSON Schema is sent (none: for servers rejecting response_format)")
    args = parser.parse_args(argv)
    if args.image_max_side < 0:
        parser.error("--image-max-side must be >= 0 (0 keeps the size)")
    if bool(args.vlm_judge_url) != bool(args.vlm_judge_model):
        parser.error("--vlm-judge-url and --vlm-judge-model go together")
    args.components = tuple(c.strip() for c in args.components.split(",") if c.strip())
    unknown = set(args.components) - set(COMPONENTS)
    if unknown or not args.components:
        parser.error(f"--components: unknown {sorted(unknown)}; choose from {COMPONENTS}")
    if args.judge_api == "completions" and "precision" in args.components and not args.vlm_judge_url:
        parser.error("precision sends images, which the completions API cannot carry: add --vlm-judge-url and "
                     "--vlm-judge-model (a chat VLM), or use --judge-api chat")
    return args


class InputError(ValueError):
    pass


def load_rows(path: str) -> tuple[list[dict[str, Any]], list[RewardItem]]:
    """(raw rows, RewardItems) of a captions JSONL; InputError naming the line and field on bad input."""
    base = os.path.dirname(os.path.abspath(path))
    images: dict[str, bytes] = {}
    rows, items = [], []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise InputError(f"{path}:{number}: not valid JSON ({error})") from None
            if not isinstance(row, dict):
                raise InputError(f"{path}:{number}: each line must be a JSON object")
            if not isinstance(row.get("caption"), str):
                raise InputError(f"{path}:{number}: 'caption' must be a string")
            references = row.get("references", [row["reference"]] if "reference" in row else None)
            if not isinstance(references, list) or not all(isinstance(r, str) for r in references):
                raise InputError(f"{path}:{number}: give 'reference' (string) or 'references' (list of strings)")
            image_path = row.get("image")
            image = None
            if image_path is not None:
                full = image_path if os.path.isabs(image_path) else os.path.join(base, image_path)
                if full not in images:
                    try:
                        with open(full, "rb") as image_file:
                            images[full] = image_file.read()
                    except OSError as error:
                        raise InputError(f"{path}:{number}: cannot read 'image' {image_path!r}: {error}") from None
                image = images[full]
            metadata = {"questions": row["questions"]} if "questions" in row else {}
            image_id = str(row.get("image_id", image_path if image_path is not None else f"row{number}"))
            rows.append(row)
            items.append(RewardItem(image_id, row["caption"], tuple(references), image, metadata))
    if not items:
        raise InputError(f"{path}: no rows")
    return rows, items


def build_components(args: argparse.Namespace) -> list:
    text = Endpoint(args.judge_model, split_urls(args.judge_url), args.api_key_env, api=args.judge_api)
    visual = None
    if args.vlm_judge_url:
        visual = Endpoint(args.vlm_judge_model, split_urls(args.vlm_judge_url), args.vlm_api_key_env)
    text_judge, visual_judge = openai_judge_pair(
        text, visual, cache_path=args.cache, max_concurrency=args.max_concurrency, request_timeout_s=args.timeout,
        max_attempts=args.max_attempts, backoff_initial_s=args.backoff, backoff_max_s=max(args.backoff, 30.0),
        image_max_side=args.image_max_side, response_format=args.response_format,
    )  # fmt: skip
    return judged_components(args.components, text_judge, visual_judge)


def _finite_or_none(value: float) -> float | None:
    return None if math.isnan(value) else float(value)


def summary_line(batch: RewardBatch) -> str:
    parts = []
    for name, metrics in batch.metrics.items():
        mean = "n/a" if math.isnan(metrics.mean) else f"{metrics.mean:.4f}"
        parts.append(f"{name} mean={mean} unscorable={metrics.nan_count} errors={metrics.errors}")
    count = batch.rewards.shape[0] * batch.rewards.shape[1]
    return f"scored {count} captions in {batch.latency_s:.1f}s: " + " | ".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        rows, items = load_rows(args.input)
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    components = build_components(args)
    with RewardManager(components) as manager:
        try:
            batch = manager.score_sync([[item] for item in items])
        except ValueError as error:  # e.g. caprl_qa rows without questions
            print(f"error: {error}", file=sys.stderr)
            return 2
    with open(args.output, "w", encoding="utf-8") as handle:
        for n, row in enumerate(rows):
            scores = {name: batch.scores[k][n] for k, name in enumerate(batch.component_names)}
            out = row | {
                "rewards": {name: _finite_or_none(s.value) for name, s in scores.items()},
                "records": {name: s.record for name, s in scores.items()},
                "errors": {name: s.errors for name, s in scores.items()},
            }
            handle.write(json.dumps(out, ensure_ascii=False) + "\n")
    print(summary_line(batch))
    return 0


if __name__ == "__main__":
    sys.exit(main())
