"""Per-device memory of each real-scale recipe's RL update step, AOT-compiled on abstract shapes (no weights).

For configs/qwen3b.py, qwen7b.py and llava7b.py: build the update step the loop runs with the training sharding
layout on the recipe's mesh over 8 devices, compile it at reduced depth, extrapolate to the full depth
(`balcap_jax.trainer.aot.full_depth_estimate`: exact per-layer state bytes, per-layer activation bytes of the
rematerialised stacks), and write experiments/results/memory.md and memory.json.

Reproduce (CPU, 8 fake devices, a few minutes per recipe):
    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu python experiments/memory_table.py
Add --cpu-slopes to also compile two deeper variants per recipe and report XLA:CPU's own per-layer slopes
(which ignore rematerialisation; see the caveats in the written file).
The last line printed is `max_peak_gib=<float> fits_80gb=<bool>`.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import sys
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402

from balcap_jax.trainer import aot  # noqa: E402

RESULTS = ROOT / "experiments" / "results"
RECIPES = ("qwen3b", "qwen7b", "llava7b")
BUDGET_BYTES = 80e9

CAVEATS = """\
## How the per-device figure is computed

* `peak = arguments + outputs - aliased + temp`, all from `compiled.memory_analysis()` of the SPMD-partitioned
  program, i.e. **per device**. Arguments are this device's shards of the train state (fp32 params + two fp32
  AdamW moments, FSDP over 8 devices) and of the batch; the state is donated, so the new state aliases it. The
  sum treats every buffer as live at once (an upper bound of XLA's own plan).
* "state" is computed exactly from the abstract shapes and shardings (no compile involved).
* Depth: every recipe is compiled at the reduced depths (text layers, vision blocks) of the "how" column and
  **extrapolated linearly to full depth**: arguments / outputs / aliased grow by the exact per-layer state bytes;
  temp grows per layer by that layer's gradient + one update buffer (2 x its per-device parameter bytes) plus,
  for a rematerialised stack, its checkpointed input (`[B / micro_batches / 8, T, D]` in bf16 for the decoder,
  the flat `[patches, 1280]` sequence for Qwen's vision tower). LLaVA's CLIP tower is not rematerialised: its
  per-layer temp is XLA's measured slope from one compile a layer deeper.

## Caveats

* **XLA:CPU ignores rematerialisation in unrolled layer loops.** Measured here: a stack of `jax.checkpoint`ed
  layers compiled by XLA:CPU has exactly the temp of the same stack without checkpointing (the CPU pipeline
  expands the optimization barriers and CSEs the recomputation into the forward pass; with CSE disabled its
  scheduler still hoists the recomputations), while the same layers under `lax.scan` keep only their inputs.
  XLA:CPU's own per-layer slopes for Qwen2.5-VL-7B: {cpu_slopes}; extrapolated with them the step would need
  the no-remat footprint ({cpu_peak}), which is why the table uses the remat model above. That XLA:GPU/TPU keep
  the recomputation (as JAX trainers rely on) could not be checked on this machine (no accelerator).
* The plan is XLA:CPU's: its fusion and layout choices (and fp32 computation of some bf16 ops) differ from
  XLA:GPU/TPU, and it counts none of the runtime's own reservations (CUDA context, cuBLAS/cuDNN workspaces,
  NCCL buffers, allocator fragmentation): keep ~10 GB of headroom on an 80 GB device.
* The rollout programs sample with the trained params in the training (FSDP) layout, as the loop does; XLA:CPU
  keeps every layer's gathered fp32 weights live in them (their temp grows ~1 GiB per 7B layer), which is
  about what a separate no-FSDP sampling copy would hold. Judges run on separate servers and are not counted.
* Qwen's vision inputs are one flat patch sequence replicated on every device (each image encoded once, its
  tokens gathered G times); the update step therefore runs with `train.micro_batches = 1` (micro-batching needs
  every batch leaf batched on axis 0). LLaVA's pixel_values are one image per row, split like the batch.
