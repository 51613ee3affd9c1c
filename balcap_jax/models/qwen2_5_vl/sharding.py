"""How Qwen2.5-VL's weights, activations and KV cache lie on a (data, fsdp, tensor) mesh.

Two layouts:
  * training: every matrix is FSDP-sharded over `fsdp` on its model-width dimension and tensor-parallel over
    `tensor` on its heads / MLP / vocabulary dimension (Megatron pairs: q/k/v and gate/up column-parallel,
    o_proj and down_proj row-parallel); the batch is split over (data, fsdp).
  * sampling: no FSDP on weights, so decode never all-gathers a layer per token; tensor parallelism over the
    axes of a `TensorPlan` (default: `tensor` for every kind; the loop's rollout copy plans it over
    `mesh.sampling_tensor_axes`, `trainer/rollout_weights.py`), k/v split no finer than the model's KV heads. The
    batch is split over (data, fsdp); the KV cache over the KV-head axes and, on its rows, the batch axes left.
The vision tower (~0.7B parameters, run once per image) gets FSDP on its matrices and tensor parallelism on its
MLP only: its fused qkv would otherwise be cut across the q/k/v boundary.

Decoder layers and vision blocks are layer stacks: their parameters carry a leading layer axis, which is never
sharded (every device holds its slice of every layer; the scan walks the layers), so each of their specs below
gains a leading None in `rules()`.

Dimensions a mesh axis does not divide (tiny test models, 2 KV heads over 4 tensor shards) are replicated
instead, with a warning (`parallel.sharding.fit_spec(on_indivisible="replicate")`).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from balcap_jax.parallel.mesh import BATCH_AXES, FSDP, TENSOR
from balcap_jax.parallel.sharding import RuleShardingMixin, TensorPlan, spec_entry

_LAYER = r"model\.language_model\.layers\."  # the decoder layer stack
_BLOCK = r"model\.visual\.blocks\."  # the vision block stack


def with_layer_axis(spec: P) -> P:
    """The spec of a layer stack's [L, ...] parameter: the per-layer `spec` behind a replicated layer axis."""
    return P(None, *spec)


