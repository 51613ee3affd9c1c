"""LLaVA-1.5 weights: HF checkpoints <-> our NNX state, through the generic rules of `models.hf_io`.

Our module tree mirrors transformers 5.x `LlavaForConditionalGeneration`, so our dotted parameter names *are*
the 5.x checkpoint keys after the leaf rule (`kernel`/`scale`/`embedding` -> `weight`; the CLIP patch conv
kernel [kh, kw, C, D] <-> torch [D, C, kh, kw] is the same rule). Loading accepts every released layout:

    transformers 5.x (canonical)         llava-hf checkpoints / transformers 4.x / save_pretrained in 5.x
    model.vision_tower.*                 vision_tower.vision_model.*   or   vision_tower.*
    model.multi_modal_projector.*        multi_modal_projector.*
    model.language_model.*               language_model.model.*
    lm_head.*                            language_model.lm_head.*

The decoder and CLIP encoder layers are layer stacks ([L, ...] leaves, HF's per-layer keys); the mappings get
their prefixes from the module (`layer_stack.layer_stack_prefixes`).

Export writes the llava-hf layout by default (what the Hub checkpoints, older transformers and vLLM read);
`layout="transformers5"` writes the canonical keys instead. Both load in transformers 5.x.
"""

from __future__ import annotations

import os
from typing import Any, Literal

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from balcap_jax.models.hf_io import ParamMapping, load_hf_state, read_hf_config, save_hf_state
from balcap_jax.models.layer_stack import layer_stack_prefixes
from balcap_jax.models.llava.config import LlavaConfig
from balcap_jax.models.llava.model import LlavaForCausalLM
from balcap_jax.models.llava.sharding import LlavaSharding

Layout = Literal["llava-hf", "transformers5"]

# (checkpoint prefix, canonical prefix); the first match wins, so `vision_model.` nesting is tried first.
CHECKPOINT_ALIASES: tuple[tuple[str, str], ...] = (
    ("model.vision_tower.vision_model.", "model.vision_tower."),
    ("vision_tower.vision_model.", "model.vision_tower."),
    ("vision_tower.", "model.vision_tower."),
    ("multi_modal_projector.", "model.multi_modal_projector."),
    ("language_model.model.", "model.language_model."),
    ("language_model.lm_head.", "lm_head."),
)

# Our prefix -> llava-hf export prefix.
LLAVA_HF_EXPORT_PREFIXES: tuple[tuple[str, str], ...] = (
    ("model.vision_tower.", "vision_tower.vision_model."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("model.language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
)

# Non-parameter tensors older checkpoints carry (buffers) that we recompute.
_BUFFERS = (r".*\.position_ids", r".*\.rotary_emb\.inv_freq")


def llava_param_mapping(config: LlavaConfig, *, layout: Layout = "transformers5") -> ParamMapping:
    """The `ParamMapping` for `LlavaForCausalLM`. Loading: use the default layout (it accepts all layouts).
    Export: `layout` picks the key names written."""
    if layout not in ("llava-hf", "transformers5"):
        raise ValueError(f"layout must be 'llava-hf' or 'transformers5', got {layout!r}")
    ignore = list(_BUFFERS)
    if config.tie_word_embeddings:
        ignore.append(r"(language_model\.)?lm_head\.weight")  # a tied head duplicates the embedding
    return ParamMapping(
        prefix_renames=LLAVA_HF_EXPORT_PREFIXES if layout == "llava-hf" else (),
        checkpoint_aliases=CHECKPOINT_ALIASES if layout == "transformers5" else (),
        ignore_unexpected=tuple(ignore),
    )


def abstract_llava(
    config: LlavaConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, remat: bool | str = False
) -> LlavaForCausalLM:
    """The model with `ShapeDtypeStruct` leaves: shapes and parameter counts without allocating weights."""
    return nnx.eval_shape(
        lambda: LlavaForCausalLM(config, dtype=dtype, param_dtype=param_dtype, remat=remat, rngs=nnx.Rngs(0))
    )


def load_llava(
    directory: str | os.PathLike,
    *,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    remat: bool | str = False,
    mesh: Mesh | None = None,
    sharding: LlavaSharding | None = None,
    config: LlavaConfig | None = None,
) -> LlavaForCausalLM:
    """A local HF LLaVA directory (config.json + safetensors) -> `LlavaForCausalLM`, streamed tensor by tensor.

    With a `mesh`, every parameter is created directly in its `sharding` layout (default: the training layout);
    without one, on the first device. `config` overrides the directory's config.json.
    """
    config = config or LlavaConfig.from_hf_dict(read_hf_config(directory))
    abstract = abstract_llava(config, dtype=dtype, param_dtype=param_dtype, remat=remat)
    graphdef, state = nnx.split(abstract)
    target: Any = state
    if mesh is not None:
        sharding = sharding or LlavaSharding.training()
        target = sharding.abstract_params(state, mesh)
    mapping = llava_param_mapping(config).with_stacked(layer_stack_prefixes(abstract))
    loaded = load_hf_state(directory, target, mapping)
    return nnx.merge(graphdef, loaded)


def save_llava(
    model: LlavaForCausalLM,
    directory: str | os.PathLike,
    *,
    layout: Layout = "llava-hf",
    dtype: Any = None,
    max_shard_size: int | str = "5GB",
) -> list:
    """Export to a HF directory that `LlavaForConditionalGeneration.from_pretrained` (and vLLM) load.

    `dtype` casts every tensor (e.g. `jnp.bfloat16` for serving); default keeps the state's dtypes."""
    state = nnx.state(model, nnx.Param)
    dtype_name = _torch_dtype_name(state, dtype)
    return save_hf_state(
        state,
        directory,
        llava_param_mapping(model.config, layout=layout).with_stacked(layer_stack_prefixes(model)),
        # transformers 5 reads `dtype`, 4.x and vLLM `torch_dtype`.
        config=model.config.to_hf_dict() | {"dtype": dtype_name, "torch_dtype": dtype_name},
        dtype=dtype,
        max_shard_size=max_shard_size,
    )


def _torch_dtype_name(state: Any, dtype: Any) -> str:
    dtypes = {jnp.dtype(leaf.dtype) for leaf in jax.tree.leaves(state)} if dtype is None else {jnp.dtype(dtype)}
    names = {jnp.dtype(jnp.bfloat16): "bfloat16", jnp.dtype(jnp.float16): "float16"}
    return names.get(dtypes.pop(), "float32") if len(dtypes) == 1 else "float32"
