"""Every model family is one `ModelFamily` of real callables: no "module:attr" strings, every callable's source
findable (go-to-definition), the registry choosing by config.json's model_type, and the data layer holding a
caption processor for each family."""

import dataclasses
import inspect
import pathlib
import types

import numpy as np
import pytest

from balcap_jax.data import caption_processors
from balcap_jax.data.llava_inputs import LlavaCaptionProcessor
from balcap_jax.data.qwen_inputs import QWEN_CONCAT_KEYS, QwenCaptionProcessor
from balcap_jax.models import image_shards, registry
from balcap_jax.models.llava import config as llava_config
from balcap_jax.models.model_family import ModelFamily
from tests.models import qwen_fixtures as fx

PACKAGE = pathlib.Path(registry.__file__).resolve().parents[1]
VALUE_FIELDS = {"name", "hf_model_types", "concat_keys"}
FAMILIES = registry.names()


def _callable_fields() -> list[str]:
    return [f.name for f in dataclasses.fields(ModelFamily) if f.name not in VALUE_FIELDS]


def test_the_registry_holds_both_families():
    assert FAMILIES == ["llava", "qwen2_5_vl"]
    assert registry.ModelFamily is ModelFamily


@pytest.mark.parametrize("name", FAMILIES)
def test_every_field_is_a_real_value_not_a_string(name):
    family = registry.get(name)
    assert isinstance(family, ModelFamily) and family.name == name
    for field in ("hf_model_types", "concat_keys"):
        value = getattr(family, field)
        assert isinstance(value, tuple) and value and all(isinstance(v, str) for v in value), field
    assert isinstance(family.processor, types.ModuleType)
    assert isinstance(family.model_class, type)
    for field in _callable_fields():
        value = getattr(family, field)
        assert not isinstance(value, str), field
        assert field == "processor" or callable(value), field


@pytest.mark.parametrize("name", FAMILIES)
def test_every_callable_has_a_source_file(name):
    """The go-to-definition property: `inspect` reaches the code behind every field (shared helpers may live
    anywhere in the package; the per-family data behaviour lives in the family's own `family.py`)."""
    family = registry.get(name)
    for field in _callable_fields():
        source = inspect.getsourcefile(getattr(family, field))
        assert source is not None, field
        assert pathlib.Path(source).resolve().is_relative_to(PACKAGE), (field, source)
        inspect.getsourcelines(getattr(family, field))  # raises when the source cannot be read
    own = PACKAGE / "models" / name / "family.py"
    for field in ("images_per_prompt", "vision_inputs", "blocked_ids"):
        assert pathlib.Path(inspect.getsourcefile(getattr(family, field))).resolve() == own, field


@pytest.mark.parametrize("name", FAMILIES)
def test_sharding_layouts_and_hf_lookup(name):
    family = registry.get(name)
    training, sampling = family.sharding("training"), family.sharding("sampling")
    assert type(training) is type(sampling) and training != sampling
    with pytest.raises(ValueError, match="sharding layout 'serving'"):
        family.sharding("serving")
    for model_type in family.hf_model_types:
        assert registry.family_for_hf_config({"model_type": model_type}) is family


def test_hf_lookup_errors_name_every_known_model_type():
    with pytest.raises(ValueError, match=r"model_type='bert'.*known: \['llava', 'qwen2_5_vl'\]"):
        registry.family_for_hf_config({"model_type": "bert"})
    with pytest.raises(ValueError, match="model_type=None"):
        registry.family_for_hf_config({})
    with pytest.raises(KeyError, match=r"unknown model family 'gpt'; registered: \['llava', 'qwen2_5_vl'\]"):
        registry.get("gpt")


def test_config_from_hf_reads_each_family_config_json():
    llava = registry.get("llava")
    tiny = llava_config.tiny()
    assert llava.config_from_hf(tiny.to_hf_dict()) == tiny
    qwen = registry.get("qwen2_5_vl")
    qwen_config = qwen.config_from_hf({"model_type": "qwen2_5_vl", **fx.tiny_qwen_config_dict()})
    assert qwen_config.image_token_id == fx.IMAGE_TOKEN_ID


def test_blocked_ids_are_the_image_placeholders():
    qwen = registry.get("qwen2_5_vl")
    qwen_config = qwen.config_from_hf({"model_type": "qwen2_5_vl", **fx.tiny_qwen_config_dict()})
    assert qwen.blocked_ids(qwen_config) == (fx.IMAGE_TOKEN_ID, fx.VISION_START_TOKEN_ID, fx.VISION_END_TOKEN_ID)
    tiny = llava_config.tiny()
    assert registry.get("llava").blocked_ids(tiny) == (tiny.image_token_id,)


def test_concat_keys_match_what_the_data_processors_emit():
    assert registry.get("qwen2_5_vl").concat_keys == QWEN_CONCAT_KEYS
    assert registry.get("llava").concat_keys == ("pixel_values",)