@dataclasses.dataclass(frozen=True)
class QwenSharding(RuleShardingMixin):
    """PartitionSpecs per parameter kind (shapes of one layer, in our [in, out] kernel layout; `rules()` puts the
    layer axis in front for the stacked ones) and for activations."""

    # decoder
    embed: P  # embed_tokens.embedding [V, D]
    lm_head: P  # lm_head.kernel [D, V]
    attn_in: P  # q_proj.kernel [D, H*Dh]
    attn_in_bias: P  # q_proj.bias [H*Dh]
    kv_in: P  # k/v_proj.kernel [D, H_kv*Dh]
    kv_in_bias: P  # k/v_proj.bias [H_kv*Dh]
    attn_out: P  # o_proj.kernel [H*Dh, D]
    mlp_in: P  # gate/up_proj.kernel [D, F]
    mlp_in_bias: P  # gate/up_proj.bias [F]
    mlp_out: P  # down_proj.kernel [F, D]
    # vision tower
    vision_patch: P  # patch_embed.proj.kernel [C, T, p, p, Dv]
    vision_in: P  # attn.qkv.kernel [Dv, 3Dv], attn.proj.kernel [Dv, Dv], merger mlp kernels
    vision_mlp_in: P  # blocks' gate/up_proj.kernel [Dv, Fv]
    vision_mlp_in_bias: P  # blocks' gate/up_proj.bias [Fv]
    vision_mlp_out: P  # blocks' down_proj.kernel [Fv, Dv]
    # activations
    batch: P  # leading batch dim of ids / masks / hidden states
    kv_cache: P  # KVCache.k / .v [L, B, S, H_kv, Dh]
    replicated: P = P()  # norms, remaining biases

    @classmethod
    def training(cls) -> "QwenSharding":
        return cls._split(FSDP, TensorPlan.uniform((TENSOR,)))

    @classmethod
    def sampling(cls, plan: TensorPlan | None = None) -> "QwenSharding":
        """No FSDP on weights; the decoder's tensor parallelism as `plan` says (default: every kind over
        `tensor`). The vision tower (run once per prompt batch) is replicated but for its MLP over `tensor`."""
        return cls._split(None, plan or TensorPlan.uniform((TENSOR,)))

    @classmethod
    def _split(cls, fsdp: str | None, plan: TensorPlan) -> "QwenSharding":
        """Both layouts: every matrix over `fsdp` (None: whole) on its model width and over `plan` on its heads /
        MLP / vocabulary (the vision MLP over `tensor` always); the KV cache's rows over the batch axes its heads
        leave."""
        heads, kv, mlp, vocab = (spec_entry(a) for a in (plan.heads, plan.kv_heads, plan.mlp, plan.vocab))
        return cls(
            embed=P(vocab, fsdp),
            lm_head=P(fsdp, vocab),
            attn_in=P(fsdp, heads),
            attn_in_bias=P(heads),
            kv_in=P(fsdp, kv),
            kv_in_bias=P(kv),
            attn_out=P(heads, fsdp),
            mlp_in=P(fsdp, mlp),
            mlp_in_bias=P(mlp),
            mlp_out=P(mlp, fsdp),
            # Spelled P() when whole: a spec of Nones means the same but compares unequal.
            vision_patch=P(None, None, None, None, fsdp) if fsdp else P(),
            vision_in=P(fsdp, None) if fsdp else P(),
            vision_mlp_in=P(fsdp, TENSOR),
            vision_mlp_in_bias=P(TENSOR),
            vision_mlp_out=P(TENSOR, fsdp),
            batch=P(BATCH_AXES),
            kv_cache=P(None, spec_entry(plan.rows_axes(BATCH_AXES)), None, kv, None),
        )

    @classmethod
    def layout(cls, name: Literal["training", "sampling"]) -> "QwenSharding":
        if name not in ("training", "sampling"):
            raise ValueError(f"sharding layout {name!r}: use 'training' or 'sampling'")
        return cls.training() if name == "training" else cls.sampling()

    def rules(self) -> list[tuple[str, P]]:
        """(regex over dotted parameter names, spec); first full match wins."""
        return [
            (r"model\.language_model\.embed_tokens\.embedding", self.embed),
            (r"lm_head\.kernel", self.lm_head),
            (_LAYER + r"self_attn\.q_proj\.kernel", with_layer_axis(self.attn_in)),
            (_LAYER + r"self_attn\.q_proj\.bias", with_layer_axis(self.attn_in_bias)),
            (_LAYER + r"self_attn\.[kv]_proj\.kernel", with_layer_axis(self.kv_in)),
            (_LAYER + r"self_attn\.[kv]_proj\.bias", with_layer_axis(self.kv_in_bias)),
            (_LAYER + r"self_attn\.o_proj\.kernel", with_layer_axis(self.attn_out)),
            (_LAYER + r"mlp\.(gate|up)_proj\.kernel", with_layer_axis(self.mlp_in)),
            (_LAYER + r"mlp\.(gate|up)_proj\.bias", with_layer_axis(self.mlp_in_bias)),
            (_LAYER + r"mlp\.down_proj\.kernel", with_layer_axis(self.mlp_out)),
            (r"model\.visual\.patch_embed\.proj\.kernel", self.vision_patch),
            (_BLOCK + r"mlp\.(gate|up)_proj\.kernel", with_layer_axis(self.vision_mlp_in)),
            (_BLOCK + r"mlp\.(gate|up)_proj\.bias", with_layer_axis(self.vision_mlp_in_bias)),
            (_BLOCK + r"mlp\.down_proj\.kernel", with_layer_axis(self.vision_mlp_out)),
            (_BLOCK + r"attn\.(qkv|proj)\.kernel", with_layer_axis(self.vision_in)),
            (r"model\.visual\.merger\.mlp\.\d+\.kernel", self.vision_in),
            (r".*(norm|norm1|norm2|ln_q|layernorm)\.scale", self.replicated),
            (r".*\.bias", self.replicated),
        ]

    def sharding_rules(self) -> list[tuple[str, P]]:
        return self.rules()


def shard_inputs(inputs: dict, mesh: Mesh, sharding: QwenSharding) -> dict:
    """Place a host batch from `model.make_inputs`: text arrays split over the batch axes, vision inputs
    (one flat patch sequence for the whole batch) replicated."""
    out = {}
    for key, value in inputs.items():
        if key == "vision":
            out[key] = jax.device_put(value, NamedSharding(mesh, P()))
        elif key == "positions" and value.ndim == 3:
            out[key] = jax.device_put(value, sharding.batch_sharding(mesh, value.shape, batch_dim=1))
        else:
            out[key] = jax.device_put(value, sharding.batch_sharding(mesh, value.shape))
    return out
