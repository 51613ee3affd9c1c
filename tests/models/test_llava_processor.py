"""LLaVA host-side inputs: CLIP preprocessing equals HF's PIL image processors; placeholder expansion; batches."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from balcap_jax.models.llava import config as llava_config
from balcap_jax.models.llava import processor

skimage_data = pytest.importorskip("skimage.data")


def _real_images() -> dict[str, Image.Image]:
    """Photographs of several sizes and aspect ratios, plus grayscale, RGBA and smaller-than-crop inputs."""
    astronaut = Image.fromarray(skimage_data.astronaut())  # 512 x 512
    coffee = Image.fromarray(skimage_data.coffee())  # 600 x 400 (landscape)
    chelsea = Image.fromarray(skimage_data.chelsea())  # 451 x 300
    portrait = coffee.transpose(Image.Transpose.ROTATE_90)  # 400 x 600
    camera = Image.fromarray(skimage_data.camera())  # grayscale "L"
    rgba = chelsea.convert("RGBA")
    alpha = np.asarray(rgba).copy()
    alpha[..., 3] = np.linspace(0, 255, alpha.shape[1], dtype=np.uint8)[None]
    small = chelsea.resize((97, 61))
    return {
        "astronaut": astronaut,
        "coffee": coffee,
        "chelsea": chelsea,
        "portrait": portrait,
        "camera_gray": camera,
        "chelsea_rgba": Image.fromarray(alpha, "RGBA"),
        "small": small,
    }


IMAGES = _real_images()


def _hf_pixels(hf_processor, image: Image.Image) -> np.ndarray:
    out = hf_processor(images=[image], return_tensors="np")["pixel_values"][0]  # [3, H, W]
    return np.moveaxis(out, 0, -1)


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_preprocess_matches_hf_clip_processor(name):
    from transformers import CLIPImageProcessorPil

    hf = CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    ours = processor.preprocess_image(IMAGES[name])
    expected = _hf_pixels(hf, IMAGES[name])
    assert ours.shape == (336, 336, 3) and ours.dtype == np.float32
    np.testing.assert_array_equal(ours, expected)


@pytest.mark.parametrize("name", ["coffee", "portrait", "chelsea", "small"])
def test_pad_to_square_matches_hf_llava_processor(name):
    from transformers import LlavaImageProcessorPil

    hf = LlavaImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, do_pad=True)
    cfg = processor.ClipImageProcessorConfig(pad_to_square=True)
    ours = processor.preprocess_image(IMAGES[name], cfg)
    np.testing.assert_array_equal(ours, _hf_pixels(hf, IMAGES[name]))


def test_processor_config_from_llava_hf_preprocessor_json_matches_hf():
    from transformers import CLIPImageProcessorPil

    # The preprocessor_config.json of llava-hf/llava-1.5-7b-hf, with a non-default crop to prove it is read.
    hf_json = {
        "crop_size": {"height": 224, "width": 224},
        "do_center_crop": True,
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": list(processor.OPENAI_CLIP_MEAN),
        "image_processor_type": "CLIPImageProcessor",
        "image_std": list(processor.OPENAI_CLIP_STD),
        "resample": 3,
        "rescale_factor": 0.00392156862745098,
        "size": {"shortest_edge": 256},
    }
    cfg = processor.ClipImageProcessorConfig.from_hf_dict(hf_json)
    assert (cfg.shortest_edge, cfg.crop_size, cfg.pad_to_square) == (256, 224, False)
    hf = CLIPImageProcessorPil(**{k: v for k, v in hf_json.items() if k != "image_processor_type"})
    np.testing.assert_array_equal(
        processor.preprocess_image(IMAGES["coffee"], cfg), _hf_pixels(hf, IMAGES["coffee"])
    )
    with pytest.raises(ValueError, match="do_normalize"):
        processor.ClipImageProcessorConfig.from_hf_dict(hf_json | {"do_normalize": False})


def test_shortest_edge_size_truncates_like_hf():
    assert processor.shortest_edge_size(300, 451, 336) == (336, 505)  # 336 * 451 / 300 = 505.12
    assert processor.shortest_edge_size(601, 400, 336) == (504, 336)  # 336 * 601 / 400 = 504.84
    assert processor.shortest_edge_size(512, 512, 336) == (336, 336)


def test_preprocess_images_stacks_and_handles_empty():
    batch = processor.preprocess_images([IMAGES["coffee"], IMAGES["astronaut"]])
    assert batch.shape == (2, 336, 336, 3)
    np.testing.assert_array_equal(batch[1], processor.preprocess_image(IMAGES["astronaut"]))
    assert processor.preprocess_images([]).shape == (0, 336, 336, 3)
    with pytest.raises(TypeError, match="PIL"):
        processor.preprocess_image(np.zeros((4, 4, 3), np.uint8))


def test_image_seq_length_is_576_for_llava_1_5_and_follows_the_config():
    assert llava_config.llava_1_5_7b().image_seq_length == 576
    cfg = llava_config.tiny(image_size=56, patch_size=14)
    assert cfg.image_seq_length == 16
    full = llava_config.LlavaConfig(
        vision=cfg.vision, text=cfg.text, image_token_id=cfg.image_token_id, vision_feature_select_strategy="full"
    )
    assert full.image_seq_length == 17


def test_placeholder_expansion_text_and_ids():
    prompt = processor.caption_prompt("Describe the image in detail.")
    assert prompt == "USER: <image>\nDescribe the image in detail. ASSISTANT:"
    assert processor.caption_prompt("Hi", num_images=2, system_prompt="Be brief.") == (
        "Be brief. USER: <image>\n<image>\nHi ASSISTANT:"
    )
    assert processor.format_llava_prompt("Hi", num_images=2, system="Be brief.") == processor.caption_prompt(
        "Hi", num_images=2, system_prompt="Be brief."
    )
    expanded = processor.expand_image_placeholders(prompt, 576)
    assert expanded.count("<image>") == 576 and expanded.endswith("Describe the image in detail. ASSISTANT:")
    ids = processor.expand_image_token_ids([1, 5, 99, 7, 99, 8], image_token_id=99, tokens_per_image=3)
    assert ids == [1, 5, 99, 99, 99, 7, 99, 99, 99, 8]
    with pytest.raises(ValueError, match="consecutive image tokens"):
        processor.expand_image_token_ids(ids, image_token_id=99, tokens_per_image=3)


def test_make_batch_pads_left_or_right_with_padding_aware_positions():
    cfg = llava_config.tiny()  # 4 image tokens per image, image token 127
    img = cfg.image_token_id
    rows = [[1, 2, img, img, img, img, 3], [4, 5]]
    pixels = np.zeros((1, 28, 28, 3), np.float32)
    batch = processor.make_batch(rows, pixels, cfg, pad_id=0, length=9)
    np.testing.assert_array_equal(batch["input_ids"][1], [0] * 7 + [4, 5])
    np.testing.assert_array_equal(batch["attention_mask"][1], [False] * 7 + [True] * 2)
    np.testing.assert_array_equal(batch["positions"][0], [0, 0, 0, 1, 2, 3, 4, 5, 6])
    np.testing.assert_array_equal(batch["positions"][1], [0] * 7 + [0, 1])
    assert batch["vision"]["pixel_values"].shape == (1, 28, 28, 3)
    right = processor.make_batch(rows, pixels, cfg, pad_id=0, padding_side="right")
    np.testing.assert_array_equal(right["positions"][1], [0, 1, 0, 0, 0, 0, 0])
    text_only = processor.make_batch([[1, 2]], None, cfg, pad_id=0)
    assert "vision" not in text_only
    with pytest.raises(ValueError, match="hold 4 image tokens .* 2 image"):
        processor.make_batch(rows, np.zeros((2, 28, 28, 3), np.float32), cfg, pad_id=0)
    with pytest.raises(ValueError, match="shorter than the longest"):
        processor.make_batch(rows, pixels, cfg, pad_id=0, length=3)


def test_make_batch_preprocesses_pil_images_for_the_model_size():
    cfg = llava_config.tiny(image_size=56)
    rows = [[1] + [cfg.image_token_id] * cfg.image_seq_length]
    batch = processor.make_batch(rows, [IMAGES["chelsea"]], cfg, pad_id=0)
    expected = processor.preprocess_image(IMAGES["chelsea"], processor.ClipImageProcessorConfig(56, 56))
    np.testing.assert_array_equal(batch["vision"]["pixel_values"][0], expected)


class _WordTokenizer:
    """A whitespace tokenizer with `<image>` as a special token split out of words (HF call convention)."""

    BOS = 1

    def __init__(self, image_token_id: int):
        self.image_token_id = image_token_id

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        ids = [self.BOS] if add_special_tokens else []
        for word in text.replace(processor.LLAVA_IMAGE_TOKEN, f" {processor.LLAVA_IMAGE_TOKEN} ").split():
            ids.append(self.image_token_id if word == processor.LLAVA_IMAGE_TOKEN else 2 + len(word) % 50)
        return {"input_ids": ids}


def test_encode_prompt_expands_tokenizes_and_preprocesses():
    cfg = llava_config.tiny(image_size=56)  # 16 tokens per image
    tokenizer = _WordTokenizer(cfg.image_token_id)
    text = processor.caption_prompt("Describe it.", num_images=2)
    out = processor.encode_prompt(tokenizer, text, [IMAGES["coffee"], IMAGES["camera_gray"]], cfg)
    assert out["input_ids"][0] == tokenizer.BOS
    assert (out["input_ids"] == cfg.image_token_id).sum() == 32
    np.testing.assert_array_equal(out["positions"], np.arange(len(out["input_ids"])))
    assert out["pixel_values"].shape == (2, 56, 56, 3)
    batch = processor.make_batch([out["input_ids"]], out["pixel_values"], cfg, pad_id=0)
    assert batch["input_ids"].shape == (1, len(out["input_ids"]))
    with pytest.raises(ValueError, match="2 <image> placeholder.* 1 image"):
        processor.encode_prompt(tokenizer, text, [IMAGES["coffee"]], cfg)
