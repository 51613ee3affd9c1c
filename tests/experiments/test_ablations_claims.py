"""experiments/ablations.py: the band / λ / utility studies and the paper's claims as paired bootstrap CIs."""

import math
from pathlib import Path

import pytest

from balcap_jax.default_config import get_config
from balcap_jax.rl.shaping import ShapingConfig
from tests.experiments.script_module import script_module

SCRIPT = Path(__file__).resolve().parents[2] / "experiments" / "ablations.py"


@pytest.fixture(scope="module")
def abl():
    with script_module(SCRIPT, "ablations_claims_script") as module:
        yield module


@pytest.mark.parametrize("study", ["band", "lambda", "utility"])
def test_new_studies_build_valid_shaping_configs(abl, study):
    grid = abl.Grid((0,), sft_steps=10, rl_steps=4)
    variants = abl.study_variants(study)
    assert variants[0] is abl.BASELINE and len({v.key for v in variants}) == len(variants)
    for variant in variants:
        config = abl.run_config(get_config(), grid, 0, variant.overrides, rl_steps=4, records_dir="/tmp/x")
        ShapingConfig.from_config(config)


def test_band_study_keeps_the_old_bands_and_nan_masking_as_named_variants(abl):
    bands = {v.key: dict(v.overrides) for v in abl.study_variants("band")}
    assert bands["gdpo_mask_band_0.5_1.5"]["length.ratio_max"] == 1.5
    assert bands["gdpo_mask_band_0.75_1.25"]["length.ratio_min"] == 0.75
    assert math.isnan(bands["gdpo_mask_nan"]["length.masked_value"])
    default = get_config().length.coef
    lambdas = abl.study_variants("lambda")[1:]
    assert [dict(v.overrides).get("length.coef", default) for v in lambdas] == list(abl.LAMBDAS)
    # The recipe's λ is the length study's linear run, not a second copy of it under another key.
    assert abl.DEFAULT_LAMBDA == default and abl.lambda_variant(default) is abl.LINEAR
    assert abl.LINEAR in abl.study_variants("length") and abl.LINEAR.start == "reference"


def _results(per_variant: dict[str, list[float]], metric: str) -> dict:
    return {(key, seed): {"eval_end": {metric: value}} for key, values in per_variant.items()
            for seed, value in enumerate(values)}


def test_claims_are_reproduced_tied_or_reversed_from_the_paired_ci(abl):
    seeds = range(5)
    better = _results({"gdpo_mask": [0.61, 0.52, 0.70, 0.58, 0.66], "grpo_mask": [0.51, 0.43, 0.59, 0.49, 0.57]},
                      "b_capscore")
    line = abl.study_claims("advantage", better, seeds)[0]
    assert line.startswith("- c-GDPO − GRPO (b_capscore): +0.096 [95 % CI")
    assert line.endswith("5 seeds (paired): c-GDPO higher — claim reproduced.")
    worse = _results({"gdpo_mask": [0.5, 0.4, 0.6, 0.5, 0.55], "grpo_mask": [0.6, 0.5, 0.7, 0.6, 0.65]},
                     "b_capscore")
    assert abl.study_claims("advantage", worse, seeds)[0].endswith("GRPO higher — claim reversed.")
    tie = _results({"gdpo_mask": [0.5, 0.6, 0.5, 0.6, 0.55], "grpo_mask": [0.6, 0.5, 0.6, 0.5, 0.55]}, "b_capscore")
    assert abl.study_claims("advantage", tie, seeds)[0].endswith("tie — claim not reproduced.")
    few = _results({"gdpo_mask": [0.9, 0.9, 0.9], "grpo_mask": [0.1, 0.1, 0.1]}, "b_capscore")
    assert abl.study_claims("advantage", few, range(3))[0].endswith("too few seeds — claim not reproduced.")


def test_every_claim_names_variants_of_its_study(abl):
    for study, claims in abl.CLAIMS.items():
        keys = {v.key for v in abl.study_variants(study)}
        for key_a, key_b, *_ in claims:
            assert key_a in keys and key_b in keys, (study, key_a, key_b)


def test_the_utility_claim_on_length_reads_the_training_curves(abl):
    """"QA utility only makes captions longer" is a claim on the train length ratio (balanced − QA < 0)."""
    def run(ratio):
        return {"eval_end": {}, "curves": {"length/ratio_mean": [ratio] * abl.CURVE_WINDOW}}

    results = {("gdpo_mask", s): run(1.0 + 0.01 * s) for s in range(5)}
    results.update({("only_caprl_qa", s): run(1.6 + 0.02 * s) for s in range(5)})
    line = [x for x in abl.study_claims("utility", results, range(5)) if abl.TRAIN_LENGTH in x][0]
    assert line.startswith("- balanced reward − QA utility only (train length ratio): -0.620")
    assert line.endswith("QA utility only higher — claim reproduced.")
