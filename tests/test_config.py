"""Config validation: every rule names the field, the value and what is allowed."""

import json
from pathlib import Path

import ml_collections
import pytest

from balcap_jax import config as cfg
from balcap_jax.recipes import load_recipe

ROOT = Path(__file__).resolve().parents[1]


def recipe(name: str = "tiny"):
    return load_recipe(name)


def problems_of(config, **kwargs) -> list[str]:
    kwargs.setdefault("device_count", 1)
    kwargs.setdefault("process_count", 1)
    try:
        cfg.validate(config, **kwargs)
    except cfg.ConfigError as error:
        assert str(error).count("\n  - ") == len(error.problems)
        return error.problems
    return []


class _AnyVariableSet(dict):
    """An environment in which every variable a recipe names is set (recipes name them for the user's shell)."""

    def __contains__(self, key):
        return True


USER_SUPPLIED = tuple(
    f"config.{field}"
    for field in (
        "model.hf_dir", "data.manifest", "rewards.judge.llm_url", "rewards.judge.llm_model",
        "rewards.judge.vlm_url", "rewards.judge.vlm_model",
    )
)


def test_every_recipe_in_configs_is_valid():
    names = sorted(p.stem for p in (ROOT / "configs").glob("*.py") if not p.name.startswith("_"))
    assert "tiny" in names
    assert problems_of(recipe("tiny")) == []
    for name in names:
        config = recipe(name)
        sizes = [config.mesh.data, config.mesh.fsdp, config.mesh.tensor]
        devices = 8 if -1 in sizes else sizes[0] * sizes[1] * sizes[2]
        # Real-model recipes leave the user's weights, data and judge servers unset on purpose (the validator
        # must name them); nothing else may be wrong. tests/trainer/test_train_aot_recipes.py validates them filled in.
        problems = problems_of(config, device_count=devices, check_paths=False, environ=_AnyVariableSet())
        unexpected = [p for p in problems if not p.startswith(USER_SUPPLIED)]
        assert unexpected == [], name


@pytest.mark.parametrize(
    "path, value, message",
    [
        ("advantage.kind", "ppo", "config.advantage.kind='ppo' is not allowed; allowed values: 'grpo', 'gdpo'"),
        ("advantage.kind", "gdp0", "(did you mean 'gdpo'?)"),
        ("length.kind", "clip", "allowed values: 'mask', 'linear', 'none'"),
        ("loss.aggregation", "mean", "allowed values: 'token-mean', 'seq-mean-token-mean', 'seq-mean-token-sum-norm'"),
        ("rewards.judge.backend", "gpt", "allowed values: 'shapes_world', 'openai', 'jax_local'"),
        ("model.name", "gemma", "config.model.name='gemma' is not allowed"),
        ("sampling.temperature", 0.0, "config.sampling.temperature=0.0 must be > 0"),
        ("sampling.top_p", 1.5, "config.sampling.top_p=1.5 must be <= 1"),
        ("optim.lr", "1e-5", "config.optim.lr='1e-5' must be a float"),
        ("train.micro_batches", 0, "config.train.micro_batches=0 must be >= 1"),
        ("checkpoint.export_hf", 1, "config.checkpoint.export_hf=1 must be a bool"),
        ("rewards.components", ("precision", "style"), "(item 'style') is not allowed"),
        ("data.prompt_buckets", 128, "config.data.prompt_buckets=128 must be a tuple of ints"),
        ("optim.grad_clip", float("nan"), "config.optim.grad_clip=nan must be finite"),
    ],
)
def test_field_checks_name_field_value_and_allowed(path, value, message):
    config = ml_collections.ConfigDict(recipe().to_dict(), type_safe=False)  # allow wrong types, as dicts do
    section, _, leaf = path.rpartition(".")
    node = config
    for part in section.split("."):
        node = node[part]
    with config.unlocked():
        node[leaf] = value
    problems = problems_of(config)
    assert any(message in p for p in problems), problems


@pytest.mark.parametrize("kind", ["grpo", "gdpo"])
def test_group_size_below_two_with_group_advantages(kind):
    config = recipe()
    config.advantage.kind = kind
    config.sampling.group_size = 1
    assert problems_of(config) == [
        f"config.sampling.group_size=1: advantage.kind='{kind}' normalises rewards within a group of samples of "
        "the same prompt, which needs at least 2; set sampling.group_size >= 2 (8 is typical)"
    ]


