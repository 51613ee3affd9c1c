"""Every recipe whose length band the paper states uses it: [0.5, 2.0], masked value 0; the embedded default is
the multi-object testbed with an imperfect warm start, and the old one-object world stays one config away."""


import pytest

from balcap_jax import default_config
from balcap_jax.data import shapes_world as W
from balcap_jax.data import shapes_world_warm_start as S
from balcap_jax.recipes import load_recipe



def _recipe(name: str):
    return load_recipe(name)


@pytest.mark.parametrize("name", ["qwen7b", "qwen3b", "llava7b", "tiny"])
def test_recipes_mask_the_linguistic_reward_outside_the_papers_band(name):
    length = _recipe(name).length
    assert (length.kind, length.component) == ("mask", "linguistic")
    assert (length.ratio_min, length.ratio_max, length.masked_value) == (0.5, 2.0, 0.0)


def test_default_world_is_multi_object_with_a_flawed_warm_start_and_the_old_world_is_a_config_value():
    sw = default_config.get_config().data.shapes_world
    assert sw.max_objects >= 2  # relations exist
    habits = S.CaptionerHabits(*sw.captioner_habits)
    assert not habits.clean
    world = W.WorldConfig(image_size=sw.image_size, max_objects=sw.max_objects,
                          captioner_habits=tuple(sw.captioner_habits))
    assert world.include_relations
    old = W.WorldConfig(image_size=sw.image_size, max_objects=1, captioner_habits=())
    assert old.max_objects == 1 and not old.captioner_habits


def test_default_token_budget_fits_the_testbeds_references():
    from balcap_jax.models.qwen2_5_vl import processor

    config = default_config.get_config()
    sw = config.data.shapes_world
    tokenizer = processor.load_tokenizer()
    world = W.WorldConfig(image_size=sw.image_size, max_objects=sw.max_objects)
    longest = max(len(tokenizer.encode(ref)) for i in range(200) for ref in W.generate_example(0, i, world).references)
    assert longest + 1 <= config.sampling.max_new_tokens  # + EOS: a complete reference is a possible rollout
