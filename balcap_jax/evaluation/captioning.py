"""Greedy captions of a set of images from a checkpoint: a training workdir or a local HF model directory.

  workdir:  `<dir>/checkpoints/<step>/` as `balcap_jax.checkpoint` writes them. The policy is rebuilt from the
            config saved in the latest checkpoint (model and data sections, so a from-scratch policy gets the
            same vocabulary subset) and only its parameters are restored (orbax partial restore: the optimizer
            state is never read).
  HF dir:   a directory with config.json + *.safetensors, loaded through `config.model.hf_dir`.

Captions are decoded greedily (temperature 0, one per image) by the same sampler and prompt pipeline as
training. Each finished caption is appended to a `ResultsStore`, so captioning is resumable too: a re-run only
captions the images it has no caption for (keyed by checkpoint, step, image and decoding settings).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import jax
import ml_collections
from flax import nnx

from balcap_jax.evaluation.results_store import ResultsStore, item_key


@dataclasses.dataclass
class LoadedPolicy:
    """config: the run config the policy was built from; fingerprint: identifies the weights (cache keys)."""

    config: Any
    policy: Any
    graphdef: Any
    params: Any
    fingerprint: dict[str, Any]


def is_hf_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json"))


def is_workdir(path: str) -> bool:
    return os.path.isdir(os.path.join(path, "checkpoints"))


def _manager(workdir: str):
    import orbax.checkpoint as ocp

    from balcap_jax.checkpoint import DATA, META, STATE

    directory = Path(workdir).absolute() / "checkpoints"
    return ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(create=False, read_only=True),
                                 item_names=(STATE, DATA, META))  # fmt: skip


def saved_config(workdir: str, step: int | None = None) -> tuple[int, ml_collections.ConfigDict]:
    """(step, run config) of the latest (or given) checkpoint of a training workdir."""
    import orbax.checkpoint as ocp

    from balcap_jax.checkpoint import META

    manager = _manager(workdir)
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"--checkpoint={workdir!r} has a checkpoints/ folder but no finished checkpoint in it")
    meta = manager.restore(step, args=ocp.args.Composite(**{META: ocp.args.JsonRestore()}))[META]
    manager.close()
    if not meta or not meta.get("config"):
        raise ValueError(f"checkpoint {step} in {workdir!r} has no saved config; was it written by balcap_jax.train?")
    return step, ml_collections.ConfigDict(meta["config"])


def restore_params(workdir: str, step: int, abstract_params: Any) -> Any:
    """The policy parameters saved at `step` (state["train"].params), read into `abstract_params`' structure."""
    import orbax.checkpoint as ocp

    from balcap_jax.checkpoint import STATE

    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)
                                                         or device), abstract_params)  # fmt: skip
    manager = _manager(workdir)
    restored = manager.restore(
        step, args=ocp.args.Composite(**{STATE: ocp.args.PyTreeRestore(
            item={"train": {"params": target}}, partial_restore=True,
            restore_args={"train": {"params": ocp.checkpoint_utils.construct_restore_args(target)}})}),
    )[STATE]  # fmt: skip
    manager.close()
    return restored["train"]["params"]


def load_policy(config: Any, checkpoint: str) -> LoadedPolicy:
    """The policy of `checkpoint` (workdir or HF dir, see module docstring). For a workdir, the model and data
    sections of `config` are replaced by the saved run's; everything else (sampling, judges) stays."""
    from balcap_jax.trainer.data_sources import corpus_texts, prepare_data
    from balcap_jax.trainer.policy import build_policy

    checkpoint = os.path.abspath(checkpoint)
    config = ml_collections.ConfigDict(config.to_dict())
    if is_hf_dir(checkpoint):
        config.model.hf_dir = checkpoint
        policy = build_policy(config, corpus=None, seed=int(config.seed))
        graphdef, params = nnx.split(policy.model)
        return LoadedPolicy(config, policy, graphdef, params, {"checkpoint": checkpoint, "checkpoint_kind": "hf_dir"})
    if not is_workdir(checkpoint):
        raise ValueError(
            f"--checkpoint={checkpoint!r} is neither a training workdir (with checkpoints/) nor a Hugging Face model "
            "directory (with config.json)"
        )
    step, saved = saved_config(checkpoint)
    for section in ("model", "data"):
        config[section] = saved[section]
    config.seed = saved.seed
    corpus = None
    if not config.model.hf_dir:
        train_source, _ = prepare_data(config, Path(checkpoint))
        corpus = corpus_texts(train_source)
    policy = build_policy(config, corpus=corpus, seed=int(config.seed))
    graphdef, abstract = nnx.split(policy.model)
    params = restore_params(checkpoint, step, abstract)
    fingerprint = {"checkpoint": checkpoint, "checkpoint_kind": "workdir", "step": step}
    return LoadedPolicy(config, policy, graphdef, params, fingerprint)


@functools.lru_cache(maxsize=4)
def sampler_for(graphdef: Any):
    """One `Sampler` per model graph in this process, so captioning several sources (or evaluating several
    checkpoints of one architecture) compiles its programs once."""
    from balcap_jax.sampling.sampler import Sampler

    return Sampler(graphdef)


def caption_source(
    loaded: LoadedPolicy, source: Sequence[Mapping[str, Any]], store: ResultsStore, *, batch_size: int,
    max_new_tokens: int,
) -> dict[str, str]:  # fmt: skip
    """{image_id: greedy caption} for every record of `source` (records as `tfds_builder.open_split` gives them),
    captioning only those without a stored caption. Records the pipeline skips (undecodable image, prompt too
    long) get no caption; the caller reports them as missing."""
    from balcap_jax.data import pipeline as pipeline_lib
    from balcap_jax.trainer import batches as batches_lib
    from balcap_jax.trainer.builders import sampler_config

    config, policy = loaded.config, loaded.policy
    settings = {"max_new_tokens": max_new_tokens, "prompt": config.data.prompt, "decoding": "greedy"}

    def key(image_id: str) -> str:
        return item_key(kind="caption", image_id=image_id, settings=settings, **loaded.fingerprint)

    def record_id(record: Mapping[str, Any]) -> str:
        value = record["id"]
        return value.decode("utf-8") if isinstance(value, bytes) else str(value)

    todo = [source[i] for i in range(len(source)) if key(record_id(source[i])) not in store]
    if todo:
        processor = batches_lib.PolicyPromptProcessor.for_policy(policy, config.data.prompt)
        pipeline = pipeline_lib.PipelineConfig(
            batch_size=batch_size, buckets=tuple(config.data.prompt_buckets), shuffle=False, num_epochs=1,
            pad_id=policy.pad_id, concat_keys=policy.family.concat_keys, seed=int(config.seed),
        )  # fmt: skip
        sampling = ml_collections.ConfigDict(config.to_dict())
        sampling.sampling.max_new_tokens = max_new_tokens
        scfg = sampler_config(sampling, policy, greedy=True, group_size=1)
        sampler = sampler_for(loaded.graphdef)
        for batch in pipeline_lib.make_dataset(todo, processor, pipeline):
            if not len(batch["example_id"]):
                continue
            for image_id, caption in zip(batch["example_id"],
                                         batches_lib.greedy_captions(policy, sampler, loaded.params, batch, scfg)):
                store.put(key(str(image_id)), str(image_id), {"caption": caption})
    captions = {}
    for i in range(len(source)):
        image_id = record_id(source[i])
        if (row := store.get(key(image_id))) is not None:
            captions[image_id] = row["caption"]
    return captions
