"""Tiny random Qwen2.5-VL models built in-process (torch, fp32, fixed seed) — the HF references for parity tests.

Token ids are remapped into a small vocabulary so full-vocabulary logits of long prompts stay cheap.
"""

from __future__ import annotations

import numpy as np

TINY_VOCAB = 512
IMAGE_TOKEN_ID = 500
VIDEO_TOKEN_ID = 501
VISION_START_TOKEN_ID = 502
VISION_END_TOKEN_ID = 503
TEXT_TOKEN_MAX = 480  # random text tokens are drawn below this id


def tiny_qwen_config_dict(*, tie_word_embeddings: bool = False, text_layers: int = 2, vision_depth: int = 2) -> dict:
    """kwargs for `transformers.Qwen2_5_VLConfig`: GQA 4/2 heads, head_dim 16, M-RoPE sections (2, 3, 3),
    a 2-block vision tower with one full-attention block and 112-px windows."""
    return dict(
        text_config=dict(
            vocab_size=TINY_VOCAB,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=text_layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            rms_norm_eps=1e-6,
            max_position_embeddings=4096,
            rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 3, 3]),
            tie_word_embeddings=tie_word_embeddings,
            bos_token_id=TEXT_TOKEN_MAX,
            eos_token_id=TEXT_TOKEN_MAX + 1,
        ),
        vision_config=dict(
            depth=vision_depth,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            in_channels=3,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=112,
            out_hidden_size=64,
            fullatt_block_indexes=[vision_depth - 1],
        ),
        image_token_id=IMAGE_TOKEN_ID,
        video_token_id=VIDEO_TOKEN_ID,
        vision_start_token_id=VISION_START_TOKEN_ID,
        vision_end_token_id=VISION_END_TOKEN_ID,
        tie_word_embeddings=tie_word_embeddings,
    )


def tiny_qwen_hf_model(*, seed: int = 0, tie_word_embeddings: bool = False, **config_overrides):
    """A random `Qwen2_5_VLForConditionalGeneration` in fp32 eval mode with eager attention.

    Weights are re-drawn with std 0.1 (HF's 0.02 init makes a tiny model's logits nearly input-independent,
    which would hide bugs); norms get random scales around 1 and biases non-zero values.
    """
    import torch
    import transformers

    torch.manual_seed(seed)
    config = transformers.Qwen2_5_VLConfig(
        **tiny_qwen_config_dict(tie_word_embeddings=tie_word_embeddings, **config_overrides)
    )
    config._attn_implementation = "eager"
    model = transformers.Qwen2_5_VLForConditionalGeneration(config).eval().float()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=generator))
            else:
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))
    return model


def hf_state_numpy(model) -> dict[str, np.ndarray]:
    """The HF state dict as numpy fp32 arrays (tied weights appear under both names)."""
    return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}


def random_text_ids(rng: np.random.Generator, length: int) -> np.ndarray:
    """Random ordinary text token ids (never an image/vision special id)."""
    return rng.integers(0, TEXT_TOKEN_MAX, size=(length,), dtype=np.int64)


def image_placeholder(grid_thw: tuple[int, int, int], merge: int = 2) -> np.ndarray:
    """<|vision_start|> + prod(grid)/merge^2 x <|image_pad|> + <|vision_end|> token ids."""
    t, h, w = grid_thw
    n = t * h * w // (merge * merge)
    return np.concatenate([[VISION_START_TOKEN_ID], np.full((n,), IMAGE_TOKEN_ID), [VISION_END_TOKEN_ID]])


def random_pixel_values(rng: np.random.Generator, grids: list[tuple[int, int, int]], patch_dim: int) -> np.ndarray:
    """Flattened patches [sum(prod(grid)), C*T*p*p] as HF's image processor lays them out (fp32, ~N(0,1))."""
    total = sum(t * h * w for t, h, w in grids)
    return rng.standard_normal((total, patch_dim)).astype(np.float32)


def load_hf_into(module, hf_state: dict[str, np.ndarray], hf_prefix: str = ""):
    """Our `module` (real or `nnx.eval_shape`-abstract) with every parameter taken from an HF state dict
    restricted to `hf_prefix` (e.g. "model.language_model.layers.0.")."""
    from balcap_jax.models import hf_io
    from balcap_jax.models.qwen2_5_vl import params, vision

    mapping = hf_io.ParamMapping(special_cases=vision.hf_special_cases())
    return params.from_hf_tensors(module, hf_state, mapping, hf_prefix=hf_prefix)