def test_batch_must_divide_over_the_mesh_and_hosts():
    config = recipe()
    config.mesh.update(data=1, fsdp=-1, tensor=1)
    config.data.prompts_per_batch = 4
    problems = problems_of(config, device_count=8)
    assert any("data.prompts_per_batch=4 is not divisible by the 8 batch shards" in p for p in problems)
    config.data.prompts_per_batch = 8
    config.train.micro_batches = 16  # 8 * 8 = 64 sequences -> micro-batches of 4 < 8 shards
    assert any("config.train.micro_batches=16" in p for p in problems_of(config, device_count=8))
    config.train.micro_batches = 1
    config.train.sft_batch_size = 12
    assert problems_of(config, device_count=8) == []  # no SFT phase (the default starts from its warm start)
    config.train.sft_steps = 10
    assert problems_of(config, device_count=8) == [
        "config.train.sft_batch_size=12 is not divisible by the 8 batch shards of the mesh; use a multiple of 8"
    ]
    config.train.sft_batch_size = 16
    assert problems_of(config, device_count=8) == []
    assert any("not divisible by the 3 data streams" in p for p in problems_of(config, device_count=8, process_count=3))


def test_mesh_that_does_not_match_the_devices():
    config = recipe()
    config.mesh.update(data=2, fsdp=2, tensor=1)
    assert any(p.startswith("config.mesh: mesh data*fsdp*tensor = 2*2*1 = 4, but 8 devices") for p in problems_of(config, device_count=8))


def test_weights_directory_and_manifest_paths(tmp_path):
    config = recipe()
    config.model.hf_dir = str(tmp_path / "missing")
    assert any("config.model.hf_dir=" in p and "does not exist" in p for p in problems_of(config))
    config.model.hf_dir = str(tmp_path)
    assert any("has no config.json" in p for p in problems_of(config))
    (tmp_path / "config.json").write_text(json.dumps({}))
    assert problems_of(config) == []
    assert problems_of(config, check_paths=False) == []
    config.model.hf_dir = ""
    del config.model["tiny"]
    assert any("config.model.hf_dir is empty and there is no config.model.tiny" in p for p in problems_of(config))

    config = recipe()
    config.data.source = "manifest"
    config.data.manifest = ""
    assert any("config.data.manifest is empty but data.source='manifest'" in p for p in problems_of(config))


def test_openai_judge_needs_urls_models_and_the_key_variable():
    config = recipe()
    config.rewards.judge.update(backend="openai", llm_url="localhost:8000", llm_model="", vlm_url="http://h:1/v1", vlm_model="m")
    config.rewards.judge.api_key_env = "BALCAP_TEST_KEY"
    problems = problems_of(config, environ={})
    assert any(p.startswith("config.rewards.judge.llm_url='localhost:8000'") for p in problems)
    assert any(p.startswith("config.rewards.judge.llm_model is empty") for p in problems)
    assert any("api_key_env='BALCAP_TEST_KEY' names an environment variable that is not set" in p for p in problems)
    config.rewards.judge.update(llm_url="http://h:1/v1", llm_model="m")
    assert problems_of(config, environ={"BALCAP_TEST_KEY": "secret"}) == []


def test_cross_field_reward_and_length_rules():
    config = recipe()
    config.rewards.weights = (1.0, 1.0)
    config.length.ratio_min = 2.0
    config.length.ratio_max = 1.5
    config.loss.dual_clip = 0.5
    problems = problems_of(config)
    assert "config.rewards.weights has 2 entries but rewards.components has 3; give one weight per component, in the same order" in problems
    assert "config.length.ratio_min=2.0 must be below length.ratio_max=1.5" in problems
    assert "config.loss.dual_clip=0.5 must be 0 (off) or > 1 (e.g. 3.0)" in problems
    config = recipe()
    config.rewards.components = ("precision", "recall")
    config.rewards.weights = (1.0, 1.0)
    assert any("config.length.component='linguistic' is not among rewards.components" in p for p in problems_of(config))


def test_missing_and_misspelled_fields():
    config = recipe()
    del config.loss["eps_high"]
    with config.unlocked():
        config.loss.eps_hihg = 0.3
    problems = problems_of(config)
    assert "config.loss.eps_high is missing (upper clip of the importance ratio: 1 + eps_high)" in problems
    assert "config.loss.eps_hihg is not a known field; did you mean config.loss.eps_high?" in problems


def test_all_problems_are_reported_at_once():
    config = recipe()
    config.advantage.kind = "ppo"
    config.sampling.group_size = 1  # reported although advantage.kind is also wrong
    config.optim.lr = -1.0
    problems = problems_of(config)
    assert len(problems) == 2 and any("advantage.kind" in p for p in problems) and any("optim.lr" in p for p in problems)


def test_get_field_and_schema_description():
    config = recipe()
    assert cfg.get_field(config, "rewards.judge.backend") == "shapes_world"
    assert cfg.get_field(config, "rewards.nope.x", None) is None
    with pytest.raises(cfg.ConfigError, match=r"config.rewards.nope.x is missing \(no field 'nope' under rewards\)"):
        cfg.get_field(config, "rewards.nope.x")
    assert "advantage.kind" in cfg.describe_schema()


