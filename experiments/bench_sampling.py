"""Rollout throughput: our jitted group sampler vs HF transformers `generate`, same model, same prompts, raced
interleaved; and our decode step against this machine's matmul roofline, measured in the same rounds.

One process, one random Qwen2.5-VL (HF torch weights converted into ours, so both run the same network), real
photographs (scikit-image samples) through the Qwen image processor, P prompts x G samples per prompt, the same
number of new tokens for every row (no EOS: HF gets min_new_tokens = max_new_tokens, ours gets no EOS ids),
plain temperature-1 sampling over the full vocabulary on both sides. HF expands each prompt G times before its
prefill (`num_return_sequences`); ours runs vision + prefill once per prompt and tiles the KV cache.

Timing: each round runs, in turn, (1) ours end to end, (2) HF `generate` end to end, (3) ours split into prefill
and decode, (4) the matmul skeleton of one decode step (below); --warmup rounds are discarded, then the median and
min-max of --runs rounds are reported. Both engines start from the same host arrays (token ids, mask, pixel
values, grids) and do their own host work inside the timing: ours builds the M-RoPE position table and the vision
tower's window/rotary tables (`make_inputs`) and pads to its bucket, HF builds its torch tensors and
`mm_token_type_ids`. Our compile time (first call) is reported separately. The speed-up is the median of the
per-round ratios (HF seconds / our seconds of the same round) with their min-max.

Roofline: the matmul skeleton runs exactly the matrix products of one decode step — per layer q/k/v/o
projections and gate/up/down ([rows x D] x [D x out], each layer with its own weights, as the model reads them)
and the unembedding [rows x D] x [D x V] — as one jitted program. Its FLOP/s is this machine's matmul roofline
for the decode step's shapes; `roofline_fraction` = achieved FLOP/s of our decode step (the same FLOPs, attention
over the cache not counted) / that roofline = skeleton seconds / decode-step seconds. On a GPU the HBM roofline
(weights + KV bytes per step / measured bandwidth) is reported as well.

Memory: peak resident-set growth of the process during one call of each engine (Linux VmHWM, after the race),
plus XLA's own buffer plan for our compiled programs; on a GPU, device peak bytes instead.

Reproduce (CPU, the numbers in experiments/results/bench_sampling.md), from the repository root:
    python -m experiments.bench_sampling
GPU, Qwen2.5-VL-3B shapes, ours only:
    python -m experiments.bench_sampling --preset 3b --skip-hf --out-name bench_sampling_3b
The last line printed is `speedup_vs_hf=<float> roofline_fraction=<float>` (nan speed-up with --skip-hf).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

import jax
import jax.numpy as jnp
from flax import nnx

from balcap_jax.models import hf_io
from balcap_jax.models.qwen2_5_vl import params as qwen_params
from balcap_jax.models.qwen2_5_vl.config import Qwen2_5_VLConfig
from balcap_jax.models.qwen2_5_vl.model import Qwen2_5_VL, make_inputs
from balcap_jax.models.qwen2_5_vl.processor import ImageProcessorConfig, preprocess_images
from balcap_jax.models.qwen2_5_vl.vision import hf_special_cases
from balcap_jax.sampling import Sampler, SamplerConfig, Temperature
from experiments import common


def _text(vocab: int, hidden: int, inter: int, layers: int, heads: int, kv: int, section, tie: bool) -> dict:
    return dict(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv, rms_norm_eps=1e-6, max_position_embeddings=32768,
        rope_parameters=dict(rope_type="default", rope_theta=1_000_000.0, mrope_section=list(section)),
        tie_word_embeddings=tie, bos_token_id=vocab - 6, eos_token_id=vocab - 5,
    )  # fmt: skip


def _vision(depth: int, hidden: int, inter: int, heads: int, out: int, full) -> dict:
    return dict(
        depth=depth, hidden_size=hidden, intermediate_size=inter, num_heads=heads, in_channels=3, patch_size=14,
        spatial_merge_size=2, temporal_patch_size=2, window_size=112, out_hidden_size=out,
        fullatt_block_indexes=list(full),
    )  # fmt: skip


_SMALL_IDS = dict(image_token_id=31996, video_token_id=31997, vision_start_token_id=31998, vision_end_token_id=31999)
# "tiny": seconds-long tests; "small": ~40M parameters (a 32k vocabulary keeps the embedding from dominating);
# "3b": Qwen2.5-VL-3B shapes.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(text=_text(32000, 64, 128, 2, 4, 2, (2, 3, 3), True), vision=_vision(2, 32, 64, 2, 64, (1,)),
                 special_ids=_SMALL_IDS),
    "small": dict(text=_text(32000, 512, 1408, 8, 8, 2, (8, 12, 12), True), vision=_vision(4, 256, 512, 4, 512, (1, 3)),
                  special_ids=_SMALL_IDS),
    "3b": dict(
        text=_text(151936, 2048, 11008, 36, 16, 2, (16, 24, 24), True),
        vision=_vision(32, 1280, 3420, 16, 2048, (7, 15, 23, 31)),
        special_ids=dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
                         vision_end_token_id=151653),
    ),
}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Prompts:
    input_ids: np.ndarray  # int64[P, T] left-padded
    attention_mask: np.ndarray  # bool[P, T]
    pixel_values: np.ndarray  # float32[N_patches, C*T*p*p], one image per prompt
    image_grid_thw: np.ndarray  # int64[P, 3]


def hf_config_dict(preset: str) -> dict:
    spec = PRESETS[preset]
    return dict(text_config=spec["text"], vision_config=spec["vision"], tie_word_embeddings=spec["text"][
        "tie_word_embeddings"], **spec["special_ids"])  # fmt: skip


def build_prompts(config: Qwen2_5_VLConfig, num_prompts: int, max_pixels: int, seed: int) -> Prompts:
    """One real photograph per prompt (cycling through skimage's samples), text of varied length around it."""
    rng = np.random.default_rng(seed)
    pixels, grids = preprocess_images(common.photograph_arrays(num_prompts), ImageProcessorConfig(max_pixels=max_pixels))
    text_high = min(config.image_token_id, config.vision_start_token_id) - 8
    rows = []
    for p in range(num_prompts):
        n_image = int(np.prod(grids[p])) // config.spatial_merge_size**2
        before, after = rng.integers(12, 24), rng.integers(24, 64)
        rows.append(np.concatenate([
            rng.integers(0, text_high, before), [config.vision_start_token_id],
            np.full(n_image, config.image_token_id), [config.vision_end_token_id], rng.integers(0, text_high, after),
        ]))  # fmt: skip
    length = max(len(r) for r in rows)
    ids = np.zeros((num_prompts, length), np.int64)
    mask = np.zeros((num_prompts, length), bool)
    for i, row in enumerate(rows):
        ids[i, length - len(row) :], mask[i, length - len(row) :] = row, True
    return Prompts(ids, mask, pixels.astype(np.float32), np.asarray(grids, np.int64))


def our_inputs(config: Qwen2_5_VLConfig, prompts: Prompts) -> dict:
    """Host prompt arrays -> our model's inputs (M-RoPE positions, vision tables): host work on our side."""
    return make_inputs(config, prompts.input_ids, prompts.attention_mask, prompts.pixel_values,
                       prompts.image_grid_thw)  # fmt: skip


# -- the decode step's matmul roofline ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DecodeShape:
    """The matrix shapes of one decode step of a decoder: rows N (= P * G), hidden D, q heads H, KV heads H_kv
    of width head_dim, MLP width I, L layers, vocabulary V."""

    rows: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    layers: int
    vocab: int

    @classmethod
    def of(cls, text_config: Any, rows: int) -> "DecodeShape":
        t = text_config
        return cls(rows, int(t.hidden_size), int(t.num_heads), int(t.num_kv_heads), int(t.head_dim),
                   int(t.intermediate_size), int(t.num_layers), int(t.vocab_size))  # fmt: skip

    def layer_matmuls(self) -> tuple[tuple[int, int], ...]:
        """(in, out) of each weight matrix one layer multiplies: q, k, v, o, gate, up, down."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        d, i = self.hidden, self.intermediate
        return ((d, q), (d, kv), (d, kv), (q, d), (d, i), (d, i), (i, d))

    def flops(self) -> int:
        """Matmul FLOPs of one step: 2 N (L * sum(in * out) + D * V)."""
        per_layer = sum(a * b for a, b in self.layer_matmuls())
        return 2 * self.rows * (self.layers * per_layer + self.hidden * self.vocab)


def matmul_skeleton(shape: DecodeShape, dtype: Any, seed: int = 0) -> Callable[[], Any]:
    """A blocking callable running exactly the decode step's matmuls (`DecodeShape.flops`) once, each layer with
    its own weights (so, as in the model, no layer's weights are still in cache from the previous one). Every
    product feeds a scalar so none is dead code; the reductions are N x out additions, negligible next to the
    N x in x out products."""
    key, counter = jax.random.key(seed), iter(range(10**9))
    init = lambda s: (0.02 * jax.random.normal(jax.random.fold_in(key, next(counter)), s)).astype(dtype)  # noqa: E731
    layers = [[init((a, b)) for a, b in shape.layer_matmuls()] for _ in range(shape.layers)]
    unembed = init((shape.hidden, shape.vocab))
    inputs = {n: init((shape.rows, n)) for n in {a for a, _ in shape.layer_matmuls()}}

    @jax.jit
    def run(inputs, layers, unembed):
        total = jnp.zeros((), jnp.float32)
        for weights in layers:
            for w in weights:
                total += jnp.sum(jnp.dot(inputs[w.shape[0]], w, preferred_element_type=jnp.float32))
        return total + jnp.sum(jnp.dot(inputs[shape.hidden], unembed, preferred_element_type=jnp.float32))

    call = lambda: jax.block_until_ready(run(inputs, layers, unembed))  # noqa: E731
    call()  # compile outside any timing
    return call


def decode_hbm_bytes(model: Qwen2_5_VL, rows: int, slots: int, cache_itemsize: int) -> dict[str, int]:
    """Bytes one decode step must read: every decoder/unembedding weight once plus the whole KV cache."""
    leaves = jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param))
    weight_bytes = sum(x.size * x.dtype.itemsize for path, x in leaves if "visual" not in jax.tree_util.keystr(path))
    spec = model.cache_spec()
    kv_bytes = 2 * spec.num_layers * rows * slots * spec.num_kv_heads * spec.head_dim * cache_itemsize
    return dict(weight_bytes=int(weight_bytes), kv_bytes=int(kv_bytes))


def measure_bandwidth_gbs(num_bytes: int, runs: int = 5) -> float:
    """Device memory bandwidth from a large elementwise op: (read + write bytes) / time, best of `runs`."""
    x = jnp.ones((num_bytes // 4,), jnp.float32)
    f = jax.jit(lambda a: a * 1.0001)
    f(x).block_until_ready()
    best = min(common.interleaved({"copy": lambda: f(x).block_until_ready()}, runs, warmup=0)["copy"])
    return 2 * x.nbytes / best / 1e9


# -- engines -------------------------------------------------------------------------------------------------------


def run_ours(sampler: Sampler, state, config: Qwen2_5_VLConfig, prompts: Prompts, sampler_config: SamplerConfig,
             key) -> np.ndarray:
    """Host prompt arrays -> generated ids int[P * G, T_new] (host tables, prefill, decode, copy back)."""
    rollout = sampler(state, our_inputs(config, prompts), sampler_config, key)
    return np.asarray(jax.block_until_ready(rollout.tokens))


@dataclasses.dataclass
class StageTimes:
    """Ours split in two stages, one entry per call: prefill seconds (host tables included) and decode seconds."""

    prefill: list[float] = dataclasses.field(default_factory=list)
    decode: list[float] = dataclasses.field(default_factory=list)


def run_ours_stages(sampler: Sampler, state, config: Qwen2_5_VLConfig, prompts: Prompts,
                    sampler_config: SamplerConfig, key, into: StageTimes) -> None:
    t0 = time.perf_counter()
    start = jax.block_until_ready(sampler.prefill(state, sampler.prepare_prompts(our_inputs(config, prompts),
                                                                                 sampler_config), sampler_config))
    t1 = time.perf_counter()
    jax.block_until_ready(sampler.decode(state, start, sampler_config, key).tokens)
    into.prefill.append(t1 - t0)
    into.decode.append(time.perf_counter() - t1)


def run_hf(hf_model, prompts: Prompts, config, group: int, new_tokens: int, device: str) -> np.ndarray:
    """The same host prompt arrays -> HF `generate` ids int[P * G, T_new]."""
    import torch

    kwargs = dict(
        input_ids=torch.from_numpy(prompts.input_ids).to(device),
        attention_mask=torch.from_numpy(prompts.attention_mask.astype(np.int64)).to(device),
        pixel_values=torch.from_numpy(prompts.pixel_values).to(device, hf_model.dtype),
        image_grid_thw=torch.from_numpy(prompts.image_grid_thw).to(device),
        mm_token_type_ids=torch.from_numpy((prompts.input_ids == config.image_token_id).astype(np.int64)).to(device),
    )
    with torch.no_grad():
        out = hf_model.generate(
            **kwargs, do_sample=True, temperature=1.0, top_p=1.0, top_k=0, num_return_sequences=group,
            max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0,
        )  # fmt: skip
    if device != "cpu":
        torch.cuda.synchronize()
    return out[:, prompts.input_ids.shape[1] :].cpu().numpy()


def xla_plan_mib(compiled) -> float:
    m = compiled.memory_analysis()
    if m is None:
        return float("nan")
    return (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes) / 2**20


def device_peak_mib() -> float:
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use", float("nan")) / 2**20


def build_models(preset: str, dtype_name: str, seed: int, with_hf: bool, torch_device: str):
    """(HF torch model or None, our module, our config): the same random weights on both sides."""
    import torch
    import transformers

    dtype = jnp.dtype(dtype_name)
    hf_config = transformers.Qwen2_5_VLConfig(**hf_config_dict(preset))
    config = Qwen2_5_VLConfig.from_hf(hf_config.to_dict())
    if not with_hf:
        model = nnx.jit(lambda: Qwen2_5_VL(config, rngs=nnx.Rngs(seed), dtype=dtype, param_dtype=dtype))()
        return None, model, config
    torch.manual_seed(seed)
    hf_model = transformers.Qwen2_5_VLForConditionalGeneration(hf_config).eval()
    hf_model = hf_model.to(getattr(torch, dtype_name)).to(torch_device)
    tensors = {k: v.float().cpu().numpy() for k, v in hf_model.state_dict().items()}
    abstract = qwen_params.abstract_model(config, dtype=dtype, param_dtype=dtype)
    # torch state_dict keys use the nested module layout (model.language_model.*, model.visual.*), as ours do.
    mapping = hf_io.ParamMapping(special_cases=hf_special_cases(),
                                 ignore_unexpected=(r"lm_head\.weight",) if config.text.tie_word_embeddings else ())
    return hf_model, qwen_params.from_hf_tensors(abstract, tensors, mapping), config


# -- main ----------------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--group", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=5, help="measured interleaved rounds (median, min-max)")
    parser.add_argument("--warmup", type=int, default=1, help="rounds run and discarded first")
    parser.add_argument("--max-pixels", type=int, default=224 * 224)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                        help="weights/compute/KV dtype for both engines (default: float32 on CPU, bfloat16 on GPU)")
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--out-dir", default=str(common.RESULTS))
    parser.add_argument("--out-name", default="bench_sampling")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name in ("prompts", "group", "runs"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name}={getattr(args, name)} must be >= 1")
    if args.new_tokens < 2:
        raise SystemExit(f"--new-tokens={args.new_tokens} must be >= 2 (one decode step needs two tokens)")
    if args.warmup < 0:
        raise SystemExit(f"--warmup={args.warmup} must be >= 0")
    return args


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    import transformers

    backend = jax.default_backend()
    dtype_name = args.dtype or ("float32" if backend == "cpu" else "bfloat16")
    torch_device = "cuda" if backend == "gpu" and torch.cuda.is_available() else "cpu"
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    rows = args.prompts * args.group
    load_start = common.loadavg()
    print(f"backend={backend} devices={jax.devices()} dtype={dtype_name} torch_threads={threads} rows={rows}")

    hf_model, model, config = build_models(args.preset, dtype_name, args.seed, not args.skip_hf, torch_device)
    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    print(f"model: {args.preset} preset, {n_params / 1e6:.1f}M parameters")
    prompts = build_prompts(config, args.prompts, args.max_pixels, args.seed)
    sampler, state = Sampler.from_model(model)
    sampler_config = SamplerConfig(max_new_tokens=args.new_tokens, eos_ids=(), pad_id=0, strategy=Temperature(1.0),
                                   group_size=args.group, cache_dtype=dtype_name)  # fmt: skip
    key = jax.random.key(args.seed)

    start = time.perf_counter()  # our first call compiles: timed on its own
    first = run_ours(sampler, state, config, prompts, sampler_config, key)
    first_call_s = time.perf_counter() - start
    assert first.shape == (rows, args.new_tokens), first.shape
    shape = DecodeShape.of(config.text, rows)
    skeleton = matmul_skeleton(shape, jnp.dtype(dtype_name), args.seed)

    stages = StageTimes()
    sides: dict[str, Callable[[], Any]] = {"ours": lambda: run_ours(sampler, state, config, prompts, sampler_config,
                                                                    key)}
    if hf_model is not None:
        hf = lambda: run_hf(hf_model, prompts, config, args.group, args.new_tokens, torch_device)  # noqa: E731
        assert hf().shape == (rows, args.new_tokens)
        sides["hf"] = hf
    sides["ours_stages"] = lambda: run_ours_stages(sampler, state, config, prompts, sampler_config, key, stages)
    sides["matmul_skeleton"] = skeleton
    times = common.interleaved(sides, args.runs, args.warmup)
    prefill_s, decode_s = stages.prefill[args.warmup :], stages.decode[args.warmup :]
    decode_steps = args.new_tokens - 1
    step_s = [d / decode_steps for d in decode_s]
    flops = shape.flops()

    prepared = sampler.prepare_prompts(our_inputs(config, prompts), sampler_config)
    placed = sampler._place(prepared)
    prefill_exe = sampler._prefill.compiled_variant(state, placed, graphdef=sampler.graphdef, config=sampler_config,
                                                    layout=sampler.layout)  # fmt: skip
    start_state = sampler.prefill(state, prepared, sampler_config)
    decode_exe = sampler._decode.compiled_variant(
        state, start_state.cache, start_state.logits, start_state.start_positions, key,
        graphdef=sampler.graphdef, config=sampler_config, layout=sampler.layout,
    )  # fmt: skip
    slots = int(start_state.cache.max_len)
    del start_state
    with common.PeakRSS() as ours_peak:
        sides["ours"]()

    ours_tps = [rows * args.new_tokens / t for t in times["ours"]]
    result: dict[str, Any] = dict(
        preset=args.preset, parameters=int(n_params), backend=backend, device=str(jax.devices()[0].device_kind),
        dtype=dtype_name, prompts=args.prompts, group=args.group, rows=rows, new_tokens=args.new_tokens,
        prompt_tokens=int(prompts.attention_mask.sum(1).max()), prompt_bucket=int(prepared["input_ids"].shape[1]),
        image_grids=prompts.image_grid_thw.tolist(), torch_threads=threads, cpu_count=os.cpu_count(),
        machine=platform.processor() or platform.machine(), runs=args.runs, warmup=args.warmup,
        order=list(sides), seconds=times,
        ours=dict(
            seconds=common.Spread.of(times["ours"]).to_dict(), tokens_per_s=common.Spread.of(ours_tps).to_dict(),
            first_call_s=first_call_s, compile_s=sampler.compile_seconds, compiled_variants=sampler.compiled_variants,
            prefill_s=common.Spread.of(prefill_s).to_dict(), decode_s=common.Spread.of(decode_s).to_dict(),
            decode_ms_per_step=common.Spread.of([1e3 * s for s in step_s]).to_dict(),
            peak_rss_growth_mib=ours_peak.growth_mib, xla_prefill_plan_mib=xla_plan_mib(prefill_exe),
            xla_decode_plan_mib=xla_plan_mib(decode_exe),
        ),
        roofline=dict(
            shape=dataclasses.asdict(shape), step_matmul_flops=flops,
            skeleton_ms=common.Spread.of([1e3 * t for t in times["matmul_skeleton"]]).to_dict(),
            matmul_gflops=common.Spread.of([flops / t / 1e9 for t in times["matmul_skeleton"]]).to_dict(),
            decode_gflops=common.Spread.of([flops / s / 1e9 for s in step_s]).to_dict(),
            # per round: the skeleton and the decode step ran back to back under the same load
            fraction=common.paired_ratios(times["matmul_skeleton"], step_s).to_dict(),
        ),
    )  # fmt: skip
    if backend != "cpu":  # a memory roofline means little on a CPU whose caches hold much of a small model
        result["ours"]["device_peak_mib"] = device_peak_mib()
        bandwidth = measure_bandwidth_gbs(2**30)
        hbm = decode_hbm_bytes(model, rows, slots, jnp.dtype(dtype_name).itemsize)
        roof_ms = (hbm["weight_bytes"] + hbm["kv_bytes"]) / (bandwidth * 1e9) * 1e3
        result["hbm_roofline"] = dict(bandwidth_gbs=bandwidth, roofline_ms=roof_ms, **hbm,
                                      fraction=roof_ms / result["ours"]["decode_ms_per_step"]["median"])  # fmt: skip
    speedup = float("nan")
    if hf_model is not None:
        if torch_device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            sides["hf"]()
            hf_peak = dict(device_peak_mib=torch.cuda.max_memory_allocated() / 2**20)
        else:
            with common.PeakRSS() as peak:
                sides["hf"]()
            hf_peak = dict(peak_rss_growth_mib=peak.growth_mib)
        hf_tps = [rows * args.new_tokens / t for t in times["hf"]]
        result["hf"] = dict(seconds=common.Spread.of(times["hf"]).to_dict(),
                            tokens_per_s=common.Spread.of(hf_tps).to_dict(), transformers=transformers.__version__,
                            torch=torch.__version__, **hf_peak)  # fmt: skip
        ratio = common.paired_ratios(times["hf"], times["ours"])
        result["speedup_vs_hf"] = ratio.to_dict()
        speedup = ratio.median
        # No engine beats this here: decode's matmuls at their fastest measured time, with a free prefill.
        floor_s = decode_steps * min(times["matmul_skeleton"])
        result["ceiling"] = dict(floor_s=floor_s, ceiling_vs_hf=result["hf"]["seconds"]["median"] / floor_s)
    result["speedup_vs_hf_median"] = speedup
    result["roofline_fraction_median"] = result["roofline"]["fraction"]["median"]
    result["loadavg"] = dict(start=load_start, end=common.loadavg())
    return result


def _spread(d: dict, digits: int = 3, unit: str = "", scale: float = 1.0) -> str:
    return common.Spread(d["median"] * scale, d["low"] * scale, d["high"] * scale, d["count"]).format(digits, unit)


def render_markdown(r: dict, command: str) -> str:
    ours, hf, roof = r["ours"], r.get("hf"), r["roofline"]
    mem = (f"{ours['device_peak_mib']:.0f} MiB device" if "device_peak_mib" in ours
           else f"+{ours['peak_rss_growth_mib']:.0f} MiB RSS")  # fmt: skip
    rows = [[
        "balcap_jax Sampler", _spread(ours["seconds"]), _spread(ours["tokens_per_s"], 1),
        f"{mem} (XLA plan: prefill {ours['xla_prefill_plan_mib']:.0f} MiB, decode {ours['xla_decode_plan_mib']:.0f} MiB)",
        f"compile {ours['compile_s']:.1f} s once ({ours['compiled_variants']} programs); prefill "
        f"{_spread(ours['prefill_s'])} s, decode {_spread(ours['decode_ms_per_step'], 2)} ms/step",
    ]]  # fmt: skip
    if hf:
        hmem = (f"{hf['device_peak_mib']:.0f} MiB device" if "device_peak_mib" in hf
                else f"+{hf['peak_rss_growth_mib']:.0f} MiB RSS")  # fmt: skip
        rows.append([f"HF transformers {hf['transformers']} `generate` (torch {hf['torch']})", _spread(hf["seconds"]),
                     _spread(hf["tokens_per_s"], 1), hmem, "eager, `num_return_sequences=G`"])  # fmt: skip
    s = roof["shape"]
    lines = [
        "# Rollout throughput: balcap_jax sampler vs HF `generate` (interleaved)",
        "",
        f"Random Qwen2.5-VL ({r['preset']} preset, {r['parameters'] / 1e6:.1f}M parameters, {r['dtype']}), "
        f"{r['prompts']} prompts x G={r['group']} = {r['rows']} sequences, one real photograph per prompt "
        f"(grids t,h,w: {sorted({tuple(g) for g in r['image_grids']})}), prompts up to {r['prompt_tokens']} tokens "
        f"(bucket {r['prompt_bucket']}), {r['new_tokens']} new tokens per sequence, temperature-1 sampling over "
        f"the full vocabulary. Backend: {r['backend']} ({r['device']}); {r['cpu_count']} CPU cores, torch threads "
        f"{r['torch_threads']}. Each round runs {' -> '.join(r['order'])}; {r['warmup']} warm-up round(s) "
        f"discarded, then median (min-max) of {r['runs']} rounds. Both engines start from the same host arrays and "
        f"do their host work inside the timing. Load average (1, 5, 15 min) {r['loadavg']['start']} at the start, "
        f"{r['loadavg']['end']} at the end.",
        "",
        common.markdown_table(["engine", "s per call", "tokens/s", "peak memory", "notes"], rows,
                              [False, True, True, False, False]),
        "",
    ]
    if hf:
        c = r["ceiling"]
        lines += [f"**speedup_vs_hf = {_spread(r['speedup_vs_hf'], 2)}x** (per round: HF seconds / our seconds; "
                  "median, min-max)", "",
                  f"**Ceiling: {c['ceiling_vs_hf']:.2f}x.** An engine whose prefill were free and whose "
                  f"{r['new_tokens'] - 1} decode steps ran at the matmul roofline below (fastest round) would take "
                  f"{c['floor_s']:.3f} s: HF's median / that is the most any engine could gain over HF on this "
                  "machine at this shape.", ""]  # fmt: skip
    lines += [
        f"**Decode step vs this machine's matmul roofline: {_spread(roof['fraction'], 2, scale=100)} %** "
        f"(median, min-max over rounds). The step's matmuls ({s['rows']} rows; per layer q/k/v/o and gate/up/down "
        f"of D={s['hidden']}, I={s['intermediate']}, {s['heads']}/{s['kv_heads']} heads of {s['head_dim']}, "
        f"x {s['layers']} layers, plus the [{s['rows']} x {s['hidden']}] x [{s['hidden']} x {s['vocab']}] "
        f"unembedding: {roof['step_matmul_flops'] / 1e9:.2f} GFLOP) run alone as one program in "
        f"{_spread(roof['skeleton_ms'], 2)} ms = {_spread(roof['matmul_gflops'], 1)} GFLOP/s; our decode step "
        f"does them (plus attention over the cache, sampling and log-probs) in {_spread(ours['decode_ms_per_step'], 2)}"
        f" ms = {_spread(roof['decode_gflops'], 1)} GFLOP/s.",
    ]
    if "hbm_roofline" in r:
        h = r["hbm_roofline"]
        lines += ["", f"HBM roofline: {h['weight_bytes'] / 1e9:.2f} GB weights + {h['kv_bytes'] / 1e9:.2f} GB KV per "
                  f"step at a measured {h['bandwidth_gbs']:.0f} GB/s = {h['roofline_ms']:.2f} ms/step "
                  f"({100 * h['fraction']:.0f}% of it)."]  # fmt: skip
    lines += ["", f"Reproduce (repository root): `{command}`", ""]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(args)
    from pathlib import Path

    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{args.out_name}.json").write_text(json.dumps(result, indent=2))
    (out_dir / f"{args.out_name}.md").write_text(render_markdown(result, common.command_line("bench_sampling", argv)))
    print(json.dumps({k: result[k] for k in ("ours", "roofline") if k in result}, indent=2))
    ceiling = result.get("ceiling", {}).get("ceiling_vs_hf", float("nan"))
    print(f"speedup_vs_hf={result['speedup_vs_hf_median']:.3f} roofline_fraction={result['roofline_fraction_median']:.3f}"
          f" ceiling_vs_hf={ceiling:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
