"""How LLaVA-1.5's parameters lie on a (data, fsdp, tensor) mesh: a training and a sampling layout.

Tensor parallelism is Megatron-style: the first matmul of each pair (q/k/v, gate/up, fc1, projector linear_1)
is split over its output features, the second (o_proj, down_proj, out_proj, fc2, linear_2) over its input
features, so each attention/MLP block needs one reduction. FSDP shards the other weight axis (training only:
the sampling layout keeps weights whole along fsdp so decode does not all-gather every layer every token).
Norms, biases of row-split layers and the CLS embedding are small and replicated. Decoder and CLIP encoder layers
are layer stacks whose parameters lead with a layer axis; it is never sharded (a leading None in their specs).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from balcap_jax.parallel.mesh import BATCH_AXES, FSDP, TENSOR
from balcap_jax.parallel.sharding import RuleShardingMixin, TensorPlan, spec_entry

def _rules(fsdp: str | None, plan: TensorPlan) -> tuple[tuple[str, P], ...]:
    """The rules with FSDP over `fsdp` (None: none) and the decoder's / projector's tensor parallelism as `plan`
    says; the CLIP tower stays tensor-parallel over `tensor` only."""
    tensor = TENSOR
    heads, kv, mlp, vocab = (spec_entry(a) for a in (plan.heads, plan.kv_heads, plan.mlp, plan.vocab))
    col = P(fsdp, tensor)  # [in, out] split over out
    row = P(tensor, fsdp)  # [in, out] split over in
    # The same behind a layer stack's replicated layer axis: [L, in, out].
    layer_col, layer_row, layer_tensor = P(None, fsdp, tensor), P(None, tensor, fsdp), P(None, tensor)
    text = r"model\.language_model"
    vision = r"model\.vision_tower"
    return (
        # Llama decoder.
        (rf"{text}\.embed_tokens\.embedding", P(vocab, fsdp)),  # [V, D]
        (rf"{text}\.layers\.self_attn\.q_proj\.kernel", P(None, fsdp, heads)),
        (rf"{text}\.layers\.self_attn\.q_proj\.bias", P(None, heads)),
        (rf"{text}\.layers\.self_attn\.[kv]_proj\.kernel", P(None, fsdp, kv)),
        (rf"{text}\.layers\.self_attn\.[kv]_proj\.bias", P(None, kv)),
        (rf"{text}\.layers\.self_attn\.o_proj\.kernel", P(None, heads, fsdp)),
        (rf"{text}\.layers\.self_attn\.o_proj\.bias", P()),
        (rf"{text}\.layers\.mlp\.(gate|up)_proj\.kernel", P(None, fsdp, mlp)),
        (rf"{text}\.layers\.mlp\.down_proj\.kernel", P(None, mlp, fsdp)),
        (rf"{text}\.(layers\.)?\w*norm\.scale", P()),
        (r"lm_head\.kernel", P(fsdp, vocab)),  # [D, V]
        # Projector.
        (r"model\.multi_modal_projector\.linear_1\.kernel", P(fsdp, mlp)),
        (r"model\.multi_modal_projector\.linear_1\.bias", P(mlp)),
        (r"model\.multi_modal_projector\.linear_2\.kernel", P(mlp, fsdp)),
        (r"model\.multi_modal_projector\.linear_2\.bias", P()),
        # CLIP tower.
        (rf"{vision}\.embeddings\.patch_embedding\.kernel", P(None, None, None, fsdp)),  # [kh, kw, C, D]
        (rf"{vision}\.embeddings\.position_embedding\.embedding", P(None, fsdp)),  # [1 + P, D]
        (rf"{vision}\.embeddings\.class_embedding", P()),
        (rf"{vision}\.encoder\.layers\.self_attn\.[qkv]_proj\.kernel", layer_col),
        (rf"{vision}\.encoder\.layers\.self_attn\.[qkv]_proj\.bias", layer_tensor),
        (rf"{vision}\.encoder\.layers\.self_attn\.out_proj\.kernel", layer_row),
        (rf"{vision}\.encoder\.layers\.mlp\.fc1\.kernel", layer_col),
        (rf"{vision}\.encoder\.layers\.mlp\.fc1\.bias", layer_tensor),
        (rf"{vision}\.encoder\.layers\.mlp\.fc2\.kernel", layer_row),
        (rf"{vision}\.encoder\.layers\.(self_attn\.out_proj|mlp\.fc2)\.bias", P()),
        (rf"{vision}\.(encoder\.layers\.layer_norm[12]|pre_layrnorm|post_layernorm)\.(scale|bias)", P()),
    )


@dataclasses.dataclass(frozen=True)
class LlavaSharding(RuleShardingMixin):
    """Parameter rules (regex over dotted names -> PartitionSpec, first full match wins, unmatched = error) and
    the specs of activations. Same methods as `qwen2_5_vl.sharding.QwenSharding`, so callers treat both alike."""

    rules: tuple[tuple[str, P], ...]
    batch: P = P(BATCH_AXES)  # leading batch dim of ids / masks / positions / pixel_values
    kv_cache: P = P(None, BATCH_AXES, None, TENSOR, None)  # KVCache.k / .v [L, B, S, H_kv, Dh]

    @classmethod
    def training(cls) -> "LlavaSharding":
        """FSDP over `fsdp` on one weight axis, tensor parallel over `tensor` on the other."""
        return cls(_rules(FSDP, TensorPlan.uniform((TENSOR,))))

    @classmethod
    def sampling(cls, plan: TensorPlan | None = None) -> "LlavaSharding":
        """Tensor parallel only (over `plan`'s axes, default `tensor`): weights are whole along the other axes, so
        decode steps need no weight all-gathers. The KV cache splits its heads as k/v_proj do, its rows over the
        batch axes left."""
        plan = plan or TensorPlan.uniform((TENSOR,))
        cache = P(None, spec_entry(plan.rows_axes(BATCH_AXES)), None, spec_entry(plan.kv_heads), None)
        return cls(_rules(None, plan), kv_cache=cache)

    @classmethod
    def layout(cls, name: Literal["training", "sampling"]) -> "LlavaSharding":
        if name not in ("training", "sampling"):
            raise ValueError(f"sharding layout {name!r}: use 'training' or 'sampling'")
        return cls.training() if name == "training" else cls.sampling()

    def sharding_rules(self) -> tuple[tuple[str, P], ...]:
        return self.rules

    def shard_inputs(self, inputs: dict, mesh: Mesh) -> dict:
        """Place a host batch (`processor.make_batch`): every array, pixel_values included, split on its
        leading dim over the batch axes."""
        return jax.tree.map(lambda x: jax.device_put(x, self.batch_sharding(mesh, np.shape(x))), inputs)
