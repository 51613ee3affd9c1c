"""Compile targets of the AOT tool: which devices a program is compiled for, without owning any of them.

    spec = parse_target("tpu:v5p:4x4x2")      # or "gpu:h100:1x2x8", "gpu:h200:1x1x8", "local"
    devices = target_devices(spec)            # 32 TPU v5p chips on 8 hosts, as the TPU compiler sees them

TPU: libtpu (`pip install balcap_jax[aot-tpu]`) describes any slice by its topology name and runs the real TPU
compiler on it. GPU: the CUDA plugin (`balcap_jax[aot-gpu]`) describes `slices x hosts x GPUs` of one GPU model
from a `GpuTargetConfigProto` (the device description XLA:GPU tunes its kernels and its memory schedule for), so
the description carries the card's real memory size. "local": the devices this process already has (8 fake CPU
devices in tests), a quick check of shapes and shardings only: XLA:CPU's memory plan is not an accelerator's.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import re
from collections.abc import Sequence

import jax

GIB = 1024**3

# HBM per chip, GiB (Cloud TPU system architecture pages). Keys: the generation prefix of a topology name.
TPU_HBM_GIB: dict[str, int] = {"v4": 32, "v5e": 16, "v5litepod": 16, "v5p": 95, "v6e": 32}


@dataclasses.dataclass(frozen=True)
class GpuModel:
    """What XLA:GPU needs to know about one card (NVIDIA's published figures for the SXM parts).

    memory_bytes: the device memory CUDA reports (what XLA's scheduler budgets against), not the marketing GB.
    """

    name: str
    description: str
    memory_bytes: int
    memory_bandwidth: int  # bytes / s
    core_count: int  # streaming multiprocessors
    clock_rate_ghz: float
    l2_cache_bytes: int
    compute_capability: tuple[int, int]

    def target_config(self, *, cudnn: tuple[int, int, int] = (9, 8, 0), cuda: tuple[int, int, int] = (12, 8, 0)) -> str:
        """`GpuTargetConfigProto` text for this card (Hopper: 2048 threads and 228 KiB shared memory per SM)."""
        major, minor = self.compute_capability
        return "\n".join([
            "gpu_device_info {",
            "  threads_per_block_limit: 1024",
            "  threads_per_warp: 32",
            "  shared_memory_per_block: 49152",
            "  shared_memory_per_core: 233472",
            "  threads_per_core_limit: 2048",
            f"  core_count: {self.core_count}",
            "  fpus_per_core: 128",
            "  block_dim_limit_x: 2147483647",
            "  block_dim_limit_y: 65535",
            "  block_dim_limit_z: 65535",
            f"  memory_bandwidth: {self.memory_bandwidth}",
            f"  l2_cache_size: {self.l2_cache_bytes}",
            f"  clock_rate_ghz: {self.clock_rate_ghz}",
            f"  device_memory_size: {self.memory_bytes}",
            "  shared_memory_per_block_optin: 232448",
            f"  cuda_compute_capability {{ major: {major} minor: {minor} }}",
            "  registers_per_core_limit: 65536",
            "  registers_per_block_limit: 65536",
            "}",
            'platform_name: "CUDA"',
            f"dnn_version_info {{ major: {cudnn[0]} minor: {cudnn[1]} patch: {cudnn[2]} }}",
            f"runtime_version {{ major: {cuda[0]} minor: {cuda[1]} patch: {cuda[2]} }}",
            f'device_description_str: "{self.description}"',
            "",
        ])


GPU_MODELS: dict[str, GpuModel] = {
    "h100": GpuModel("h100", "NVIDIA H100 80GB HBM3", memory_bytes=81559 * 2**20, memory_bandwidth=3_350_000_000_000,
                     core_count=132, clock_rate_ghz=1.98, l2_cache_bytes=50 * 2**20, compute_capability=(9, 0)),
    "h200": GpuModel("h200", "NVIDIA H200", memory_bytes=143771 * 2**20, memory_bandwidth=4_800_000_000_000,
                     core_count=132, clock_rate_ghz=1.98, l2_cache_bytes=50 * 2**20, compute_capability=(9, 0)),
}

# What to install for each compiler (the extras of setup.py, at the pinned jax version).
INSTALL_HINT = {"tpu": "pip install 'balcap_jax[aot-tpu]'", "gpu": "pip install 'balcap_jax[aot-gpu]'"}
_PLUGIN_MODULE = {"tpu": "libtpu", "gpu": "jax_cuda12_plugin"}


@dataclasses.dataclass(frozen=True)
class TargetSpec:
    """A parsed --target. kind: "tpu" | "gpu" | "local". chip: "v5p", "h100", ... ("cpu" for local).
    topology: the TPU topology name ("v5p:4x4x2") or the GPU "slices x hosts x gpus" string ("1x2x8")."""

    text: str
    kind: str
    chip: str
    topology: str
    hbm_bytes: int

    @property
    def label(self) -> str:
        if self.kind == "local":
            return "local (this process's devices; XLA:CPU plan, a quick check only)"
        return self.text


def _tpu_generation(topology: str) -> str:
    return topology.split(":", 1)[0].lower()


def parse_target(text: str, *, local_hbm_bytes: int = 80 * 10**9) -> TargetSpec:
    """'tpu:<topology>' | 'gpu:<h100|h200>:<slices>x<hosts>x<gpus>' | 'local' -> TargetSpec; raises naming the fix.

    local_hbm_bytes: the budget a local (CPU) check is judged against (default: an 80 GB accelerator)."""
    if text == "local":
        return TargetSpec(text, "local", "cpu", "", int(local_hbm_bytes))
    kind, _, rest = text.partition(":")
    if kind == "tpu":
        generation = _tpu_generation(rest)
        if generation not in TPU_HBM_GIB or not re.fullmatch(r"[a-z0-9]+:\d+(x\d+){1,2}", rest):
            raise ValueError(
                f"--target={text!r}: a TPU target is tpu:<generation>:<topology>, e.g. tpu:v5p:4x4x2 or tpu:v6e:8x8 "
                f"(known generations: {sorted(TPU_HBM_GIB)})"
            )
        return TargetSpec(text, "tpu", generation, rest, TPU_HBM_GIB[generation] * GIB)
    if kind == "gpu":
        model, _, topology = rest.partition(":")
        if model not in GPU_MODELS or not re.fullmatch(r"\d+x\d+x\d+", topology):
            raise ValueError(
                f"--target={text!r}: a GPU target is gpu:<model>:<slices>x<hosts>x<gpus per host>, e.g. "
                f"gpu:h100:1x2x8 (known models: {sorted(GPU_MODELS)})"
            )
        return TargetSpec(text, "gpu", model, topology, GPU_MODELS[model].memory_bytes)
    raise ValueError(f"--target={text!r}: use tpu:<topology> (tpu:v5p:4x4x2), gpu:<model>:<SxHxG> (gpu:h100:1x2x8) "
                     "or local")


def compiler_installed(kind: str) -> bool:
    """Whether the deviceless compiler for `kind` ("tpu" | "gpu") is importable in this environment."""
    return importlib.util.find_spec(_PLUGIN_MODULE[kind]) is not None


def target_devices(spec: TargetSpec) -> Sequence[jax.Device]:
    """The devices of `spec` as the target's compiler sees them (none of them needs to exist here)."""
    if spec.kind == "local":
        return jax.devices()
    if not compiler_installed(spec.kind):
        raise RuntimeError(f"--target={spec.text} needs the {spec.kind.upper()} compiler: {INSTALL_HINT[spec.kind]}")
    from jax.experimental import topologies

    if spec.kind == "tpu":
        return topologies.get_topology_desc(platform="tpu", topology_name=spec.topology).devices
    # "cuda", not "gpu": the plugin registers itself under its CUDA platform name.
    config = GPU_MODELS[spec.chip].target_config()
    return topologies.get_topology_desc(platform="cuda", target_config=config, topology=spec.topology).devices


def host_count(devices: Sequence[jax.Device]) -> int:
    return len({d.process_index for d in devices})
