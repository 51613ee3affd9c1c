"""The Qwen2.5-VL processor in the pipeline: per-example M-RoPE positions, left-padded by the pipeline, equal
positions computed on the padded batch; image tokens and patches match the image grid."""

import numpy as np
import pytest

from balcap_jax.data import shapes_world as W
from balcap_jax.data.pipeline import PipelineConfig, make_dataset
from balcap_jax.data.qwen_inputs import QWEN_CONCAT_KEYS, QwenCaptionProcessor
from balcap_jax.data.shapes_world_records import write_shapes_world_manifests
from balcap_jax.data.tfds_builder import open_split, prepare_manifest_dataset
from balcap_jax.models.qwen2_5_vl.processor import IMAGE_TOKEN_ID, ImageProcessorConfig
from balcap_jax.models.qwen2_5_vl.rope_index import get_rope_index


@pytest.fixture(scope="module")
def batches(tmp_path_factory, qwen_tokenizer):
    root = tmp_path_factory.mktemp("qwen_inputs")
    # Two image sizes, so prompts differ in length and rows get different amounts of left padding.
    small = write_shapes_world_manifests(str(root / "a"), seed=0, split_sizes={"train": 3},
                                         config=W.WorldConfig(image_size=56))
    large = write_shapes_world_manifests(str(root / "b"), seed=1, split_sizes={"train": 3})
    manifest = root / "mixed.jsonl"
    manifest.write_text(open(small["train"]).read() + open(large["train"]).read())
    prepare_manifest_dataset(str(root / "tfds"), "mixed", {"train": str(manifest)})
    processor = QwenCaptionProcessor(qwen_tokenizer, image_config=ImageProcessorConfig(max_pixels=112 * 112))
    config = PipelineConfig(batch_size=6, buckets=(64, 128), num_epochs=1, num_threads=1, pad_id=processor.pad_id,
                            concat_keys=QWEN_CONCAT_KEYS)
    return list(make_dataset(open_split(str(root / "tfds"), "mixed", "train"), processor, config))


def test_image_tokens_and_patches_follow_the_grid(batches):
    (batch,) = batches
    grid = batch["image_grid_thw"]
    assert grid.shape == (6, 3) and sorted(map(tuple, grid.tolist())) == [(1, 4, 4)] * 3 + [(1, 8, 8)] * 3
    assert batch["pixel_values"].shape == (int(np.prod(grid, axis=1).sum()), 3 * 2 * 14 * 14)
    image_tokens = (batch["input_ids"] == IMAGE_TOKEN_ID).sum(axis=1)
    np.testing.assert_array_equal(image_tokens, np.prod(grid, axis=1) // 4)
    np.testing.assert_array_equal(batch["mm_token_type_ids"], (batch["input_ids"] == IMAGE_TOKEN_ID).astype(int))
    assert batch["input_ids"].shape[1] in (64, 128) and len(set(batch["prompt_length"].tolist())) == 2


def test_per_example_positions_equal_batch_positions(batches):
    (batch,) = batches
    expected, _ = get_rope_index(batch["input_ids"], batch["attention_mask"], batch["image_grid_thw"],
                                 image_token_id=IMAGE_TOKEN_ID, spatial_merge_size=2)
    mask = batch["attention_mask"]
    assert batch["positions"].shape == (3, *batch["input_ids"].shape)
    np.testing.assert_array_equal(np.where(mask, batch["positions"], 0), np.where(mask, expected, 0))
