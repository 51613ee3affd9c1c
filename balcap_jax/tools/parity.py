"""Check our Qwen2.5-VL against HF transformers (torch) on the same checkpoint and inputs.

    python -m balcap_jax.tools.parity --hf-dir /path/to/Qwen2.5-VL-3B-Instruct

Builds a batch with a long prompt and several images of different sizes (plus a text-only, left-padded row),
runs `Qwen2_5_VLForConditionalGeneration` in torch and our model in JAX, both in fp32 with the highest matmul
precision, and prints the max absolute logit difference and the per-token KL(HF || ours) over real tokens.
Exits with status 1 when a tolerance is exceeded.

The inputs are random token ids and random normalised patches (what the image processor emits), or real
images with `--images a.jpg b.png` (through our processor); no tokenizer is needed. The check exercises the
vision tower, the image-token scatter, M-RoPE with mixed text/image rows and padding, and the decoder.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence

import numpy as np

from balcap_jax.tools.parity_report import ParityReport, compare  # noqa: F401  (re-exported)

DEFAULT_GRIDS = ((1, 16, 24), (1, 28, 20), (1, 8, 8))  # patch grids: 224x336, 392x280 and 112x112 pixels


@dataclasses.dataclass(frozen=True)
class ParityBatch:
    """Host arrays of one test batch (numpy)."""

    input_ids: np.ndarray  # int64[B, T]
    attention_mask: np.ndarray  # bool[B, T]
    pixel_values: np.ndarray | None  # float32[N_patches, C*T*p*p]
    image_grid_thw: np.ndarray | None  # int64[N_images, 3]


def build_batch(
    config,
    *,
    seed: int = 0,
    prompt_tokens: int = 512,
    image_grids: Sequence[tuple[int, int, int]] = DEFAULT_GRIDS,
    text_only_row: bool = True,
    text_token_max: int | None = None,
    pixel_values: np.ndarray | None = None,
) -> ParityBatch:
    """Row 0: text, then each image (vision_start, pads, vision_end) separated by text, `prompt_tokens` text
    tokens in all. Row 1 (optional): a shorter text-only prompt, left-padded to the same length.

    `config` is our `Qwen2_5_VLConfig`. Random text ids are drawn below `text_token_max` (default: below the
    smallest special vision token id, so no random token is an image placeholder). Patches are random normal
    values unless `pixel_values` (e.g. real images through the processor, matching `image_grids`) is given.
    """
    rng = np.random.default_rng(seed)
    merge = config.vision.spatial_merge_size
    specials = (config.image_token_id, config.video_token_id, config.vision_start_token_id,
                config.vision_end_token_id)  # fmt: skip
    high = text_token_max or min(min(specials), config.text.vocab_size)
    n_images = len(image_grids)
    cuts = np.sort(rng.choice(np.arange(1, prompt_tokens), size=n_images, replace=False))
    text_chunks = np.split(rng.integers(0, high, size=prompt_tokens), cuts)
    parts = [text_chunks[0]]
    for grid, text in zip(image_grids, text_chunks[1:]):
        count = int(np.prod(grid)) // merge**2
        parts += [[config.vision_start_token_id], np.full(count, config.image_token_id),
                  [config.vision_end_token_id], text]  # fmt: skip
    rows = [np.concatenate(parts).astype(np.int64)]
    if text_only_row:
        rows.append(rng.integers(0, high, size=max(8, len(rows[0]) * 2 // 3)))
    length = max(len(r) for r in rows)
    ids = np.zeros((len(rows), length), np.int64)
    mask = np.zeros((len(rows), length), bool)
    for i, row in enumerate(rows):
        ids[i, length - len(row):], mask[i, length - len(row):] = row, True
    if not n_images:
        return ParityBatch(ids, mask, None, None)
    grids = np.asarray(image_grids, np.int64)
    shape = (int(np.prod(grids, axis=1).sum()), config.vision.patch_dim)
    if pixel_values is None:
        pixel_values = rng.standard_normal(shape).astype(np.float32)
    elif pixel_values.shape != shape:
        raise ValueError(f"pixel_values has shape {pixel_values.shape}; image_grids {grids.tolist()} need {shape}")
    return ParityBatch(ids, mask, np.asarray(pixel_values, np.float32), grids)


def hf_logits(hf_model, batch: ParityBatch, *, image_token_id: int) -> np.ndarray:
    """HF fp32 logits [B, T, V]. M-RoPE positions come from HF's own `get_rope_index` (it needs
    `mm_token_type_ids`); a text-only batch gets explicit 0..n-1 positions over its real tokens."""
    import torch

    kwargs = dict(input_ids=torch.from_numpy(batch.input_ids),
                  attention_mask=torch.from_numpy(batch.attention_mask.astype(np.int64)))  # fmt: skip
    if batch.pixel_values is not None:
        kwargs.update(
            pixel_values=torch.from_numpy(batch.pixel_values),
            image_grid_thw=torch.from_numpy(batch.image_grid_thw),
            mm_token_type_ids=torch.from_numpy((batch.input_ids == image_token_id).astype(np.int64)),
        )
    else:
        positions = np.where(batch.attention_mask, np.cumsum(batch.attention_mask, axis=1) - 1, 0)
        kwargs["position_ids"] = torch.from_numpy(np.broadcast_to(positions, (3, *positions.shape)).copy())
    with torch.no_grad():
        return hf_model(**kwargs).logits.float().numpy()


def our_logits(model, batch: ParityBatch) -> np.ndarray:
    """Our fp32 logits [B, T, V] for the same batch (jitted forward of the split model)."""
    import jax
    from flax import nnx

    from balcap_jax.models.qwen2_5_vl.model import make_inputs

    inputs = make_inputs(model.config, batch.input_ids, batch.attention_mask, batch.pixel_values,
                         batch.image_grid_thw)  # fmt: skip
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, inputs):
        return nnx.merge(graphdef, state)(inputs)

    return np.asarray(forward(state, inputs))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf-dir", required=True,
                        help="local HF Qwen2.5-VL or LLaVA-1.5 directory (config.json + safetensors)")
    parser.add_argument("--prompt-tokens", type=int, default=512, help="text tokens in the image prompt")
    parser.add_argument("--grids", default=";".join(",".join(map(str, g)) for g in DEFAULT_GRIDS),
                        help="image patch grids 't,h,w;t,h,w;...' (h, w even) of random images; '' for text only")
    parser.add_argument("--images", nargs="*", default=None,
                        help="image files to use instead of random patches (through our Qwen2.5-VL processor)")
    parser.add_argument("--max-pixels", type=int, default=448 * 448, help="processor max_pixels for --images")
    parser.add_argument("--logit-tol", type=float, default=1e-3)
    parser.add_argument("--kl-tol", type=float, default=1e-6)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from balcap_jax.models import registry

    if registry.family_for_hf_dir(args.hf_dir).name == "llava":
        from balcap_jax.tools.parity_llava import check_llava

        report = check_llava(args.hf_dir, seed=args.seed, prompt_tokens=args.prompt_tokens)
        print(report)
        ok = report.ok(logit_tol=args.logit_tol, kl_tol=args.kl_tol)
        print("PASS" if ok else "FAIL")
        return 0 if ok else 1

    import jax
    import jax.numpy as jnp
    import torch
    import transformers

    from balcap_jax.models.qwen2_5_vl.params import load_qwen2_5_vl

    model = load_qwen2_5_vl(args.hf_dir, dtype=jnp.float32, param_dtype=jnp.float32)
    config = model.config
    pixel_values = None
    if args.images:
        from PIL import Image

        from balcap_jax.models.qwen2_5_vl.processor import ImageProcessorConfig, preprocess_images

        processor_config = ImageProcessorConfig(
            patch_size=config.vision.patch_size, temporal_patch_size=config.vision.temporal_patch_size,
            merge_size=config.vision.spatial_merge_size, max_pixels=args.max_pixels,
        )
        pixel_values, grid_array = preprocess_images([Image.open(path) for path in args.images], processor_config)
        grids = [tuple(int(v) for v in g) for g in grid_array]
    else:
        grids = [tuple(int(v) for v in g.split(",")) for g in args.grids.split(";") if g.strip()]
    hf_model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
        args.hf_dir, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    batch = build_batch(config, seed=args.seed, prompt_tokens=args.prompt_tokens, image_grids=grids,
                        pixel_values=pixel_values)
    with jax.default_matmul_precision("highest"):
        ours = our_logits(model, batch)
    report = compare(hf_logits(hf_model, batch, image_token_id=config.image_token_id), ours, batch.attention_mask)
    print(f"batch: {batch.input_ids.shape[0]} rows x {batch.input_ids.shape[1]} tokens, image grids {grids}")
    print(report)
    ok = report.ok(logit_tol=args.logit_tol, kl_tol=args.kl_tol)
    print("PASS" if ok else f"FAIL (tolerances: logits {args.logit_tol:g}, KL {args.kl_tol:g})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
