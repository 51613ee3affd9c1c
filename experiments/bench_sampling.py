"""Rollout throughput: our jitted group sampler vs HF transformers `generate`, same model, same prompts.

One process, one random Qwen2.5-VL (HF torch weights converted into ours, so both run the same network), real
photographs (scikit-image samples) through the Qwen image processor, P prompts x G samples per prompt, the same
number of new tokens for every row (no EOS: HF gets min_new_tokens = max_new_tokens, ours gets no EOS ids),
plain temperature-1 sampling over the full vocabulary on both sides. HF expands each prompt G times before its
prefill (`num_return_sequences`); ours runs vision + prefill once per prompt and tiles the KV cache.

Timing: wall clock from host prompt arrays to generated ids, median of --runs runs after one warm-up run;
our compile time (first call) is reported separately. Memory: peak resident-set growth of the process during
one run of each engine (Linux VmHWM reset via /proc/self/clear_refs, allocator trimmed first), plus XLA's own
buffer plan for our compiled programs; on a GPU, device peak bytes instead.

Reproduce (CPU, the numbers in experiments/results/bench_sampling.md):
    python experiments/bench_sampling.py
GPU, Qwen2.5-VL-3B shapes, ours only, decode ms/step against the HBM roofline:
    python experiments/bench_sampling.py --preset 3b --skip-hf --out-name bench_sampling_3b
The last line printed is `speedup_vs_hf=<float>` (our tokens/s / HF tokens/s; nan with --skip-hf).
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import json
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from balcap_jax.models import hf_io  # noqa: E402
from balcap_jax.models.qwen2_5_vl import params as qwen_params  # noqa: E402
from balcap_jax.models.qwen2_5_vl.config import Qwen2_5_VLConfig  # noqa: E402
from balcap_jax.models.qwen2_5_vl.model import Qwen2_5_VL, make_inputs  # noqa: E402
from balcap_jax.models.qwen2_5_vl.processor import ImageProcessorConfig, preprocess_images  # noqa: E402
from balcap_jax.models.qwen2_5_vl.vision import hf_special_cases  # noqa: E402
from balcap_jax.sampling import Sampler, SamplerConfig, Temperature  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "coins", "hubble_deep_field", "immunohistochemistry")


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


# "small": ~40M parameters (a 32k vocabulary keeps the embedding from dominating); "3b": Qwen2.5-VL-3B shapes.
PRESETS: dict[str, dict[str, Any]] = {
    "small": dict(
        text=_text(32000, 512, 1408, 8, 8, 2, (8, 12, 12), True),
        vision=_vision(4, 256, 512, 4, 512, (1, 3)),
        special_ids=dict(image_token_id=31996, video_token_id=31997, vision_start_token_id=31998,
                         vision_end_token_id=31999),  # fmt: skip
    ),
    "3b": dict(
        text=_text(151936, 2048, 11008, 36, 16, 2, (16, 24, 24), True),
        vision=_vision(32, 1280, 3420, 16, 2048, (7, 15, 23, 31)),
        special_ids=dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
                         vision_end_token_id=151653),  # fmt: skip
    ),
}


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
    import skimage.data

    rng = np.random.default_rng(seed)
    images = [np.asarray(getattr(skimage.data, PHOTOS[i % len(PHOTOS)])()) for i in range(num_prompts)]
    images = [np.stack([im] * 3, -1) if im.ndim == 2 else im[..., :3] for im in images]
    pixels, grids = preprocess_images(images, ImageProcessorConfig(max_pixels=max_pixels))
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


# -- memory ---------------------------------------------------------------------------------------------------


def _rss_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))


def peak_rss_growth(fn: Callable[[], Any]) -> tuple[Any, float]:
    """(fn(), peak RSS growth in MiB during fn) — Linux only; NaN where /proc/self/clear_refs is unavailable."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")
        before = _rss_kib("VmRSS")
    except (OSError, AttributeError):
        return fn(), float("nan")
    out = fn()
    return out, (_rss_kib("VmHWM") - before) / 1024


def xla_plan_mib(compiled) -> float:
    m = compiled.memory_analysis()
    if m is None:
        return float("nan")
    return (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes) / 2**20


def device_peak_mib() -> float:
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use", float("nan")) / 2**20


# -- engines --------------------------------------------------------------------------------------------------