"""


def load_recipe(name: str):
    spec = importlib.util.spec_from_file_location(f"recipe_{name}", ROOT / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def regime(config) -> str:
    return (
        f"P={config.data.prompts_per_batch} x G={config.sampling.group_size} = "
        f"{config.data.prompts_per_batch * config.sampling.group_size} seq, T={max(config.data.prompt_buckets)}+"
        f"{config.sampling.max_new_tokens}, micro_batches={config.train.micro_batches}"
    )


def rollout_table(rollouts) -> list[str]:
    """Markdown rows for the sampler's programs (empty when they were not compiled)."""
    if not rollouts:
        return []
    g = lambda n: f"{n / aot.GIB:.2f}"  # noqa: E731
    rows = [
        "## Rollout programs (sampler prefill + decode, same params, training layout)",
        "",
        "Fitted from compiles at three reduced depths with XLA's own per-layer slopes (no backward pass, so no "
        "remat question). `while sampling` adds the optimizer state that stays resident during rollouts.",
        "",
        "| recipe | program | depths compiled | arguments | outputs | aliased | temp | peak | while sampling (GiB) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, programs in rollouts.items():
        for program in programs:
            rows.append(
                f"| {name} | {program.name.rsplit(' ', 1)[-1]} | {', '.join(str(d) for d in program.depths_compiled)} "
                f"| {g(program.argument_bytes)} | {g(program.output_bytes)} | {g(program.alias_bytes)} "
                f"| {g(program.temp_bytes)} | {g(program.peak_bytes)} "
                f"| **{g(program.peak_bytes + program.state_bytes)}** |"
            )
    rows.append("")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=RECIPES)
    parser.add_argument("--skip-sampler", action="store_true", help="only the update step")
    parser.add_argument("--cpu-slopes", action="store_true", help="also extrapolate with XLA:CPU's own slopes")
    args = parser.parse_args()
    if jax.device_count() != 8:
        raise SystemExit(f"needs 8 devices (got {jax.device_count()}); set XLA_FLAGS before starting Python")

    reports, regimes, cpu_reports, rollouts = {}, {}, {}, {}
    for name in args.recipes:
        config = load_recipe(name)
        regimes[name] = regime(config)
        reports[name] = aot.full_depth_estimate(config, name=name)
        print(reports[name].summary(), "\n  ", reports[name].notes, flush=True)
        if not args.skip_sampler:
            rollouts[name] = aot.sampler_full_depth(config, name=name)
            for program in rollouts[name]:
                print("  ", program.summary(), f"+ resident optimizer state {program.state_bytes / aot.GIB:.2f} GiB",
                      flush=True)
        if args.cpu_slopes:
            _, model_config = aot.model_config_for(config)
            base = reports[name].depths_compiled[0]
            depths = [base, (base[0] + 1, base[1]), (base[0], base[1] + 1)]
            compiled = [aot.compile_update_step(config, depth=d, name=name) for d in depths]
            cpu_reports[name] = aot.extrapolate_by_depth(compiled, aot.model_depth(model_config))
            print("  XLA:CPU slopes:", cpu_reports[name].summary(), flush=True)

    g = lambda n: f"{n / aot.GIB:.1f} GiB"  # noqa: E731
    q7 = cpu_reports.get("qwen7b")
    if q7 is None:
        cpu_slopes = (
            "not measured in this run (use --cpu-slopes); when this file was first written, compiles at depths "
            "(1, 1), (2, 1), (1, 2) gave +12.1 GiB temp per decoder layer and +1.45 GiB per vision block"
        )
        cpu_peak = "about 400 GiB per device"
    else:
        cpu_slopes = "see `xla_cpu_slopes` in memory.json"
        cpu_peak = g(q7.peak_bytes)
    lines = [
        "# Per-device memory of the RL step's programs (AOT, abstract shapes, 8-device mesh)",
        "",
        f"Generated by `python experiments/memory_table.py` on {platform.node()} (JAX {jax.__version__}, "
        f"{jax.default_backend()} backend, {datetime.date.today()}). Budget: 80 GB per device.",
        "",
        "Sizes in GiB per device; `peak` is the figure checked against the budget by "
        "`tests/train/test_train_aot_memory.py`.",
        "",
        *aot.memory_table_rows(reports),
        "",
        "| recipe | batch regime | per-layer growth |",
        "|---|---|---|",
        *[f"| {n} | {regimes[n]} | {reports[n].notes} |" for n in reports],
        "",
        *rollout_table(rollouts),
        CAVEATS.format(cpu_slopes=cpu_slopes, cpu_peak=cpu_peak),
    ]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "memory.md").write_text("\n".join(lines))
    payload = {
        "budget_bytes": BUDGET_BYTES,
        "backend": jax.default_backend(),
        "jax": jax.__version__,
        "recipes": {n: r.to_dict() | {"regime": regimes[n]} for n, r in reports.items()},
        "xla_cpu_slopes": {n: r.to_dict() for n, r in cpu_reports.items()},
        "rollout": {n: {"prefill": p.to_dict(), "decode": d.to_dict()} for n, (p, d) in rollouts.items()},
    }
    (RESULTS / "memory.json").write_text(json.dumps(payload, indent=2, default=str))
    phases = [r.peak_bytes for r in reports.values()]
    phases += [p.peak_bytes + p.state_bytes for pair in rollouts.values() for p in pair]
    print(f"max_peak_gib={max(phases) / aot.GIB:.2f} fits_80gb={max(phases) <= BUDGET_BYTES}")


if __name__ == "__main__":
    main()
