"""experiments/ablations.py: variants and their configs, the verbose warm start's data, tables, findings and plots."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from balcap_jax.default_config import get_config
from balcap_jax.rl.shaping import ShapingConfig
from tests.experiments.script_module import script_module

SCRIPT = Path(__file__).resolve().parents[2] / "experiments" / "ablations.py"


@pytest.fixture(scope="module")
def abl():
    with script_module(SCRIPT, "ablations_script") as module:
        yield module


# ------------------------------------------------------------------------------------------------------------
# Variants and configs


def test_every_variant_builds_a_valid_shaping_config(abl):
    grid = abl.Grid((0, 1, 2), sft_steps=10, rl_steps=4)
    for study in abl.STUDIES:
        for variant in abl.study_variants(study):
            config = abl.run_config(get_config(), grid, 7, variant.overrides, rl_steps=4, records_dir="/r")
            shaping = ShapingConfig.from_config(config)  # raises on an inconsistent variant
            assert shaping.components == variant.components
            assert (config.seed, config.train.sft_steps, config.train.rl_steps) == (7, 10, 4)
            assert config.data.records_dir == "/r" and not config.checkpoint.export_hf


def test_studies_compare_what_they_say(abl):
    advantage = {v.key: dict(v.overrides) for v in abl.study_variants("advantage")}
    assert advantage["gdpo_mask"]["advantage.kind"] == "gdpo" and advantage["grpo_mask"]["advantage.kind"] == "grpo"
    assert advantage["gdpo_mask"]["length.kind"] == advantage["grpo_mask"]["length.kind"] == "mask"

    length = abl.study_variants("length")
    kinds = {(v.start, dict(v.overrides)["length.kind"]) for v in length}
    assert kinds == {(s, k) for s in abl.STARTS for k in ("mask", "linear", "none")}
    assert len({v.key for v in length}) == 6  # verbose-start runs never share a directory with reference-start runs

    components = abl.study_variants("components")
    assert [v.components for v in components] == [
        ("precision", "recall", "linguistic"), ("precision", "recall"), ("precision", "linguistic"),
        ("recall", "linguistic"), ("precision",), ("recall",), ("linguistic",),
    ]
    for v in components[1:]:
        overrides = dict(v.overrides)
        assert len(overrides["rewards.weights"]) == len(v.components)
        assert overrides["length.kind"] == ("mask" if "linguistic" in v.components else "none")
    # The default recipe is one run shared by all three studies.
    assert components[0] is abl.BASELINE is abl.study_variants("advantage")[0] is length[0]


def test_apply_overrides_copies_and_names_unknown_fields(abl):
    base = get_config()
    changed = abl.apply_overrides(base, {"advantage.kind": "grpo", "rewards.components": ("recall",)})
    assert changed.advantage.kind == "grpo" and tuple(changed.rewards.components) == ("recall",)
    assert base.advantage.kind == "gdpo"  # the base is untouched
    with pytest.raises(KeyError, match="advantage.kindd"):
        abl.apply_overrides(base, {"advantage.kindd": "grpo"})
    with pytest.raises(KeyError, match="nosuch"):
        abl.apply_overrides(base, {"nosuch.kind": 1})
    with pytest.raises(ValueError, match="at least one"):
        abl.component_variant(())
    with pytest.raises(ValueError, match="Grid"):
        abl.Grid((), 1, 1)


def test_parse_args_validates(abl):
    args = abl.parse_args(["run", "--studies=length,advantage", "--seeds=3,4,5", "--rl_steps=50"])
    assert args.studies == ("length", "advantage") and args.seeds == (3, 4, 5)
    assert abl.regenerate_command(args) == (
        "python experiments/ablations.py run --studies=length,advantage --seeds=3,4,5 --sft_steps=0 --rl_steps=50")
    for bad in (["run", "--studies=lenght"], ["report", "--seeds=a,b"]):
        with pytest.raises(SystemExit):
            abl.parse_args(bad)


# ------------------------------------------------------------------------------------------------------------
# The verbose warm start


REFS = [
    "There is exactly one shape in the image. There is a large yellow circle in the bottom middle.",
    "The picture contains a single shape. In the bottom middle, there is a large yellow circle.",
    "Only one object appears in the image. A large yellow circle sits in the bottom middle.",
]


def test_verbose_reference_restates_without_the_count_sentence(abl):
    verbose = abl.verbose_reference(REFS)
    assert verbose == REFS[0] + " In the bottom middle, there is a large yellow circle. A large yellow circle sits in the bottom middle."
    assert len(verbose.split()) / len(REFS[0].split()) > 2.0  # above the paper's band: the mask binds
    with pytest.raises(ValueError, match=">= 2 references"):
        abl.verbose_reference(REFS[:1])
    with pytest.raises(ValueError, match="no sentence after"):
        abl.verbose_reference([REFS[0], "One shape."])


def test_rewrite_manifest_replaces_only_references(abl, tmp_path):
    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps({"id": "a", "references": REFS, "metadata": {"k": 1}}) + "\n\n")
    count = abl.rewrite_manifest(str(source), str(tmp_path / "out" / "x.jsonl"), lambda r: [*r, "extra"])
    out = [json.loads(line) for line in (tmp_path / "out" / "x.jsonl").read_text().splitlines()]
    assert count == 1 and out == [{"id": "a", "references": [*REFS, "extra"], "metadata": {"k": 1}}]


def test_prepare_records_verbose_sft_and_rl_share_a_corpus(abl, tmp_path):
    from balcap_jax.trainer.data_sources import corpus_texts, prepare_data

    config = abl.apply_overrides(get_config(), {"seed": 3, "data.shapes_world.num_train": 4,
                                                "data.shapes_world.num_eval": 2})
    dirs = abl.prepare_records(config, tmp_path)
    splits = {}
    for key, directory in dirs.items():
        train, validation = prepare_data(abl.apply_overrides(config, {"data.records_dir": directory}), tmp_path)
        splits[key] = (train, validation)
    first = lambda source: [source[i]["references"][0].decode() for i in range(len(source))]  # noqa: E731
    normal, sft, rl = (first(splits[k][0]) for k in ("reference", "verbose_sft", "verbose_rl"))
    assert rl == normal  # RL rewards and the length ratio read the ordinary reference
    assert all(s.startswith(n) and len(s.split()) > 1.5 * len(n.split()) for s, n in zip(sft, normal))
    assert sorted(corpus_texts(splits["verbose_sft"][0])) == sorted(corpus_texts(splits["verbose_rl"][0]))
    for key in ("verbose_sft", "verbose_rl"):  # the held-out split is the world's own
        assert first(splits[key][1]) == first(splits["reference"][1])


# ------------------------------------------------------------------------------------------------------------
# Statistics and findings


def test_mean_std_and_paired_difference(abl):
    assert abl.mean_std([1.0, 2.0, 3.0]) == pytest.approx((2.0, 1.0))
    assert abl.mean_std([0.5, float("nan")]) == (0.5, 0.0)
    assert all(math.isnan(x) for x in abl.mean_std([]))
    assert abl.fmt_mean_std([0.25, 0.75]) == "0.500 ± 0.354"
    assert abl.fmt_mean_std([]) == "—"
    mean, std, n = abl.paired_difference({0: 0.5, 1: 0.7, 2: 0.9}, {0: 0.4, 1: 0.5, 2: 0.9, 3: 9.0})
    assert (mean, std, n) == (pytest.approx(0.1), pytest.approx(0.1), 3)


def test_verdict_calls_small_gaps_ties(abl):
    assert "GDPO higher" in abl.verdict("GDPO", "GRPO", (0.05, 0.01, 3), "total")
    assert "GRPO higher" in abl.verdict("GDPO", "GRPO", (-0.05, 0.01, 3), "total")
    assert "no clear difference" in abl.verdict("GDPO", "GRPO", (0.01, 0.02, 3), "total")
    assert "1 seed" in abl.verdict("GDPO", "GRPO", (0.01, 0.0, 1), "total")
    assert "no seed" in abl.verdict("GDPO", "GRPO", (math.nan, math.nan, 0), "total")


def test_smooth_skips_nans(abl):
    np.testing.assert_allclose(abl.smooth([1.0, np.nan, 3.0, 5.0], 2), [1.0, 1.0, 3.0, 4.0])
    assert np.isnan(abl.smooth([np.nan, 1.0], 1)[0])


def test_read_metrics_keeps_rl_rows_last_write_wins(abl, tmp_path):
    rows = [{"step": 1, "sft/nll": 2.0}, {"step": 3, "reward/total_mean": 0.1},
            {"step": 2, "reward/total_mean": 0.0}, {"step": 3, "reward/total_mean": 0.3, "length/ratio_mean": 1.1}]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    got = abl.read_metrics(tmp_path, after_step=1)
    assert [r["step"] for r in got] == [2, 3] and got[1]["reward/total_mean"] == 0.3
    curves = abl.curves_from_metrics(got, sft_steps=1)
    assert curves["rl_step"] == [1, 2] and curves["length/ratio_mean"][1] == 1.1
    assert math.isnan(curves["reward/precision_mean"][0])


def test_eval_length_ratio_reads_eval_captions_only(abl, tmp_path):
    rows = [{"step": 9, "caption": "a b c d", "reference": "a b"},
            {"step": 9, "caption": "a b", "reference": "a b"},
            {"step": 9, "caption": "training sample", "reference": "x", "rewards": {"precision": 1.0}},
            {"step": 5, "caption": "a", "reference": "a b c d"}]
    (tmp_path / "samples.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    assert abl.eval_length_ratio(tmp_path, 9) == pytest.approx(1.5)
    assert math.isnan(abl.eval_length_ratio(tmp_path, 7))


# ------------------------------------------------------------------------------------------------------------
# Reports from finished runs


def _fake_result(abl, root: Path, variant, seed: int, grid, total: float) -> None:
    steps = list(range(1, grid.rl_steps + 1))
    scores = {"precision": total, "recall": total / 2, "linguistic": 1.0, "total": total}
    result = {
        "variant": variant.key, "label": variant.label, "start": variant.start, "seed": seed,
        "sft_steps": grid.sft_steps, "rl_steps": grid.rl_steps, "overrides": dict(variant.overrides),
        "rl_seconds": 10.0, "warm_start": {k: 0.1 for k in scores}, "warm_start_length_ratio": 1.0,
        "eval_end": scores, "eval_length_ratio": 1.0 + seed / 10,
        "curves": {"rl_step": steps, **{m: [total * s / len(steps) for s in steps] for m, _ in abl.CURVE_METRICS}},
    }
    run_dir = root / f"rl_{variant.key}_s{seed}_n{grid.sft_steps}_{grid.rl_steps}"
    run_dir.mkdir(parents=True)
    (run_dir / abl.RESULT_FILE).write_text(json.dumps(result))


def test_write_reports_tables_findings_and_plots(abl, tmp_path):
    grid = abl.Grid((0, 1, 2), sft_steps=20, rl_steps=6)
    gaps = {"gdpo_mask": 0.6, "grpo_mask": 0.4}
    for seed in grid.seeds:
        for key, base in gaps.items():
            variant = next(v for v in abl.study_variants("advantage") if v.key == key)
            _fake_result(abl, tmp_path, variant, seed, grid, base + 0.01 * seed)
    # A run of another grid and a seed outside the grid are ignored.
    _fake_result(abl, tmp_path, abl.BASELINE, 0, abl.Grid((0,), 20, 7), 0.0)
    _fake_result(abl, tmp_path, abl.BASELINE, 5, grid, 0.0)

    out = tmp_path / "results"
    written = abl.write_reports(tmp_path, grid, ["advantage", "components"], out, "CMD")
    assert sorted(p.name for p in written) == sorted(
        [f"ablation_{s}.{e}" for s in ("advantage", "components") for e in ("md", "json", "png")]
        + ["ablation_claims.md"])
    for path in written:
        assert path.stat().st_size > 0
    assert (out / "ablation_advantage.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    md = (out / "ablation_advantage.md").read_text()
    assert "20 SFT + 6 RL steps, seeds [0, 1, 2]" in md and "REDUCED GRID" in md and "    CMD" in md
    assert "| c-GDPO + mask (default) | 3 | 0.610 ± 0.010 | 0.610 ± 0.010 | 0.305 ± 0.005 |" in md
    assert "| GRPO + mask | 3 | 0.410 ± 0.010 |" in md
    # held-out length ratio, train length ratio (mean of the last steps: 0.40..0.42 x 3.5/6), collapsed, RL seconds
    assert "| GRPO + mask | 3 | 0.410 ± 0.010 | 0.410 ± 0.010 | 0.205 ± 0.005 | 1.000 ± 0.000 | 1.10 ± 0.10 | " \
           "0.24 ± 0.01 | 0/3 | 10 ± 0 |" in md
    assert "| warm start (reference), before RL | 3 | 0.100 ± 0.000 |" in md
    assert "c-GDPO − GRPO (total): +0.200 ± 0.000 over 3 seeds (paired): c-GDPO higher." in md
    assert "(linguistic): +0.000 ± 0.000 over 3 seeds (paired): no clear difference." in md

    data = json.loads((out / "ablation_advantage.json").read_text())
    assert data["reduced_grid"] and data["grid"]["seeds"] == [0, 1, 2]
    rows = {r["variant"]: r for r in data["rows"]}
    assert rows["grpo_mask"]["total_mean_std"] == pytest.approx([0.41, 0.01])
    assert rows["gdpo_mask"]["length_ratio"] == pytest.approx([1.0, 1.1, 1.2])

    claims = (out / "ablation_claims.md").read_text()
    assert "| advantage | c-GDPO > GRPO | total | +0.200 | [+0.200, +0.200] | 3 | not reproduced |" in claims
    assert "| components | all three > precision + recall (no mask) | b_capscore | — | — | 0 | not run |" in claims

    components_md = (out / "ablation_components.md").read_text()
    assert "| precision + recall (no mask) | 0 | — |" in components_md  # not run yet: shown, not invented
    assert "all three vs precision + recall (no mask) (total): no seed with both runs finished." in components_md


def test_full_grid_is_not_labelled_reduced(abl):
    assert abl.Grid((0, 1, 2, 3, 4), 0, 800).is_full()
    assert not abl.Grid((0, 1, 2), 0, 800).is_full()
    assert not abl.Grid((0, 1, 2, 3, 4), 0, 300).is_full()


def test_a_shipped_start_grid_trains_only_the_verbose_start(abl):
    """sft_steps 0: the reference start is the recipe's init (no SFT run), the verbose one a short fine-tune of it;
    sft_steps > 0 trains both from scratch for that many steps."""
    shipped = abl.Grid((0,), 0, 300, verbose_sft_steps=40)
    assert (shipped.start_steps("reference"), shipped.start_steps("verbose")) == (0, 40)
    scratch = abl.Grid((0,), 500, 300)
    assert (scratch.start_steps("reference"), scratch.start_steps("verbose")) == (500, 500)
    with pytest.raises(ValueError, match="verbose_sft_steps"):
        abl.Grid((0,), 0, 1, verbose_sft_steps=0)
    args = abl.parse_args(["run", "--starts=reference", "--rl_steps=300"])
    assert args.starts == ("reference",) and args.sft_steps == 0
    assert abl.regenerate_command(args).endswith("--sft_steps=0 --rl_steps=300 --starts=reference")
    with pytest.raises(SystemExit):
        abl.parse_args(["run", "--starts=fancy"])


def test_curve_window_mean_reads_the_tail_or_the_head(abl):
    values = list(range(1, 21))  # 20 RL steps
    result = {"curves": {"length/ratio_mean": [float(v) for v in values]}}
    assert abl.curve_window_mean(result, "length/ratio_mean") == pytest.approx(np.mean(values[-abl.CURVE_WINDOW:]))
    assert abl.curve_window_mean(result, "length/ratio_mean", first=True) == pytest.approx(
        np.mean(values[: abl.CURVE_WINDOW]))
    assert math.isnan(abl.curve_window_mean({"curves": {}}, "length/ratio_mean"))


def test_collapsed_flags_the_count_sentence_scores(abl):
    assert abl.collapsed({"precision": 1.0, "recall": 0.25, "linguistic": 1.0})
    assert not abl.collapsed({"precision": 1.0, "recall": 0.5})
    assert not abl.collapsed({"precision": 0.6, "recall": 0.25})
    assert not abl.collapsed({"recall": 0.25})  # a run without a precision score is never called collapsed


def test_runner_gives_the_verbose_start_its_token_budget_and_runs_only_chosen_variants(abl, tmp_path, monkeypatch):
    """The verbose start's fine-tune and its RL runs get START_OVERRIDES (room for ~120-token targets); the
    reference start keeps the recipe's budget. `--variants` picks variants of the studies and refuses others."""
    import types

    from balcap_jax.trainer import loop

    seen: list[tuple[str, int, int]] = []

    def fake_run(config, workdir, **_):
        seen.append((Path(workdir).name, int(config.sampling.max_new_tokens), int(config.train.rl_steps)))
        Path(workdir).mkdir(parents=True, exist_ok=True)
        scores = {"precision": 0.5, "recall": 0.5, "linguistic": 0.5, "total": 0.5, "b_capscore": 0.5}
        return types.SimpleNamespace(final_step=0, eval_end=scores, eval_start=scores, stopped_early=False)

    monkeypatch.setattr(loop, "run", fake_run)
    monkeypatch.setattr(abl, "read_metrics", lambda *_: [])
    monkeypatch.setattr(abl, "_summary_dict", lambda summary: {"eval_end": summary.eval_end})
    runner = abl.Runner(tmp_path, abl.Grid((0,), 0, 3, verbose_sft_steps=2), get_config(), echo=lambda _: None)
    runner._records[0] = {k: str(tmp_path / k) for k in ("reference", "verbose_sft", "verbose_rl")}
    length = {v.key: v for v in abl.study_variants("length")}
    runner.rl_run(length["gdpo_linear_verbose"], 0)
    runner.rl_run(length["gdpo_linear"], 0)
    budget = dict(abl.START_OVERRIDES["verbose"])["sampling.max_new_tokens"]
    assert budget > get_config().sampling.max_new_tokens
    assert seen == [("sft_verbose_s0_n2", budget, 0), ("rl_gdpo_linear_verbose_s0_n0_3", budget, 3),
                    ("rl_gdpo_linear_s0_n0_3", get_config().sampling.max_new_tokens, 3)]

    args = abl.parse_args(["run", "--studies=components", "--variants=only_precision+recall"])
    assert args.variants == ("only_precision+recall",)
    with pytest.raises(SystemExit):
        abl.parse_args(["run", "--studies=advantage", "--variants=only_precision+recall"])


def test_runner_builds_a_seeds_records_under_a_lock(abl, tmp_path, monkeypatch):
    """Side-by-side sweeps on one workdir: a seed's records are built while holding `records_s<seed>.lock`, so a
    second process waits instead of racing the first's dataset build."""
    import fcntl

    held = []

    def fake_prepare(config, root):
        with open(root / f"records_s{config.seed}.lock", "w") as other:  # another open file: as another process
            try:
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
                held.append(False)
            except BlockingIOError:
                held.append(True)
        return {"reference": "r"}

    monkeypatch.setattr(abl, "prepare_records", fake_prepare)
    runner = abl.Runner(tmp_path, abl.Grid((7,), 0, 3), get_config(), echo=lambda _: None)
    assert runner.records(7) == {"reference": "r"} and runner.records(7) == {"reference": "r"}
    assert held == [True]  # built once, under the lock
