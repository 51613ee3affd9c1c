"""LLaVA-1.5 inputs on the host: CLIP image preprocessing, `<image>` expansion, padded model batches.

`preprocess_image` reproduces HF's `CLIPImageProcessor` / `LlavaImageProcessor` (PIL backend) as configured by
`llava-hf/llava-1.5-*-hf`: RGB (alpha composited on white) -> bicubic resize of the shortest edge to 336 ->
center crop 336x336 -> x/255 -> (x - mean) / std with OpenAI CLIP statistics. `pad_to_square=True` is the
original LLaVA-1.5 training recipe (`image_aspect_ratio="pad"`): pad to a square with the mean colour first.

Output is channels-last float32[H, W, 3] (HF returns [3, H, W]).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

from balcap_jax.models.image_shards import IMAGES_PER_SHARD, RowShard
from balcap_jax.models.llava.config import LlavaConfig

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
LLAVA_IMAGE_TOKEN = "<image>"

_RESAMPLE = {
    0: Image.Resampling.NEAREST,
    1: Image.Resampling.LANCZOS,
    2: Image.Resampling.BILINEAR,
    3: Image.Resampling.BICUBIC,
    4: Image.Resampling.BOX,
    5: Image.Resampling.HAMMING,
}


@dataclasses.dataclass(frozen=True)
class ClipImageProcessorConfig:
    shortest_edge: int = 336
    crop_size: int = 336
    resample: int = 3  # PIL bicubic, HF's `resample` enum value
    rescale_factor: float = 1 / 255
    image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    image_std: tuple[float, float, float] = OPENAI_CLIP_STD
    pad_to_square: bool = False

    def __post_init__(self):
        if self.shortest_edge <= 0 or self.crop_size <= 0:
            raise ValueError(
                f"ClipImageProcessorConfig sizes must be positive, got shortest_edge={self.shortest_edge}, "
                f"crop_size={self.crop_size}"
            )
        if self.resample not in _RESAMPLE:
            raise ValueError(f"ClipImageProcessorConfig.resample must be one of {sorted(_RESAMPLE)} (PIL enum)")
        if len(self.image_mean) != 3 or len(self.image_std) != 3:
            raise ValueError("ClipImageProcessorConfig.image_mean and image_std need one value per RGB channel")

    @classmethod
    def for_model(cls, config: LlavaConfig, **overrides) -> "ClipImageProcessorConfig":
        size = config.vision.image_size
        return cls(**({"shortest_edge": size, "crop_size": size} | overrides))

    @classmethod
    def from_hf_dict(cls, hf: Mapping[str, Any]) -> "ClipImageProcessorConfig":
        """From a `preprocessor_config.json` of a CLIP/LLaVA image processor."""
        size, crop = hf.get("size", {}), hf.get("crop_size", {})
        shortest = size.get("shortest_edge") if isinstance(size, Mapping) else size
        if isinstance(crop, Mapping):
            if crop.get("height") != crop.get("width"):
                raise ValueError(f"preprocessor crop_size must be square, got {crop}")
            crop = crop.get("height")
        if shortest is None or crop is None:
            raise ValueError(
                f"preprocessor_config needs size.shortest_edge and crop_size, got size={size!r} crop_size={crop!r}"
            )
        for flag in ("do_resize", "do_center_crop", "do_rescale", "do_normalize"):
            if hf.get(flag, True) is False:
                raise ValueError(f"preprocessor_config {flag}=False is not supported by the LLaVA processor")
        return cls(
            shortest_edge=int(shortest),
            crop_size=int(crop),
            resample=int(hf.get("resample", 3)),
            rescale_factor=float(hf.get("rescale_factor", 1 / 255)),
            image_mean=tuple(hf.get("image_mean", OPENAI_CLIP_MEAN)),
            image_std=tuple(hf.get("image_std", OPENAI_CLIP_STD)),
            pad_to_square=bool(hf.get("do_pad", False)),
        )


def _to_rgb(image: Image.Image) -> Image.Image:
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def _pad_to_square(image: Image.Image, mean: Sequence[float]) -> Image.Image:
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new("RGB", (side, side), tuple(int(m * 255) for m in mean))
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def shortest_edge_size(height: int, width: int, shortest_edge: int) -> tuple[int, int]:
    """(height, width) with the short side = `shortest_edge` and the long side scaled and truncated (HF rule)."""
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(shortest_edge * long / short)
    return (new_long, shortest_edge) if width <= height else (shortest_edge, new_long)


def center_crop(pixels: np.ndarray, size: int) -> np.ndarray:
    """[H, W, C] -> [size, size, C]; zero-pads first (centred, HF rounding) when the image is smaller."""
    height, width = pixels.shape[:2]
    if height < size or width < size:
        new_h, new_w = max(size, height), max(size, width)
        top_pad, left_pad = -(-(new_h - height) // 2), -(-(new_w - width) // 2)
        padded = np.zeros((new_h, new_w, pixels.shape[2]), pixels.dtype)
        padded[top_pad : top_pad + height, left_pad : left_pad + width] = pixels
        pixels, height, width = padded, new_h, new_w
    top, left = (height - size) // 2, (width - size) // 2
    return pixels[top : top + size, left : left + size]


def preprocess_image(image: Image.Image, config: ClipImageProcessorConfig = ClipImageProcessorConfig()) -> np.ndarray:
    """One PIL image -> float32[crop, crop, 3], normalised."""
    if not isinstance(image, Image.Image):
        raise TypeError(f"preprocess_image expects a PIL.Image.Image, got {type(image).__name__}")
    rgb = _to_rgb(image)
    if config.pad_to_square:
        rgb = _pad_to_square(rgb, config.image_mean)
    height, width = shortest_edge_size(rgb.height, rgb.width, config.shortest_edge)
    resized = rgb.resize((width, height), resample=_RESAMPLE[config.resample])
    pixels = center_crop(np.asarray(resized), config.crop_size)
    # Same dtype path as HF: rescale in float64, store float32, normalise in float32.
    scaled = (pixels.astype(np.float64) * config.rescale_factor).astype(np.float32)
    mean = np.asarray(config.image_mean, np.float32)
    std = np.asarray(config.image_std, np.float32)
    return (scaled - mean) / std


def preprocess_images(
    images: Sequence[Image.Image], config: ClipImageProcessorConfig = ClipImageProcessorConfig()
) -> np.ndarray:
    """Images -> float32[N, crop, crop, 3] (N may be 0)."""
    if not images:
        return np.zeros((0, config.crop_size, config.crop_size, 3), np.float32)
    return np.stack([preprocess_image(image, config) for image in images])


def expand_image_placeholders(text: str, tokens_per_image: int, image_token: str = LLAVA_IMAGE_TOKEN) -> str:
    """Replace each `<image>` in `text` by `tokens_per_image` copies (what HF's LlavaProcessor tokenizes)."""
    return text.replace(image_token, image_token * tokens_per_image)


def expand_image_token_ids(token_ids: Sequence[int], image_token_id: int, tokens_per_image: int) -> list[int]:
    """Token-level version: each single `image_token_id` becomes `tokens_per_image` copies.

    Raises if the ids already contain a run of image tokens (expanding twice is the usual bug)."""
    out: list[int] = []
    previous = None
    for token in token_ids:
        if token == image_token_id:
            if previous == image_token_id:
                raise ValueError(
                    "token_ids already contain consecutive image tokens; pass the unexpanded prompt (one image "
                    "token per image)"
                )
            out.extend([image_token_id] * tokens_per_image)
        else:
            out.append(token)
        previous = token
    return out


def format_llava_prompt(instruction: str, *, num_images: int = 1, system: str | None = None) -> str:
    """LLaVA-1.5's conversation template (llava-hf's chat template with `add_generation_prompt`):
    `[{system} ]USER: <image>\\n{instruction} ASSISTANT:`, one `<image>\\n` per image."""
    if num_images < 0:
        raise ValueError(f"num_images must be >= 0, got {num_images}")
    images = (LLAVA_IMAGE_TOKEN + "\n") * num_images
    prefix = f"{system} " if system else ""
    return f"{prefix}USER: {images}{instruction} ASSISTANT:"


def caption_prompt(instruction: str, *, num_images: int = 1, system_prompt: str | None = None) -> str:
    """`format_llava_prompt` under the name and signature of `qwen2_5_vl.processor.caption_prompt`, so code
    that picks a family's processor module calls both the same way."""
    return format_llava_prompt(instruction, num_images=num_images, system=system_prompt)


def encode_prompt(
    tokenizer,
    text: str,
    images: Sequence[Image.Image],
    config: LlavaConfig,
    *,
    image_config: ClipImageProcessorConfig | None = None,
    add_special_tokens: bool = True,
) -> dict[str, np.ndarray]:
    """Tokenize one prompt with its images (one `<image>` per image in `text`), as HF's LlavaProcessor does:
    expand each `<image>` to `image_seq_length` copies, then tokenize (BOS added by default).

    `tokenizer` is any HF-style callable returning {"input_ids": [...]}, whose vocabulary maps `<image>` to
    `config.image_token_id`. Returns input_ids int32[T], positions int32[T] (0..T-1) and, with images,
    pixel_values float32[N, S, S, 3].
    """
    placeholders = text.count(LLAVA_IMAGE_TOKEN)
    if placeholders != len(images):
        raise ValueError(
            f"the prompt has {placeholders} {LLAVA_IMAGE_TOKEN} placeholder(s) but {len(images)} image(s) were "
            "given; put exactly one placeholder per image (caption_prompt does)"
        )
    expanded = expand_image_placeholders(text, config.image_seq_length)
    input_ids = np.asarray(tokenizer(expanded, add_special_tokens=add_special_tokens)["input_ids"], np.int32)
    check_image_token_count(input_ids, len(images), config)
    out = {"input_ids": input_ids, "positions": np.arange(len(input_ids), dtype=np.int32)}
    if images:
        out["pixel_values"] = preprocess_images(images, image_config or ClipImageProcessorConfig.for_model(config))
    return out


def check_image_token_count(input_ids: np.ndarray, num_images: int, config: LlavaConfig) -> None:
    """Host-side guard: the batch must hold exactly num_images * image_seq_length image tokens."""
    found = int(np.sum(np.asarray(input_ids) == config.image_token_id))
    expected = num_images * config.image_seq_length
    if found != expected:
        raise ValueError(
            f"input_ids hold {found} image tokens (id {config.image_token_id}) but {num_images} image(s) need "
            f"{expected} ({config.image_seq_length} each); expand each <image> with expand_image_token_ids"
        )


def padded_positions(attention_mask: np.ndarray) -> np.ndarray:
    """1-D RoPE positions that ignore padding: cumsum(mask) - 1 on real tokens, 0 on padding. [B, T] -> [B, T]."""
    mask = np.asarray(attention_mask, bool)
    return np.where(mask, np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)


def make_batch(
    token_ids: Sequence[Sequence[int]],
    images: Sequence[Image.Image] | np.ndarray | None,
    config: LlavaConfig,
    *,
    pad_id: int,
    length: int | None = None,
    padding_side: str = "left",
    image_config: ClipImageProcessorConfig | None = None,
) -> dict[str, Any]:
    """Pad expanded prompts into `SequenceInputs` (see `balcap_jax.models.interface`).

    token_ids: per row, ids with every image already expanded to `image_seq_length` tokens; images appear in
    row-major order of their tokens. `images` are PIL images (preprocessed here) or float32[N, H, W, 3].
    Returns numpy arrays: input_ids int32[B, L], attention_mask bool[B, L], positions int32[B, L] and, when
    there are images, vision = {"pixel_values": float32[N, H, W, 3]}.
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if not token_ids:
        raise ValueError("make_batch needs at least one row of token_ids")
    longest = max(len(row) for row in token_ids)
    length = longest if length is None else length
    if length < longest:
        raise ValueError(f"length={length} is shorter than the longest prompt ({longest} tokens)")
    batch = len(token_ids)
    input_ids = np.full((batch, length), pad_id, np.int32)
    mask = np.zeros((batch, length), bool)
    for row, ids in enumerate(token_ids):
        start = length - len(ids) if padding_side == "left" else 0
        input_ids[row, start : start + len(ids)] = ids
        mask[row, start : start + len(ids)] = True
    if images is None or len(images) == 0:
        pixels = None
    elif isinstance(images, np.ndarray):
        pixels = images.astype(np.float32)
    else:
        pixels = preprocess_images(images, image_config or ClipImageProcessorConfig.for_model(config))
    num_images = 0 if pixels is None else pixels.shape[0]
    check_image_token_count(np.where(mask, input_ids, -1), num_images, config)
    inputs: dict[str, Any] = {
        "input_ids": input_ids,
        "attention_mask": mask,
        "positions": padded_positions(mask),
    }
    if pixels is not None:
        inputs["vision"] = {"pixel_values": pixels}
    return inputs


def _images_per_prompt(images_per_prompt: Sequence[int] | np.ndarray | None, num_images: int) -> np.ndarray:
    counts = np.ones((num_images,), np.int64) if images_per_prompt is None else np.asarray(images_per_prompt, np.int64)
    if counts.ndim != 1 or np.any(counts < 0) or int(counts.sum()) != num_images:
        raise ValueError(
            f"images_per_prompt={np.asarray(images_per_prompt).tolist()} must be non-negative and sum to the "
            f"{num_images} images, one count per prompt in row order"
        )
    return counts


def shard_sizes(plan: Sequence[RowShard], images_per_prompt: Sequence[int] | np.ndarray | None,
                num_images: int) -> tuple[int, int]:
    """(distinct images, image placeholder runs) of the fullest block of `plan`: the padded sizes every block
    (and every process: agree them) uses in `sharded_vision_inputs`."""
    counts = _images_per_prompt(images_per_prompt, num_images)
    images = max((int(counts[s.first:s.stop].sum()) for s in plan), default=0)
    runs = max((int((counts[s.first:s.stop] * s.rows).sum()) for s in plan), default=0)
    return images, runs


def sharded_vision_inputs(
    pixel_values: np.ndarray,
    *,
    plan: Sequence[RowShard],
    images_per_prompt: Sequence[int] | np.ndarray | None = None,
    min_images: int = 0,
    min_runs: int = 0,
) -> dict[str, np.ndarray]:
    """A batch's images laid out by block of rows (`models/image_shards.py`): block k of `plan` holds the crops
    of its prompts once and, for each image placeholder run of its rows in reading order, which of them fills it.

    pixel_values float[N, H, W, 3]: the batch's distinct images in prompt order (`images_per_prompt[p]` for prompt
    p; None: one each). Returns "pixel_values" float32[K, n, H, W, 3] (zero crops pad each block to n images),
    "image_index" int32[K, m] and `IMAGES_PER_SHARD` int32[K]; n and m are the fullest block's, or `min_images`
    / `min_runs` when larger (the fullest over all processes).
    """
    pixels = np.asarray(pixel_values, np.float32)
    if pixels.ndim != 4:
        raise ValueError(f"pixel_values must be [N, H, W, 3] crops; got shape {pixels.shape}")
    counts = _images_per_prompt(images_per_prompt, len(pixels))
    images, runs = shard_sizes(plan, counts, len(pixels))
    images, runs = max(images, int(min_images), 1), max(runs, int(min_runs), 1)
    bounds = np.concatenate([[0], np.cumsum(counts)])
    out_pixels = np.zeros((len(plan), images, *pixels.shape[1:]), np.float32)
    index = np.zeros((len(plan), runs), np.int32)
    per_shard = np.zeros((len(plan),), np.int32)
    for k, shard in enumerate(plan):
        first = int(bounds[shard.first])
        own = pixels[first: int(bounds[shard.stop])]
        out_pixels[k, : len(own)] = own
        per_shard[k] = len(own)
        local = [np.tile(np.arange(bounds[p], bounds[p + 1]) - first, int(r))
                 for p, r in zip(range(shard.first, shard.stop), shard.rows)]
        order = np.concatenate([np.zeros((0,), np.int64), *local])
        index[k, : order.size] = order
    return {"pixel_values": out_pixels, "image_index": index, IMAGES_PER_SHARD: per_shard}