def test_llava_vision_inputs_put_each_crop_once_in_its_block():
    """3 prompts x 2 rollouts in 2 blocks of 3 rows: block 0 holds prompts 0-1, block 1 prompts 1-2."""
    tiny = llava_config.tiny()
    crops = np.arange(3, dtype=np.float32)[:, None, None, None] * np.ones((3, 28, 28, 3), np.float32)
    family = registry.get("llava")
    np.testing.assert_array_equal(family.images_per_prompt(tiny, {"pixel_values": crops}), [1, 1, 1])
    vision = family.vision_inputs(tiny, {"pixel_values": crops}, 2, 2)
    assert vision["pixel_values"].shape == (2, 2, 28, 28, 3)
    np.testing.assert_array_equal(vision[image_shards.IMAGES_PER_SHARD], [2, 2])
    np.testing.assert_array_equal(vision["pixel_values"][:, :, 0, 0, 0], [[0, 1], [1, 2]])


def test_a_caption_processor_for_every_family():
    assert caption_processors.families() == FAMILIES
    tiny = llava_config.tiny()
    llava = caption_processors.caption_processor("llava", tokenizer=None, model_config=tiny, image_config=None,
                                                 instruction="Say what you see.")
    assert isinstance(llava, LlavaCaptionProcessor)
    assert (llava.image_token_id, llava.image_seq_length) == (tiny.image_token_id, tiny.image_seq_length)
    assert llava.instruction == "Say what you see."
    qwen = caption_processors.caption_processor("qwen2_5_vl", tokenizer=None, model_config=None, image_config=None,
                                                instruction="Say what you see.")
    assert isinstance(qwen, QwenCaptionProcessor) and qwen.instruction == "Say what you see."
    with pytest.raises(ValueError, match=r"model family 'gpt'; known: \['llava', 'qwen2_5_vl'\]"):
        caption_processors.caption_processor("gpt", tokenizer=None, model_config=None, image_config=None,
                                             instruction="")


def _qwen_batch(rng: np.random.Generator, config, grids: list[tuple[int, int, int]], prompts: int = 2) -> dict:
    """`prompts` rows of 5 random tokens, row i followed by the placeholder run of image `grids[i]` if any."""
    rows = [np.concatenate([fx.random_text_ids(rng, 5), fx.image_placeholder(g) if i < len(grids) else []])
            for i, g in enumerate([*grids, *[None] * (prompts - len(grids))])]
    ids = np.zeros((prompts, max(len(r) for r in rows)), np.int64)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
    mask = np.arange(ids.shape[1])[None] < np.asarray([len(r) for r in rows])[:, None]
    return {"input_ids": ids, "attention_mask": mask,
            "image_grid_thw": np.asarray(grids, np.int64).reshape(-1, 3),
            "pixel_values": fx.random_pixel_values(rng, grids, config.vision.patch_dim)}


def _qwen_config():
    from balcap_jax.models.qwen2_5_vl.config import Qwen2_5_VLConfig

    return Qwen2_5_VLConfig.from_hf(fx.tiny_qwen_config_dict())


def test_qwen_vision_inputs_are_none_for_a_batch_without_any_image():
    """A text-only batch (no image anywhere) runs without the tower: the hook gives None, with or without the
    image keys, and agrees that over processes (one agree_max call, like a process that has images)."""
    family, config, rng = registry.get("qwen2_5_vl"), _qwen_config(), np.random.default_rng(0)
    batch = _qwen_batch(rng, config, [])
    assert batch["image_grid_thw"].shape == (0, 3)
    assert family.vision_inputs(config, batch, 4, 2) is None
    text_only = {k: batch[k] for k in ("input_ids", "attention_mask")}
    assert family.vision_inputs(config, text_only, 4, 1) is None
    np.testing.assert_array_equal(family.images_per_prompt(config, batch), [0, 0])


def test_a_process_without_images_builds_padding_blocks_of_the_agreed_bucket(monkeypatch):
    """Two processes, one with images and one without: the image-less one must build the same shapes (all
    padding, no valid token, zero images per block), because the vision program is one SPMD program."""
    from balcap_jax.parallel import hosts

    family, config, rng = registry.get("qwen2_5_vl"), _qwen_config(), np.random.default_rng(1)
    with_images = family.vision_inputs(config, _qwen_batch(rng, config, [(1, 8, 8), (1, 4, 8)]), 2, 2)
    assert with_images is not None
    # The other process's values reach this one through agree_max: more than zero images, its fullest block.
    fullest = int(with_images["patches"].shape[1])
    agreed = iter([2, fullest])
    monkeypatch.setattr(hosts, "agree_max", lambda value: max(value, next(agreed)))
    empty = family.vision_inputs(config, _qwen_batch(rng, config, []), 2, 2)
    assert {k: v.shape for k, v in empty.items()} == {k: v.shape for k, v in with_images.items()}
    np.testing.assert_array_equal(empty[image_shards.IMAGES_PER_SHARD], [0, 0])
    assert not empty["token_valid"].any() and not empty["patches"].any()
    np.testing.assert_array_equal(with_images[image_shards.IMAGES_PER_SHARD], [1, 1])
