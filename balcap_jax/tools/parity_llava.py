"""Check our LLaVA-1.5 against HF transformers (torch) on one checkpoint: the LLaVA half of `tools.parity`.

    from balcap_jax.tools.parity_llava import check_llava
    print(check_llava("/path/to/llava-1.5-7b-hf"))

The batch: row 0 is a long prompt (`prompt_tokens` text tokens) with `num_images` images of different sizes
and aspect ratios (synthetic PIL images run through our CLIP preprocessing, so no image files are needed);
row 1 a shorter prompt with one image, left-padded; optionally row 2 text only. Both models run in fp32 at the
highest matmul precision with padding-aware positions; the report covers every real token.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from balcap_jax.models.llava import processor
from balcap_jax.models.llava.config import LlavaConfig
from balcap_jax.tools.parity_report import compare

DEFAULT_IMAGE_SIZES = ((480, 640), (700, 300), (256, 256))  # (height, width) before preprocessing


def synthetic_image(height: int, width: int, seed: int) -> Image.Image:
    """A smooth colour gradient with noise: structured enough that resizing and cropping matter."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi, size=3)
    channels = [np.sin(x / (17 + 9 * c) + y / (23 + 5 * c) + phase[c]) for c in range(3)]
    pixels = 127.5 * (1 + np.stack(channels, -1)) + rng.normal(0, 12, size=(height, width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def build_batch(
    config: LlavaConfig,
    *,
    seed: int = 0,
    prompt_tokens: int = 512,
    image_sizes: Sequence[tuple[int, int]] = DEFAULT_IMAGE_SIZES,
    text_only_row: bool = True,
    pad_id: int = 0,
) -> dict[str, Any]:
    """`SequenceInputs` as numpy arrays (see `processor.make_batch`). Random text ids avoid the image token."""
    rng = np.random.default_rng(seed)
    per_image = config.image_seq_length
    high = config.image_token_id if config.image_token_id > 1 else config.text.vocab_size

    def prompt(text_tokens: int, images: int) -> list[int]:
        ids = [int(t) for t in rng.integers(1, high, size=text_tokens)]
        cuts = sorted(rng.choice(np.arange(1, max(text_tokens, 2)), size=images, replace=images > text_tokens - 1))
        for cut in reversed(cuts):
            ids[cut:cut] = [config.image_token_id] * per_image
        return ids

    rows = [prompt(prompt_tokens, len(image_sizes))]
    images = [synthetic_image(h, w, seed + i) for i, (h, w) in enumerate(image_sizes)]
    if image_sizes:
        rows.append(prompt(max(8, prompt_tokens // 3), 1))
        images.append(synthetic_image(*image_sizes[0], seed + len(image_sizes)))
    if text_only_row:
        rows.append(prompt(max(8, prompt_tokens // 2), 0))
    image_config = processor.ClipImageProcessorConfig.for_model(config)
    return processor.make_batch(rows, images, config, pad_id=pad_id, image_config=image_config)


def hf_logits(hf_model, batch: dict[str, Any]) -> np.ndarray:
    """HF fp32 logits [B, T, V] with our positions (HF's plain forward would ignore left padding)."""
    import torch

    kwargs = dict(
        input_ids=torch.from_numpy(batch["input_ids"].astype(np.int64)),
        attention_mask=torch.from_numpy(batch["attention_mask"].astype(np.int64)),
        position_ids=torch.from_numpy(batch["positions"].astype(np.int64)),
    )
    if "vision" in batch:
        channels_first = np.moveaxis(batch["vision"]["pixel_values"], -1, 1)
        kwargs["pixel_values"] = torch.from_numpy(np.ascontiguousarray(channels_first))
    with torch.no_grad():
        return hf_model(**kwargs).logits.float().numpy()


def our_logits(model, batch: dict[str, Any]) -> np.ndarray:
    """Our fp32 logits [B, T, V] (jitted forward of the split model)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, inputs):
        return nnx.merge(graphdef, state)(inputs)

    return np.asarray(forward(state, jax.tree.map(jnp.asarray, batch)))


def check_llava(
    hf_dir: str,
    *,
    seed: int = 0,
    prompt_tokens: int = 512,
    image_sizes: Sequence[tuple[int, int]] = DEFAULT_IMAGE_SIZES,
):
    """Load `hf_dir` in both frameworks (fp32), run the batch, return `tools.parity_report.ParityReport`."""
    import jax
    import jax.numpy as jnp
    import torch
    import transformers

    from balcap_jax.models.llava.params import load_llava

    model = load_llava(hf_dir, dtype=jnp.float32, param_dtype=jnp.float32)
    hf_model = transformers.LlavaForConditionalGeneration.from_pretrained(
        hf_dir, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    batch = build_batch(model.config, seed=seed, prompt_tokens=prompt_tokens, image_sizes=image_sizes)
    with jax.default_matmul_precision("highest"):
        ours = our_logits(model, batch)
    return compare(hf_logits(hf_model, batch), ours, batch["attention_mask"])
