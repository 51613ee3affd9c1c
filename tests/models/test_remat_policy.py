"""`remat` as configuration: False/True or "none" | "full" | "save_dots", applied to every scanned layer body."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.extend import core as jex_core

from balcap_jax.models.llava import config as llava_config
from balcap_jax.models.llava import params as llava_params
from balcap_jax.models.qwen2_5_vl import params as qwen_params
from balcap_jax.models.qwen2_5_vl.text import DecoderConfig, TextModel
from balcap_jax.models.remat import Remat
from tests.models.test_layer_stack import count_equations, tiny_qwen

# Biased q/k/v (Qwen2) and plain o/gate/up/down projections: the policy must see through both kinds.
DECODER = DecoderConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=3, num_heads=4,
                        num_kv_heads=2, head_dim=8, rope_theta=10000.0)  # fmt: skip


@pytest.mark.parametrize(
    "value, expected",
    [(False, Remat.NONE), (None, Remat.NONE), ("none", Remat.NONE), (True, Remat.FULL), ("full", Remat.FULL),
     ("save_dots", Remat.SAVE_DOTS), (Remat.SAVE_DOTS, Remat.SAVE_DOTS)],
)  # fmt: skip
def test_parse_accepts_bools_and_policy_names(value, expected):
    assert Remat.parse(value) is expected
    assert bool(Remat.parse(value)) == (expected is not Remat.NONE)


@pytest.mark.parametrize("bad", ["dots", "True", 1, 0.5])
def test_an_unknown_policy_names_the_field_and_the_choices(bad):
    with pytest.raises(ValueError, match=r"model\.remat.*'none', 'full', 'save_dots'"):
        Remat.parse(bad)
    with pytest.raises(ValueError, match="not a remat policy"):
        TextModel(DECODER, remat=bad, rngs=nnx.Rngs(0))


def _grad_program(remat) -> tuple[jex_core.ClosedJaxpr, dict]:
    model = TextModel(DECODER, remat=remat, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    ids = jax.random.randint(jax.random.key(1), (2, 12), 0, 64)
    positions = jnp.broadcast_to(jnp.arange(12), (2, 12))
    mask = jnp.ones((2, 12), bool)

    def loss(p):
        text = nnx.merge(graphdef, p)
        return jnp.mean(text(text.embed(ids), positions, mask) ** 2)

    return jax.make_jaxpr(jax.grad(loss))(params), jax.jit(jax.grad(loss))(params)


def test_save_dots_recomputes_fewer_matmuls_than_full_and_every_policy_gives_the_same_gradients(highest_precision):
    programs = {policy: _grad_program(policy) for policy in ("none", "full", "save_dots")}
    dots = {policy: count_equations(jaxpr.jaxpr, "dot_general") for policy, (jaxpr, _) in programs.items()}
    # full re-runs every forward matmul of the layer in the backward pass; save_dots keeps the projections (biased
    # ones included) and re-runs only the two attention products.
    assert dots["none"] < dots["save_dots"] < dots["full"], dots
    assert dots["save_dots"] - dots["none"] == 2, dots
    assert str(programs["none"][0]).count("remat") == 0
    assert all(str(programs[policy][0]).count("remat") == 1 for policy in ("full", "save_dots"))
    reference = programs["none"][1]
    for policy in ("full", "save_dots"):
        for a, b in zip(jax.tree.leaves(reference), jax.tree.leaves(programs[policy][1])):
            np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("policy", ["none", "full", "save_dots", True, False])
def test_every_model_takes_the_policy_for_all_its_stacks(policy):
    expected = Remat.parse(policy)
    qwen = qwen_params.abstract_model(tiny_qwen(2), remat=policy)
    assert qwen.model.visual.remat is expected and qwen.model.language_model.remat is expected
    llava = llava_params.abstract_llava(llava_config.tiny(), remat=policy)
    assert llava.model.vision_tower.remat is expected and llava.model.language_model.remat is expected