def test_allowed_values_agree_with_the_modules_that_use_them():
    losses = pytest.importorskip("balcap_jax.rl.losses")
    assert tuple(losses.AGGREGATIONS) == cfg.LOSS_AGGREGATIONS


def test_model_names_agree_with_the_registry():
    registry = pytest.importorskip("balcap_jax.models.registry")
    assert sorted(registry.names()) == sorted(cfg.MODEL_NAMES)


def test_qwen_micro_batching_is_accepted_now_that_images_travel_in_blocks_of_rows():
    config = recipe()
    config.train.micro_batches = 2
    assert not [p for p in problems_of(config) if "micro_batches" in p]


def test_kl_to_a_reference_and_tis_are_accepted_and_tis_below_one_is_not():
    config = recipe()
    config.loss.kl_coef = 0.05
    config.loss.tis_cap = 2.0
    assert problems_of(config) == []
    config.loss.tis_cap = 0.5
    assert problems_of(config) == ["config.loss.tis_cap=0.5 must be 0 (off) or >= 1 (e.g. 2.0)"]


def test_every_batch_of_images_must_fit_the_largest_vision_bucket():
    config = recipe("qwen7b")
    config.model.hf_dir, config.data.manifest = "/w", "/m"
    config.rewards.judge.backend = "shapes_world"
    assert cfg.max_patches_per_image(512 * 28 * 28) == 2048
    assert not [p for p in problems_of(config, device_count=8, check_paths=False) if "vision bucket" in p]
    config.eval.batch_size = 0  # default: P * G = 128 images of up to 2048 patches
    problems = problems_of(config, device_count=8, check_paths=False)
    # The rollouts' mesh is all tensor-parallel (mesh.sampling_tensor_axes): one block holds every prompt.
    assert ("config.eval.batch_size=128: 128 images of up to 2048 patches (data.max_pixels=401408) on one batch "
            "shard can exceed the largest vision bucket of 32768 patches; hold at most 16 images per shard (more "
            "devices on the batch axes, fewer per batch, or a smaller data.max_pixels)") in problems, problems
    config.mesh.sampling_tensor_axes = ("tensor",)  # rollouts split rows over fsdp=8: 16 images per block
    assert not [p for p in problems_of(config, device_count=8, check_paths=False) if "vision bucket" in p]
    config.data.max_pixels = 1024 * 28 * 28  # 4096 patches: 8 images fill the largest bucket
    config.data.prompts_per_batch, config.eval.batch_size = 64, 64  # 8 prompts per block: fits
    assert not [p for p in problems_of(config, device_count=8, check_paths=False) if "vision bucket" in p]
    config.data.prompts_per_batch = 128
    problems = problems_of(config, device_count=8, check_paths=False)
    assert any(p.startswith("config.data.prompts_per_batch=128: 16 images of up to 4096 patches") for p in problems), \
        problems


def test_multi_process_fields_and_data_streams():
    config = recipe()
    config.distributed.num_processes = 2
    config.distributed.process_id = 2
    problems = problems_of(config, process_count=2)
    assert any(p.startswith("config.distributed.process_id=2 must be this process's rank in [0, 2)") for p in problems)
    assert any(p.startswith("config.distributed.coordinator_address=''") for p in problems)
    config.distributed.process_id, config.distributed.coordinator_address = 1, "127.0.0.1:1234"
    config.data.loader_shards = 3
    assert any("config.data.loader_shards=3 does not divide over the 2 processes" in p
               for p in problems_of(config, process_count=2))
    config.data.loader_shards = 16
    config.data.prompts_per_batch = 8
    assert any(p.startswith("config.data.prompts_per_batch=8 is not divisible by the 16 data streams")
               for p in problems_of(config, process_count=2))


def test_evaluation_split_rules(tmp_path):
    config = recipe("qwen7b")
    config.model.hf_dir = str(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("")
    config.data.manifest = str(manifest)
    config.rewards.judge.backend = "shapes_world"
    config.data.eval_manifest = str(tmp_path / "missing.jsonl")
    config.data.eval_fraction = 0.1
    problems = problems_of(config, device_count=8)
    assert f"config.data.eval_manifest={str(tmp_path / 'missing.jsonl')!r} does not exist" in problems
    assert any("data.eval_manifest and data.eval_fraction are both set" in p for p in problems)
    config.data.eval_fraction = 1.0
    assert any("config.data.eval_fraction=1.0 must be < 1" in p for p in problems_of(config, device_count=8))
