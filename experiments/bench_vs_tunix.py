"""Rollout throughput against the JAX peer: google-tunix's `Sampler` vs ours, same text-only Qwen2 architecture.

Runs in its own venv (tunix 0.1.7 pins safetensors<0.8, transformers 5.24 needs >=0.8, so the two cannot be
resolved together; tunix is installed beside our pinned stack with --no-deps and imports and runs with
safetensors 0.8.0):

    python3 -m venv .venv-tunix
    .venv-tunix/bin/pip install -e . -c constraints.txt
    .venv-tunix/bin/pip install --no-deps google-tunix==0.1.7
    .venv-tunix/bin/pip install datasets google-metrax hf-transfer importlib-resources jinja2 kagglehub numba \
        omegaconf perfetto pylatexenc python-dotenv qwix sentencepiece sympy -c constraints.txt
    .venv-tunix/bin/python -m experiments.bench_vs_tunix

Both sides: a random Qwen2-architecture decoder of the same shape (default: Qwen2.5-0.5B widths — hidden 896,
MLP 4864, 14/2 heads of 64, tied 151,936-token embedding, q/k/v biases — with --layers layers), fp32, the same P
prompt strings (random words, the real Qwen tokenizer) repeated G times, exactly --new-tokens tokens per row (no
EOS on either side), temperature-1 sampling over the full vocabulary. Each side starts from the strings and ends
with the decoded completions (tokenising, padding to a bucket, prefill, decode, detokenising all inside the
timing). Ours runs each prompt's prefill once and tiles its KV cache G times; tunix gets the P x G strings (its
sampler has no group tiling). The weights are drawn independently on each side (same shapes): with no EOS the
work does not depend on their values. Rounds interleaved (tunix, ours, ...), median and min-max of --runs after
--warmup rounds; the ratio is per round.

Not raced here: tunix's GRPO step (`GRPOLearner` over an `RLCluster`). Setting it up with the same model, rewards
and lengths as ours needs its cluster/rollout/trainer configuration, which this script does not build yet.

The last line printed is `tunix_sampler_ratio=<float>` (tunix seconds / our seconds, median per round).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

import jax
from flax import nnx

from balcap_jax.models.llama_text import LlamaForCausalLM
from balcap_jax.models.qwen2_5_vl.processor import load_tokenizer
from balcap_jax.models.qwen2_5_vl.text import DecoderConfig
from balcap_jax.sampling import Sampler, SamplerConfig, Temperature
from experiments import common

WORDS = ("a", "photo", "of", "red", "cat", "sitting", "on", "the", "blue", "mat", "near", "window", "with", "light",
         "and", "two", "small", "dogs", "in", "garden")  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Shape:
    layers: int = 4
    hidden: int = 896
    intermediate: int = 4864
    heads: int = 14
    kv_heads: int = 2
    head_dim: int = 64
    vocab: int = 151936

    def ours(self) -> DecoderConfig:
        return DecoderConfig(vocab_size=self.vocab, hidden_size=self.hidden, intermediate_size=self.intermediate,
                             num_layers=self.layers, num_heads=self.heads, num_kv_heads=self.kv_heads,
                             head_dim=self.head_dim, qkv_bias=True, tie_word_embeddings=True)  # fmt: skip

    def tunix(self):
        from tunix.models.qwen2 import model as qwen2

        return qwen2.ModelConfig(num_layers=self.layers, vocab_size=self.vocab, embed_dim=self.hidden,
                                 hidden_dim=self.intermediate, num_heads=self.heads, head_dim=self.head_dim,
                                 num_kv_heads=self.kv_heads, rope_theta=1_000_000, norm_eps=1e-6,
                                 use_tied_embedding=True)  # fmt: skip


def prompt_strings(count: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, rng.integers(8, 24))) for _ in range(count)]


def run(args: argparse.Namespace) -> dict[str, Any]:
    from tunix.generate import sampler as tunix_sampler
    from tunix.models.qwen2 import model as qwen2

    shape = Shape(layers=args.layers)
    tokenizer = load_tokenizer()
    prompts = prompt_strings(args.prompts, args.seed)
    rows = args.prompts * args.group
    bucket = 64

    theirs = qwen2.Qwen2(shape.tunix(), rngs=nnx.Rngs(args.seed))
    cache = tunix_sampler.CacheConfig(cache_size=bucket + args.new_tokens, num_layers=shape.layers,
                                      num_kv_heads=shape.kv_heads, head_dim=shape.head_dim)  # fmt: skip
    their_sampler = tunix_sampler.Sampler(theirs, tokenizer, cache)
    repeated = [p for p in prompts for _ in range(args.group)]

    def tunix_side() -> list[str]:
        out = their_sampler(repeated, max_generation_steps=args.new_tokens, max_prompt_length=bucket,
                            temperature=1.0, top_p=1.0, eos_tokens=[-1], seed=args.seed)  # fmt: skip
        return list(out.text)

    ours = nnx.jit(lambda: LlamaForCausalLM(shape.ours(), rngs=nnx.Rngs(args.seed)))()
    our_sampler, state = Sampler.from_model(ours)
    scfg = SamplerConfig(max_new_tokens=args.new_tokens, eos_ids=(), pad_id=0, strategy=Temperature(1.0),
                         group_size=args.group, prompt_buckets=(bucket,), cache_dtype="float32")  # fmt: skip
    key = jax.random.key(args.seed)

    def our_side() -> list[str]:
        encoded = [tokenizer(p)["input_ids"] for p in prompts]
        ids = np.zeros((len(prompts), bucket), np.int32)
        mask = np.zeros((len(prompts), bucket), bool)
        for i, row in enumerate(encoded):
            ids[i, bucket - len(row) :], mask[i, bucket - len(row) :] = row, True
        positions = np.maximum(np.cumsum(mask, 1) - 1, 0).astype(np.int32)
        rollout = our_sampler(state, {"input_ids": ids, "attention_mask": mask, "positions": positions}, scfg, key)
        return tokenizer.batch_decode(np.asarray(rollout.tokens).tolist())

    load_start = common.loadavg()
    first = {"tunix": tunix_side(), "ours": our_side()}  # compiles both
    assert len(first["tunix"]) == len(first["ours"]) == rows
    times = common.interleaved({"tunix": tunix_side, "ours": our_side}, args.runs, args.warmup)
    tps = {k: common.Spread.of([rows * args.new_tokens / t for t in v]).to_dict() for k, v in times.items()}
    ratio = common.paired_ratios(times["tunix"], times["ours"])
    import tunix

    return dict(shape=dataclasses.asdict(shape), prompts=args.prompts, group=args.group, rows=rows,
                new_tokens=args.new_tokens, prompt_bucket=bucket, runs=args.runs, warmup=args.warmup,
                backend=jax.default_backend(), device=jax.devices()[0].device_kind, seconds=times, tokens_per_s=tps,
                sampler_ratio=ratio.to_dict(), tunix=getattr(tunix, "__version__", "0.1.7"), jax=jax.__version__,
                loadavg=dict(start=load_start, end=common.loadavg()))  # fmt: skip


def render_markdown(r: dict, command: str) -> str:
    fmt = lambda d, k=3: common.Spread(d["median"], d["low"], d["high"], d["count"]).format(k)  # noqa: E731
    s = r["shape"]
    rows = [[f"google-tunix {r['tunix']} `Sampler`", fmt(common.Spread.of(r["seconds"]["tunix"]).to_dict()),
             fmt(r["tokens_per_s"]["tunix"], 1), "P x G strings, no group tiling"],
            ["balcap_jax `Sampler`", fmt(common.Spread.of(r["seconds"]["ours"]).to_dict()),
             fmt(r["tokens_per_s"]["ours"], 1), "prefill once per prompt, KV cache tiled G times"]]  # fmt: skip
    return "\n".join([
        "# Rollout throughput vs google-tunix (interleaved)",
        "",
        f"Random text-only Qwen2 decoder, {s['layers']} layers, hidden {s['hidden']}, MLP {s['intermediate']}, "
        f"{s['heads']}/{s['kv_heads']} heads of {s['head_dim']}, tied vocabulary {s['vocab']}, fp32, jax {r['jax']} "
        f"on {r['backend']} ({r['device']}). {r['prompts']} prompts x G={r['group']} = {r['rows']} rows, prompts "
        f"padded to {r['prompt_bucket']}, {r['new_tokens']} new tokens per row (no EOS), temperature 1. Strings in, "
        f"strings out on both sides. Rounds tunix -> ours, {r['warmup']} warm-up discarded, median (min-max) of "
        f"{r['runs']}. Load average {r['loadavg']['start']} at the start, {r['loadavg']['end']} at the end.",
        "",
        common.markdown_table(["sampler", "s per call", "tokens/s", "notes"], rows, [False, True, True, False]),
        "",
        f"**tunix_sampler_ratio = {fmt(r['sampler_ratio'], 2)}x** (per round: tunix seconds / our seconds).",
        "",
        "GRPO step vs tunix's `GRPOLearner`: not raced yet (see the script's docstring).",
        "",
        f"Reproduce (repository root, in .venv-tunix): `{command}`",
        "",
    ])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--group", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", default=str(common.RESULTS))
    parser.add_argument("--out-name", default="bench_vs_tunix")
    args = parser.parse_args(argv)
    try:
        import tunix  # noqa: F401
    except ImportError as error:
        raise SystemExit(f"google-tunix is not importable here ({error}); run in .venv-tunix (see the docstring)")
    result = run(args)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.out_name}.json").write_text(json.dumps(result, indent=2))
    (out / f"{args.out_name}.md").write_text(render_markdown(result, common.command_line("bench_vs_tunix", argv)))
    print(json.dumps({k: result[k] for k in ("tokens_per_s", "sampler_ratio")}, indent=2))
    print(f"tunix_sampler_ratio={result['sampler_ratio']['median']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
