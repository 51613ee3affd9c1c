"""Host-side batch assembly between the data pipeline, the sampler, the judges and the update step.

Pipeline batches (see `data.pipeline`) carry Qwen prompt features for P images; this module turns them into
model inputs (`models/interface.py` layout), into SFT batches (prompt + reference caption), and turns rollouts
back into text and `RewardItem`s.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from balcap_jax.data.caption_processors import caption_processor
from balcap_jax.data.records import CaptionExample
from balcap_jax.data.shapes_world_warm_start import sft_target
from balcap_jax.models.interface import next_text_positions
from balcap_jax.parallel import hosts
from balcap_jax.rewards.types import RewardItem
from balcap_jax.sampling.rollout import Rollout, build_training_batch
from balcap_jax.trainer.policy import Policy


@dataclasses.dataclass(frozen=True)
class PolicyPromptProcessor:
    """The pipeline processor for a policy: its family's prompt features, ids mapped to the policy's vocabulary."""

    inner: Any
    policy: Policy

    @classmethod
    def for_policy(cls, policy: Policy, instruction: str) -> "PolicyPromptProcessor":
        inner = caption_processor(policy.family.name, tokenizer=policy.tokenizer, model_config=policy.model_config,
                                  image_config=policy.image_config, instruction=instruction)
        return cls(inner, policy)

    @property
    def pad_id(self) -> int:
        return self.policy.pad_id

    def __call__(self, example: CaptionExample) -> dict[str, np.ndarray]:
        features = dict(self.inner(example))
        features["input_ids"] = self.policy.to_model_ids(features["input_ids"])
        return features


def vision_inputs(policy: Policy, batch: Mapping[str, Any], *, repeats: int = 1, mesh: Any = None,
                  micro_batches: int = 1) -> dict[str, np.ndarray] | None:
    """The vision inputs of this process's rows (each prompt's `repeats` copies, prompt-major), laid out in one
    block per batch shard of `mesh` and micro-batch (`hosts.row_blocks`; one block without a mesh), so each
    device encodes only its own rows' images (each family's `vision_inputs`, `models/<family>/family.py`)."""
    rows = len(batch["input_ids"]) * repeats
    blocks = hosts.row_blocks(mesh, rows, micro_batches=micro_batches)
    return policy.family.vision_inputs(policy.model_config, batch, repeats, blocks)


def text_inputs(batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Pipeline batch -> the text part of its prompt SequenceInputs (numpy): input_ids [P, T], attention_mask,
    positions ([3, P, T] M-RoPE or [P, T])."""
    return {
        "input_ids": np.asarray(batch["input_ids"], np.int32),
        "attention_mask": np.asarray(batch["attention_mask"], bool),
        "positions": np.asarray(batch["positions"], np.int32),
    }


def prompt_inputs(policy: Policy, batch: Mapping[str, Any], mesh: Any = None) -> dict[str, Any]:
    """Pipeline batch -> prompt SequenceInputs (numpy): `text_inputs` and vision (in blocks of `mesh`'s batch
    shards: the mesh the prompts run on)."""
    return {**text_inputs(batch), "vision": vision_inputs(policy, batch, mesh=mesh)}


def tile_vision_for(policy: Policy, batch: Mapping[str, Any], mesh: Any = None, micro_batches: int = 1):
    """`tile_vision` for `build_training_batch`: each prompt's images for its G rows (encoded once per block of
    rows of `mesh`'s batch shards x `micro_batches`)."""
    return lambda _vision, group_size: vision_inputs(policy, batch, repeats=group_size, mesh=mesh,
                                                     micro_batches=micro_batches)


