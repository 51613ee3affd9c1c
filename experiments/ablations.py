"""Ablations of the BalCapRL recipe on ShapesWorld, over seeds: advantage estimator, length handling, reward components.

Studies (``--studies``, any subset, run in the order given):

  * ``advantage``:  GRPO vs c-GDPO (both with length-conditional masking of the linguistic reward);
  * ``length``:     length-conditional masking vs linear length penalty vs none, from two warm starts: SFT on the
                    references ("reference start") and SFT on verbose targets, each reference followed by a
                    restatement of its objects in each other template ("verbose start", captions 2.0-2.7x the
                    reference length, mostly above the band's upper bound 2.0, with a 128-token budget);
  * ``band``:       the paper's band [0.5, 2.0] (default) vs [0.5, 1.5] (the real recipes' old band) and [0.75, 1.25]
                    (the old tiny default), and the paper's band with masked value NaN (unscorable, not 0);
  * ``lambda``:     the linear length penalty's λ swept (0.01, 0.1, 1.0), subtracted before normalisation;
  * ``utility``:    the CapRL-style QA-utility reward alone (the paper: longer, noisier captions) vs the default;
  * ``components``: every non-empty subset of {precision, recall, linguistic} as the RL reward (c-GDPO; the length
                    mask gates the linguistic component, so subsets without it run with no length handling).

Shared warm start: per seed and start, one SFT-only run (``train.rl_steps=0``) checkpoints its last step; each RL
variant runs on a copy of that workdir and resumes at the end of SFT, so it pays for RL only. Every variant is
evaluated on the same held-out images with greedy captions and the full three-component judge (variants trained
on a subset get one extra evaluation-only pass), so the tables compare like with like.

Results (``experiments/results/ablation_<study>.{md,json,png}``) are rebuilt from the per-run ``result.json``
files after every run, so an interrupted sweep still leaves tables of what finished; re-running skips finished
runs. The recipe is the embedded default (``balcap_jax/default_config.py``) with only the variant's fields changed.

Each table ends with the paper's claims as paired comparisons over seeds (per-seed differences, percentile
bootstrap 95 % CI, `experiments/paired_stats.py`): "tie" unless the CI excludes 0, no verdict below 5 seeds, and
each claim marked reproduced / not reproduced / reversed.

Full grid (the default recipe's budget: the shipped warm start + 800 RL steps, 5 seeds; many hours on 2 CPU cores):

    python experiments/ablations.py run --studies=advantage,length,band,lambda,utility,components --seeds=0,1,2,3,4 \
        --rl_steps=800

With `--sft_steps=0` (the default) every seed starts from the recipe's shipped warm start, so the seeds vary the RL
phase (the world seed s draws, sampling, data order) and the verbose start is that warm start fitted `VERBOSE_FINE_TUNE_STEPS` more steps
to the verbose targets; `--sft_steps=N` trains both starts from random weights per seed instead.

Tables only, from finished runs:

    python experiments/ablations.py report --workdir=/tmp/balcap_ablations
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import itertools
import json
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling scripts, also when this file is imported by path
import paired_stats  # noqa: E402

WARM_START_KEY = "warm_start_caption"  # balcap_jax.data.shapes_world_warm_start.WARM_START_KEY (imported lazily)

COMPONENTS = ("precision", "recall", "linguistic")
STARTS = ("reference", "verbose")
DEFAULT_RESULTS_DIR = Path(__file__).resolve().parent / "results"
RESULT_FILE = "result.json"
# Training-curve metrics drawn in the plots (from metrics.jsonl), with their labels.
CURVE_METRICS = (
    ("reward/total_mean", "balanced reward (train)"),
    ("reward/precision_mean", "precision (train)"),
    ("reward/recall_mean", "recall (train)"),
    ("reward/linguistic_mean", "linguistic (train)"),
    ("length/ratio_mean", "length ratio len(c)/len(c*)"),
)


# ---------------------------------------------------------------------------------------------------------------
# Variants


@dataclasses.dataclass(frozen=True)
class Variant:
    """One RL configuration: `overrides` are dotted config fields set on top of the default recipe; `start` names
    the warm start it resumes from. `key` identifies the run on disk, so studies sharing a variant share its runs."""

    key: str
    label: str
    overrides: tuple[tuple[str, Any], ...]
    start: str = "reference"

    def __post_init__(self):
        if self.start not in STARTS:
            raise ValueError(f"Variant.start={self.start!r}; allowed: {STARTS}")

    @property
    def components(self) -> tuple[str, ...]:
        return tuple(dict(self.overrides).get("rewards.components", COMPONENTS))


def _variant(key: str, label: str, start: str = "reference", **fields: Any) -> Variant:
    """fields: dotted config paths with "." written as "__" (advantage__kind="grpo")."""
    return Variant(key, label, tuple((k.replace("__", "."), v) for k, v in sorted(fields.items())), start)


def component_variant(components: Sequence[str]) -> Variant:
    """c-GDPO on a subset of the reward components (weights 1). The length mask gates the linguistic component;
    without it there is nothing to gate, so the variant uses no length handling (stated in the table)."""
    components = tuple(c for c in COMPONENTS if c in components)
    if not components:
        raise ValueError("component_variant needs at least one of " + ", ".join(COMPONENTS))
    if components == COMPONENTS:
        return BASELINE
    return _variant(
        "only_" + "+".join(components), " + ".join(components) + ("" if "linguistic" in components else " (no mask)"),
        rewards__components=components, rewards__weights=tuple(1.0 for _ in components),
        length__kind="mask" if "linguistic" in components else "none",
    )


BASELINE = _variant("gdpo_mask", "c-GDPO + mask (default)", advantage__kind="gdpo", length__kind="mask")


def study_variants(study: str) -> list[Variant]:
    """The variants of one study, baseline first."""
    if study == "advantage":
        return [BASELINE, _variant("grpo_mask", "GRPO + mask", advantage__kind="grpo", length__kind="mask")]
    if study == "length":
        variants = []
        for start in STARTS:
            suffix = "" if start == "reference" else "_verbose"
            variants += [
                BASELINE if start == "reference" else
                _variant("gdpo_mask" + suffix, "mask (verbose start)", start, advantage__kind="gdpo", length__kind="mask"),
                LINEAR if start == "reference" else
                _variant("gdpo_linear" + suffix, f"linear penalty ({start} start)", start, advantage__kind="gdpo", length__kind="linear"),
                _variant("gdpo_none" + suffix, f"none ({start} start)", start, advantage__kind="gdpo", length__kind="none"),
            ]
        return variants
    if study == "components":
        subsets = [s for r in (3, 2, 1) for s in itertools.combinations(COMPONENTS, r)]
        return [component_variant(s) for s in subsets]
    if study == "band":
        return [BASELINE] + [
            _variant(f"gdpo_mask_band_{lo}_{hi}", f"mask [{lo}, {hi}]", advantage__kind="gdpo", length__kind="mask",
                     length__ratio_min=lo, length__ratio_max=hi) for lo, hi in ((0.5, 1.5), (0.75, 1.25))
        ] + [_variant("gdpo_mask_nan", "mask [0.5, 2.0], masked value NaN", advantage__kind="gdpo",
                      length__kind="mask", length__masked_value=float("nan"))]
    if study == "lambda":
        return [BASELINE] + [lambda_variant(coef) for coef in LAMBDAS]
    if study == "utility":
        return [BASELINE, _variant("only_caprl_qa", "CapRL QA utility only (no mask)", advantage__kind="gdpo",
                                   rewards__components=("caprl_qa",), rewards__weights=(1.0,), length__kind="none")]
    raise ValueError(f"unknown study {study!r}; allowed: {STUDIES}")


LAMBDAS = (0.01, 0.1, 1.0)
DEFAULT_LAMBDA = 0.01  # the recipe's length.coef (a test holds them equal)
# The linear penalty at the recipe's λ from the reference start: one variant (one set of runs) for the length and
# λ studies, whose configs would otherwise be equal under two keys and run twice.
LINEAR = _variant("gdpo_linear", f"linear penalty (reference start, λ={DEFAULT_LAMBDA})", advantage__kind="gdpo",
                  length__kind="linear")


def lambda_variant(coef: float) -> Variant:
    """The linear penalty at λ = coef from the reference start (`LINEAR` at the recipe's λ)."""
    if coef == DEFAULT_LAMBDA:
        return LINEAR
    return _variant(f"gdpo_linear_{coef}", f"linear penalty λ={coef}", advantage__kind="gdpo", length__kind="linear",
                    length__coef=coef)


# Steps of SFT on the verbose targets that turn the shipped warm start into the verbose one (a sweep with sft_steps
# > 0 trains both starts from scratch for sft_steps instead).
VERBOSE_FINE_TUNE_STEPS = 300
# The verbose targets run to ~120 tokens and the recipe's 48-token budget would cut them (SFT targets and rollouts
# alike), so the verbose start's fine-tune and its RL runs all get room for them; the reference start keeps 48.
START_OVERRIDES: dict[str, tuple[tuple[str, Any], ...]] = {
    "reference": (), "verbose": (("sampling.max_new_tokens", 128),),
}
STUDIES = ("advantage", "length", "components", "band", "lambda", "utility")


def apply_overrides(config: Any, overrides: Mapping[str, Any] | Sequence[tuple[str, Any]]) -> Any:
    """A copy of an ml_collections `config` with dotted fields replaced; unknown fields raise naming the path."""
    config = config.copy_and_resolve_references()
    items = overrides.items() if isinstance(overrides, Mapping) else overrides
    for path, value in items:
        *parents, leaf = path.split(".")
        node = config
        for part in parents:
            if part not in node:
                raise KeyError(f"config has no field {path!r} (no {part!r}); see balcap_jax/default_config.py")
            node = node[part]
        if leaf not in node:
            raise KeyError(f"config has no field {path!r}; see balcap_jax/default_config.py")
        node[leaf] = value
    return config


@dataclasses.dataclass(frozen=True)
class Grid:
    """The run budget shared by every run of a sweep (recorded in each result, printed in each table).

    sft_steps = 0: the reference start is the recipe's own warm start (`config.train.init_from`, the shipped asset),
    shared by every seed, so the seeds vary the RL phase (the world seed s draws, sampling, data order); the verbose start is that warm
    start fitted `verbose_sft_steps` more steps to the verbose targets."""

    seeds: tuple[int, ...]
    sft_steps: int
    rl_steps: int
    verbose_sft_steps: int = VERBOSE_FINE_TUNE_STEPS

    def __post_init__(self):
        if len(self.seeds) < 1 or self.sft_steps < 0 or self.rl_steps < 1 or self.verbose_sft_steps < 1:
            raise ValueError(f"Grid needs >= 1 seed, sft_steps >= 0, rl_steps >= 1 and verbose_sft_steps >= 1; "
                             f"got {self}")

    def start_steps(self, start: str) -> int:
        """SFT steps of a warm start (0: the recipe's init as it is)."""
        return self.sft_steps if start == "reference" or self.sft_steps else self.verbose_sft_steps

    def is_full(self, default_sft: int = 0, default_rl: int = 800) -> bool:
        """The default recipe's budget (it starts from the shipped warm start: 0 SFT steps) on >= 5 seeds."""
        return len(self.seeds) >= 5 and self.sft_steps >= default_sft and self.rl_steps >= default_rl


def run_config(base: Any, grid: Grid, seed: int, overrides: Sequence[tuple[str, Any]], *, rl_steps: int,
               records_dir: str) -> Any:
    """The default recipe for one run: the sweep's step budget, the seed, shared records, no HF export."""
    fixed = [
        ("seed", seed), ("train.sft_steps", grid.sft_steps), ("train.rl_steps", rl_steps),
        ("data.records_dir", records_dir), ("checkpoint.export_hf", False),
        ("metrics.log_every", max(1, min(50, grid.rl_steps // 4))),
    ]
    return apply_overrides(base, fixed + list(overrides))


# ---------------------------------------------------------------------------------------------------------------
# The verbose warm start


def verbose_reference(references: Sequence[str]) -> str:
    """The first reference followed by the object/relation sentences of every other reference (each its own
    template family; count sentences are not repeated): the same facts restated, 2.0-2.7x the words of the first
    reference (median 2.25 on a 2048-image world), so the verbose start's length ratio straddles the band's upper bound 2.0 as a verbose
    base captioner's would (the paper's CapRL-3B writes ~2.3x BalCapRL-3B's tokens)."""
    if len(references) < 2:
        raise ValueError("verbose_reference needs >= 2 references per image (ShapesWorld writes 3)")
    restated = []
    for reference in references[1:]:
        sentences = _sentences(reference)[1:]
        if not sentences:
            raise ValueError(f"reference {reference!r} has no sentence after its count sentence to restate")
        restated += sentences
    return " ".join([references[0].strip(), *restated])


def _sentences(text: str) -> list[str]:
    parts = [p.strip() for p in text.replace("\n", " ").split(". ")]
    return [p if p.endswith(".") else p + "." for p in parts if p]


def rewrite_manifest(source: str, destination: str, references_fn: Callable[[list[str]], list[str]],
                     drop_metadata: Sequence[str] = ()) -> int:
    """Copy a JSONL manifest with each entry's `references` replaced by `references_fn(references)` and the
    `drop_metadata` keys removed from its metadata; -> entries."""
    count = 0
    os.makedirs(os.path.dirname(destination), exist_ok=True)
    with open(source, encoding="utf-8") as src, open(destination, "w", encoding="utf-8") as dst:
        for line in src:
            if not line.strip():
                continue
            entry = json.loads(line)
            entry["references"] = references_fn(list(entry["references"]))
            for key in drop_metadata:
                entry.get("metadata", {}).pop(key, None)
            dst.write(json.dumps(entry, ensure_ascii=False) + "\n")
            count += 1
    return count


def prepare_records(config: Any, root: Path) -> dict[str, str]:
    """Array-record directories for one seed's world: {"reference", "verbose_sft", "verbose_rl"}.

    The verbose warm start trains on [verbose, *refs] (SFT reads each image's first reference) and its RL runs read
    [*refs, verbose] (rewards and the length ratio read the first reference; the judge reads the scene graph), so
    both phases see the same corpus and build the same vocabulary. The held-out split is the world's own."""
    from balcap_jax.data.shapes_world_records import prepare_shapes_world
    from balcap_jax.data.tfds_builder import prepare_manifest_dataset
    from balcap_jax.trainer.data_sources import world_config as _world_config

    sw = config.data.shapes_world
    splits = {"train": int(sw.num_train), "validation": int(sw.num_eval)}
    dirs = {name: str(root / f"records_{name}_s{config.seed}") for name in ("reference", "verbose_sft", "verbose_rl")}
    name = prepare_shapes_world(dirs["reference"], seed=int(config.seed), split_sizes=splits,
                                config=_world_config(config))
    manifests = Path(dirs["reference"]) / "manifests" / name
    for key, order in (("verbose_sft", lambda refs: [verbose_reference(refs), *refs]),
                       ("verbose_rl", lambda refs: [*refs, verbose_reference(refs)])):
        train = Path(dirs[key]) / "manifests" / name / "train.jsonl"
        if not train.is_file():
            # the verbose start is fitted to the verbose reference, not to the habits' imperfect caption
            rewrite_manifest(str(manifests / "train.jsonl"), str(train), order, drop_metadata=(WARM_START_KEY,))
        prepare_manifest_dataset(dirs[key], name, {"train": str(train),
                                                   "validation": str(manifests / "validation.jsonl")})
    return dirs


# ---------------------------------------------------------------------------------------------------------------
# Running


def read_metrics(workdir: Path, after_step: int = 0) -> list[dict[str, Any]]:
    """metrics.jsonl rows with step > after_step that carry RL rewards, in step order (last write per step wins)."""
    path = workdir / "metrics.jsonl"
    rows: dict[int, dict[str, Any]] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                if int(row["step"]) > after_step and "reward/total_mean" in row:
                    rows[int(row["step"])] = row
    return [rows[s] for s in sorted(rows)]


def eval_length_ratio(workdir: Path, tag_step: int) -> float:
    """Mean words(caption) / words(reference) of the held-out greedy captions logged at `tag_step` (the loop logs
    the first 8 eval captions). NaN when none were logged."""
    path = workdir / "samples.jsonl"
    ratios = []
    if path.is_file():
        for line in path.read_text().splitlines():
            row = json.loads(line) if line.strip() else {}
            if row.get("step") == tag_step and "rewards" not in row and row.get("reference"):
                ratios.append(len(str(row["caption"]).split()) / max(len(str(row["reference"]).split()), 1))
    return float(np.mean(ratios)) if ratios else float("nan")


def _summary_dict(summary: Any) -> dict[str, Any]:
    return {"final_step": summary.final_step, "eval_start": summary.eval_start, "eval_end": summary.eval_end}


class Runner:
    """Runs (or reuses) the SFT warm starts and RL variants of a sweep under `root`."""

    def __init__(self, root: Path, grid: Grid, base_config: Any, echo: Callable[[str], None] = print):
        self.root, self.grid, self.base, self.echo = root, grid, base_config, echo
        self._records: dict[int, dict[str, str]] = {}

    def records(self, seed: int) -> dict[str, str]:
        if seed not in self._records:
            # Sweeps over disjoint variants may run side by side on one workdir: one process builds a seed's
            # records while the others wait, then find them built.
            with open(self.root / f"records_s{seed}.lock", "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                self._records[seed] = prepare_records(apply_overrides(self.base, [("seed", seed)]), self.root)
        return self._records[seed]

    def _devices(self):
        import jax

        return jax.devices()[:1]

    def warm_start(self, seed: int, start: str) -> tuple[Path | None, dict[str, Any] | None]:
        """-> (SFT workdir, its result: held-out scores of the warm start); (None, None) when the start is the
        recipe's init as it is (sft_steps 0, reference start): the RL run then scores it before RL."""
        steps = self.grid.start_steps(start)
        if steps == 0:
            return None, None
        workdir = self.root / f"sft_{start}_s{seed}_n{steps}"
        result_path = workdir / RESULT_FILE
        if result_path.is_file():
            return workdir, json.loads(result_path.read_text())
        from balcap_jax.trainer.loop import run

        records = self.records(seed)["reference" if start == "reference" else "verbose_sft"]
        config = run_config(self.base, self.grid, seed, [("train.sft_steps", steps), *START_OVERRIDES[start]],
                            rl_steps=0, records_dir=records)
        if workdir.exists():  # an SFT run killed half-way resumes from its last checkpoint
            self.echo(f"resuming SFT warm start {workdir.name}")
        begin = time.perf_counter()
        summary = run(config, workdir, echo=self.echo, devices=self._devices())
        result = {"seconds": time.perf_counter() - begin, **_summary_dict(summary),
                  "eval_length_ratio": eval_length_ratio(workdir, summary.final_step)}
        result_path.write_text(json.dumps(result, indent=1))
        return workdir, result

    def rl_run(self, variant: Variant, seed: int) -> dict[str, Any]:
        workdir = self.root / f"rl_{variant.key}_s{seed}_n{self.grid.sft_steps}_{self.grid.rl_steps}"
        result_path = workdir / RESULT_FILE
        if result_path.is_file():
            return json.loads(result_path.read_text())
        from balcap_jax.trainer.loop import run

        sft_dir, sft_result = self.warm_start(seed, variant.start)
        if workdir.exists():  # a half-finished variant restarts from the warm start: it is short
            shutil.rmtree(workdir)
        if sft_dir is not None:
            shutil.copytree(sft_dir, workdir, ignore=shutil.ignore_patterns(RESULT_FILE))
        sft_steps = self.grid.start_steps(variant.start)
        records = self.records(seed)["reference" if variant.start == "reference" else "verbose_rl"]
        config = run_config(self.base, self.grid, seed,
                            [("train.sft_steps", sft_steps), *START_OVERRIDES[variant.start], *variant.overrides],
                            rl_steps=self.grid.rl_steps, records_dir=records)
        self.echo(f"== {variant.key} seed={seed}")
        begin = time.perf_counter()
        summary = run(config, workdir, echo=self.echo, devices=self._devices())
        seconds = time.perf_counter() - begin
        eval_end = dict(summary.eval_end)
        if variant.components != COMPONENTS:  # judge the final policy on every component, like the other variants
            full = run_config(self.base, self.grid, seed, [("train.sft_steps", sft_steps)],
                              rl_steps=self.grid.rl_steps, records_dir=records)
            eval_end = dict(run(full, workdir, echo=self.echo, devices=self._devices()).eval_end)
        if sft_result is None:  # the init itself: scored by this run before its first RL step (full judge)
            sft_result = {"eval_end": self._full_eval_start(summary, variant, seed, records),
                          "eval_length_ratio": eval_length_ratio(workdir, sft_steps)}
        result = {
            "variant": variant.key, "label": variant.label, "start": variant.start, "seed": seed,
            "sft_steps": sft_steps, "rl_steps": self.grid.rl_steps, "overrides": dict(variant.overrides),
            "rl_seconds": seconds, "warm_start": sft_result["eval_end"],
            "warm_start_length_ratio": sft_result["eval_length_ratio"],
            "eval_end": eval_end, "eval_length_ratio": eval_length_ratio(workdir, summary.final_step),
            "curves": curves_from_metrics(read_metrics(workdir, sft_steps), sft_steps),
        }
        result_path.write_text(json.dumps(result, indent=1))
        self.echo(f"== {variant.key} seed={seed} done in {seconds:.0f}s: " +
                  " ".join(f"{k}={v:.3f}" for k, v in eval_end.items()))
        return result

    def _full_eval_start(self, summary: Any, variant: Variant, seed: int, records: str) -> dict[str, float]:
        """The init's held-out scores on all three components: the run's own pre-RL evaluation when it used the
        full judge, else one evaluation-only run of the init (no RL steps) in a scratch directory."""
        if variant.components == COMPONENTS:
            return dict(summary.eval_start)
        from balcap_jax.trainer.loop import run

        scratch = self.root / f"init_eval_s{seed}"
        result_path = scratch / RESULT_FILE
        if not result_path.is_file():
            shutil.rmtree(scratch, ignore_errors=True)
            config = run_config(self.base, self.grid, seed, [("train.sft_steps", 0)], rl_steps=0, records_dir=records)
            result_path.parent.mkdir(parents=True, exist_ok=True)
            scores = dict(run(config, scratch, echo=self.echo, devices=self._devices()).eval_end)
            result_path.write_text(json.dumps(scores))
        return json.loads(result_path.read_text())


def curves_from_metrics(rows: Sequence[Mapping[str, Any]], sft_steps: int) -> dict[str, list[float]]:
    """{"rl_step": [...], metric: [...]} for the plotted metrics (NaN where a run did not log one)."""
    curves: dict[str, list[float]] = {"rl_step": [int(r["step"]) - sft_steps for r in rows]}
    for metric, _ in CURVE_METRICS:
        curves[metric] = [float(r.get(metric, math.nan)) for r in rows]
    return curves


# ---------------------------------------------------------------------------------------------------------------
# Tables and plots


def load_results(root: Path, grid: Grid) -> dict[tuple[str, int], dict[str, Any]]:
    """{(variant key, seed): result} of the finished runs of `grid` under `root`."""
    results = {}
    for path in sorted(root.glob(f"rl_*_n{grid.sft_steps}_{grid.rl_steps}/{RESULT_FILE}")):
        result = json.loads(path.read_text())
        if int(result["seed"]) in grid.seeds:
            results[(result["variant"], int(result["seed"]))] = result
    return results


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample std (ddof=1; 0 for a single value) of the finite values; (nan, nan) when none."""
    finite = np.asarray([v for v in values if v is not None and np.isfinite(v)], np.float64)
    if finite.size == 0:
        return math.nan, math.nan
    return float(finite.mean()), float(finite.std(ddof=1)) if finite.size > 1 else 0.0


def fmt_mean_std(values: Sequence[float], digits: int = 3) -> str:
    mean, std = mean_std(values)
    if math.isnan(mean):
        return "—"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


TABLE_COLUMNS = (("total", "balanced (mean of P, R, L)"), ("precision", "precision"), ("recall", "recall"),
                 ("linguistic", "linguistic"))


def study_rows(study: str, results: Mapping[tuple[str, int], Mapping[str, Any]], seeds: Sequence[int]
               ) -> list[dict[str, Any]]:
    """One row per variant (and one per warm start): {"label", "start", "n", column: [per-seed values]}."""
    rows, starts_seen = [], []
    for variant in study_variants(study):
        runs = [results[(variant.key, s)] for s in seeds if (variant.key, s) in results]
        if variant.start not in starts_seen and runs:
            starts_seen.append(variant.start)
            warm = {"label": f"warm start ({variant.start}), before RL", "start": variant.start, "n": len(runs),
                    "variant": f"sft_{variant.start}"}
            for column, _ in TABLE_COLUMNS:
                warm[column] = [r["warm_start"].get(column, math.nan) for r in runs]
            warm["length_ratio"] = [r["warm_start_length_ratio"] for r in runs]
            warm["train_length_ratio"] = [curve_window_mean(r, "length/ratio_mean", first=True) for r in runs]
            warm["collapsed"] = [collapsed(r["warm_start"]) for r in runs]
            rows.append(warm)
        row = {"label": variant.label, "start": variant.start, "n": len(runs), "variant": variant.key}
        for column, _ in TABLE_COLUMNS:
            row[column] = [r["eval_end"].get(column, math.nan) for r in runs]
        row["length_ratio"] = [r["eval_length_ratio"] for r in runs]
        row["train_length_ratio"] = [curve_window_mean(r, "length/ratio_mean") for r in runs]
        row["collapsed"] = [collapsed(r["eval_end"]) for r in runs]
        row["rl_seconds"] = [r["rl_seconds"] for r in runs]
        rows.append(row)
    return rows


CURVE_WINDOW = 10  # training steps averaged for the "train length ratio" column
# Held-out scores of the collapse to the count sentence on one-object ShapesWorld (precision 1, recall 1/4).
COLLAPSE_MIN_PRECISION, COLLAPSE_MAX_RECALL = 0.95, 0.30


def collapsed(scores: Mapping[str, float]) -> bool:
    """Whether held-out greedy captions look like the count-sentence collapse (near-perfect precision, no recall
    beyond the count fact)."""
    return (scores.get("precision", math.nan) >= COLLAPSE_MIN_PRECISION
            and scores.get("recall", math.nan) <= COLLAPSE_MAX_RECALL)


def curve_window_mean(result: Mapping[str, Any], metric: str, *, first: bool = False) -> float:
    """Mean of a run's curve over its last (or first) CURVE_WINDOW RL steps; NaN when it logged none."""
    values = result["curves"].get(metric, [])
    window = values[:CURVE_WINDOW] if first else values[-CURVE_WINDOW:]
    return mean_std(window)[0]


def paired_difference(a: Mapping[int, float], b: Mapping[int, float]) -> tuple[float, float, int]:
    """Mean and std over shared seeds of a[seed] - b[seed]: -> (mean, std, number of seeds)."""
    shared = sorted(set(a) & set(b))
    mean, std = mean_std([a[s] - b[s] for s in shared])
    return mean, std, len(shared)


def verdict(name_a: str, name_b: str, diff: tuple[float, float, int], metric: str) -> str:
    """A plain sentence on a paired difference: a gap within one std of its seed-to-seed spread is called a tie."""
    mean, std, n = diff
    if n == 0 or math.isnan(mean):
        return f"- {name_a} vs {name_b} ({metric}): no seed with both runs finished."
    if n < 2:
        return f"- {name_a} − {name_b} ({metric}): {mean:+.3f} on 1 seed (no spread to judge it by)."
    if abs(mean) <= std:
        word = "no clear difference"
    else:
        word = f"{name_a if mean > 0 else name_b} higher"
    return f"- {name_a} − {name_b} ({metric}): {mean:+.3f} ± {std:.3f} over {n} seeds (paired): {word}."


def _per_seed(results, key: str, column: str, seeds: Sequence[int]) -> dict[int, float]:
    return {s: results[(key, s)]["eval_end"].get(column, math.nan) for s in seeds if (key, s) in results}


def _per_seed_length(results, key: str, seeds: Sequence[int]) -> dict[int, float]:
    return {s: curve_window_mean(results[(key, s)], "length/ratio_mean") for s in seeds if (key, s) in results}


STUDY_TITLES = {
    "advantage": "GRPO vs c-GDPO",
    "length": "Length handling: conditional masking vs linear penalty vs none",
    "components": "Reward components removed in turn",
    "band": "Length band of the linguistic mask",
    "lambda": "Linear length penalty: λ swept",
    "utility": "QA-utility reward alone vs the balanced reward",
}


def study_findings(study: str, results, seeds: Sequence[int]) -> list[str]:
    """Paired comparisons against the study's baseline, computed from the results (no hand-written numbers)."""
    lines = []
    if study == "advantage":
        for column in ("total", *COMPONENTS):
            lines.append(verdict("c-GDPO", "GRPO", paired_difference(
                _per_seed(results, "gdpo_mask", column, seeds), _per_seed(results, "grpo_mask", column, seeds)),
                column))
    elif study == "length":
        for suffix, start in (("", "reference"), ("_verbose", "verbose")):
            for other, name in (("gdpo_linear", "linear"), ("gdpo_none", "none")):
                for column in ("total",):
                    lines.append(verdict(f"mask [{start} start]", f"{name} [{start} start]", paired_difference(
                        _per_seed(results, "gdpo_mask" + suffix, column, seeds),
                        _per_seed(results, other + suffix, column, seeds)), column))
                lines.append(verdict(f"mask [{start} start]", f"{name} [{start} start]", paired_difference(
                    _per_seed_length(results, "gdpo_mask" + suffix, seeds),
                    _per_seed_length(results, other + suffix, seeds)), "train length ratio"))
    elif study == "components":
        for variant in study_variants(study)[1:]:
            lines.append(verdict("all three", variant.label, paired_difference(
                _per_seed(results, BASELINE.key, "total", seeds), _per_seed(results, variant.key, "total", seeds)),
                "total"))
    return lines


TRAIN_LENGTH = "train length ratio"  # a claim metric read from the training curves, not the held-out scores
# The paper's claims per study: (key of a, key of b, label a, label b, metric, expected sign of a - b).
CLAIMS: dict[str, list[tuple[str, str, str, str, str, int]]] = {
    "advantage": [("gdpo_mask", "grpo_mask", "c-GDPO", "GRPO", m, +1) for m in ("b_capscore", "total")],
    "length": [("gdpo_mask" + sfx, other + sfx, f"mask [{start}]", f"{name} [{start}]", m, +1)
               for sfx, start in (("", "reference start"), ("_verbose", "verbose start"))
               for other, name in (("gdpo_linear", "linear penalty"), ("gdpo_none", "no length handling"))
               for m in ("b_capscore", "total")]
              # the paper: with no length handling captions ended shorter than the base model's
              + [("gdpo_mask_verbose", "gdpo_none_verbose", "mask [verbose start]", "no length handling [verbose start]",
                  TRAIN_LENGTH, +1)],
    "components": [("gdpo_mask", component_variant(s).key, "all three", component_variant(s).label, "b_capscore", +1)
                   for s in itertools.combinations(COMPONENTS, 2)],
    "band": [("gdpo_mask", f"gdpo_mask_band_{lo}_{hi}", "[0.5, 2.0]", f"[{lo}, {hi}]", "b_capscore", +1)
             for lo, hi in ((0.5, 1.5), (0.75, 1.25))],
    "lambda": [("gdpo_mask", lambda_variant(coef).key, "mask", f"linear λ={coef}", "b_capscore", +1) for coef in LAMBDAS],
    "utility": [("gdpo_mask", "only_caprl_qa", "balanced reward", "QA utility only", "b_capscore", +1),
                ("gdpo_mask", "only_caprl_qa", "balanced reward", "QA utility only", "precision", +1),
                # the paper: a utility-only reward makes captions longer
                ("gdpo_mask", "only_caprl_qa", "balanced reward", "QA utility only", TRAIN_LENGTH, -1)],
}
def _claim_values(results, key: str, metric: str, seeds: Sequence[int]) -> dict[int, float]:
    return _per_seed_length(results, key, seeds) if metric == TRAIN_LENGTH else _per_seed(results, key, metric, seeds)


def study_claims(study: str, results, seeds: Sequence[int]) -> list[str]:
    """One line per paper claim of the study: the paired CI sentence and reproduced / not reproduced / reversed."""
    lines = []
    for key_a, key_b, name_a, name_b, metric, sign in CLAIMS.get(study, []):
        comparison = paired_stats.compare(_claim_values(results, key_a, metric, seeds),
                                          _claim_values(results, key_b, metric, seeds))
        outcome = paired_stats.claim_outcome(comparison, sign)
        lines.append(comparison.sentence(name_a, name_b, metric)[:-1] + f" — claim {outcome}.")
    return lines


def claims_markdown(studies: Sequence[str], results, grid: Grid, command: str) -> str:
    """Every paper claim of `studies` in one table: the paired mean a − b, its bootstrap 95 % CI, the seeds and
    the outcome (computed from the finished runs; a claim with no finished pair is listed as such)."""
    lines = [
        "# The paper's claims on ShapesWorld",
        "",
        f"{grid.sft_steps} SFT + {grid.rl_steps} RL steps, seeds {list(grid.seeds)}; per-seed paired differences, "
        f"percentile-bootstrap 95 % CI (`experiments/paired_stats.py`); \"reproduced\" only when the CI excludes 0 "
        f"on the claimed side, no verdict below {paired_stats.MIN_SEEDS} seeds. Details per study: "
        "`ablation_<study>.md`.",
        "",
        "| study | claim | metric | a − b | 95 % CI | seeds | outcome |",
        "|---|---|---|---:|---|---:|---|",
    ]
    for study in studies:
        for key_a, key_b, name_a, name_b, metric, sign in CLAIMS.get(study, []):
            comparison = paired_stats.compare(_claim_values(results, key_a, metric, grid.seeds),
                                              _claim_values(results, key_b, metric, grid.seeds))
            claim = f"{name_a} {'>' if sign > 0 else '<'} {name_b}"
            if comparison.n == 0:
                lines.append(f"| {study} | {claim} | {metric} | — | — | 0 | not run |")
                continue
            outcome = paired_stats.claim_outcome(comparison, sign)
            lines.append(f"| {study} | {claim} | {metric} | {comparison.mean:+.3f} | "
                         f"[{comparison.ci_low:+.3f}, {comparison.ci_high:+.3f}] | {comparison.n} | {outcome} |")
    lines += ["", "Regenerate:", "", f"    {command}", ""]
    return "\n".join(lines)


def study_markdown(study: str, results, grid: Grid, command: str) -> str:
    seeds = grid.seeds
    rows = study_rows(study, results, seeds)
    reduced = "" if grid.is_full() else (" — REDUCED GRID (the default recipe is the shipped warm start + 800 RL "
                                         "steps; ≥ 5 seeds for a CI verdict)")
    start = ("every seed starts from the shipped warm start (`balcap_jax/assets/shapes_world_warm_start`), so seeds "
             "vary the RL phase (world, sampling, data order); the verbose start is it fitted "
             f"{grid.verbose_sft_steps} more SFT steps to verbose targets" if grid.sft_steps == 0 else
             f"per seed, {grid.sft_steps} SFT steps from random weights for each warm start")
    lines = [
        f"# Ablation: {STUDY_TITLES[study]}",
        "",
        f"ShapesWorld testbed (1-2 objects with relations, warm start fitted to imperfect captions), tiny Qwen2.5-VL-architecture policy, exact offline judge. "
        f"**{grid.sft_steps} SFT + {grid.rl_steps} RL steps, seeds {list(seeds)}**{reduced}; {start}. "
        "Held-out images (64 per seed), greedy captions, every variant scored on all three components; "
        "mean ± std over seeds (n = seeds finished). `length ratio`: words of the caption / words of the reference "
        "on the first 8 held-out captions. All other settings are the embedded default recipe.",
        "",
        f"`train length ratio`: tokens of the caption / tokens of the reference, mean over the training rollouts of "
        f"the last {CURVE_WINDOW} RL steps (for the warm-start rows: of the first {CURVE_WINDOW} RL steps of the "
        "same runs, i.e. near the warm start).",
        "",
        f"`collapsed`: seeds whose held-out captions score precision ≥ {COLLAPSE_MIN_PRECISION} and recall ≤ "
        f"{COLLAPSE_MAX_RECALL} (the count-sentence collapse explained below). `RL wall s` includes the process's "
        "first compile on the first variant and, for component subsets, the extra full-judge evaluation.",
        "",
        "| variant | n | " + " | ".join(h for _, h in TABLE_COLUMNS)
        + " | length ratio (held-out) | train length ratio | collapsed | RL wall s |",
        "|---|---:|" + "---:|" * (len(TABLE_COLUMNS) + 4),
    ]
    for row in rows:
        cells = [fmt_mean_std(row[c]) for c, _ in TABLE_COLUMNS]
        cells.append(fmt_mean_std(row["length_ratio"], 2))
        cells.append(fmt_mean_std(row["train_length_ratio"], 2))
        cells.append(f"{sum(row['collapsed'])}/{len(row['collapsed'])}")
        cells.append(fmt_mean_std(row["rl_seconds"], 0) if "rl_seconds" in row else "")
        lines.append(f"| {row['label']} | {row['n']} | " + " | ".join(cells) + " |")
    lines += ["", "## What the numbers show (paired over seeds, computed by the script)", ""]
    lines += study_findings(study, results, seeds)
    lines += ["", "## The paper's claims (paired bootstrap 95 % CI over seeds; tie unless the CI excludes 0; "
              f"no verdict below {paired_stats.MIN_SEEDS} seeds)", ""]
    lines += study_claims(study, results, seeds)
    lines += ["", "How to read the balanced score here: a caption that states only the count (\"There are two "
              "shapes in the image.\") scores precision 1, recall 1/8 and linguistic 1; its length ratio ρ ≈ 0.3 is "
              "below the band [0.5, 2.0], so the mask takes its linguistic credit. A variant whose precision goes to "
              "~1 while recall falls to the count fact (`collapsed`) has learned that collapse, not better captions. "
              "b-CapScore (the harmonic mean of the three) punishes such imbalance more than the mean does."]
    lines += ["", f"Reward curves (training batches, mean ± std over seeds): `ablation_{study}.png`.", "",
              "Regenerate (the workdir keeps finished runs, so a repeated command only rebuilds the tables):", "",
              f"    {command}", ""]
    if not grid.is_full():
        lines += ["Full grid (the default recipe's step budget, 5 seeds; ~20 RL variants x 5 seeds on 2 CPU cores "
                  "take many hours):", "",
                  "    python experiments/ablations.py run --studies=advantage,length,band,lambda,utility,components "
                  "--seeds=0,1,2,3,4 --rl_steps=800", ""]
    return "\n".join(lines)


def study_json(study: str, results, grid: Grid) -> dict[str, Any]:
    rows = study_rows(study, results, grid.seeds)
    return {
        "study": study, "grid": dataclasses.asdict(grid), "reduced_grid": not grid.is_full(),
        "rows": [{**row, **{f"{c}_mean_std": mean_std(row[c]) for c, _ in TABLE_COLUMNS}} for row in rows],
    }


def smooth(values: Sequence[float], window: int) -> np.ndarray:
    """Trailing moving average that skips NaNs (a step's NaN stays NaN only if its whole window is NaN)."""
    values = np.asarray(values, np.float64)
    out = np.full_like(values, np.nan)
    for i in range(len(values)):
        chunk = values[max(0, i - window + 1): i + 1]
        finite = chunk[np.isfinite(chunk)]
        if finite.size:
            out[i] = finite.mean()
    return out


LENGTH_COLOURS = {"mask": "C0", "linear": "C1", "none": "C2"}


def plot_study(study: str, results, grid: Grid, path: Path) -> None:
    """One panel per curve metric; one line per variant (mean over seeds, band = ± std), smoothed over steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = study_variants(study)
    fig, grid_axes = plt.subplots(2, 3, figsize=(13.5, 7.0))
    axes, legend_ax = [list(grid_axes.flat[: len(CURVE_METRICS)])], grid_axes.flat[-1]
    window = max(1, grid.rl_steps // 15)
    for variant in variants:
        runs = [results[(variant.key, s)] for s in grid.seeds if (variant.key, s) in results]
        if not runs:
            continue
        length = min(len(r["curves"]["rl_step"]) for r in runs)
        if length == 0:
            continue
        steps = np.asarray(runs[0]["curves"]["rl_step"][:length])
        style = "--" if variant.start == "verbose" else "-"
        label = variant.label
        for ax, (metric, title) in zip(axes[0], CURVE_METRICS):
            curves = np.stack([smooth(r["curves"][metric][:length], window) for r in runs])
            if not np.isfinite(curves).any():
                continue
            with np.errstate(all="ignore"):
                mean = np.nanmean(curves, axis=0)
                std = np.nanstd(curves, axis=0)
            # Length study: one colour per length handling, so the two starts of a method read as a pair.
            colour = LENGTH_COLOURS.get(dict(variant.overrides).get("length.kind")) if study == "length" else None
            line, = ax.plot(steps, mean, style, color=colour, label=f"{label} (n={len(runs)})")
            ax.fill_between(steps, mean - std, mean + std, color=line.get_color(), alpha=0.15)
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("RL step")
    handles, labels = axes[0][0].get_legend_handles_labels()
    legend_ax.axis("off")
    if handles:
        legend_ax.legend(handles, labels, loc="center", fontsize=9, frameon=False)
    fig.suptitle(f"{STUDY_TITLES[study]} — {grid.sft_steps} SFT + {grid.rl_steps} RL steps, seeds "
                 f"{list(grid.seeds)} (mean ± std over seeds; moving average over {window} steps)", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_reports(root: Path, grid: Grid, studies: Sequence[str], results_dir: Path, command: str) -> list[Path]:
    """ablation_<study>.{md,json,png} from the finished runs; -> the paths written."""
    results = load_results(root, grid)
    written = []
    results_dir.mkdir(parents=True, exist_ok=True)
    for study in studies:
        md = results_dir / f"ablation_{study}.md"
        md.write_text(study_markdown(study, results, grid, command))
        js = results_dir / f"ablation_{study}.json"
        js.write_text(json.dumps(study_json(study, results, grid), indent=1, allow_nan=True))
        png = results_dir / f"ablation_{study}.png"
        plot_study(study, results, grid, png)
        written += [md, js, png]
    claims = results_dir / "ablation_claims.md"
    claims.write_text(claims_markdown(studies, results, grid, command))
    return written + [claims]


# ---------------------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("run", "report"), help="run the sweep (then report), or only report")
    parser.add_argument("--studies", default=",".join(STUDIES), help=f"comma-separated subset of {STUDIES}")
    parser.add_argument("--seeds", default="0,1,2,3,4", help="comma-separated seeds (>= 5 for a CI verdict)")
    parser.add_argument("--sft_steps", type=int, default=0,
                        help="0: every run starts from the recipe's shipped warm start (config.train.init_from)")
    parser.add_argument("--rl_steps", type=int, default=300)
    parser.add_argument("--starts", default=",".join(STARTS),
                        help=f"comma-separated subset of {STARTS}: the warm starts whose variants run")
    parser.add_argument("--variants", default="",
                        help="comma-separated variant keys to run (default: every variant of the studies); reports "
                             "still cover whole studies, with the runs not made listed as such")
    parser.add_argument("--workdir", default="/tmp/balcap_ablations", help="run directories (large; not committed)")
    parser.add_argument("--results_dir", default=str(DEFAULT_RESULTS_DIR))
    args = parser.parse_args(list(argv))
    args.studies = tuple(s for s in args.studies.split(",") if s)
    unknown = [s for s in args.studies if s not in STUDIES]
    if unknown:
        parser.error(f"--studies has unknown {unknown}; allowed: {STUDIES}")
    args.starts = tuple(s for s in args.starts.split(",") if s)
    if not args.starts or any(s not in STARTS for s in args.starts):
        parser.error(f"--starts={','.join(args.starts)!r}; allowed: a comma-separated subset of {STARTS}")
    args.variants = tuple(v for v in args.variants.split(",") if v)
    known = {v.key for study in args.studies for v in study_variants(study)}
    if any(v not in known for v in args.variants):
        parser.error(f"--variants has {sorted(set(args.variants) - known)}, not variants of --studies="
                     f"{','.join(args.studies)}; allowed: {sorted(known)}")
    try:
        args.seeds = tuple(int(s) for s in args.seeds.split(",") if s)
    except ValueError:
        parser.error(f"--seeds must be comma-separated integers; got {args.seeds!r}")
    return args


def regenerate_command(args: argparse.Namespace) -> str:
    starts = "" if tuple(args.starts) == STARTS else f" --starts={','.join(args.starts)}"
    return (f"python experiments/ablations.py run --studies={','.join(args.studies)} "
            f"--seeds={','.join(map(str, args.seeds))} --sft_steps={args.sft_steps} --rl_steps={args.rl_steps}"
            + starts)


def main(argv: Sequence[str]) -> None:
    args = parse_args(argv)
    grid = Grid(args.seeds, args.sft_steps, args.rl_steps)
    root = Path(args.workdir)
    root.mkdir(parents=True, exist_ok=True)
    command = regenerate_command(args)
    results_dir = Path(args.results_dir)
    if args.command == "run":
        import jax

        # Every variant compiles the same sampler and update programs: share them across runs and processes.
        jax.config.update("jax_compilation_cache_dir", str(root / "jax_cache"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
        from balcap_jax.default_config import get_config

        runner = Runner(root, grid, get_config(), echo=lambda s: print(s, flush=True))
        # Seeds inside studies: the first study finishes on every seed before the next one starts.
        for study in args.studies:
            for variant in (v for v in study_variants(study)
                            if v.start in args.starts and (not args.variants or v.key in args.variants)):
                for seed in grid.seeds:
                    runner.rl_run(variant, seed)
                    write_reports(root, grid, args.studies, results_dir, command)
    for path in write_reports(root, grid, args.studies, results_dir, command):
        print(f"wrote {path}")


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    main(sys.argv[1:])
