"""What a user's real run looks like, at toy size, built offline (not collected: helpers for the real-path tests).

  qwen_hf_dir(dir)       a random Qwen2.5-VL over the real Qwen vocabulary, saved by transformers: config,
                         safetensors, generation config (two EOS ids), the packaged Qwen tokenizer, and a
                         preprocessor config allowing ~12.8 MP images (the released checkpoints' value)
  llava_hf_dir(dir)      a random LLaVA-1.5 with a tokenizer that knows '<image>'
  photo_manifests(dir)   JSONL manifests of scikit-image's photographs at their native sizes (PNG and JPEG)
  judge_servers()        two loopback OpenAI-compatible judge servers (text and visual) answering in the
                         prompts' JSON forms (`tests.rewards.rewards_fake_server`)
  launch(...)            `python -m balcap_jax.train` as N processes on 127.0.0.1, bounded in time, killed on exit
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from tests.conftest import CPU_COLLECTIVE_TIMEOUT

ROOT = Path(__file__).resolve().parents[2]
IM_END, END_OF_TEXT = 151645, 151643

# (skimage name, file format): colour, grey, RGBA and multi-megapixel-ish photographs at their native sizes.
PHOTOS = (
    ("astronaut", "png"), ("coffee", "jpeg"), ("chelsea", "png"), ("rocket", "jpeg"), ("cat", "jpeg"),
    ("hubble_deep_field", "jpeg"), ("immunohistochemistry", "png"), ("retina", "jpeg"), ("colorwheel", "png"),
    ("coins", "png"), ("camera", "jpeg"), ("clock", "png"), ("logo", "png"), ("page", "png"), ("brick", "jpeg"),
    ("text", "png"), ("moon", "jpeg"), ("grass", "png"), ("gravel", "jpeg"), ("horse", "png"),
)


def qwen_hf_dir(directory: Path, *, max_pixels: int = 12845056) -> str:
    import torch
    import transformers

    from balcap_jax.models.qwen2_5_vl import config as qwen_ids
    from balcap_jax.models.qwen2_5_vl.processor import packaged_tokenizer_dir
    from tests.models.qwen_fixtures import tiny_qwen_config_dict

    directory = Path(directory)
    spec = tiny_qwen_config_dict(tie_word_embeddings=True, text_layers=1, vision_depth=1)
    spec["text_config"] |= dict(vocab_size=151936, bos_token_id=IM_END, eos_token_id=IM_END)
    spec |= dict(image_token_id=qwen_ids.IMAGE_TOKEN_ID, video_token_id=qwen_ids.IMAGE_TOKEN_ID + 1,
                 vision_start_token_id=qwen_ids.VISION_START_TOKEN_ID, vision_end_token_id=qwen_ids.VISION_END_TOKEN_ID)
    torch.manual_seed(0)
    transformers.Qwen2_5_VLForConditionalGeneration(transformers.Qwen2_5_VLConfig(**spec)).save_pretrained(directory)
    for name in os.listdir(packaged_tokenizer_dir()):
        shutil.copy(os.path.join(packaged_tokenizer_dir(), name), directory)
    (directory / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": END_OF_TEXT, "eos_token_id": [IM_END, END_OF_TEXT], "pad_token_id": END_OF_TEXT}))
    (directory / "preprocessor_config.json").write_text(json.dumps({
        "min_pixels": 3136, "max_pixels": max_pixels, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
        "image_processor_type": "Qwen2VLImageProcessor",
    }))
    return str(directory)


def llava_hf_dir(directory: Path) -> str:
    """No Llama tokenizer ships offline: the packaged Qwen tokenizer with '<image>' added stands in for it."""
    import torch
    import transformers

    from balcap_jax.models.qwen2_5_vl.processor import load_tokenizer

    tokenizer = load_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, image_size=56, patch_size=14)
    text = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    config = transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_id,
                                      image_seq_length=16)
    torch.manual_seed(0)
    transformers.LlavaForConditionalGeneration(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


def _photo(name: str) -> np.ndarray:
    import skimage.data

    image = np.asarray(getattr(skimage.data, name)())
    if image.dtype == bool:
        image = image.astype(np.uint8) * 255
    return image


def photo_manifests(directory: Path, *, num_train: int = 12, num_eval: int = 8) -> tuple[str, str]:
    """(train manifest, eval manifest): the first `num_train` photographs, then the next `num_eval` (cycling
    through the list with new ids if it runs out). Image paths are relative to the manifests' folder."""
    import PIL.Image

    directory = Path(directory)
    (directory / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(num_train + num_eval):
        name, fmt = PHOTOS[i % len(PHOTOS)]
        image = _photo(name)
        path = directory / "images" / f"{i:02d}_{name}.{'jpg' if fmt == 'jpeg' else 'png'}"
        pil = PIL.Image.fromarray(image)
        if fmt == "jpeg" and pil.mode not in ("RGB", "L"):
            pil = pil.convert("RGB")
        pil.save(path, format=fmt.upper())
        words = name.replace("_", " ")
        rows.append({"id": f"{i:02d}_{name}", "image": f"images/{path.name}",
                     "references": [f"A photograph of the {words}. The {words} fills most of the frame."]})
    train, evaluation = directory / "train.jsonl", directory / "eval.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows[:num_train]))
    evaluation.write_text("".join(json.dumps(r) + "\n" for r in rows[num_train:]))
    return str(train), str(evaluation)


@contextlib.contextmanager
def judge_servers():
    """(llm_url, vlm_url) of two loopback judge servers, each in its own process."""
    from tests.rewards.rewards_fake_server import ServerSpec, serve_in_subprocess

    with serve_in_subprocess(ServerSpec()) as llm, serve_in_subprocess(ServerSpec()) as vlm:
        yield llm, vlm


def judge_flags(llm_url: str, vlm_url: str) -> list[str]:
    return [f"--config.rewards.judge.llm_url={llm_url}", "--config.rewards.judge.llm_model=fake-llm",
            f"--config.rewards.judge.vlm_url={vlm_url}", "--config.rewards.judge.vlm_model=fake-vlm"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Launch:
    """`num_processes` processes of `python -m balcap_jax.train`, each with `devices` fake CPU devices."""

    def __init__(self, flags: list[str], workdir: Path, *, num_processes: int = 1, devices: int = 8,
                 module: str = "balcap_jax.train"):
        self.workdir = Path(workdir)
        port = free_port()
        env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu",
               "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices} {CPU_COLLECTIVE_TIMEOUT}"}
        self.logs = [self.workdir.with_name(f"{self.workdir.name}.log{i}") for i in range(num_processes)]
        self.procs = []
        for i in range(num_processes):
            dist = ([f"--config.distributed.num_processes={num_processes}", f"--config.distributed.process_id={i}",
                     f"--config.distributed.coordinator_address=127.0.0.1:{port}"] if num_processes > 1 else [])
            log = open(self.logs[i], "ab")
            self.procs.append(subprocess.Popen(
                [sys.executable, "-m", module, f"--workdir={workdir}", *flags, *dist],
                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True,
            ))

    def wait(self, timeout: float) -> list[str]:
        """Waits for every process; returns their logs. Raises (after killing them) on a timeout or a failure."""
        deadline = time.monotonic() + timeout
        try:
            for proc in self.procs:
                proc.wait(max(deadline - time.monotonic(), 1))
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"training did not finish in {timeout} s:\n{self.tail()}") from None
        codes = [p.returncode for p in self.procs]
        if any(codes):
            raise AssertionError(f"training failed with exit codes {codes}:\n{self.tail()}")
        return [log.read_text(errors="replace") for log in self.logs]

    def kill_after_checkpoint(self, step: int, timeout: float) -> None:
        """kill -9 every process once the checkpoint of `step` is complete on disk."""
        done = self.workdir / "checkpoints" / str(step) / "_CHECKPOINT_METADATA"
        deadline = time.monotonic() + timeout
        while not done.exists():
            if time.monotonic() > deadline or any(p.poll() is not None for p in self.procs):
                self.kill()
                raise AssertionError(f"no checkpoint {step} appeared before the processes ended:\n{self.tail()}")
            time.sleep(0.1)
        self.kill()

    def kill(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        for proc in self.procs:
            proc.wait(30)

    def tail(self, chars: int = 4000) -> str:
        return "\n".join(f"--- process {i}\n{log.read_text(errors='replace')[-chars:]}"
                         for i, log in enumerate(self.logs))


def metric_rows(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def safetensors_weights(directory: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    out = {}
    for path in sorted(Path(directory).glob("*.safetensors")):
        out.update(load_file(path))
    return out
