"""Compile time of a jitted forward+backward of a tiny Qwen2.5-VL (images included) at several depths, on CPU.

    python bench_compile_depth.py [--depths 2,16] [--remat none]
Prints one line per depth: decoder layers = vision blocks = depth; seconds to lower and to compile.
"""
import argparse
import os
import sys
import time

if os.environ.get("BENCH_SRC"):  # measure another checkout's balcap_jax (e.g. the code before this change)
    sys.path.insert(0, os.environ["BENCH_SRC"])

os.environ.setdefault("JAX_PLATFORMS", "cpu")
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from balcap_jax.models.qwen2_5_vl.config import Qwen2_5_VLConfig
from balcap_jax.models.qwen2_5_vl.model import Qwen2_5_VL, make_inputs
from balcap_jax.models.qwen2_5_vl.text import DecoderConfig
from balcap_jax.models.qwen2_5_vl.vision import VisionConfig


def tiny(depth: int) -> Qwen2_5_VLConfig:
    text = DecoderConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=depth, num_heads=4,
                         num_kv_heads=2, head_dim=16, rope_theta=10000.0, mrope_section=(2, 3, 3))
    vision = VisionConfig(depth=depth, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                          fullatt_block_indexes=tuple(i for i in range(depth) if i % 8 == 7) or (depth - 1,))
    return Qwen2_5_VLConfig(text=text, vision=vision, image_token_id=500, video_token_id=501,
                            vision_start_token_id=502, vision_end_token_id=503)


def batch(config: Qwen2_5_VLConfig) -> dict:
    grid = np.array([[1, 8, 8]])
    n_img = 64 // 4
    ids = np.concatenate([[502], np.full(n_img, 500), [503], np.arange(40) % 480])[None]
    mask = np.ones_like(ids, bool)
    pixels = np.random.default_rng(0).standard_normal((64, config.vision.patch_dim)).astype(np.float32)
    return make_inputs(config, ids, mask, pixels, grid)


def measure(depth: int, remat) -> tuple[float, float]:
    config = tiny(depth)
    kwargs = {} if remat is None else {"remat": {"True": True, "False": False}.get(remat, remat)}
    model = Qwen2_5_VL(config, rngs=nnx.Rngs(0), **kwargs)
    graphdef, params = nnx.split(model, nnx.Param)
    inputs = jax.tree.map(jnp.asarray, batch(config))

    def loss(p, x):
        return jnp.mean(nnx.merge(graphdef, p).hidden_states(x) ** 2)

    step = jax.jit(jax.value_and_grad(loss))
    start = time.perf_counter()
    lowered = step.lower(params, inputs)
    lowered_at = time.perf_counter()
    lowered.compile()
    return lowered_at - start, time.perf_counter() - lowered_at


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--depths", default="2,16")
    parser.add_argument("--remat", default=None)
    args = parser.parse_args()
    import balcap_jax
    print(f"balcap_jax from {os.path.dirname(balcap_jax.__file__)}, remat={args.remat}", flush=True)
    measure(2, args.remat)  # warm-up: the first compile of a process pays one-off costs
    for depth in (int(d) for d in args.depths.split(",")):
        lower_s, compile_s = measure(depth, args.remat)
        print(f"depth {depth:3d}: lower {lower_s:6.2f} s, compile {compile_s:6.2f} s, total {lower_s + compile_s:6.2f} s",
              flush=True)


if __name__ == "__main__":
    main()