def run_ours(sampler: Sampler, state, prompts: dict, config: SamplerConfig, key) -> np.ndarray:
    rollout = sampler(state, prompts, config, key)
    return np.asarray(jax.block_until_ready(rollout.tokens))


def run_hf(hf_model, prompts: Prompts, config, group: int, new_tokens: int, device: str) -> np.ndarray:
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


def timed(fn: Callable[[], Any], runs: int) -> tuple[list[float], Any]:
    times, out = [], None
    for _ in range(runs):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return times, out


def measure_bandwidth_gbs(num_bytes: int) -> float:
    """Device memory bandwidth from a large elementwise op: (read + write bytes) / time, best of 5."""
    x = jnp.ones((num_bytes // 4,), jnp.float32)
    f = jax.jit(lambda a: a * 1.0001)
    f(x).block_until_ready()
    best = min(timed(lambda: f(x).block_until_ready(), 5)[0])
    return 2 * x.nbytes / best / 1e9


def decode_roofline(model: Qwen2_5_VL, rows: int, slots: int, cache_bytes: int, bandwidth_gbs: float) -> dict:
    """Bytes one decode step must read — every decoder/unembedding weight once plus the whole KV cache — over
    the measured bandwidth."""
    params = nnx.state(model, nnx.Param)
    leaves = jax.tree_util.tree_leaves_with_path(params)
    weight_bytes = sum(
        x.size * x.dtype.itemsize for path, x in leaves if "visual" not in jax.tree_util.keystr(path)
    )
    spec = model.cache_spec()
    kv_bytes = 2 * spec.num_layers * rows * slots * spec.num_kv_heads * spec.head_dim * cache_bytes
    total = weight_bytes + kv_bytes
    return dict(weight_bytes=weight_bytes, kv_bytes=kv_bytes, roofline_ms=total / (bandwidth_gbs * 1e9) * 1e3)


# -- main -----------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--group", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--max-pixels", type=int, default=224 * 224)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                        help="weights/compute/KV dtype for both engines (default: float32 on CPU, bfloat16 on GPU)")
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--out-name", default="bench_sampling")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import torch
    import transformers

    backend = jax.default_backend()
    dtype_name = args.dtype or ("float32" if backend == "cpu" else "bfloat16")
    dtype = jnp.dtype(dtype_name)
    torch_device = "cuda" if backend == "gpu" and torch.cuda.is_available() else "cpu"
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    rows = args.prompts * args.group
    load_at_start = os.getloadavg()[0]
    print(f"backend={backend} devices={jax.devices()} dtype={dtype_name} torch_threads={threads} rows={rows}")

    hf_config = transformers.Qwen2_5_VLConfig(**hf_config_dict(args.preset))
    config = Qwen2_5_VLConfig.from_hf(hf_config.to_dict())
    hf_model = None
    if args.skip_hf:
        model = nnx.jit(lambda: Qwen2_5_VL(config, rngs=nnx.Rngs(args.seed), dtype=dtype, param_dtype=dtype))()
    else:
        torch.manual_seed(args.seed)
        hf_model = transformers.Qwen2_5_VLForConditionalGeneration(hf_config).eval()
        hf_model = hf_model.to(getattr(torch, dtype_name)).to(torch_device)
        tensors = {k: v.float().cpu().numpy() for k, v in hf_model.state_dict().items()}
        abstract = qwen_params.abstract_model(config, dtype=dtype, param_dtype=dtype)
        # torch state_dict keys use the nested module layout (model.language_model.*, model.visual.*), as ours do.
        mapping = hf_io.ParamMapping(
            special_cases=hf_special_cases(),
            ignore_unexpected=(r"lm_head\.weight",) if config.text.tie_word_embeddings else (),
        )
        model = qwen_params.from_hf_tensors(abstract, tensors, mapping)
        del tensors
    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    print(f"model: {args.preset} preset, {n_params / 1e6:.1f}M parameters")

    prompts = build_prompts(config, args.prompts, args.max_pixels, args.seed)
    inputs = make_inputs(config, prompts.input_ids, prompts.attention_mask, prompts.pixel_values,
                         prompts.image_grid_thw)  # fmt: skip
    sampler, state = Sampler.from_model(model)
    sampler_config = SamplerConfig(
        max_new_tokens=args.new_tokens, eos_ids=(), pad_id=0, strategy=Temperature(1.0), group_size=args.group,
        cache_dtype=dtype_name,
    )  # fmt: skip
    key = jax.random.key(args.seed)

    # Ours: the first call compiles (timed separately), then the measured runs.
    start = time.perf_counter()
    first = run_ours(sampler, state, inputs, sampler_config, key)
    first_call_s = time.perf_counter() - start
    assert first.shape == (rows, args.new_tokens)
    run_ours(sampler, state, inputs, sampler_config, key)  # warm-up after compile
    ours_times, _ = timed(lambda: run_ours(sampler, state, inputs, sampler_config, key), args.runs)
    _, ours_rss = peak_rss_growth(lambda: run_ours(sampler, state, inputs, sampler_config, key))

    # Stage split: prefill (vision + prompt, once per prompt) and the decode loop, per step.
    ran = sampler.prepare_prompts(inputs, sampler_config)
    prefill_times, decode_times = [], []
    for _ in range(args.runs):
        t0 = time.perf_counter()
        start_state = jax.block_until_ready(sampler.prefill(state, ran, sampler_config))
        t1 = time.perf_counter()
        jax.block_until_ready(sampler.decode(state, start_state, sampler_config, key).tokens)
        prefill_times.append(t1 - t0)
        decode_times.append(time.perf_counter() - t1)
    placed = sampler._place(ran)
    prefill_exe = sampler._prefill.compiled_variant(state, placed, graphdef=sampler.graphdef, config=sampler_config,
                                                    layout=sampler.layout)  # fmt: skip
    start_state = sampler.prefill(state, ran, sampler_config)
    decode_exe = sampler._decode.compiled_variant(
        state, start_state.cache, start_state.logits, start_state.start_positions, key,
        graphdef=sampler.graphdef, config=sampler_config, layout=sampler.layout,
    )  # fmt: skip
    slots = start_state.cache.max_len
    del start_state
    decode_steps = args.new_tokens - 1

    ours_tps = rows * args.new_tokens / statistics.median(ours_times)
    result: dict[str, Any] = dict(
        preset=args.preset, parameters=int(n_params), backend=backend, device=str(jax.devices()[0].device_kind),
        dtype=dtype_name, prompts=args.prompts, group=args.group, rows=rows, new_tokens=args.new_tokens,
        prompt_tokens=int(prompts.attention_mask.sum(1).max()), prompt_bucket=int(ran["input_ids"].shape[1]),
        image_grids=prompts.image_grid_thw.tolist(), torch_threads=threads, cpu_count=os.cpu_count(),
        machine=platform.processor() or platform.machine(), runs=args.runs,
        ours=dict(
            seconds=ours_times, median_s=statistics.median(ours_times), tokens_per_s=ours_tps,
            first_call_s=first_call_s, compile_s=sampler.compile_seconds, compiled_variants=sampler.compiled_variants,
            prefill_median_s=statistics.median(prefill_times), decode_median_s=statistics.median(decode_times),
            decode_ms_per_step=statistics.median(decode_times) / decode_steps * 1e3,
            peak_rss_growth_mib=ours_rss, xla_prefill_plan_mib=xla_plan_mib(prefill_exe),
            xla_decode_plan_mib=xla_plan_mib(decode_exe),
        ),
    )  # fmt: skip
    if backend != "cpu":  # a memory roofline means little on a CPU whose caches hold much of a small model
        result["ours"]["device_peak_mib"] = device_peak_mib()
        bandwidth = measure_bandwidth_gbs(2**30)
        roof = decode_roofline(model, rows, slots, dtype.itemsize, bandwidth)
        result["roofline"] = dict(bandwidth_gbs=bandwidth, **roof,
                                  fraction=roof["roofline_ms"] / result["ours"]["decode_ms_per_step"])  # fmt: skip

    speedup = float("nan")
    if hf_model is not None:
        hf = lambda: run_hf(hf_model, prompts, config, args.group, args.new_tokens, torch_device)  # noqa: E731
        hf_first = hf()
        assert hf_first.shape == (rows, args.new_tokens), hf_first.shape
        hf_times, _ = timed(hf, args.runs)
        if torch_device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            hf()
            hf_peak = dict(device_peak_mib=torch.cuda.max_memory_allocated() / 2**20)
        else:
            _, growth = peak_rss_growth(hf)
            hf_peak = dict(peak_rss_growth_mib=growth)
        hf_tps = rows * args.new_tokens / statistics.median(hf_times)
        result["hf"] = dict(seconds=hf_times, median_s=statistics.median(hf_times), tokens_per_s=hf_tps,
                            transformers=transformers.__version__, torch=torch.__version__, **hf_peak)  # fmt: skip
        speedup = ours_tps / hf_tps
    result["speedup_vs_hf"] = speedup
    result["load_average_1min"] = dict(start=load_at_start, end=os.getloadavg()[0])

    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.out_name}.json").write_text(json.dumps(result, indent=2))
    (RESULTS / f"{args.out_name}.md").write_text(render_markdown(result, argv))
    print(json.dumps(result, indent=2))
    print(f"speedup_vs_hf={speedup:.3f}")
    return 0


def render_markdown(r: dict, argv) -> str:
    ours, hf = r["ours"], r.get("hf")
    cmd = "python experiments/bench_sampling.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [
        "# Rollout throughput: balcap_jax sampler vs HF `generate`",
        "",
        f"Random Qwen2.5-VL ({r['preset']} preset, {r['parameters'] / 1e6:.1f}M parameters, {r['dtype']}), "
        f"{r['prompts']} prompts x G={r['group']} = {r['rows']} sequences, one real photograph per prompt "
        f"(grids t,h,w: {sorted({tuple(g) for g in r['image_grids']})}), prompts up to {r['prompt_tokens']} tokens "
        f"(bucket {r['prompt_bucket']}), {r['new_tokens']} new tokens per sequence, temperature-1 sampling over "
        f"the full vocabulary. Backend: {r['backend']} ({r['device']}); {r['cpu_count']} CPU cores, torch threads "
        f"{r['torch_threads']}. Median of {r['runs']} runs after warm-up. 1-minute load average "
        f"{r['load_average_1min']['start']:.1f} at the start, {r['load_average_1min']['end']:.1f} at the end "
        f"(above the core count: the machine was shared, which slows both engines).",
        "",
        "| engine | median s | tokens/s | peak memory | notes |",
        "| --- | ---: | ---: | --- | --- |",
    ]
    mem = (f"{ours['device_peak_mib']:.0f} MiB device" if "device_peak_mib" in ours
           else f"+{ours['peak_rss_growth_mib']:.0f} MiB RSS")  # fmt: skip
    lines.append(
        f"| balcap_jax Sampler | {ours['median_s']:.3f} | {ours['tokens_per_s']:.1f} | {mem} (XLA plan: prefill "
        f"{ours['xla_prefill_plan_mib']:.0f} MiB, decode {ours['xla_decode_plan_mib']:.0f} MiB) | compile "
        f"{ours['compile_s']:.1f} s once ({ours['compiled_variants']} programs); prefill {ours['prefill_median_s']:.3f}"
        f" s, decode {ours['decode_ms_per_step']:.2f} ms/step |"
    )
    if hf:
        hmem = (f"{hf['device_peak_mib']:.0f} MiB device" if "device_peak_mib" in hf
                else f"+{hf['peak_rss_growth_mib']:.0f} MiB RSS")  # fmt: skip
        lines.append(
            f"| HF transformers {hf['transformers']} `generate` (torch {hf['torch']}) | {hf['median_s']:.3f} | "
            f"{hf['tokens_per_s']:.1f} | {hmem} | eager, `num_return_sequences=G` |"
        )
    lines += ["", f"**speedup_vs_hf = {r['speedup_vs_hf']:.2f}x** (our tokens/s / HF tokens/s)"]
    if "roofline" in r:
        roof = r["roofline"]
        lines += [
            "",
            f"Decode roofline: {roof['weight_bytes'] / 1e9:.2f} GB weights + {roof['kv_bytes'] / 1e9:.2f} GB KV "
            f"per step at a measured {roof['bandwidth_gbs']:.0f} GB/s = {roof['roofline_ms']:.2f} ms/step; measured "
            f"{ours['decode_ms_per_step']:.2f} ms/step ({100 * roof['fraction']:.0f}% of roofline).",
        ]
    lines += ["", f"Reproduce: `{cmd.strip()}`", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
