"""The model registry resolves every family; the parity CLI passes on a faithful checkpoint and fails on a
corrupted one."""

import os

import numpy as np
import pytest

from balcap_jax.models import hf_io, registry
from balcap_jax.tools import parity
from tests.models import qwen_fixtures as fx


@pytest.mark.parametrize("name", ["qwen2_5_vl", "llava"])
def test_every_registered_family_resolves(name):
    family = registry.get(name)
    assert callable(family.config_from_hf) and callable(family.load) and callable(family.save)
    assert isinstance(family.model_class, type)
    training, sampling = family.sharding("training"), family.sharding("sampling")
    assert type(training) is type(sampling) and training != sampling
    assert registry.family_for_hf_config({"model_type": family.hf_model_types[0]}) is family


def test_registry_errors_name_the_problem():
    with pytest.raises(KeyError, match="unknown model family 'gpt'"):
        registry.get("gpt")
    with pytest.raises(ValueError, match="model_type='bert'"):
        registry.family_for_hf_config({"model_type": "bert"})


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny_qwen")
    fx.tiny_qwen_hf_model(seed=4).save_pretrained(directory)
    return directory


def test_parity_cli_passes_on_the_same_weights_with_real_images(tiny_dir, capsys):
    """Three real photographs (colour and grayscale, two aspect ratios) through our processor."""
    import skimage

    assert registry.family_for_hf_dir(tiny_dir).name == "qwen2_5_vl"
    data = os.path.join(os.path.dirname(skimage.__file__), "data")
    images = [os.path.join(data, name) for name in ("astronaut.png", "coffee.png", "camera.png")]
    code = parity.main(["--hf-dir", str(tiny_dir), "--prompt-tokens", "64", "--max-pixels", str(160 * 160),
                        "--images", *images])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0, out
    assert "max |logit diff|" in out and "PASS" in out
    assert "(1, 10, 10)" in out and "(1, 8, 12)" in out  # square and 2:3 (coffee, 400x600) photos


def test_parity_cli_fails_when_our_weights_differ(tiny_dir, tmp_path, capsys, monkeypatch):
    """Load ours from a copy with one perturbed decoder weight: the tool must report FAIL and exit 1."""
    from balcap_jax.models.qwen2_5_vl import params

    corrupted = tmp_path / "corrupted"
    corrupted.mkdir()
    tensors = dict(hf_io.iter_hf_tensors(tiny_dir))
    key = "model.layers.1.mlp.down_proj.weight"  # save_pretrained writes the flat layout
    tensors[key] = tensors[key] + np.float32(0.05)
    hf_io.write_safetensors(corrupted / "model.safetensors", tensors, {"format": "pt"})
    (corrupted / "config.json").write_text((tiny_dir / "config.json").read_text())
    real_load = params.load_qwen2_5_vl
    monkeypatch.setattr(params, "load_qwen2_5_vl", lambda directory, **kw: real_load(corrupted, **kw))
    code = parity.main(["--hf-dir", str(tiny_dir), "--prompt-tokens", "32", "--grids", "1,4,4"])
    assert code == 1
    assert "FAIL" in capsys.readouterr().out


def test_compare_reports_kl_and_max_diff():
    ref = np.zeros((1, 2, 3), np.float32)
    ours = ref.copy()
    ours[0, 1, 0] = 0.5
    report = parity.compare(ref, ours, np.array([[True, True]]))
    assert report.max_abs_logit_diff == pytest.approx(0.5) and report.num_tokens == 2
    p = np.full(3, 1 / 3)
    q = np.exp([0.5, 0, 0]) / np.exp([0.5, 0, 0]).sum()
    assert report.max_kl == pytest.approx(float(np.sum(p * np.log(p / q))))
    assert not report.ok(logit_tol=1e-3, kl_tol=1.0)
