"""A shipped warm start: a from-scratch policy's parameters saved after SFT, loaded into a fresh policy.

Two files with one stem: `<stem>.npz` holds every leaf of the policy's NNX state under its key path
("model/language_model/embed_tokens/embedding"), `<stem>.json` what the weights only fit: the compact vocabulary
(the Qwen ids of `VocabSubset`, whose order *is* the embedding's row order), the architecture (`config.model.tiny`)
and how the file was made (command, seed, steps, git commit). `config.train.init_from` names either file or the
stem; a relative path is read against the package (`balcap_jax/`), so a pip install finds the shipped asset.

Every leaf's shape and dtype must match the freshly built policy exactly: a warm start built for another model size
would load silently wrong weights, so a mismatch is an error naming the field. The vocabulary may differ: the
embedding rows are carried over by Qwen token id (a run on fewer training scenes has a subset of the same tokens).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np

from balcap_jax.trainer.vocab_subset import VocabSubset

PACKAGE_DIR = Path(__file__).resolve().parent.parent
_FIELD = "config.train.init_from"


def resolve(init_from: str) -> tuple[Path, Path]:
    """`config.train.init_from` -> (npz path, json path). Relative paths are read against the package dir."""
    path = Path(init_from).expanduser()
    if not path.is_absolute():
        path = PACKAGE_DIR / path
    stem = path.with_suffix("") if path.suffix in (".npz", ".json") else path
    npz, meta = stem.with_name(stem.name + ".npz"), stem.with_name(stem.name + ".json")
    for f in (npz, meta):
        if not f.is_file():
            raise ValueError(
                f"{_FIELD}={init_from!r}: {f} does not exist (a warm start is a .npz and a .json with the same stem; "
                "build one with `python -m experiments.build_warm_start --out=...`, or set it to '' to start from "
                "random weights)"
            )
    return npz, meta


def config_problems(config: Any) -> list[str]:
    """What is wrong with `config.train.init_from` before any model is built (empty when unset or fine): the files
    exist, the run builds a from-scratch policy, and the recorded architecture is `config.model.tiny`."""
    init_from = str(config.train.get("init_from", "") or "")
    if not init_from:
        return []
    if config.model.hf_dir:
        return [f"{_FIELD}={init_from!r} warm-starts a from-scratch policy, but config.model.hf_dir="
                f"{config.model.hf_dir!r} loads a checkpoint; set one of them to ''"]
    try:
        _, meta_path = resolve(init_from)
        meta = json.loads(meta_path.read_text())
    except ValueError as e:  # JSONDecodeError is a ValueError too
        return [str(e) if _FIELD in str(e) else f"{_FIELD}={init_from!r}: unreadable metadata ({e})"]
    saved_arch = meta.get("architecture")
    ours = {k: (v if not isinstance(v, tuple) else list(v)) for k, v in dict(config.model.tiny).items()}
    if saved_arch != ours or meta.get("model_name", config.model.name) != config.model.name:
        return [f"{_FIELD}={init_from!r} was built for config.model.name={meta.get('model_name')!r}, "
                f"config.model.tiny={saved_arch}; this run has {config.model.name!r}, {ours}: set config.model.tiny "
                "to the warm start's, rebuild it (python -m experiments.build_warm_start) or set it to ''"]
    return []


def check_config(config: Any) -> None:
    """Raises ValueError with every `config_problems`."""
    problems = config_problems(config)
    if problems:
        raise ValueError("; ".join(problems))


def _flat(state: Any) -> dict[str, Any]:
    """An NNX state (or any pytree) -> {"a/b/c": leaf} with '/'-joined key paths."""
    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(state):
        names = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
        out["/".join(n for n in names if n != "value")] = leaf
    return out


def save(stem: str | Path, state: Any, vocab: VocabSubset, metadata: Mapping[str, Any]) -> tuple[Path, Path]:
    """Writes `<stem>.npz` (every leaf of `state`, on the host) and `<stem>.json` (vocabulary ids + `metadata`,
    which should carry architecture, seed, steps, command and commit). Returns the two paths."""
    stem = Path(stem)
    stem = stem.with_suffix("") if stem.suffix in (".npz", ".json") else stem
    stem.parent.mkdir(parents=True, exist_ok=True)
    arrays = {k: np.asarray(jax.device_get(v)) for k, v in _flat(state).items()}
    npz, meta = stem.with_name(stem.name + ".npz"), stem.with_name(stem.name + ".json")
    np.savez(npz, **arrays)
    record = dict(metadata)
    record["vocab_tokenizer_ids"] = json.loads(vocab.to_json())
    record["leaves"] = {k: [list(a.shape), str(a.dtype)] for k, a in arrays.items()}
    meta.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    return npz, meta


def read_metadata(init_from: str) -> dict[str, Any]:
    return json.loads(resolve(init_from)[1].read_text())


def load_into(state: Any, vocab: VocabSubset | None, init_from: str) -> Any:
    """`state` (the fresh policy's NNX state, any layout) with every leaf replaced by the warm start's (host numpy
    arrays of the same shape and dtype; the caller places them). A different vocabulary subset is mapped token by
    token (`vocab_rows`). Raises ValueError naming `config.train.init_from` when the set of leaves or a leaf's
    shape/dtype differ."""
    npz_path, meta_path = resolve(init_from)
    meta = json.loads(meta_path.read_text())
    if vocab is None:
        raise ValueError(
            f"{_FIELD}={init_from!r} is a warm start of a from-scratch policy (compact vocabulary), but this run "
            "loads config.model.hf_dir; set one of them to ''"
        )
    saved_vocab = VocabSubset(np.concatenate([[-1], np.asarray(meta.get("vocab_tokenizer_ids", []), np.int64)]))
    with np.load(npz_path) as data:
        saved = {k: data[k] for k in data.files}
    fresh = _flat(state)
    if set(saved) != set(fresh):
        only_file, only_model = sorted(set(saved) - set(fresh)), sorted(set(fresh) - set(saved))
        raise ValueError(
            f"{_FIELD}={init_from!r} does not match the model: leaves only in the file {only_file[:3]}, only in the "
            f"model {only_model[:3]}; the warm start was built for another architecture (config.model)"
        )
    rows = vocab_rows(saved_vocab, vocab)
    for key, leaf in fresh.items():
        axis = _vocab_axis(key)
        if rows is not None and axis is not None:
            saved[key] = _remap_rows(saved[key], np.asarray(leaf), rows, axis)
        if tuple(saved[key].shape) != tuple(leaf.shape) or np.dtype(saved[key].dtype) != np.dtype(leaf.dtype):
            raise ValueError(
                f"{_FIELD}={init_from!r} does not match the model at {key}: file {saved[key].shape} "
                f"{saved[key].dtype}, model {tuple(leaf.shape)} {np.dtype(leaf.dtype)}; the warm start was built "
                f"for config.model.tiny={meta.get('architecture')} (or another dtype)"
            )
    # _flat walks the leaves in tree order, so its keys line up with the treedef's leaves.
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(state), [saved[k] for k in fresh])


# Leaves indexed by the compact vocabulary, and the axis that is: the input embedding's rows, an untied head's columns.
_VOCAB_AXES = (("embed_tokens/embedding", 0), ("lm_head/kernel", -1), ("lm_head/bias", 0))


def _vocab_axis(key: str) -> int | None:
    return next((axis for suffix, axis in _VOCAB_AXES if key.endswith(suffix)), None)


def vocab_rows(saved: VocabSubset, ours: VocabSubset) -> np.ndarray | None:
    """int64[V'_ours]: for each of this run's compact ids, the warm start's compact id of the same Qwen token (-1
    where the warm start never had that token); None when the two subsets are identical.

    A ShapesWorld corpus is drawn from a closed grammar, so a run with fewer or other training scenes
    (`config.data.shapes_world.num_train`) sees a subset of the same tokens; their rows carry over by token, and a
    token the warm start never saw keeps its fresh initialisation (no trained row exists for it)."""
    if saved.size == ours.size and np.array_equal(saved.tokenizer_ids, ours.tokenizer_ids):
        return None
    mapped = saved.from_tokenizer(ours.tokenizer_ids).astype(np.int64)
    mapped[(mapped == saved.unk_id) & (np.arange(ours.size) != ours.unk_id)] = -1
    return mapped


def _remap_rows(saved: np.ndarray, fresh: np.ndarray, rows: np.ndarray, axis: int) -> np.ndarray:
    """`fresh` with its slices along `axis` replaced by `saved`'s slices `rows` (kept where rows == -1)."""
    saved, fresh = np.moveaxis(saved, axis, 0), np.moveaxis(fresh, axis, 0)
    if saved.shape[1:] != fresh.shape[1:]:
        return np.moveaxis(saved, 0, axis)  # another width: the shape check names it
    out = np.where((rows >= 0)[(slice(None),) + (None,) * (fresh.ndim - 1)], saved[np.maximum(rows, 0)], fresh)
    return np.moveaxis(out.astype(saved.dtype), 0, axis)
