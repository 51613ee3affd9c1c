"""A tiny NNX causal LM whose attribute names mirror HF's Qwen2ForCausalLM (shared by the hf_io tests and the
multi-process worker; no torch import here, so subprocesses start fast)."""

import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, MLP, VOCAB, LAYERS = 32, 4, 2, 8, 64, 128, 2


class Attention(nnx.Module):
    def __init__(self, rngs, dtype):
        lin = lambda i, o, bias: nnx.Linear(i, o, use_bias=bias, rngs=rngs, param_dtype=dtype)  # noqa: E731
        self.q_proj = lin(HIDDEN, HEADS * HEAD_DIM, True)
        self.k_proj = lin(HIDDEN, KV_HEADS * HEAD_DIM, True)
        self.v_proj = lin(HIDDEN, KV_HEADS * HEAD_DIM, True)
        self.o_proj = lin(HEADS * HEAD_DIM, HIDDEN, False)


class Mlp(nnx.Module):
    def __init__(self, rngs, dtype):
        self.gate_proj = nnx.Linear(HIDDEN, MLP, use_bias=False, rngs=rngs, param_dtype=dtype)
        self.up_proj = nnx.Linear(HIDDEN, MLP, use_bias=False, rngs=rngs, param_dtype=dtype)
        self.down_proj = nnx.Linear(MLP, HIDDEN, use_bias=False, rngs=rngs, param_dtype=dtype)


class Layer(nnx.Module):
    def __init__(self, rngs, dtype):
        self.self_attn = Attention(rngs, dtype)
        self.mlp = Mlp(rngs, dtype)
        self.input_layernorm = nnx.RMSNorm(HIDDEN, rngs=rngs, param_dtype=dtype)
        self.post_attention_layernorm = nnx.RMSNorm(HIDDEN, rngs=rngs, param_dtype=dtype)


class Body(nnx.Module):
    def __init__(self, rngs, dtype):
        self.embed_tokens = nnx.Embed(VOCAB, HIDDEN, rngs=rngs, param_dtype=dtype)
        self.layers = nnx.List([Layer(rngs, dtype) for _ in range(LAYERS)])
        self.norm = nnx.RMSNorm(HIDDEN, rngs=rngs, param_dtype=dtype)


class TinyCausalLM(nnx.Module):
    """Attribute names mirror HF's Qwen2ForCausalLM, as every balcap_jax model does."""

    def __init__(self, rngs, dtype=jnp.float32):
        self.model = Body(rngs, dtype)
        self.lm_head = nnx.Linear(HIDDEN, VOCAB, use_bias=False, rngs=rngs, param_dtype=dtype)


def abstract_state(dtype=jnp.float32):
    return nnx.state(nnx.eval_shape(lambda: TinyCausalLM(nnx.Rngs(0), dtype)), nnx.Param)


TRAINING_RULES = [
    (r".*(q|k|v|gate|up)_proj\.kernel", P("fsdp", "tensor")),
    (r".*(o|down)_proj\.kernel", P("tensor", "fsdp")),
    (r".*_proj\.bias", P("tensor")),
    (r".*embed_tokens\.embedding", P("tensor", "fsdp")),
    (r"lm_head\.kernel", P("fsdp", "tensor")),
    (r".*norm\.scale", P()),
]
