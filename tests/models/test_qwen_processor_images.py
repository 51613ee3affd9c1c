"""Image preprocessing equals HF's `Qwen2VLImageProcessorPil` on real photographs (scikit-image's samples)."""

import importlib.util
import os

import numpy as np
import PIL.Image
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import Qwen2VLImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

from balcap_jax.models.qwen2_5_vl import processor

# RGB photos of several sizes and aspect ratios, a greyscale photo and an RGBA logo.
PHOTOS = ["astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg", "camera.png", "logo.png", "motorcycle_left.png"]


def sample_photo(name: str) -> PIL.Image.Image:
    data_dir = os.path.join(importlib.util.find_spec("skimage").submodule_search_locations[0], "data")
    with PIL.Image.open(os.path.join(data_dir, name)) as image:
        image.load()
        return image


@pytest.mark.parametrize("max_pixels", [28 * 28 * 1280, 200_000], ids=["default", "downscale"])
@pytest.mark.parametrize("name", PHOTOS)
def test_preprocessing_equals_hf_on_photos(name, max_pixels):
    image = sample_photo(name)
    ref = Qwen2VLImageProcessorPil(max_pixels=max_pixels)(images=[image])
    config = processor.ImageProcessorConfig(max_pixels=max_pixels)
    pixel_values, grid_thw = processor.preprocess_images([image], config)
    np.testing.assert_array_equal(grid_thw, ref["image_grid_thw"])
    assert pixel_values.dtype == np.float32
    np.testing.assert_array_equal(pixel_values, ref["pixel_values"])  # bit-identical, not merely close


def test_batch_of_photos_and_arrays_equals_hf():
    images = [sample_photo("coffee.png"), np.asarray(sample_photo("chelsea.png")), sample_photo("camera.png")]
    ref = Qwen2VLImageProcessorPil(min_pixels=100_000)(images=images)
    pixel_values, grid_thw = processor.preprocess_images(images, processor.ImageProcessorConfig(min_pixels=100_000))
    np.testing.assert_array_equal(grid_thw, ref["image_grid_thw"])
    np.testing.assert_array_equal(pixel_values, ref["pixel_values"])


def test_rgba_array_is_composited_on_white_like_hf():
    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, size=(90, 130, 4), dtype=np.uint8)
    ref = Qwen2VLImageProcessorPil()(images=[rgba])
    pixel_values, _ = processor.preprocess_images([rgba])
    np.testing.assert_array_equal(pixel_values, ref["pixel_values"])


@settings(max_examples=300, deadline=None)
@given(
    height=st.integers(1, 5000),
    width=st.integers(1, 5000),
    min_pixels=st.sampled_from([56 * 56, 100_000]),
    max_pixels=st.sampled_from([28 * 28 * 1280, 12_845_056, 300_000]),
)
def test_smart_resize_equals_hf(height, width, min_pixels, max_pixels):
    kwargs = dict(factor=28, min_pixels=min_pixels, max_pixels=max_pixels)
    if max(height, width) / min(height, width) > 200:
        with pytest.raises(ValueError, match="aspect ratio"):
            processor.smart_resize(height, width, **kwargs)
        return
    assert processor.smart_resize(height, width, **kwargs) == hf_smart_resize(height, width, **kwargs)


def test_patches_follow_merge_unit_order():
    """Patch k of merge unit u holds the pixels of patch (row, col) from `merge_order_positions`."""
    image = np.arange(3 * 56 * 84, dtype=np.float32).reshape(3, 56, 84)
    patches = processor.patchify(image, patch_size=14, temporal_patch_size=2, merge_size=2)
    assert patches.shape == (4 * 6, 3 * 2 * 14 * 14)
    from balcap_jax.models.qwen2_5_vl.vision_host import merge_order_positions

    for patch, (row, col) in zip(patches, merge_order_positions(np.array([[1, 4, 6]]), 2)):
        cube = patch.reshape(3, 2, 14, 14)
        expected = image[:, row * 14:(row + 1) * 14, col * 14:(col + 1) * 14]
        np.testing.assert_array_equal(cube[:, 0], expected)
        np.testing.assert_array_equal(cube[:, 1], expected)  # a still image repeats along time


def test_config_from_hf_preprocessor_json():
    released = {"min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2,
                "merge_size": 2, "image_mean": list(processor.OPENAI_CLIP_MEAN),
                "image_std": list(processor.OPENAI_CLIP_STD),
                "image_processor_type": "Qwen2VLImageProcessor"}  # fmt: skip
    config = processor.ImageProcessorConfig.from_hf(released)
    assert (config.min_pixels, config.max_pixels, config.factor) == (3136, 12845056, 28)
    newer = {"size": {"shortest_edge": 1000, "longest_edge": 500_000}}
    assert processor.ImageProcessorConfig.from_hf(newer).max_pixels == 500_000
    with pytest.raises(ValueError, match="do_normalize=False"):
        processor.ImageProcessorConfig.from_hf({"do_normalize": False})


def test_bad_images_raise_clear_errors():
    with pytest.raises(ValueError, match="must be uint8"):
        processor.preprocess_images([np.zeros((40, 40, 3), np.float32)])
    with pytest.raises(ValueError, match="channels-last"):
        processor.preprocess_images([np.zeros((3, 40, 40, 2), np.uint8)])
    with pytest.raises(ValueError, match="aspect ratio"):
        processor.preprocess_images([np.zeros((1, 300, 3), np.uint8)])
    with pytest.raises(ValueError, match="at least one image"):
        processor.preprocess_images([])
    with pytest.raises(ValueError, match="min_pixels <= max_pixels"):
        processor.ImageProcessorConfig(min_pixels=10_000, max_pixels=5_000)