def reference_completions(
    policy: Policy, references: Sequence[str], prompts: Mapping[str, Any], max_new_tokens: int
) -> Rollout:
    """Reference captions laid out as a `Rollout` (tokens + EOS, padded), so SFT batches are built by the same
    `build_training_batch` as RL batches and line up with them token for token. Longer references are cut."""
    rows = len(references)
    tokens = np.full((rows, max_new_tokens), policy.pad_id, np.int32)
    mask = np.zeros((rows, max_new_tokens), bool)
    for row, text in enumerate(references):
        ids = np.concatenate([policy.encode_text(text), [policy.eos_id]])[:max_new_tokens]
        tokens[row, : len(ids)] = ids
        mask[row, : len(ids)] = True
    starts = np.asarray(next_text_positions(np.asarray(prompts["positions"]), np.asarray(prompts["attention_mask"])))
    lengths = mask.sum(-1).astype(np.int32)
    return Rollout(
        tokens=tokens,
        logprobs=np.zeros((rows, max_new_tokens), np.float32),
        completion_mask=mask,
        lengths=lengths,
        finish_reason=np.zeros((rows,), np.int32),
        start_positions=starts.astype(np.int32),
        decode_steps=np.asarray(max_new_tokens, np.int32),
    )


def sft_batch(policy: Policy, batch: Mapping[str, Any], max_new_tokens: int, *, mesh: Any = None,
              micro_batches: int = 1) -> dict:
    """Teacher-forcing batch on each row's warm-start target: its imperfect caption when the record carries one
    (ShapesWorld with captioner habits), else its first reference caption. Vision in blocks of `mesh`'s batch
    shards x `micro_batches` (the update's)."""
    prompts = text_inputs(batch)
    references = [sft_target(meta, refs) for meta, refs in zip(batch["metadata"], batch["references"])]
    rollout = reference_completions(policy, references, prompts, max_new_tokens)
    out = {k: np.asarray(v) for k, v in build_training_batch(prompts, rollout, 1).items()}
    if "pixel_values" in batch:
        out["vision"] = vision_inputs(policy, batch, mesh=mesh, micro_batches=micro_batches)
    return out


def completion_texts(policy: Policy, rollout: Rollout) -> list[str]:
    """Decoded completions, EOS and padding removed; row order as in the rollout (prompt-major)."""
    tokens = np.asarray(rollout.tokens)
    mask = np.asarray(rollout.completion_mask)
    texts = []
    for row in range(tokens.shape[0]):
        ids = tokens[row][mask[row]]
        ids = ids[~np.isin(ids, policy.eos_ids)]
        texts.append(policy.decode(ids))
    return texts


def greedy_captions(policy: Policy, sampler: Any, params: Any, batch: Mapping[str, Any], config: Any) -> list[str]:
    """Captions of a pipeline batch's prompts under the sampler config `config` (greedy for evaluation), this
    process's rows only: the one captioning path of training-time and standalone evaluation."""
    prompts = prompt_inputs(policy, batch, sampler.layout.mesh)
    rollout = local_rollout(sampler(params, prompts, config, jax.random.key(0)))
    return completion_texts(policy, rollout)


def local_rollout(rollout: Rollout) -> Rollout:
    """This process's rows of a rollout whose arrays span the mesh (numpy; the whole rollout with one process)."""
    return jax.tree.map(lambda x: hosts.host_value(x) if np.ndim(x) == 0 else hosts.local_rows(x), rollout)


def reward_items(batch: Mapping[str, Any], captions: Sequence[str], group_size: int) -> list[list[RewardItem]]:
    """P groups of G `RewardItem`s (captions prompt-major)."""
    groups = []
    for p, image_id in enumerate(batch["example_id"]):
        groups.append(
            [
                RewardItem(
                    image_id=str(image_id),
                    caption=captions[p * group_size + g],
                    references=tuple(batch["references"][p]),
                    image=batch["image_bytes"][p],
                    metadata=batch["metadata"][p],
                )
                for g in range(group_size)
            ]
        )
    return groups


def reference_lengths(policy: Policy, batch: Mapping[str, Any]) -> np.ndarray:
    """Tokens of each prompt's first reference caption (in the policy's tokenizer): int32[P]."""
    return np.asarray([len(policy.encode_text(refs[0])) for refs in batch["references"]], np.int32)
