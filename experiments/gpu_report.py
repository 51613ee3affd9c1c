"""One-GPU report for the Qwen2.5-VL-3B shape: decode ms/step against the HBM roofline, and the RL update's MFU.

    python -m experiments.gpu_report            # on one GPU: 3B shape, random bf16 weights, batch 64, 512 new tokens
    python -m experiments.gpu_report --tiny     # anywhere (CPU): the same code on a tiny model, in seconds

Decode: our production sampler (vision-free text prompts of --prompt-tokens random ids, P prompts x G = batch
rows, no EOS so every row decodes --new-tokens tokens), prefill and decode timed separately, median (min-max) of
--runs after a warm-up. HBM roofline per step = (decoder + unembedding weight bytes + the whole KV cache's bytes) /
the detected GPU's HBM bandwidth (a table of datasheet figures; on other devices, a measured copy bandwidth);
fraction = roofline ms / measured ms.

Update: the production jitted RL update (`trainer.builders.rl_update_step`, what the loop runs) on the training
batch built from that rollout (`sampling.rollout.build_training_batch`, --update-rows of its rows), timed the same
way. MFU = model FLOPs per update / seconds / the device's dense peak FLOP/s (datasheet bf16 figure for known GPUs,
otherwise a measured square matmul: then the figure is "fraction of measured matmul peak"). Model FLOPs: 6 x tokens
x decoder non-embedding matmul parameters, + 6 x completion tokens x D x V for the log-prob unembedding, + causal
attention 6 x 2 x L x rows x T^2 x H x head_dim (full masked attention is computed, so T^2, not T^2 / 2).

Writes experiments/results/gpu_report[_tiny].md and .json; the last line printed is
`decode_hbm_fraction=<float> update_mfu=<float>`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from balcap_jax import default_config
from balcap_jax.models.qwen2_5_vl.model import make_inputs
from balcap_jax.rl import update as update_lib
from balcap_jax.sampling import Sampler, SamplerConfig, Temperature
from balcap_jax.sampling.rollout import build_training_batch
from balcap_jax.trainer import builders
from experiments import bench_sampling, common

# Datasheet figures (dense bf16 FLOP/s, HBM bytes/s) by a lower-case substring of `device_kind`; first match wins.
GPU_SPECS: tuple[tuple[str, float, float], ...] = (
    ("h200", 989e12, 4.8e12),
    ("h100", 989e12, 3.35e12),
    ("a100", 312e12, 2.04e12),
    ("l40s", 362e12, 0.864e12),
    ("l4", 121e12, 0.3e12),
)


@dataclasses.dataclass(frozen=True)
class Sizes:
    preset: str
    prompts: int
    group: int
    prompt_tokens: int
    new_tokens: int
    update_rows: int
    micro_batches: int
    runs: int


TINY = Sizes("tiny", 2, 2, 16, 8, 4, 1, 2)
FULL = Sizes("3b", 16, 4, 64, 512, 16, 4, 3)


def device_spec(device_kind: str) -> tuple[float, float] | None:
    """(peak FLOP/s, HBM bytes/s) of a known GPU, else None."""
    kind = device_kind.lower()
    for name, flops, bandwidth in GPU_SPECS:
        if name in kind:
            return flops, bandwidth
    return None


def update_flops(shape: bench_sampling.DecodeShape, rows: int, length: int, completion: int) -> int:
    """Model FLOPs of one RL update (forward + backward) on `rows` sequences of `length` tokens (module doc)."""
    per_layer = sum(a * b for a, b in shape.layer_matmuls())
    dense = 6 * rows * length * shape.layers * per_layer
    unembed = 6 * rows * completion * shape.hidden * shape.vocab
    attention = 6 * 2 * shape.layers * rows * length**2 * shape.heads * shape.head_dim
    return dense + unembed + attention


def text_prompts(config: Any, prompts: int, length: int, seed: int) -> dict:
    """P text-only prompts of `length` random ids (no image tokens), host arrays through `make_inputs`."""
    high = min(config.image_token_id, config.vision_start_token_id) - 8
    ids = np.random.default_rng(seed).integers(0, high, (prompts, length))
    return make_inputs(config, ids, np.ones_like(ids, bool))


def update_config(sizes: Sizes, dtype_name: str) -> ml_collections.ConfigDict:
    c = default_config.get_config()
    c.model.dtype = dtype_name
    c.sampling.temperature, c.sampling.top_p, c.sampling.top_k = 1.0, 1.0, 0
    c.train.micro_batches, c.train.updates_per_batch = sizes.micro_batches, 1
    return c


def run(sizes: Sizes, seed: int = 0) -> dict[str, Any]:
    device = jax.devices()[0]
    backend = jax.default_backend()
    dtype_name = "float32" if backend == "cpu" else "bfloat16"
    _, model, config = bench_sampling.build_models(sizes.preset, dtype_name, seed, False, "cpu")
    rows = sizes.prompts * sizes.group
    shape = bench_sampling.DecodeShape.of(config.text, rows)
    sampler, state = Sampler.from_model(model)
    scfg = SamplerConfig(max_new_tokens=sizes.new_tokens, eos_ids=(), pad_id=0, strategy=Temperature(1.0),
                         group_size=sizes.group, cache_dtype=dtype_name,
                         prompt_buckets=(sizes.prompt_tokens,))  # fmt: skip
    key = jax.random.key(seed)
    inputs = text_prompts(config, sizes.prompts, sizes.prompt_tokens, seed)
    prepared = sampler.prepare_prompts(inputs, scfg)
    stages = bench_sampling.StageTimes()

    def sample():
        t0 = time.perf_counter()
        start = jax.block_until_ready(sampler.prefill(state, prepared, scfg))
        t1 = time.perf_counter()
        rollout = jax.block_until_ready(sampler.decode(state, start, scfg, key))
        stages.prefill.append(t1 - t0)
        stages.decode.append(time.perf_counter() - t1)
        return rollout, int(start.cache.max_len)

    sample()  # compiles
    stages.prefill.clear(), stages.decode.clear()
    common.interleaved({"sample": sample}, sizes.runs, warmup=0)
    rollout, slots = sample()
    step_ms = [1e3 * d / (sizes.new_tokens - 1) for d in stages.decode[: sizes.runs]]
    hbm = bench_sampling.decode_hbm_bytes(model, rows, slots, jnp.dtype(dtype_name).itemsize)
    spec = device_spec(device.device_kind) if backend == "gpu" else None
    if spec is not None:
        peak_flops, bandwidth, peak_source = spec[0], spec[1], f"datasheet ({device.device_kind})"
    else:
        square = 1024 if sizes.preset == "tiny" else 4096  # best of a square matmul
        peak_flops = max(common.matmul_rates(square, square, square, jnp.dtype(dtype_name), runs=3))
        bandwidth = bench_sampling.measure_bandwidth_gbs(2**26 if sizes.preset == "tiny" else 2**30) * 1e9
        peak_source = "measured (square matmul, copy bandwidth)"
    roof_ms = (hbm["weight_bytes"] + hbm["kv_bytes"]) / bandwidth * 1e3

    # The update on the rollout's training batch (the first update_rows rows).
    batch = build_training_batch(prepared, rollout, sizes.group)
    keep = slice(0, sizes.update_rows)
    batch = {k: (v[:, keep] if k == "positions" and v.ndim == 3 else v[keep]) for k, v in batch.items()}
    batch["advantages"] = jnp.asarray(np.random.default_rng(seed).standard_normal(sizes.update_rows), jnp.float32)
    run_config = update_config(sizes, dtype_name)
    graphdef, params = nnx.split(model)
    optimizer, _ = builders.rl_optimizer(run_config)
    update = builders.rl_update_step(graphdef, run_config)
    box = {"state": update_lib.TrainState.create(params, optimizer)}

    def step():
        box["state"], metrics = update(box["state"], batch)
        jax.block_until_ready(metrics)

    step()  # compiles
    # One more untimed call: the state the first call returns is placed as the update's outputs are, which can
    # differ from the freshly created state's placement and compile the program once more.
    update_s = common.interleaved({"update": step}, sizes.runs, warmup=1)["update"]
    length = int(batch["input_ids"].shape[1])
    flops = update_flops(shape, sizes.update_rows, length, sizes.new_tokens)
    mfu = [flops / s / peak_flops for s in update_s]
    decode = common.Spread.of(step_ms)
    return dict(
        sizes=dataclasses.asdict(sizes), backend=backend, device=device.device_kind, dtype=dtype_name,
        shape=dataclasses.asdict(shape), cache_slots=slots, peak_flops=peak_flops, hbm_bytes_per_s=bandwidth,
        peak_source=peak_source, decode_ms_per_step=decode.to_dict(),
        prefill_s=common.Spread.of(stages.prefill[: sizes.runs]).to_dict(), hbm_roofline_ms=roof_ms, **hbm,
        decode_hbm_fraction=roof_ms / decode.median, update_s=common.Spread.of(update_s).to_dict(),
        update_tokens=sizes.update_rows * length, update_flops=flops, update_mfu=common.Spread.of(mfu).to_dict(),
        loadavg=common.loadavg(),
    )  # fmt: skip


def render_markdown(r: dict, command: str) -> str:
    s, sh = r["sizes"], r["shape"]
    spread = lambda d, k=3, x=1.0: common.Spread(d["median"] * x, d["low"] * x, d["high"] * x, d["count"]).format(k)  # noqa: E731
    rows = [
        ["decode", f"{spread(r['decode_ms_per_step'], 2)} ms/step", f"{r['hbm_roofline_ms']:.2f} ms/step "
         f"({r['weight_bytes'] / 1e9:.2f} GB weights + {r['kv_bytes'] / 1e9:.2f} GB KV at "
         f"{r['hbm_bytes_per_s'] / 1e9:.0f} GB/s)", f"{100 * r['decode_hbm_fraction']:.1f} % of the HBM roofline"],
        ["RL update", f"{spread(r['update_s'])} s ({r['update_tokens']} tokens, "
         f"{r['update_flops'] / 1e12:.2f} TFLOP)", f"{r['peak_flops'] / 1e12:.1f} TFLOP/s peak",
         f"MFU {spread(r['update_mfu'], 1, 100)} %"],
    ]  # fmt: skip
    return "\n".join([
        f"# GPU report: {s['preset']} shape on {r['device']} ({r['backend']}, {r['dtype']})",
        "",
        f"Random weights; decoder D={sh['hidden']}, I={sh['intermediate']}, {sh['heads']}/{sh['kv_heads']} heads of "
        f"{sh['head_dim']}, {sh['layers']} layers, V={sh['vocab']}. Decode: {s['prompts']} prompts x G={s['group']} "
        f"= {sh['rows']} rows, {s['prompt_tokens']}-token prompts, {s['new_tokens']} new tokens ({r['cache_slots']} "
        f"cache slots). Update: {s['update_rows']} rows, {s['micro_batches']} micro-batches. Median (min-max) of "
        f"{s['runs']} runs after a compiling one. Peak figures: {r['peak_source']}. Load average {r['loadavg']}.",
        "",
        common.markdown_table(["stage", "measured", "roofline / peak", "fraction"], rows),
        "",
        f"Reproduce (repository root): `{command}`",
        "",
    ])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny model (CPU, seconds): tests and dry runs")
    parser.add_argument("--out-dir", default=str(common.RESULTS))
    args = parser.parse_args(argv)
    if not args.tiny and jax.default_backend() != "gpu":
        raise SystemExit(f"the full report needs a GPU (backend is {jax.default_backend()!r}); use --tiny here")
    result = run(TINY if args.tiny else FULL)
    name = "gpu_report_tiny" if args.tiny else "gpu_report"
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=2))
    (out / f"{name}.md").write_text(render_markdown(result, common.command_line("gpu_report", argv)))
    print((out / f"{name}.md").read_text())
    print(f"decode_hbm_fraction={result['decode_hbm_fraction']:.4f} update_mfu={result['update_mfu']['median']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
